"""``tir dumps summary DIR``: per-step and overall tables and plots of a run's rollout dumps, and
the ``tir dumps`` command line (``view`` is ``tir.dumps.viewer``). The dump schema: ``tir.dumps.reader``.
"""

from __future__ import annotations

import html
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence

from tir.dumps.reader import DumpError

# Subtasks of tools the registry does not know (neural tools from a manifest not loaded here).
SUBTASK_PREFIXES = (
    ("deblur_motion", "motion_deblurring"),
    ("deblur_defocus", "defocus_deblurring"),
    ("sharpen", "defocus_deblurring"),
    ("denoise", "denoising"),
    ("dehaze", "dehazing"),
    ("derain", "deraining"),
    ("jpeg", "jpeg_artifact_removal"),
    ("brighten", "brightening"),
    ("sr_", "super_resolution"),
)


# ---------------------------------------------------------------- reading


# ---------------------------------------------------------------- statistics (pure)


def subtask_of(name: str) -> str:
    """A tool's subtask: from the registry when it knows the tool, else from the name's prefix."""
    try:
        from tool_pool.tools import TOOLS

        if name in TOOLS.names():
            return TOOLS.get(name).subtask
    except ImportError:
        pass
    return next((subtask for prefix, subtask in SUBTASK_PREFIXES if name.startswith(prefix)), "other")


def tool_usage_by_subtask(episodes: Sequence[dict], subtask: Callable[[str], str] = subtask_of) -> dict[str, int]:
    """Calls per subtask (committed calls, failed ones included), most used first."""
    return dict(Counter(subtask(name) for ep in episodes for name in ep["calls"]).most_common())


def tool_usage_by_position(episodes: Sequence[dict]) -> dict[int, dict[str, int]]:
    """Position in the episode (1 = first call) -> calls per tool at that position."""
    out: dict[int, Counter] = defaultdict(Counter)
    for ep in episodes:
        for position, name in enumerate(ep["calls"], start=1):
            out[position][name] += 1
    return {p: dict(out[p].most_common()) for p in sorted(out)}


def episode_lengths(episodes: Sequence[dict]) -> dict:
    """Mean turns, tool calls and tokens per episode; the turn histogram and stop reasons."""
    tokens = [ep["tokens"] for ep in episodes if ep["tokens"] is not None]
    return {
        "episodes": len(episodes),
        "turns_mean": _mean([ep["num_turns"] for ep in episodes]),
        "tool_calls_mean": _mean([len(ep["calls"]) for ep in episodes]),
        "tokens_mean": _mean(tokens),
        "tokens_max": max(tokens) if tokens else None,
        "turns_histogram": dict(sorted(Counter(ep["num_turns"] for ep in episodes).items())),
        "stop_reasons": dict(Counter(ep["stop_reason"] for ep in episodes).most_common()),
    }


def reward_by_metric(episodes: Sequence[dict]) -> dict:
    """Mean reward and advantage; per metric the mean input and final score, gain, contribution
    to the reward, and the share of episodes that improved it (gain > 0)."""
    metrics = sorted({m for ep in episodes for m in (*ep["final_scores"], *ep["gains"])})
    rewards = [ep["reward"] for ep in episodes if ep["reward"] is not None]
    out = {
        "reward_mean": _mean(rewards),
        "reward_std": _std(rewards),
        "advantage_mean": _mean([ep["advantage"] for ep in episodes if ep["advantage"] is not None]),
        "metrics": {},
    }
    for m in metrics:
        gains = [ep["gains"][m] for ep in episodes if m in ep["gains"]]
        out["metrics"][m] = {
            "input": _mean([ep["input_scores"][m] for ep in episodes if m in ep["input_scores"]]),
            "final": _mean([ep["final_scores"][m] for ep in episodes if m in ep["final_scores"]]),
            "gain": _mean(gains),
            "improved": _mean([float(g > 0) for g in gains]),
            "contribution": _mean([ep["contributions"][m] for ep in episodes if m in ep["contributions"]]),
        }
    return out


def weights_over_time(episodes: Sequence[dict]) -> dict[int, dict[str, float]]:
    """Step -> the reward's metric weights at that step (one set per step: the first row's)."""
    out = {}
    for ep in episodes:
        if ep["weights"] and ep["step"] not in out:
            out[ep["step"]] = dict(ep["weights"])
    return dict(sorted(out.items()))


def format_error_stats(episodes: Sequence[dict]) -> dict:
    """Format errors (total, per episode, share of episodes with any), episodes stopped by the
    format-error limit, failed tool calls, crashed episodes."""
    return {
        "format_errors": sum(ep["format_errors"] for ep in episodes),
        "per_episode": _mean([ep["format_errors"] for ep in episodes]),
        "episodes_with_errors": _mean([float(ep["format_errors"] > 0) for ep in episodes]),
        "parse_error_limit": sum(ep["stop_reason"] == "parse_error_limit" for ep in episodes),
        "tool_errors": sum(ep["tool_errors"] for ep in episodes),
        "crashed": sum(ep["crashed"] for ep in episodes),
    }


def top_sequences(episodes: Sequence[dict], k: int = 5) -> dict[str, list[dict]]:
    """Per degradation combination, its ``k`` most common tool sequences: count, share and mean
    reward (ties: the higher reward first)."""
    groups: dict[str, dict[tuple, list]] = defaultdict(lambda: defaultdict(list))
    for ep in episodes:
        groups[ep["combo"]][tuple(ep["calls"])].append(ep["reward"])
    out = {}
    for combo in sorted(groups):
        total = sum(len(r) for r in groups[combo].values())
        ranked = sorted(
            groups[combo].items(),
            key=lambda kv: (-len(kv[1]), -(_mean([r for r in kv[1] if r is not None]) or -math.inf), kv[0]),
        )
        out[combo] = [
            {
                "sequence": list(seq),
                "count": len(rs),
                "share": len(rs) / total,
                "reward_mean": _mean([r for r in rs if r is not None]),
            }
            for seq, rs in ranked[:k]
        ]
    return out


def summarize(episodes: Sequence[dict], top: int = 5, subtask: Callable[[str], str] = subtask_of) -> dict:
    """Every statistic, per step and overall (``"all"``), as one JSON-able dict."""
    if not episodes:
        raise DumpError("no trajectories in the dumps (every file is empty)")
    by_step: dict[int, list] = defaultdict(list)
    for ep in episodes:
        by_step[ep["step"]].append(ep)

    def stats(eps):
        return {
            "lengths": episode_lengths(eps),
            "reward": reward_by_metric(eps),
            "format": format_error_stats(eps),
            "subtasks": tool_usage_by_subtask(eps, subtask),
        }

    return {
        "steps": {step: stats(by_step[step]) for step in sorted(by_step)},
        "all": stats(episodes),
        "positions": tool_usage_by_position(episodes),
        "position_subtasks": _position_subtasks(episodes, subtask),
        "weights": weights_over_time(episodes),
        "sequences": top_sequences(episodes, top),
    }


def _position_subtasks(episodes, subtask) -> dict[int, dict[str, int]]:
    return {p: _sum_by(names, subtask) for p, names in tool_usage_by_position(episodes).items()}


def _sum_by(counts: Mapping[str, int], key: Callable[[str], str]) -> dict[str, int]:
    out: Counter = Counter()
    for name, count in counts.items():
        out[key(name)] += count
    return dict(out)


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(values) / len(values) if values else None


def _std(values) -> float | None:
    mean = _mean(values)
    return None if mean is None else math.sqrt(sum((float(v) - mean) ** 2 for v in values) / len(values))


# ---------------------------------------------------------------- tables and plots


def markdown_report(summary: Mapping, max_rows: int = 30) -> str:
    """The summary as Markdown tables (readable on a console too). At most ``max_rows`` steps per
    table, evenly spread, first and last included."""
    steps = shown_steps(list(summary["steps"]), max_rows)
    rows = [(str(s), summary["steps"][s]) for s in steps] + [("all", summary["all"])]
    note = (
        f"\n({len(steps)} of {len(summary['steps'])} steps shown; summary.json has all)\n"
        if len(steps) < len(summary["steps"])
        else ""
    )
    out = [
        "## Episodes",
        note,
        _table(
            [
                "step",
                "episodes",
                "reward",
                "turns",
                "tool calls",
                "tokens",
                "format err/ep",
                "tool errors",
                "crashed",
                "stop reasons",
            ],
            [
                [
                    name,
                    s["lengths"]["episodes"],
                    _fmt(s["reward"]["reward_mean"]),
                    _fmt(s["lengths"]["turns_mean"]),
                    _fmt(s["lengths"]["tool_calls_mean"]),
                    _fmt(s["lengths"]["tokens_mean"], 0),
                    _fmt(s["format"]["per_episode"]),
                    s["format"]["tool_errors"],
                    s["format"]["crashed"],
                    ", ".join(f"{_esc(k)} {v}" for k, v in s["lengths"]["stop_reasons"].items()),
                ]
                for name, s in rows
            ],
        ),
    ]
    metrics = list(summary["all"]["reward"]["metrics"])
    if metrics:
        out += [
            "## Reward per metric (input -> final, mean gain, share improved)",
            _table(
                ["step", *map(_esc, metrics)],
                [[name] + [_metric_cell(s["reward"]["metrics"].get(m)) for m in metrics] for name, s in rows],
            ),
        ]
    if summary["weights"]:
        names = sorted({m for w in summary["weights"].values() for m in w})
        wsteps = shown_steps(list(summary["weights"]), max_rows)
        out += [
            "## Reward weights over steps",
            _table(
                ["step", *map(_esc, names)],
                [[s] + [_fmt(summary["weights"][s].get(m), 3) for m in names] for s in wsteps],
            ),
        ]
    subtasks = list(summary["all"]["subtasks"])
    if subtasks:
        out += [
            "## Tool calls by subtask (share of the step's calls)",
            _table(
                ["step", "calls", *map(_esc, subtasks)],
                [
                    [name, sum(s["subtasks"].values())]
                    + [_share(s["subtasks"].get(t, 0), sum(s["subtasks"].values())) for t in subtasks]
                    for name, s in rows
                ],
            ),
        ]
        out += [
            "## Tool calls by position in the episode",
            _table(
                ["position", "calls", "tools (count)"],
                [
                    [p, sum(c.values()), ", ".join(f"{_esc(n)} {v}" for n, v in list(c.items())[:6])]
                    for p, c in summary["positions"].items()
                ],
            ),
        ]
    out += [
        "## Most common tool sequences per degradation combination",
        _table(
            ["combo", "sequence", "count", "share", "mean reward"],
            [
                [
                    _esc(combo),
                    " > ".join(map(_esc, r["sequence"])) or "(no tool)",
                    r["count"],
                    _share(r["count"], r["count"] / r["share"]),
                    _fmt(r["reward_mean"]),
                ]
                for combo, ranked in summary["sequences"].items()
                for r in ranked
            ],
        ),
    ]
    return "\n\n".join(part for part in out if part) + "\n"


def shown_steps(steps: Sequence[int], max_rows: int) -> list[int]:
    if len(steps) <= max_rows or max_rows < 2:
        return list(steps)
    picks = {round(i * (len(steps) - 1) / (max_rows - 1)) for i in range(max_rows)}
    return [steps[i] for i in sorted(picks)]


def _table(header: Sequence, rows: Sequence[Sequence]) -> str:
    cells = [[str(c) for c in header]] + [[str(c).replace("|", "\\|") for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def _esc(text) -> str:
    """Text taken from trajectories (tool names, combos, stop reasons), HTML-escaped: a Markdown
    viewer must show it, never run it."""
    return html.escape(str(text), quote=False)


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _share(part, total) -> str:
    return f"{100 * part / total:.0f}%" if total else "-"


def _metric_cell(m: Mapping | None) -> str:
    if not m:
        return "-"
    return f"{_fmt(m['input'])} -> {_fmt(m['final'])} ({'+' if (m['gain'] or 0) >= 0 else ''}{_fmt(m['gain'], 3)}, {_share(m['improved'] or 0, 1)})"


# ---------------------------------------------------------------- CLI: tir dumps summary|view
