#!/usr/bin/env bash
# SFT on the tiny CPU recipe: held-out tool-choice accuracy with and without perception cues.
#
#   bash benchmarks/sft_accuracy.sh            # ~10 min of expert search, then two SFT runs
#
# Data: the 8 built-in photos x group A (8 pairs of degradations) x 6 random 128 px crops.
# Held out (never trained on): chelsea and stereo_motorcycle (tir/trainer/sft.py DEFAULT_HELDOUT).
# Prints each run's summary.json (accuracy before and after SFT, steps, training seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/sft_acc}

[ -f "$RUN/data/train.parquet" ] || $PY -m tir.cli data synth --combos groupA --per-image 6 --crop 128 --crop-mode random \
  --seed 0 --no-progress --out "$RUN/data/train.parquet"
# resumable: rerun after a kill and finished shards are kept
$PY -m tir.expert --in "$RUN/data/train.parquet" --out "$RUN/data/sft.parquet" --recipe sft_tiny_cpu --no-progress \
  run.output_dir="$RUN"
[ -d "$RUN/tiny_policy" ] || $PY -m tir.cli model tiny --out "$RUN/tiny_policy"

sft() {  # $1: output folder, then recipe overrides
  local out=$1; shift
  mkdir -p "$out/data" && ln -sf "$(realpath "$RUN/data/sft.parquet")" "$out/data/sft.parquet"
  $PY -c 'import sys; from tir.trainer.sft import sft_main; sys.exit(sft_main(sys.argv[1:]))' \
    recipe=sft_tiny_cpu run.output_dir="$out" model.path="$RUN/tiny_policy" "$@"
  cat "$out/sft/summary.json"
}
sft "$RUN/cues" model.perception_cues=true
sft "$RUN/no_cues" model.perception_cues=false
