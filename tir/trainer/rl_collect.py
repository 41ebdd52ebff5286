"""A step's trajectories: photos drawn from the data stream, rolled out ``rollout.n`` times each,
their final images scored; and, with DAPO's dynamic sampling (``algo.dynamic_sampling``), groups
whose rewards are all equal dropped and more photos drawn to fill the batch (as many as groups
are missing), at most ``algo.max_resample_batches`` extra draws.

Why: after SFT the n trajectories of a group are often identical, so their rewards are equal and
their advantages zero; a batch of such groups teaches nothing (only the KL and entropy terms
move). Dynamic sampling spends rollouts until the batch holds groups that differ.

Each draw samples with its own seed (draw 0 with the step's, ``step_seed``), so a resumed run
draws what the uninterrupted one did. The state's data position advances by every photo drawn.
Also here: the step's rollout settings and seed, and the scoring of final images (``tir.trainer.rl``
re-exports them).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np

from tir.config import value_or
from tir.rl import algos


@dataclass
class Collected:
    """The step's batch: trajectories (groups of n adjacent rows), their scores, the expert's
    best PSNR per row (NaN: unknown), and what dynamic sampling did."""

    trajectories: Any
    finals: list[dict]
    inputs: list[dict]
    expert_psnr: np.ndarray
    photos_drawn: int
    draws: int
    groups_dropped: int  # flat groups left out (0 without dynamic sampling)
    groups_flat_drawn: int  # flat groups among every group drawn

    def metrics(self, group_size: int) -> dict[str, float]:
        drawn = self.photos_drawn
        return {
            "sampling/draws": float(self.draws),
            "sampling/photos_drawn": float(drawn),
            "sampling/groups_kept": float(len(self.trajectories) // group_size),
            "sampling/groups_dropped": float(self.groups_dropped),
            "sampling/flat_share_drawn": self.groups_flat_drawn / drawn if drawn else 0.0,
        }


def step_seed(seed: int, step: int) -> int:
    """The rollout seed of one step; the agent loop derives each row's and each turn's request
    seed from it, so sampling is a function of (seed, step, row, turn) and a resumed run
    samples what the uninterrupted one did. Below 2**31: the loop's derived seeds stay in int64."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0]) % (1 << 31)


def loop_settings(cfg, step: int):
    from tir.agent.loop import LoopSettings

    # rollout.choices (replies constrained to these texts: smoke runs) comes with the section
    return LoopSettings.from_recipe(cfg.rollout, cfg.get("env"), seed=step_seed(cfg.run.seed, step))


def draw_seed(seed: int, step: int, draw: int) -> int:
    """The rollout seed of one draw of a step: the step's own seed for draw 0."""
    if draw == 0:
        return step_seed(seed, step)
    return int(np.random.SeedSequence([seed, step, draw]).generate_state(1)[0]) % (1 << 31)


def collect(run, data_position: int, step: int, timer) -> Collected:
    """Roll out, score, and (dynamic sampling) keep the first ``trainer.batch_size`` groups
    whose rewards differ; see the module docstring."""
    from dataclasses import replace

    from tir.agent.loop import run_rollout

    cfg, n, want = run.cfg, int(run.cfg.rollout.n), int(run.cfg.trainer.batch_size)
    dynamic = bool(value_or(cfg, "algo.dynamic_sampling", False))
    extra = int(value_or(cfg, "algo.max_resample_batches", 0)) if dynamic else 0
    pieces, flags, position, draws = [], [], data_position, 0
    for draw in range(extra + 1):
        # draw 0: the batch; each further draw: as many photos as groups are still missing
        rows = run.stream.indices(position, want - sum(flags))
        position += len(rows)
        draws += 1
        groups = run.samples.take(rows).repeat(n)
        settings = replace(loop_settings(cfg, step), seed=draw_seed(cfg.run.seed, step, draw))
        with timer("rollout"):
            trajectories = run_rollout(
                run.engine, run.processor, run.pool, groups, settings, tool_schemas=run.schemas, cues=run.cues
            )
        with timer("score"):
            finals, inputs = asyncio.run(
                score_trajectories(run.pool, trajectories, run.reward_fn, n, cfg.rollout.concurrency)
            )
        expert = np.repeat(run.expert_psnr[np.asarray(rows, dtype=int)], n) if run.expert_psnr is not None else None
        pieces.append((trajectories, finals, inputs, expert))
        if not dynamic:
            break
        with timer("reward"):
            probe = run.reward_fn(
                finals,
                inputs,
                trajectories.column("num_tool_calls"),
                trajectories.column("format_errors"),
                group_size=n,
                update=False,  # the adaptive weights move once per step, on the batch kept
            )
        flags += algos.informative_groups(_as_tensor(probe.rewards), n).tolist()
        if sum(flags) >= want:
            break
    photos = position - data_position
    if not dynamic:
        trajectories, finals, inputs, expert = pieces[0]
        return Collected(trajectories, finals, inputs, _expert_or_nan(expert, len(finals)), photos, draws, 0, 0)
    keep = algos.first_informative(flags, want) or list(range(len(pieces[0][1]) // n))  # none differ: draw 0 as is
    # every drawn group, in order: (piece, group within the piece)
    where = [(p, g) for p, piece in enumerate(pieces) for g in range(len(piece[1]) // n)]
    chosen = [where[i] for i in keep]
    batches, finals, inputs, expert = [], [], [], []
    for p, g in chosen:
        trajectories, f, i, e = pieces[p]
        rows = list(range(g * n, (g + 1) * n))
        batches.append(trajectories.take(rows))
        finals += [f[r] for r in rows]
        inputs += [i[r] for r in rows]
        expert += list(_expert_or_nan(e, len(f))[rows])
    flat = len(flags) - sum(flags)
    dropped = len(where) - len(chosen) if sum(flags) else 0
    return Collected(_concat(batches), finals, inputs, np.asarray(expert, dtype=float), photos, draws, dropped, flat)


def _concat(batches):
    """Draws' trajectories as one Batch; when arrow typed a column differently in two draws (a
    list column empty in one of them), rebuilt from the values with the first draw's kinds."""
    from tir.protocol import Batch, BatchError

    try:
        return Batch.concat(batches)
    except BatchError:
        first = batches[0]
        columns = {name: [v for b in batches for v in b.column(name)] for name in first.columns}
        return Batch.from_pydict(columns, first.meta, {name: first.kind(name) for name in first.columns})


def _as_tensor(values):
    import torch

    return torch.as_tensor(np.asarray(values, dtype=float))


def _expert_or_nan(expert, rows: int) -> np.ndarray:
    return np.full(rows, np.nan) if expert is None else np.asarray(expert, dtype=float)


# ------------------------------------------------------------------------------ scoring


async def score_trajectories(
    pool, trajectories, reward_fn, group_size: int, concurrency: int
) -> tuple[list[dict], list[dict]]:
    """Scores of every final image and of its degraded input (once per group), per row; a
    score that failed is filled in (``fill_missing``)."""
    from tool_pool.client import score_against

    finals, lqs, hqs = trajectories.column("final_image"), trajectories.column("lq"), trajectories.column("hq")
    slots = asyncio.Semaphore(concurrency)

    async def score(image, hq):
        async with slots:
            return await score_against(pool, reward_fn.metrics, image, hq)

    firsts = range(0, len(trajectories), group_size)
    inputs, final_scores = await asyncio.gather(
        asyncio.gather(*(score(lqs[i], hqs[i]) for i in firsts)),
        asyncio.gather(*(score(im, hq) for im, hq in zip(finals, hqs))),
    )
    input_scores = [inputs[i // group_size] for i in range(len(trajectories))]
    return fill_missing(final_scores, input_scores, reward_fn.metrics, reward_fn.lower_better, group_size)


def fill_missing(finals: list[dict], inputs: list[dict], metrics, lower_better: dict, group_size: int):
    """A final image a metric could not score gets the worst score of its group (breaking a
    metric is no merit); an input that could not be scored, the same; a metric nothing in the
    group could score, 0 everywhere (no gain, no signal)."""
    finals, inputs = [dict(f) for f in finals], [dict(i) for i in inputs]
    for start in range(0, len(finals), group_size):
        rows = range(start, start + group_size)
        for m in metrics:
            known = [finals[i][m] for i in rows if m in finals[i]] + [inputs[i][m] for i in rows if m in inputs[i]]
            worst = (max(known) if lower_better[m] else min(known)) if known else 0.0
            for i in rows:
                finals[i].setdefault(m, worst)
                inputs[i].setdefault(m, worst)
    return finals, inputs
