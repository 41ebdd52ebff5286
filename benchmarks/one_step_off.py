"""One-step-off RL against synchronous RL: steps per hour at equal held-out quality, and a timing
model that predicts the gain where rollout and training run on devices of their own.

    # the two runs: benchmarks/rl_gain.py from one SFT checkpoint, same seeds, same machine
    .venv/bin/python benchmarks/rl_gain.py --recipe quickstart --sft runs/quickstart/sft/hf --steps 12 \
        --seeds 0,1,2 --out runs/one_step_off/sync
    .venv/bin/python benchmarks/rl_gain.py --recipe quickstart --sft runs/quickstart/sft/hf --steps 12 \
        --seeds 0,1,2 --out runs/one_step_off/ahead trainer.rollout_mode=one_step_off
    # the comparison and the model
    .venv/bin/python benchmarks/one_step_off.py --sync runs/one_step_off/sync --ahead runs/one_step_off/ahead

Reads each seed's ``rl/metrics.jsonl`` (the step's wall time ``time/step`` and its phases) and
``results.json`` (held-out PSNR per seed). Step 1 is left out of the step times: in one-step-off
mode nothing runs ahead of it.

The timing model. A step's phases fall in three parts:
- R, the rollout side: ``rollout`` (generation and tool calls) and ``score`` (the pool scores the
  final images);
- T, the training side: ``reference`` and ``old_logprobs`` (forward passes) and ``update``;
- S, the serial rest: ``reward``, ``weight_sync``, dump and checkpoint waits, logging.

Synchronous: R + T + S. One-step-off: max(R, T) + S + c * min(R, T), where c is the share of the
overlapped time lost to contention: 0 when rollout and training have devices of their own (verl's
one-step-off recipe gives them separate GPUs), up to 1 when they share every core. ``c`` is
fitted on this machine's two runs and printed; the prediction for separate devices uses c = 0
with the measured shares of R and T, and a table over the share R / (R + T).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROLLOUT = ("rollout", "score")
TRAINING = ("reference", "old_logprobs", "update")


def phase_split(record: dict) -> tuple[float, float, float]:
    """(R, T, S) seconds of one logged step (see the module docstring). In one-step-off mode the
    step's ``rollout`` and ``score`` ran during the previous step; what the driver waited for them
    is ``rollout_wait``."""
    rollout = sum(record.get(f"time/{p}", 0.0) for p in ROLLOUT)
    training = sum(record.get(f"time/{p}", 0.0) for p in TRAINING)
    serial = record["time/step"] - training - record.get("time/rollout_wait", rollout)
    return rollout, training, max(0.0, serial)


def predicted_step(rollout: float, training: float, serial: float, contention: float) -> float:
    """A one-step-off step's seconds: the longer side, the serial part, and the share
    ``contention`` of the shorter side that overlapping did not hide."""
    return max(rollout, training) + serial + contention * min(rollout, training)


def fitted_contention(sync: tuple[float, float, float], ahead_step: float) -> float:
    """The ``c`` that makes the model give the measured one-step-off step from the sync phases."""
    rollout, training, serial = sync
    hidden = min(rollout, training)
    if hidden <= 0:
        return 0.0
    return float(np.clip((ahead_step - max(rollout, training) - serial) / hidden, 0.0, 1.0))


def gain_for_share(share: float, serial_share: float = 0.05) -> float:
    """Sync step / one-step-off step on separate devices (c = 0), for a rollout share
    R / (R + T) and a serial part ``serial_share`` of the sync step."""
    work = 1.0 - serial_share
    rollout, training = share * work, (1.0 - share) * work
    return 1.0 / predicted_step(rollout, training, serial_share, 0.0)


def read_run(folder: Path) -> dict:
    """Per seed: its step records (step 1 left out) and held-out PSNR (from rl_gain's results.json)."""
    results = json.loads((folder / "results.json").read_text())
    seeds = {}
    for run in results["runs"]:
        seed = run["seed"]
        records = [json.loads(line) for line in (folder / f"seed_{seed}" / "rl" / "metrics.jsonl").open()]
        seeds[seed] = {"records": [r for r in records if r["step"] > 1], "tests": run["eval"]}
    return {"results": results, "seeds": seeds}


def mean_std(values) -> str:
    values = np.asarray(list(values), dtype=float)
    return f"{values.mean():.2f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.2f}"


def report(sync: dict, ahead: dict) -> str:
    lines = ["| mode | seeds | s per step | steps per hour | R s | T s | S s | held-out PSNR |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    rows = {}
    for name, run in (("sync", sync), ("one_step_off", ahead)):
        steps = [r["time/step"] for s in run["seeds"].values() for r in s["records"]]
        split = np.array([phase_split(r) for s in run["seeds"].values() for r in s["records"]]).mean(axis=0)
        psnr = {
            t: [s["tests"][t]["psnr"] for s in run["seeds"].values()]
            for t in next(iter(run["seeds"].values()))["tests"]
        }
        rows[name] = {"step": float(np.mean(steps)), "split": split, "psnr": psnr}
        quality = "; ".join(f"{t} {mean_std(v)}" for t, v in psnr.items())
        lines.append(
            f"| {name} | {len(run['seeds'])} | {np.mean(steps):.1f} | {3600 / np.mean(steps):.0f} | "
            f"{split[0]:.1f} | {split[1]:.1f} | {split[2]:.1f} | {quality} |"
        )
    ratio = rows["sync"]["step"] / rows["one_step_off"]["step"]
    lines.append("")
    lines.append(f"steps per hour, one_step_off / sync: {ratio:.2f}x (this machine)")
    for test in rows["sync"]["psnr"]:
        delta = np.mean(rows["one_step_off"]["psnr"][test]) - np.mean(rows["sync"]["psnr"][test])
        lines.append(f"held-out PSNR, one_step_off - sync, {test}: {delta:+.2f} dB (mean over seeds)")
    rollout, training, serial = rows["sync"]["split"]
    c = fitted_contention(tuple(rows["sync"]["split"]), rows["one_step_off"]["step"])
    total = rollout + training + serial
    lines.append("")
    lines.append(
        f"timing model (sync phases R {rollout:.1f} s, T {training:.1f} s, S {serial:.1f} s): contention fitted here "
        f"c = {c:.2f}; predicted with c = {c:.2f}: {total / predicted_step(rollout, training, serial, c):.2f}x; "
        f"on separate devices (c = 0): {total / predicted_step(rollout, training, serial, 0.0):.2f}x"
    )
    lines.append("")
    lines.append("| rollout share R/(R+T) | 0.3 | 0.4 | 0.5 | 0.6 | 0.7 | 0.8 |")
    lines.append("|---|---|---|---|---|---|---|")
    lines.append(
        "| predicted gain, separate devices, serial 5% | "
        + " | ".join(f"{gain_for_share(s):.2f}x" for s in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8))
        + " |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sync", required=True, help="rl_gain --out folder of the synchronous runs")
    parser.add_argument("--ahead", required=True, help="rl_gain --out folder of the one-step-off runs")
    args = parser.parse_args(argv)
    for folder in (args.sync, args.ahead):
        if not (Path(folder) / "results.json").is_file():
            parser.error(f"{folder}: no results.json (run benchmarks/rl_gain.py --out {folder} first)")
    print(report(read_run(Path(args.sync)), read_run(Path(args.ahead))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
