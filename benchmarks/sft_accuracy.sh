#!/usr/bin/env bash
# SFT as in the quickstart: held-out tool-choice accuracy with and without perception cues.
#
#   bash benchmarks/sft_accuracy.sh            # ~3 min of expert search, then two ~9 min SFT runs
#
# Data: the quickstart's (the 8 built-in photos x group A's 8 pairs x 6 random 128 px crops,
# seed 0). Held out (never trained on): chelsea and stereo_motorcycle (tir/trainer/sft.py
# DEFAULT_HELDOUT), all 96 of their rows scored. Recipe: quickstart_weight_free (12 epochs of 8 rows, one
# tool per subtask, tool names only in the prompt, the combination expert rule).
# Prints each run's summary.json (accuracy before and after SFT, steps, training seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/sft_acc}

[ -f "$RUN/data/train.parquet" ] || $PY -m tir.cli data synth --combos groupA --per-image 6 --crop 128 --crop-mode random \
  --seed 0 --no-progress --out "$RUN/data/train.parquet"
# resumable: rerun after a kill and finished shards are kept
$PY -m tir.data.expert --in "$RUN/data/train.parquet" --out "$RUN/data/sft.parquet" --recipe quickstart_weight_free --no-progress \
  run.output_dir="$RUN"
[ -d "$RUN/tiny_policy" ] || $PY -m tir.cli model tiny --out "$RUN/tiny_policy"
$PY benchmarks/expert_labels.py "$RUN/data/sft.parquet"

sft() {  # $1: output folder, then recipe overrides
  local out=$1; shift
  $PY -c 'import sys; from tir.trainer.sft import sft_main; sys.exit(sft_main(sys.argv[1:]))' \
    recipe=quickstart_weight_free run.output_dir="$out" model.path="$RUN/tiny_policy" sft.data_path="$RUN/data/sft.parquet" "$@"
  cat "$out/sft/summary.json"
}
sft "$RUN/cues" model.perception_cues=true
sft "$RUN/no_cues" model.perception_cues=false
