"""Training-free agents on the same environment and pool as the policy: for comparison, and as
teachers (their chats, in ``messages``, render like the policy's).

- ``random``: each turn, a uniformly random served tool, or the answer (chance 1 / (tools + 1)).
- ``fixed_order`` (MAIR's order prior): undo compression first, then imaging, then scene
  degradations, with one fixed tool per subtask; no feedback.
- ``exhaustive`` (AgenticIR-like): for each needed subtask, in the same order, run every tool of
  the subtask, keep the best output by a no-reference score if it beats the current image; if
  none does (or every tool failed), roll back and retry that subtask once after the others.
  At most ``concurrency`` (4) candidates run and are scored at a time, one at a time on a photo
  over ``pixel_budget`` / 2 (8 Mpx): memory stays bounded.

The degradations come from the sample (``degradations``, when known and allowed) or are
perceived (``tir.agent.perceive``: the cue thresholds, or the learned recogniser). Each episode reports its tool calls
(every execution, explorations included) and its wall time.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Mapping, Sequence

import numpy as np

from tir.agent import prompts
from tir.agent.env import RestorationEnv
from tir.agent.perceive import Perception
from tir.data.degradations import SUBTASK_FOR_DEGRADATION
from tir.protocol import Batch
from tool_pool.execution import PoolError

# MAIR's prior: degradations arise scene -> imaging -> compression, so they are undone in reverse.
# Within a group, the order that undoes AgenticIR's synthesis chains best (e.g. denoise before
# brightening "dark+noise", deblock before upscaling a compressed thumbnail).
ORDER_PRIOR = {
    "compression": ("jpeg", "lowres"),
    "imaging": ("noise", "defocus_blur", "motion_blur", "dark"),
    "scene": ("haze", "rain"),
}
RESTORATION_ORDER = tuple(name for group in ("compression", "imaging", "scene") for name in ORDER_PRIOR[group])
# The fixed tool of each subtask: the best weight-free tool per PROTOCOL.md's measurements; for motion
# blur the one every recipe serves (deblur_motion_wiener gains more on motion blur alone: README's
# toolbox table).
FIXED_TOOLS = {
    "denoising": "denoise_tv",
    "motion_deblurring": "deblur_motion_rl",
    "defocus_deblurring": "deblur_defocus_wiener",
    "dehazing": "dehaze_dcp",
    "deraining": "derain_median",
    "brightening": "brighten_shift",
    "jpeg_artifact_removal": "jpeg_deblock_dct",
    "super_resolution": "sr_bicubic",
}
# No-reference metrics and their direction (+1: higher is better).
NR_DIRECTION = {"niqe": -1, "piqe": -1, "brisque": -1, "nrqm": 1, "musiq": 1, "maniqa": 1, "clipiqa": 1}


def restoration_order(degradations: Sequence[str]) -> list[str]:
    """``degradations`` sorted by the order prior (unknown names raise KeyError)."""
    for name in degradations:
        if name not in SUBTASK_FOR_DEGRADATION:
            raise KeyError(f"unknown degradation {name!r}; expected some of {', '.join(SUBTASK_FOR_DEGRADATION)}")
    return sorted(dict.fromkeys(degradations), key=RESTORATION_ORDER.index)


def perceive_degradations(image: np.ndarray) -> list[str]:
    """Degradations guessed from measured cues (``tir.data.perception.likely_degradations``), in the order prior's order."""
    from tir.data.perception import likely_degradations, measure_cues

    return restoration_order(likely_degradations(measure_cues(image)))


async def nr_score(pool, image: np.ndarray, metric: str = "niqe") -> float | None:
    """A no-reference score, or None when the metric cannot score this image (e.g. too small)."""
    try:
        return (await pool.score([metric], image))[metric]
    except PoolError as err:
        if err.kind in ("bad_image", "bad_arguments"):
            return None
        raise


def better(new: float | None, old: float | None, metric: str) -> bool:
    """Whether ``new`` beats ``old``; a score beats no score (an image the metric cannot judge)."""
    if new is None:
        return False
    return old is None or NR_DIRECTION.get(metric, 1) * (new - old) > 0


def tools_by_subtask(tool_names: Sequence[str]) -> dict[str, list[str]]:
    """The served tools of each subtask, sorted by name."""
    from tool_pool.tools import get_tool

    grouped: dict[str, list[str]] = {}
    for name in sorted(tool_names):
        grouped.setdefault(get_tool(name).subtask, []).append(name)
    return grouped


# ---------------------------------------------------------------- the agents


class RandomAgent:
    name = "random"
    needs_degradations = False

    def __init__(self, seed: int = 0):
        self.seed = seed

    async def act(self, env: RestorationEnv, degradations: Sequence[str], episode: int = 0) -> None:
        rng = random.Random(self.seed * 1_000_003 + episode)
        names = [schema["name"] for schema in env.tool_schemas]
        while not env.done:
            pick = rng.randrange(len(names) + 1)
            await (env.finish() if pick == len(names) else env.step(prompts.ToolCall(names[pick], {})))


class FixedOrderAgent:
    name = "fixed_order"
    needs_degradations = True

    async def act(self, env: RestorationEnv, degradations: Sequence[str], episode: int = 0) -> None:
        served = tools_by_subtask([schema["name"] for schema in env.tool_schemas])
        for degradation in restoration_order(degradations):
            subtask = SUBTASK_FOR_DEGRADATION[degradation]
            candidates = served.get(subtask, [])
            if env.done or not candidates:
                continue
            tool = FIXED_TOOLS[subtask] if FIXED_TOOLS[subtask] in candidates else candidates[0]
            await env.step(prompts.ToolCall(tool, {}))
        if not env.done:
            await env.finish()


class ExhaustiveAgent:
    name = "exhaustive"
    needs_degradations = True

    def __init__(self, metric: str = "niqe", retries: int = 1, concurrency: int = 4, pixel_budget: int = 1 << 24):
        if concurrency < 1 or pixel_budget < 1:
            raise ValueError(f"concurrency and pixel_budget must be >= 1, got {concurrency} and {pixel_budget}")
        self.metric, self.retries, self.concurrency, self.pixel_budget = metric, retries, concurrency, pixel_budget

    def slots(self, image: np.ndarray) -> int:
        """Candidates run at once on ``image``: ``concurrency``, fewer for a large image (their
        inputs' pixels within ``pixel_budget``), at least one."""
        return max(1, min(self.concurrency, self.pixel_budget // (image.shape[0] * image.shape[1])))

    async def act(self, env: RestorationEnv, degradations: Sequence[str], episode: int = 0) -> None:
        served = tools_by_subtask([schema["name"] for schema in env.tool_schemas])
        current = await nr_score(env.pool, env.image, self.metric)
        queue = deque(restoration_order(degradations))
        failures: dict[str, int] = {}
        while queue and not env.done:
            degradation = queue.popleft()
            slots = asyncio.Semaphore(self.slots(env.image))
            calls = [prompts.ToolCall(name, {}) for name in served.get(SUBTASK_FOR_DEGRADATION[degradation], [])]

            async def run_and_score(call: prompts.ToolCall, slots: asyncio.Semaphore):
                async with slots:  # a bounded number of candidates (and their scoring) in memory at once
                    out = await env.try_tool(call)
                    return None if out is None else (call, out, await nr_score(env.pool, out, self.metric))

            results = [
                r for r in await asyncio.gather(*(run_and_score(call, slots) for call in calls)) if r is not None
            ]
            tried = [(call, out) for call, out, _ in results]
            scores = [score for _, _, score in results]
            best = max(range(len(tried)), key=lambda i: _rank(scores[i], self.metric), default=None)
            if best is not None and better(scores[best], current, self.metric):
                await env.commit(*tried[best])
                current = scores[best]
            elif failures.get(degradation, 0) < self.retries:
                # Roll back (nothing committed) and retry once the others are done: the image may
                # need another degradation undone first.
                failures[degradation] = failures.get(degradation, 0) + 1
                queue.append(degradation)
        if not env.done:
            await env.finish()


def _rank(score: float | None, metric: str) -> float:
    return float("-inf") if score is None else NR_DIRECTION.get(metric, 1) * score


BASELINES = {"random": RandomAgent, "fixed_order": FixedOrderAgent, "exhaustive": ExhaustiveAgent}


def make_baseline(name: str, **options):
    """A baseline by name (``fixed-order`` and ``fixed_order`` both work)."""
    key = name.replace("-", "_")
    if key not in BASELINES:
        from tir.registry import unknown_name

        raise KeyError(unknown_name("baseline", name, BASELINES))
    return BASELINES[key](**options)


# ---------------------------------------------------------------- running them


async def run_baseline_episode(
    agent,
    pool,
    image: np.ndarray,
    tool_schemas: Sequence[Mapping],
    degradations: Sequence[str] | None = None,
    max_turns: int = 4,
    episode: int = 0,
    cues=None,
    perception: Perception | None = None,
) -> tuple[RestorationEnv, dict]:
    """Play one episode; the env (its log holds every turn's image) and the episode's report.
    ``degradations``: what the agent is told; None: what ``perception`` (default: the cue
    thresholds) perceives in ``image``, as a policy would have to."""
    started = time.perf_counter()
    env = RestorationEnv(pool, tool_schemas, max_turns=max_turns, cues=cues)
    await env.reset(image)
    if degradations is None and agent.needs_degradations:
        degradations = restoration_order(await (perception or Perception()).degradations(image, pool))
    await agent.act(env, list(degradations or []), episode)
    from tir.agent.loop import chat_text

    report = env.summary()
    report.update(
        agent=agent.name,
        degradations_used=list(degradations or []),
        wall_s=time.perf_counter() - started,
        messages=chat_text(env.messages),
    )
    return env, report


async def run_baseline(
    agent,
    pool,
    samples: Batch,
    tool_schemas: Sequence[Mapping] | None = None,
    max_turns: int = 4,
    use_known_degradations: bool = True,
    concurrency: int = 8,
    image_column: str = "lq",
) -> Batch:
    """One episode per sample row; ``samples`` with final_image, tool_calls, num_tool_calls,
    num_turns, stop_reason, wall_s, degradations_used and messages added."""
    from tir.agent.loop import pool_tool_schemas

    schemas = list(tool_schemas) if tool_schemas is not None else await pool_tool_schemas(pool)
    images = samples.column(image_column)
    known = (
        samples.column("degradations")
        if use_known_degradations and "degradations" in samples.columns
        else [None] * len(samples)
    )
    slots = asyncio.Semaphore(concurrency)

    async def one(row: int) -> dict:
        async with slots:
            return (await run_baseline_episode(agent, pool, images[row], schemas, known[row], max_turns, row))[1]

    reports = await asyncio.gather(*(one(row) for row in range(len(samples))))
    kinds = {"final_image": "image", "tool_calls": "json", "messages": "json", "degradations_used": "auto"}
    batch = samples
    for name in (
        "final_image",
        "tool_calls",
        "num_tool_calls",
        "num_turns",
        "format_errors",
        "tool_errors",
        "stop_reason",
        "wall_s",
        "degradations_used",
        "messages",
    ):
        batch = batch.with_column(name, [report[name] for report in reports], kind=kinds.get(name, "auto"))
    return batch.with_meta(agent=agent.name)
