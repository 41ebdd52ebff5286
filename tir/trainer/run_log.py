"""What a training run reports, every step: a progress bar with a one-line summary on the
console, one JSON object per line in ``metrics.jsonl``, and TensorBoard scalars.

    with RunLogger(out_dir, total_steps=100, start_step=first_step) as log:
        log.step(step, {"reward/mean": 0.1, "time/step": 12.0, ...})

Steps count from 1. A resumed run starts at the step after its checkpoint; a killed run may
have logged steps past that checkpoint, which the resumed run repeats. So ``metrics.jsonl`` is
cut back to the steps before ``start_step`` when the logger opens (a fresh run, ``start_step=1``,
starts it empty), and TensorBoard purges events from ``start_step`` on: each step appears once.

TensorBoard goes through ``torch.utils.tensorboard``, which needs the ``tensorboard`` package;
without it the run logs to the console and JSONL and says what to install.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

# The console line: (metric key, label, format); keys missing from a step are skipped.
CONSOLE = (
    ("reward/mean", "reward", "{:+.3f}"),
    ("reward/gain/psnr", "psnr", "{:+.2f}dB"),
    ("episode/tool_calls", "calls", "{:.2f}"),
    ("episode/format_errors", "fmt_err", "{:.2f}"),
    ("actor/kl", "kl", "{:.4f}"),
    ("actor/entropy", "entropy", "{:.3f}"),
    ("advantage/flat_groups", "flat", "{:.0%}"),
    ("explore/distinct_sequences", "distinct", "{:.2f}"),
    ("reward/gap_to_expert_db", "gap to expert", "{:.2f}dB"),
    ("sampling/groups_dropped", "dropped", "{:.0f}"),
    ("nll", "nll", "{:.3f}"),  # SFT
    ("grad_norm", "grad norm", "{:.2f}"),
    ("lr", "lr", "{:.2e}"),
)
TIMES = (
    "generate",
    "tools",
    "score",
    "reward",
    "reference",
    "old_logprobs",
    "update",
    "weight_sync",
    "dump",
    "checkpoint",
)


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def console_line(step: int, total: int, metrics: dict[str, Any]) -> str:
    """``step 3/10 | reward +0.120 psnr +1.52dB ... | 12.3s: rollout 8.1 (generate 5.0, tools 4.2) ...``"""
    parts = [
        f"{label} {fmt.format(metrics[key])}" for key, label, fmt in CONSOLE if _number(metrics.get(key)) is not None
    ]
    line = f"step {step}/{total} | " + " ".join(parts)
    if "time/step" in metrics:
        times = [f"{name} {metrics[f'time/{name}']:.1f}" for name in TIMES if _number(metrics.get(f"time/{name}"))]
        line += f" | {metrics['time/step']:.1f}s: rollout {metrics.get('time/rollout', 0.0):.1f} ({', '.join(times)})"
    return line


def keep_records_before(path: Path, step: int) -> int:
    """Rewrite a JSONL log without the records of ``step`` and later; how many were kept."""
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
        if record.get("step", -1) < step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(kept)


def read_records(path: str | Path) -> list[dict]:
    """Every record of a ``metrics.jsonl``, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def open_tensorboard(folder: Path, purge_step: int):
    """A SummaryWriter, or None (with the reason) when TensorBoard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        return None, f"TensorBoard logging is off ({err}); `pip install tensorboard` turns it on"
    return SummaryWriter(str(folder), purge_step=purge_step), None


class RunLogger:
    """Console (progress bar + a line every ``every`` steps), JSONL and TensorBoard."""

    def __init__(
        self,
        out_dir: str | Path,
        total_steps: int,
        start_step: int = 1,
        every: int = 1,
        tensorboard: bool = True,
        prefix: str = "rl",
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.total, self.every, self.prefix = total_steps, max(1, every), prefix
        self.jsonl = self.out_dir / "metrics.jsonl"
        keep_records_before(self.jsonl, start_step)
        self.writer, why_not = (
            open_tensorboard(self.out_dir / "tensorboard", start_step) if tensorboard else (None, None)
        )
        self.bar = tqdm(total=total_steps, initial=start_step - 1, desc=prefix, unit="step", dynamic_ncols=True)
        if why_not:
            self.print(why_not)

    def print(self, text: str) -> None:
        tqdm.write(f"[{self.prefix}] {text}")

    def record(self, step: int, record: dict[str, Any]) -> None:
        """A JSONL record at ``step`` that is not a step of its own (an evaluation): cut back
        with the steps on resume like every record, no console line, no progress."""
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **record}, default=float) + "\n")

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        """Log step ``step`` (from 1): JSONL always; TensorBoard every number; console every ``every``."""
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}, default=float) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                number = _number(value)
                if number is not None:
                    self.writer.add_scalar(key, number, step)
            self.writer.flush()
        self.bar.update(1)
        reward = _number(metrics.get("reward/mean"))
        if reward is not None:
            self.bar.set_postfix(reward=f"{reward:+.3f}", refresh=False)
        if step % self.every == 0 or step == self.total:
            self.print(console_line(step, self.total, metrics))
        warning = no_signal_warning(metrics)
        if warning:
            self.print(warning)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------ what a step reports
class StepTimer:
    """Seconds per phase of a step."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def breakdown(self, trajectories) -> dict[str, float]:
        """Every phase, plus the rollout's split: wall time with a generation in flight
        (``generate``) and with a tool call or cue in flight (``tools``); they overlap."""
        timings = trajectories.column("timings")
        out = {f"time/{phase}": s for phase, s in self.seconds.items()}
        out["time/generate"] = busy_seconds(timings, "generate")
        out["time/tools"] = busy_seconds(timings, "env")
        out["time/step"] = time.perf_counter() - self.started
        return out


def busy_seconds(timings: list[dict], kind: str) -> float:
    """Length of the union of every episode's ``kind`` spans (seconds something was in flight)."""
    spans = sorted((start, end) for t in timings for k, start, end in t["spans"] if k == kind)
    total, reached = 0.0, -math.inf
    for start, end in spans:
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


def committed_tools(trajectories) -> list[list[str]]:
    """Each trajectory's tool sequence: the names of its committed calls, in order."""
    return [[c["name"] for c in calls if c.get("committed", True)] for calls in trajectories.column("tool_calls")]


def episode_metrics(trajectories) -> dict[str, float]:
    def mean(column):
        return float(np.mean(trajectories.column(column)))

    stops = trajectories.column("stop_reason")
    out = {
        f"episode/{name}": mean(column)
        for name, column in (
            ("tool_calls", "num_tool_calls"),
            ("format_errors", "format_errors"),
            ("tool_errors", "tool_errors"),
            ("turns", "num_turns"),
        )
    }
    out["episode/tokens"] = float(np.mean([len(ids) for ids in trajectories.column("input_ids")]))
    out["episode/policy_tokens"] = float(np.mean([sum(mask) for mask in trajectories.column("loss_mask")]))
    out["episode/crashed"] = float(np.mean([bool(e) for e in trajectories.column("error")]))
    out.update({f"episode/stop/{reason}": stops.count(reason) / len(stops) for reason in sorted(set(stops))})
    return out


def advantage_metrics(
    rewards: np.ndarray, advantages: np.ndarray, group_size: int, loss_masks: list | None = None
) -> dict[str, float]:
    """How much learning signal a step holds: groups whose trajectories all scored the same have
    zero advantage (``flat_groups``), and ``signal_tokens`` is the share of the policy's tokens
    whose advantage is not zero (what the policy gradient actually moves)."""
    groups = rewards.reshape(-1, group_size)
    out = {
        "advantage/abs_mean": float(np.abs(advantages).mean()),
        "reward/std": float(rewards.std()),
        "advantage/flat_groups": float(np.mean(groups.max(axis=1) - groups.min(axis=1) < 1e-9)),
    }
    if loss_masks is not None:
        tokens = np.array([sum(mask) for mask in loss_masks], float)
        moving = tokens * (np.abs(np.asarray(advantages, float)) > 1e-9)
        out["advantage/signal_tokens"] = float(moving.sum() / max(tokens.sum(), 1.0))
    return out


def expert_gap_metrics(final_psnr: np.ndarray, expert_psnr: np.ndarray) -> dict[str, float]:
    """Each final image against the expert's best schedule for its photo (NaN: unknown): the mean
    dB it falls short (negative: beyond the expert), the share that matches or beats it (within
    0.05 dB), over the rows where both are known; nothing when none are. What the reward must see
    for RL to win back what imitation of one schedule per combination loses."""
    final_psnr, expert_psnr = np.asarray(final_psnr, dtype=float), np.asarray(expert_psnr, dtype=float)
    known = np.isfinite(final_psnr) & np.isfinite(expert_psnr)
    if not known.any():
        return {}
    gap = expert_psnr[known] - final_psnr[known]
    return {
        "reward/gap_to_expert_db": float(gap.mean()),
        "reward/reaches_expert": float((gap <= 0.05).mean()),
        "reward/expert_known": float(known.mean()),
    }


def exploration_metrics(tool_sequences: list[list[str]], group_size: int) -> dict[str, float]:
    """Whether the n trajectories of a group explore: the mean number of distinct tool sequences
    per group (1: all n did the same), and the mean entropy (nats) of the first tool choice within
    a group (0: every trajectory started with the same tool; "none" counts as a choice)."""
    if not tool_sequences or len(tool_sequences) % group_size:
        raise ValueError(f"{len(tool_sequences)} trajectories do not split into groups of {group_size}")
    distinct, entropies = [], []
    for start in range(0, len(tool_sequences), group_size):
        group = [tuple(seq) for seq in tool_sequences[start : start + group_size]]
        distinct.append(len(set(group)))
        firsts = np.unique([seq[0] if seq else "none" for seq in group], return_counts=True)[1] / group_size
        entropies.append(float(-(firsts * np.log(firsts)).sum()))
    return {
        "explore/distinct_sequences": float(np.mean(distinct)),
        "explore/first_tool_entropy": float(np.mean(entropies)),
    }


def no_signal_warning(metrics: dict[str, Any]) -> str | None:
    """A line for the console when a step cannot teach anything: every group flat."""
    if metrics.get("advantage/flat_groups", 0.0) < 1.0:
        return None
    return (
        "no learning signal this step: every group's trajectories scored the same (advantages all 0); "
        f"distinct tool sequences per group {metrics.get('explore/distinct_sequences', float('nan')):.2f}. "
        "Raise rollout.temperature or rollout.n, or start RL from an earlier SFT checkpoint"
    )


def summarize(out: Path, hf: str) -> dict:
    """The run from its metrics.jsonl: means over the first and the last tenth of the steps
    (at least 3 where the run has 6; one step is noisy) and the mean step-time breakdown."""
    records = read_records(out / "metrics.jsonl")
    window = max(1, min(max(3, len(records) // 10), len(records) // 2))

    def mean_of(rows):
        keys = [
            k
            for k in rows[0]
            if k.startswith(("reward/", "episode/", "actor/", "advantage/", "explore/", "sampling/"))
            and isinstance(rows[0][k], (int, float))
        ]
        return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}

    times = sorted({k for r in records for k in r if k.startswith("time/")})
    return {
        "steps": len(records),
        "window": window,
        "start": mean_of(records[:window]) if records else {},
        "end": mean_of(records[-window:]) if records else {},
        "mean_times": {k: float(np.mean([r.get(k, 0.0) for r in records])) for k in times},
        "hf_checkpoint": hf,
    }
