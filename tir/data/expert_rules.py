"""Which searched schedule becomes the expert (``quality`` ranks them), and how it is perturbed.

``sample`` rule: the sample's own best schedule, near ties (``ties`` within ``tie_margin``) broken
toward the conventional order and tools (``pick_expert``). ``combination`` rule: one order of
subtasks per combination (``combination_orders``), then the sample's best tools in that order
(``choose_expert``). ``combination_tools`` rule: one schedule of tools per combination, which is
the same as ``combination`` with one tool per subtask; with several, which tool of a subtask wins
also flips from crop to crop, so fixing it makes the labels learnable again. Perturbation
(``perturb_tools``) reorders steps or swaps a step's tool.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tir.data.degradations import SUBTASK_FOR_DEGRADATION, stable_hash
from tir.rl.reward import LOWER_BETTER, metric_gains, normalize_gains


@dataclass
class Schedule:
    """A (partial) tool schedule executed on one LQ photo: its tools and their true outputs."""

    tools: tuple[str, ...]
    images: tuple[np.ndarray, ...]
    image: np.ndarray  # the current image: the last output, or the LQ photo
    scores: dict[str, float] | None = None
    quality: float = 0.0  # the combined score among the candidates it was ranked with


# Score differences too small to prefer one schedule over another (per metric, its own units): a
# few tenths of a dB moves with the crop and the noise draw (tir.data.expert.ties).
TIE_TOLERANCE = {
    "psnr": 0.3,
    "ssim": 0.01,
    "ms_ssim": 0.01,
    "fsim": 0.01,
    "vif": 0.02,
    "gmsd": 0.005,
    "lpips": 0.01,
    "niqe": 0.3,
    "piqe": 2.0,
}


def quality(candidate_scores: Sequence[Mapping], input_scores: Mapping, settings) -> np.ndarray:
    """One number per candidate, as the reward combines metrics: gains over the input,
    standardised across the candidates, weighted. A candidate a metric could not score gets
    that metric's worst gain among the others (breaking a metric is no merit). ``settings``: the
    search's ``tir.data.expert.ExpertSettings`` (its metrics and weights)."""
    metrics = [m for m in settings.metrics if m in input_scores and any(m in s for s in candidate_scores)]
    if not metrics:
        raise ValueError(f"no metric of {list(settings.metrics)} could score this sample")
    gains = np.full((len(candidate_scores), len(metrics)), np.nan)
    for i, scores in enumerate(candidate_scores):
        present = [m for m in metrics if m in scores]
        row = metric_gains([{m: scores[m] for m in present}], [input_scores], present, LOWER_BETTER)[0]
        gains[i, [metrics.index(m) for m in present]] = row
    gains = np.where(np.isnan(gains), np.nanmin(gains, axis=0, keepdims=True), gains)
    normalized = normalize_gains(gains, group_size=len(candidate_scores))
    weights = np.array([float(settings.weights.get(m, 0.0)) if settings.weights else 1.0 for m in metrics])
    if weights.sum() <= 0:  # the weighted metrics all failed on this sample: the rest count equally
        weights = np.ones(len(metrics))
    return normalized @ (weights / weights.sum())


def pick_expert(ranked: Sequence[Schedule], tools_by_subtask: Mapping[str, Sequence[str]], margin: float) -> Schedule:
    """The best schedule, except that near ties (``ties`` the best within ``margin``) go to the
    conventional schedule: the order prior of the training-free agents first, then each
    subtask's usual tool, then fewer calls. Near ties are measurement noise; breaking them the same
    way every time keeps the expert's choices learnable (with margin 0: the plain best)."""
    near = [s for s in ranked if ties(s.scores, ranked[0].scores, margin)]
    return min(near, key=lambda s: (*unconventional(s.tools, tools_by_subtask), len(s.tools), -s.quality))


def ties(scores: Mapping[str, float], best: Mapping[str, float], margin: float) -> bool:
    """Whether ``scores`` are as good as ``best`` up to ``margin`` x ``TIE_TOLERANCE`` on every
    metric both have (metrics without a tolerance do not break ties). Absolute units, not the
    search's standardised quality: with two candidates standardised gains are always +-1, so a
    margin in those units could never see a tie."""
    common = [m for m in best if m in scores and m in TIE_TOLERANCE]
    return all((best[m] - scores[m]) * (-1 if LOWER_BETTER[m] else 1) <= margin * TIE_TOLERANCE[m] for m in common)


def unconventional(tools: Sequence[str], tools_by_subtask: Mapping[str, Sequence[str]]) -> tuple[int, int]:
    """(1 if the order departs from the order prior, number of steps not using their subtask's usual tool)."""
    from tir.agent.baselines import FIXED_TOOLS

    subtask_of = {tool: s for s, names in tools_by_subtask.items() for tool in names}
    usual = {
        s: FIXED_TOOLS[s] if FIXED_TOOLS.get(s) in names else sorted(names)[0]
        for s, names in tools_by_subtask.items()
        if names
    }
    return int(departs_from_prior(subtask_order(tools, subtask_of))), sum(usual[subtask_of[t]] != t for t in tools)


def departs_from_prior(subtasks: Sequence[str]) -> bool:
    """Whether an order of subtasks differs from the order prior of the training-free agents."""
    from tir.agent.baselines import restoration_order

    degradation_of = {s: d for d, s in SUBTASK_FOR_DEGRADATION.items()}
    names = [degradation_of[s] for s in subtasks]
    return names != restoration_order(names)


def perturb_tools(
    tools: Sequence[str],
    tools_by_subtask: Mapping[str, Sequence[str]],
    rng: np.random.Generator,
    reorder_prob: float,
    swap_tool_prob: float,
) -> tuple[list[str], dict]:
    """A perturbed copy of a schedule and what was done, each with its probability per
    trajectory: ``reordered`` (another order of the same steps) and ``swapped`` (the index, in
    the new order, of the one step whose tool became another tool of its subtask). A schedule of
    one step cannot be reordered, nor a step whose subtask has a single tool swapped."""
    subtask_of = {tool: s for s, names in tools_by_subtask.items() for tool in names}
    out = list(tools)
    reordered = len(out) > 1 and rng.random() < reorder_prob
    if reordered:
        orders = [p for p in itertools.permutations(range(len(out))) if list(p) != list(range(len(out)))]
        out = [out[i] for i in orders[int(rng.integers(len(orders)))]]
    alternatives = {
        i: [t for t in tools_by_subtask.get(subtask_of.get(tool), []) if t != tool] for i, tool in enumerate(out)
    }
    swappable = [i for i, others in alternatives.items() if others]
    swapped = []
    if swappable and rng.random() < swap_tool_prob:
        index = swappable[int(rng.integers(len(swappable)))]
        out[index] = alternatives[index][int(rng.integers(len(alternatives[index])))]
        swapped.append(index)
    return out, {"reordered": bool(reordered), "swapped": swapped}


def sample_generator(seed: int, row: Mapping) -> np.random.Generator:
    """The perturbation's generator of one row: a function of the run seed and the sample only,
    so that a resumed or re-sharded run perturbs every sample the same way."""
    return np.random.default_rng(
        [
            int(seed),
            stable_hash(str(row.get("image_id", ""))),
            stable_hash(str(row.get("combo", ""))),
            int(row.get("seed", 0)),
        ]
    )


def subtask_order(tools: Sequence[str], subtask_of: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(subtask_of[tool] for tool in tools)


def rule_key(tools: Sequence[str], subtask_of: Mapping[str, str], by_tools: bool) -> tuple[str, ...]:
    """What one label per combination fixes: the schedule of tools (``by_tools``) or its order of subtasks."""
    return tuple(tools) if by_tools else subtask_order(tools, subtask_of)


def combination_orders(
    rows: Sequence[Mapping], subtask_of: Mapping[str, str], by_tools: bool = False
) -> dict[str, list[str]]:
    """{combination: its order of subtasks}: the order whose best schedule has the highest mean
    quality over the combination's searched rows (quality is standardised within each sample,
    so every sample weighs the same). An order the beam pruned in a sample counts as that
    sample's worst candidate. Equal means go to the order prior, then to fewer calls. ``by_tools``: {combination:
    its schedule of tools}, chosen the same way among schedules instead of orders."""
    per_row: dict[
        str, list[tuple[dict[tuple, float], float]]
    ] = {}  # combo -> [(best quality per order, worst quality)]
    for row in rows:
        best: dict[tuple, float] = {}
        for candidate in row["search_candidates"]:
            order = rule_key(candidate["tools"], subtask_of, by_tools)
            best[order] = max(best.get(order, -math.inf), float(candidate["quality"]))
        per_row.setdefault(row["combo"], []).append((best, min(float(c["quality"]) for c in row["search_candidates"])))
    orders = {}
    for combo, bests in per_row.items():
        seen = list(dict.fromkeys(order for best, _ in bests for order in best))
        mean = {order: np.mean([best.get(order, worst) for best, worst in bests]) for order in seen}
        # rounded: means equal up to float noise are a tie, which the order prior breaks
        subtasks = (lambda order: subtask_order(order, subtask_of)) if by_tools else (lambda order: order)
        orders[combo] = list(
            min(
                seen, key=lambda order: (-round(float(mean[order]), 9), departs_from_prior(subtasks(order)), len(order))
            )
        )
    return orders


def choose_expert(
    row: Mapping,
    order: Sequence[str] | None,
    tools_by_subtask: Mapping[str, Sequence[str]],
    margin: float,
    by_tools: bool = False,
) -> tuple[list[str], str]:
    """(the expert's tools, the rule that chose them): the best candidate in ``order``
    (``pick_expert`` among them; ``by_tools``: ``order`` is a schedule of tools, the candidate
    itself), or, with no order or none of its candidates searched, the sample's own expert."""
    subtask_of = {tool: s for s, names in tools_by_subtask.items() for tool in names}
    if order is not None:
        ranked = sorted(
            (c for c in row["search_candidates"] if rule_key(c["tools"], subtask_of, by_tools) == tuple(order)),
            key=lambda c: -c["quality"],
        )
        if ranked:
            schedules = [Schedule(tuple(c["tools"]), (), None, c["scores"], c["quality"]) for c in ranked]
            return list(pick_expert(schedules, tools_by_subtask, margin).tools), "combination"
    return list(row["sample_expert_tools"]), "sample"
