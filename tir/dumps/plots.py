"""The PNG plots of ``tir dumps summary``: tool usage, episode lengths, reward per metric, weights."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path


def write_plots(summary: Mapping, out_dir: str | Path) -> list[Path]:
    """PNG plots of the per-step statistics into ``out_dir``; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps, per = list(summary["steps"]), summary["steps"]
    paths = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        paths.append(out_dir / name)

    metrics = list(summary["all"]["reward"]["metrics"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(steps, [_nan(per[s]["reward"]["reward_mean"]) for s in steps], marker="o", label="reward (mean)")
    axes[0].set(title="reward", xlabel="step")
    for m in metrics:
        axes[1].plot(
            steps, [_nan(per[s]["reward"]["metrics"].get(m, {}).get("gain")) for s in steps], marker="o", label=m
        )
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[1].set(title="mean gain over the input, per metric", xlabel="step")
    for ax in axes:
        ax.legend(fontsize=8)
    save(fig, "reward.png")

    if summary["weights"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        wsteps = list(summary["weights"])
        for m in sorted({m for w in summary["weights"].values() for m in w}):
            ax.plot(wsteps, [summary["weights"][s].get(m, math.nan) for s in wsteps], marker="o", label=m)
        ax.set(title="reward weights", xlabel="step", ylim=(0, None))
        ax.legend(fontsize=8)
        save(fig, "weights.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(steps, [_nan(per[s]["lengths"]["turns_mean"]) for s in steps], marker="o", label="turns")
    axes[0].plot(steps, [_nan(per[s]["lengths"]["tool_calls_mean"]) for s in steps], marker="o", label="tool calls")
    axes[0].set(title="episode length (mean)", xlabel="step")
    axes[0].legend(fontsize=8)
    axes[1].plot(
        steps, [_nan(per[s]["format"]["per_episode"]) for s in steps], marker="o", label="format errors / episode"
    )
    axes[1].plot(
        steps,
        [per[s]["format"]["tool_errors"] / max(1, per[s]["lengths"]["episodes"]) for s in steps],
        marker="o",
        label="tool errors / episode",
    )
    axes[1].set(title="errors", xlabel="step")
    axes[1].legend(fontsize=8)
    save(fig, "lengths_errors.png")

    subtasks = list(summary["all"]["subtasks"])
    if subtasks:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        bottom, width = [0.0] * len(steps), 0.8 * min([b - a for a, b in zip(steps, steps[1:])] or [1])
        for t in subtasks:
            shares = [per[s]["subtasks"].get(t, 0) / max(1, sum(per[s]["subtasks"].values())) for s in steps]
            axes[0].bar(steps, shares, width=width, bottom=bottom, label=t)
            bottom = [b + v for b, v in zip(bottom, shares)]
        axes[0].set(title="tool calls by subtask (share per step)", xlabel="step")
        positions = list(summary["position_subtasks"])
        bottom = [0.0] * len(positions)
        for t in subtasks:
            counts = [summary["position_subtasks"][p].get(t, 0) for p in positions]
            axes[1].bar([str(p) for p in positions], counts, bottom=bottom, label=t)
            bottom = [b + v for b, v in zip(bottom, counts)]
        axes[1].set(title="tool calls by position in the episode", xlabel="position")
        axes[1].legend(fontsize=7)
        save(fig, "tools.png")
    return paths


def _nan(value) -> float:
    return math.nan if value is None else value
