"""Expert trajectories for SFT: search tool schedules through the pool, then perturb them.

For one training sample (a degraded LQ photo with known degradations, and its HQ original):

1. Search. Each degradation needs its subtask (``SUBTASK_FOR_DEGRADATION``); a schedule is an
   order of those subtasks and one served tool per subtask. Every schedule is executed for real
   through the pool and its final image is scored against the HQ photo with the reward's
   metrics. Two degradations (at most ``exhaustive_up_to``) are searched exhaustively (2 orders
   x tools x tools); three with a beam: after each step only the ``beam_width`` best partial
   schedules (their current image scored against HQ) are extended. Metrics are combined as the
   reward combines them: gains over the LQ input, standardised across the sample's candidates,
   weighted (``tir.rl.reward``). With ``partial`` (``sft.partial_schedules``, the default) the
   schedules that leave degradations untreated are candidates too (every prefix, and no call at
   all), so a tool that only hurts the photo drops out of the expert's schedule.
2. Choose the expert (``expert_rule``). ``sample``: the sample's own best schedule (near ties,
   within ``tie_margin``, go to the conventional order and tools, so that noise does not pick
   the label). ``combination`` (the default): first the order of subtasks that scores best on
   average over every sample of the same combination (``combination_orders``), then the
   sample's best tools in that order. Which order wins flips from crop to crop by margins no
   policy can see in the photo (``benchmarks/expert_labels.py`` measures it); one order per
   combination makes the labels a function of what the policy can perceive, at a measured cost
   in score against the per-sample best (``sample_expert_tools`` keeps that schedule).
   ``combination_tools``: one schedule of tools per combination, chosen the same way (with
   several tools per subtask, which tool wins flips from crop to crop too).
3. Perturb (the paper's exploration-keeping trick). With the recipe's probabilities, the
   expert's steps are reordered and/or a step's tool is swapped for another tool of the same
   subtask. The perturbed schedule is executed for real, so every image of the trajectory is
   the true output of its call. ``perturbed`` marks those rows; ``expert_tools`` keeps the
   expert's own schedule (the label for evaluation) either way.

``tir data expert --in data/train.parquet --out data/sft.parquet`` searches every row, several
samples at a time, writing shards of searched samples as it goes (``<out>.parts/``): rerun the
same command after a kill and only unsearched shards are computed. Steps 2 and 3 then run over
the whole set (a few tool calls per sample).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from tir.data.degradations import SUBTASK_FOR_DEGRADATION
from tir.data.expert_rules import (
    Schedule,
    choose_expert,
    combination_orders,
    perturb_tools,
    pick_expert,
    quality,
    sample_generator,
)
from tir.protocol import Batch
from tir.rl.reward import LOWER_BETTER
from tool_pool.client import score_against
from tool_pool.execution import PoolError

# Columns a row gains (beside the sample's own), and their Batch kinds.
EXPERT_KINDS = {
    "expert_tools": "auto",
    "expert_scores": "json",
    "tools": "auto",
    "step_images": "images",
    "final_image": "image",
    "input_scores": "json",
    "final_scores": "json",
    "perturbed": "auto",
    "perturbation": "json",
    "search_mode": "auto",
    "search_candidates": "json",
    "search_tool_calls": "auto",
    "search_score_calls": "auto",
    "search_s": "auto",
    "perturb_tool_calls": "auto",
    "expert_rule": "auto",
    "sample_expert_tools": "auto",
    "sample_expert_scores": "json",
}
EXPERT_RULES = ("combination", "combination_tools", "sample")
NOT_PERTURBED = {"reordered": False, "swapped": []}


@dataclass(frozen=True)
class ExpertSettings:
    metrics: tuple[str, ...] = ("psnr", "ssim", "niqe")
    weights: Mapping[str, float] = field(default_factory=dict)  # empty: equal
    beam_width: int = 4
    # also score schedules that leave degradations untreated (every prefix of every order, and no
    # call): a tool that only hurts this photo (a deblurrer on a JPEG) is then left out
    partial: bool = True
    exhaustive_up_to: int = 2  # degradations searched exhaustively; more use the beam
    tie_margin: float = 1.0  # schedules within this many TIE_TOLERANCEs of the best, on every metric, tie
    # "combination": one order of subtasks per combination; "combination_tools": one schedule of tools
    # per combination (the same with one tool per subtask); "sample": each sample's best
    expert_rule: str = "combination"
    perturb: bool = True
    reorder_prob: float = 0.3
    swap_tool_prob: float = 0.3
    seed: int = 0

    def __post_init__(self):
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {self.beam_width}")
        for name in ("reorder_prob", "swap_tool_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.expert_rule not in EXPERT_RULES:
            raise ValueError(f"expert_rule {self.expert_rule!r} unknown; expected one of {EXPERT_RULES}")
        unknown = [m for m in self.metrics if m not in LOWER_BETTER]
        if unknown or not self.metrics:
            raise ValueError(
                f"metrics {list(self.metrics)}: need at least one, each with a known direction (unknown: {unknown})"
            )

    @classmethod
    def from_recipe(cls, cfg, **overrides) -> ExpertSettings:
        """The reward's metrics and weights, the ``sft`` section's perturbation, beam width, tie
        margin and expert rule (``sft.tie_margin``, ``sft.expert_rule``; these defaults where unset)."""
        from omegaconf import OmegaConf

        tie_margin = OmegaConf.select(cfg, "sft.tie_margin", default=None)
        rule = OmegaConf.select(cfg, "sft.expert_rule", default=None)
        values = {
            "metrics": tuple(cfg.reward.metrics),
            "weights": dict(cfg.reward.weights),
            "beam_width": cfg.sft.beam_width,
            "partial": cfg.sft.partial_schedules,
            "perturb": cfg.sft.perturb,
            "reorder_prob": cfg.sft.reorder_prob,
            "swap_tool_prob": cfg.sft.swap_tool_prob,
            "seed": cfg.run.seed,
            "tie_margin": cls.tie_margin if tie_margin is None else float(tie_margin),
            "expert_rule": cls.expert_rule if rule is None else str(rule),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# Tool calls (and scorings) of one search in flight at once: their intermediates stay bounded.
SEARCH_CONCURRENCY = 4


async def bounded_gather(coroutines, limit: int = SEARCH_CONCURRENCY) -> list:
    """``asyncio.gather`` of ``coroutines`` (results in order), at most ``limit`` running at once."""
    slots = asyncio.Semaphore(limit)

    async def one(coroutine):
        async with slots:
            return await coroutine

    return await asyncio.gather(*(one(c) for c in coroutines))


@dataclass
class Cost:
    tool_calls: int = 0
    score_calls: int = 0


# ---------------------------------------------------------------- running and scoring


async def execute(pool, lq: np.ndarray, tools: Sequence[str], cost: Cost) -> Schedule | None:
    """Run ``tools`` in order from the LQ photo; None if a call fails."""
    schedule = Schedule((), (), lq)
    for tool in tools:
        schedule = await extend(pool, schedule, tool, cost)
        if schedule is None:
            return None
    return schedule


async def extend(pool, schedule: Schedule, tool: str, cost: Cost) -> Schedule | None:
    """``schedule`` plus one call of ``tool`` on its current image; None when the pool says the
    call failed (that schedule is dropped)."""
    cost.tool_calls += 1
    try:
        output = await pool.run(tool, schedule.image)
    except PoolError:
        return None
    return Schedule(schedule.tools + (tool,), schedule.images + (output,), output)


async def score(pool, image: np.ndarray, hq: np.ndarray, metrics: Sequence[str], cost: Cost) -> dict[str, float]:
    """Each metric of ``image`` against HQ (a path that has not super-resolved yet is judged at
    the HQ size too); a metric that cannot score this image is left out rather than failing the
    sample."""
    cost.score_calls += 1
    return await score_against(pool, metrics, image, hq)


# ---------------------------------------------------------------- the search


def needed_subtasks(degradations: Sequence[str]) -> list[str]:
    unknown = [d for d in degradations if d not in SUBTASK_FOR_DEGRADATION]
    if unknown:
        raise KeyError(f"unknown degradation(s) {unknown}; expected some of {', '.join(SUBTASK_FOR_DEGRADATION)}")
    return list(dict.fromkeys(SUBTASK_FOR_DEGRADATION[d] for d in degradations))


async def search_expert(
    pool,
    lq: np.ndarray,
    hq: np.ndarray,
    degradations: Sequence[str],
    tools_by_subtask: Mapping[str, Sequence[str]],
    settings: ExpertSettings,
    cost: Cost,
    input_scores: Mapping,
) -> tuple[Schedule, list[Schedule], str]:
    """The expert schedule for this sample (``pick_expert``), every complete schedule scored
    (best first; with ``settings.partial`` every prefix the search kept too, and the empty
    schedule), and the search mode ("exhaustive" or "beam"). Partial schedules share their
    prefix's executions."""
    subtasks = needed_subtasks(degradations)
    missing = [s for s in subtasks if not tools_by_subtask.get(s)]
    if missing:
        raise ValueError(f"the pool serves no tool for subtask(s) {missing}")
    subtask_of = {tool: s for s, tools in tools_by_subtask.items() for tool in tools}
    exhaustive = len(subtasks) <= settings.exhaustive_up_to
    frontier = [Schedule((), (), lq)]
    prefixes: list[Schedule] = []  # with settings.partial: the shorter schedules, candidates too
    for depth in range(len(subtasks)):
        if settings.partial:
            prefixes += frontier
        moves = [
            (schedule, tool)
            for schedule in frontier
            for subtask in subtasks
            if subtask not in {subtask_of[t] for t in schedule.tools}
            for tool in tools_by_subtask[subtask]
        ]
        children = await bounded_gather(extend(pool, schedule, tool, cost) for schedule, tool in moves)
        frontier = [child for child in children if child is not None]
        if not frontier:
            raise RuntimeError(f"every schedule failed at step {depth + 1} (subtasks {subtasks})")
        last = depth == len(subtasks) - 1
        if not last and not exhaustive:  # the beam keeps the best partial schedules
            frontier = (await best_first(pool, frontier, hq, input_scores, settings, cost))[: settings.beam_width]
    # every candidate is ranked in one set: quality is standardised among the candidates
    candidates = await best_first(pool, prefixes + frontier, hq, input_scores, settings, cost)
    return (
        pick_expert(candidates, tools_by_subtask, settings.tie_margin),
        candidates,
        "exhaustive" if exhaustive else "beam",
    )


async def best_first(
    pool, schedules: list[Schedule], hq: np.ndarray, input_scores: Mapping, settings: ExpertSettings, cost: Cost
) -> list[Schedule]:
    """``schedules`` scored against HQ and sorted best first (ties: the order they came in). The
    empty schedule's scores are the input's, and a schedule scored before is not scored again."""

    async def scores_of(schedule: Schedule) -> dict[str, float]:
        if schedule.scores is not None:
            return schedule.scores
        if not schedule.tools:
            return dict(input_scores)
        return await score(pool, schedule.image, hq, settings.metrics, cost)

    scores = await bounded_gather(scores_of(s) for s in schedules)
    for schedule, values, value in zip(schedules, scores, quality(scores, input_scores, settings)):
        schedule.scores, schedule.quality = values, float(value)
    return sorted(schedules, key=lambda s: -s.quality)


# ---------------------------------------------------------------- one sample, many samples


async def search_row(
    pool, row: Mapping, tools_by_subtask: Mapping[str, Sequence[str]], settings: ExpertSettings
) -> dict:
    """The sample's row with the search's columns: every complete schedule scored
    (``search_candidates``), its cost, and the sample's own expert (``pick_expert``) executed."""
    started, cost = time.perf_counter(), Cost()
    lq, hq = row["lq"], row["hq"]
    input_scores = await score(pool, lq, hq, settings.metrics, cost)
    best, candidates, mode = await search_expert(
        pool, lq, hq, row["degradations"], tools_by_subtask, settings, cost, input_scores
    )
    return {
        **row,
        "sample_expert_tools": list(best.tools),
        "sample_expert_scores": best.scores,
        "step_images": list(best.images),
        "final_image": best.image,
        "input_scores": input_scores,
        "search_mode": mode,
        "search_candidates": [{"tools": list(c.tools), "quality": c.quality, "scores": c.scores} for c in candidates],
        "search_tool_calls": cost.tool_calls,
        "search_score_calls": cost.score_calls,
        "search_s": time.perf_counter() - started,
    }


async def trajectory_row(
    pool,
    row: Mapping,
    expert_tools: Sequence[str],
    rule: str,
    tools_by_subtask: Mapping[str, Sequence[str]],
    settings: ExpertSettings,
) -> dict:
    """A searched row with its expert (``expert_tools``, chosen by ``rule``) and the trajectory to
    train on: the expert's, or its perturbation; each executed for real where the search's
    images are not already its own (``perturb_tool_calls`` counts those calls)."""
    cost = Cost()
    scores_of = {tuple(c["tools"]): c["scores"] for c in row["search_candidates"]}
    expert = Schedule(
        tuple(row["sample_expert_tools"]), tuple(row["step_images"]), row["final_image"], row["sample_expert_scores"]
    )
    if list(expert_tools) != list(expert.tools):
        expert = await execute(pool, row["lq"], expert_tools, cost)
        if expert is None:
            raise RuntimeError(
                f"the expert schedule {list(expert_tools)} of {row.get('image_id')}/{row.get('combo')} failed when run again"
            )
        expert.scores = scores_of[tuple(expert_tools)]
    chosen, info = expert, NOT_PERTURBED
    if settings.perturb:
        tools, info = perturb_tools(
            expert.tools,
            tools_by_subtask,
            sample_generator(settings.seed, row),
            settings.reorder_prob,
            settings.swap_tool_prob,
        )
        if tools != list(expert.tools):
            executed = await execute(pool, row["lq"], tools, cost)
            if executed is not None:  # a failing perturbed schedule falls back to the expert
                executed.scores = scores_of.get(tuple(tools)) or await score(
                    pool, executed.image, row["hq"], settings.metrics, cost
                )
                chosen = executed
    return {
        **row,
        "expert_tools": list(expert.tools),
        "expert_scores": expert.scores,
        "expert_rule": rule,
        "tools": list(chosen.tools),
        "step_images": list(chosen.images),
        "final_image": chosen.image,
        "final_scores": chosen.scores,
        "perturbed": chosen is not expert,
        "perturbation": info if chosen is not expert else NOT_PERTURBED,
        "perturb_tool_calls": cost.tool_calls,
    }


async def search_batch(
    pool,
    samples: Batch,
    settings: ExpertSettings,
    tools_by_subtask: Mapping[str, Sequence[str]],
    concurrency: int = 8,
    progress=None,
) -> Batch:
    """``search_row`` of every row of ``samples`` (a ``tir data synth`` batch), in order.
    ``progress``: called once per finished sample (e.g. a tqdm bar's ``update``)."""
    rows, slots = samples.rows(), asyncio.Semaphore(concurrency)

    async def one(row):
        async with slots:
            out = await search_row(pool, row, tools_by_subtask, settings)
        if progress is not None:
            progress(1)
        return out

    done = await asyncio.gather(*(one(row) for row in rows))
    return Batch.from_rows(done, meta={**samples.meta, "kind": "expert_search"}, kinds=_kinds(samples, done))


async def trajectory_batch(
    pool,
    searched: Batch,
    settings: ExpertSettings,
    tools_by_subtask: Mapping[str, Sequence[str]],
    concurrency: int = 8,
    progress=None,
) -> Batch:
    """Every searched row's expert (by ``settings.expert_rule``) and trajectory (``trajectory_row``)."""
    rows, slots = searched.rows(), asyncio.Semaphore(concurrency)
    subtask_of = {tool: s for s, names in tools_by_subtask.items() for tool in names}
    by_tools = settings.expert_rule == "combination_tools"
    orders = combination_orders(rows, subtask_of, by_tools) if settings.expert_rule != "sample" else {}

    async def one(row):
        tools, rule = choose_expert(row, orders.get(row["combo"]), tools_by_subtask, settings.tie_margin, by_tools)
        async with slots:
            out = await trajectory_row(pool, row, tools, rule, tools_by_subtask, settings)
        if progress is not None:
            progress(1)
        return out

    done = await asyncio.gather(*(one(row) for row in rows))
    meta = {**searched.meta, "kind": "expert", "expert": settings_dict(settings), "combination_orders": orders}
    return Batch.from_rows(done, meta=meta, kinds=_kinds(searched, done))


def _kinds(source: Batch, rows: Sequence[Mapping]) -> dict[str, str]:
    """Column kinds of ``rows``: the source batch's, then the expert's columns they hold."""
    names = set(rows[0]) if rows else set()
    return {name: source.kind(name) for name in source.columns} | {n: k for n, k in EXPERT_KINDS.items() if n in names}


async def expert_batch(
    pool,
    samples: Batch,
    settings: ExpertSettings,
    tools_by_subtask: Mapping[str, Sequence[str]] | None = None,
    concurrency: int = 8,
) -> Batch:
    """Expert trajectories of every row of ``samples``, in order (the combination rule's orders
    come from these samples)."""
    if tools_by_subtask is None:
        tools_by_subtask = await served_tools_by_subtask(pool)
    searched = await search_batch(pool, samples, settings, tools_by_subtask, concurrency)
    return await trajectory_batch(pool, searched, settings, tools_by_subtask, concurrency)


async def served_tools_by_subtask(pool) -> dict[str, list[str]]:
    from tir.agent.baselines import tools_by_subtask

    return tools_by_subtask(await pool.available_tools())


def settings_dict(settings: ExpertSettings) -> dict:
    out = asdict(settings)
    out["metrics"], out["weights"] = list(settings.metrics), dict(settings.weights)
    return out
