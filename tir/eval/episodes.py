"""What every agent's episodes share in ``tir eval``: the per-image summary and running them
with a bound on how many are in flight."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence


def episode_summary(report: Mapping, wall_s: float, error: str = "", **extra) -> dict:
    """The per-image fields of an env summary (baselines and policies alike)."""
    return {
        "final_image": report["final_image"],
        "tool_calls": int(report["num_tool_calls"]),
        "turns": int(report["num_turns"]),
        "format_errors": int(report["format_errors"]),
        "tool_errors": int(report["tool_errors"]),
        "stop_reason": report["stop_reason"],
        "wall_s": float(wall_s),
        "tools": [c["name"] for c in report["tool_calls"] if c["committed"]],
        "error": error,
        "ended_at": time.perf_counter(),
        **extra,
    }


def episodes_span(episodes: Sequence[dict]) -> float:
    """Seconds from the first episode's start to the last one's end: an agent's time for the whole
    test set with its episodes in flight together, without engine start-up or scoring. Takes the
    ``ended_at`` stamps out of the episodes (a process-local clock, meaningless in a report)."""
    ends = [episode.pop("ended_at", None) for episode in episodes]
    spans = [(end - float(e["wall_s"]), end) for end, e in zip(ends, episodes) if end is not None]
    if not spans:
        return float(sum(float(e["wall_s"]) for e in episodes))
    return max(end for _, end in spans) - min(start for start, _ in spans)


async def gather_limited(awaitables: Sequence, limit: int) -> list:
    slots = asyncio.Semaphore(limit)

    async def one(awaitable):
        async with slots:
            return await awaitable

    return list(await asyncio.gather(*(one(a) for a in awaitables)))


def tick(bar, value):
    if bar is not None:
        bar.update(1)
    return value
