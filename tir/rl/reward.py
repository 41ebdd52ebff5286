"""The multi-dimensional adaptive reward: image-quality gains over the degraded input, made
comparable across metrics within each GRPO group, combined with weights that adapt during
training; plus a format term and a tool-cost term.

    reward_fn = MultiMetricReward(["psnr", "ssim", "niqe", "piqe"], mode="adaptive")
    out = reward_fn(final_scores, input_scores, tool_calls, format_errors, group_size=4)
    out.rewards            # [N] floats, one per trajectory
    out.log_dict()         # every weight and per-metric mean gain, for the step's log
    reward_fn.state_dict() # JSON-able: goes into the checkpoint

Per trajectory ``i`` (``N`` rows, groups of ``group_size`` adjacent rows, as ``Batch.repeat``
lays them out; ``M`` metrics):

1. gain ``g[i, m]`` = final score minus the degraded input's score, sign-flipped for
   lower-is-better metrics (NIQE, PIQE, LPIPS...), so that a positive gain is always better.
2. normalised gain ``z[i, m]`` = gain minus its group's mean, divided by the metric's pooled
   within-group std over the batch. Centring inside the group compares trajectories on the
   same image (what GRPO ranks); dividing by a per-metric spread makes dB and [0, 1] metrics
   commensurable. Pooling the spread over the batch (rather than per group) keeps a metric that
   barely differs within one group from being blown up to unit variance by noise. With one
   group in the batch it is the plain z-score.
3. quality ``q[i] = sum_m w[m] * z[i, m]`` with weights ``w`` > 0 summing to 1: fixed
   (``mode="fixed"``, the ablation) or adaptive (``AdaptiveWeights``, below).
4. ``reward[i] = q[i] - format_penalty * format_errors[i] - tool_cost * tool_calls[i]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Which direction is better, as pyiqa's metric table says (DEFAULT_CONFIGS[name]["lower_better"]).
# Copied rather than imported so the reward does not load pyiqa or the pool; pass
# ``lower_better=`` for a metric not listed.
LOWER_BETTER = {
    "psnr": False,
    "psnry": False,
    "ssim": False,
    "ms_ssim": False,
    "fsim": False,
    "vif": False,
    "vsi": False,
    "cw_ssim": False,
    "gmsd": True,
    "lpips": True,
    "dists": True,
    "mad": True,
    "nlpd": True,
    "niqe": True,
    "ilniqe": True,
    "piqe": True,
    "brisque": True,
    "musiq": False,
    "maniqa": False,
    "clipiqa": False,
    "nrqm": False,
    "entropy": False,
}
MODES = ("adaptive", "fixed")


# ------------------------------------------------------------------------------ pure steps
def metric_gains(
    final_scores: Sequence[Mapping[str, float]],
    input_scores: Sequence[Mapping[str, float]],
    metrics: Sequence[str],
    lower_better: Mapping[str, bool],
) -> np.ndarray:
    """[N, M] gains of each final image over its degraded input; positive is better."""
    if len(final_scores) != len(input_scores):
        raise ValueError(f"final_scores has {len(final_scores)} rows but input_scores has {len(input_scores)}")
    gains = np.zeros((len(final_scores), len(metrics)))
    for i, (final, start) in enumerate(zip(final_scores, input_scores)):
        for j, name in enumerate(metrics):
            for what, row in (("final_scores", final), ("input_scores", start)):
                if name not in row:
                    raise ValueError(f"{what}[{i}] has no score for metric {name!r} (has {sorted(row)})")
                if not math.isfinite(row[name]):
                    raise ValueError(f"{what}[{i}][{name!r}] is {row[name]}: expected a finite score")
            gain = float(final[name]) - float(start[name])
            gains[i, j] = -gain if lower_better[name] else gain
    return gains


def normalize_gains(gains: np.ndarray, group_size: int, eps: float = 1e-8) -> np.ndarray:
    """[N, M] gains centred within each group, divided by each metric's pooled within-group std
    (population std of the centred gains over the batch). A metric that never differs within a
    group gets 0 everywhere."""
    n = gains.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} trajectories do not split into groups of group_size={group_size}")
    groups = gains.reshape(n // group_size, group_size, -1)
    centred = (groups - groups.mean(axis=1, keepdims=True)).reshape(n, -1)
    spread = np.sqrt((centred**2).mean(axis=0))
    return np.where(spread > eps, centred / np.maximum(spread, eps), 0.0)


def consensus_agreement(normalized: np.ndarray) -> np.ndarray:
    """[M] how far the other metrics confirm each metric's claimed improvements, in [-1, 1].

    For metric ``m``, with ``up = max(z[:, m], 0)`` (the trajectories ``m`` calls better than
    their group's average, by how much) and ``others`` the mean normalised gain of the other
    metrics: ``sum(up * others) / sqrt(sum(up**2) * sum(others**2))`` over the batch (a
    correlation through the origin, bounded by Cauchy-Schwarz). +1: whenever ``m`` rises the
    others rise in proportion; -1: whenever ``m`` rises the others fall, the signature of a
    hacked metric. Only rises are judged: a metric that misses an improvement the others see
    pays out nothing false, so it is not the one to distrust (a symmetric correlation would
    blame PSNR for falling under a PIQE hack as much as PIQE for rising).

    NaN where undefined: a metric that never rises above its group's mean, others that are all
    flat, or a single metric. With 2 metrics each is judged by the other alone, so a hack can
    be seen but not always told apart from its victim: use 3 or more.
    """
    m = normalized.shape[1]
    out = np.full(m, np.nan)
    if m < 2:
        return out
    total = normalized.sum(axis=1)
    for j in range(m):
        others = (total - normalized[:, j]) / (m - 1)
        up = np.maximum(normalized[:, j], 0.0)
        denom = math.sqrt(float((up * up).sum() * (others * others).sum()))
        if denom > 1e-12:
            out[j] = float((up * others).sum()) / denom
    return out


def improvement_rate(gains: np.ndarray) -> np.ndarray:
    """[M] fraction of trajectories whose final image beats the degraded input on each metric:
    a unit-free measure of how far the policy has got on that metric."""
    return (gains > 0).mean(axis=0)


def _as_weights(weights: Mapping[str, float] | None, metrics: Sequence[str]) -> np.ndarray:
    if not weights:
        return np.full(len(metrics), 1.0 / len(metrics))
    unknown = sorted(set(weights) - set(metrics))
    if unknown:
        raise ValueError(f"weights name metrics {unknown} that are not in metrics {list(metrics)}")
    values = np.array([float(weights.get(name, 0.0)) for name in metrics])
    if not (np.all(np.isfinite(values)) and np.all(values > 0)):
        raise ValueError(f"weights must be positive for every metric in {list(metrics)}, got {dict(weights)}")
    return values / values.sum()


# ------------------------------------------------------------------------------ adaptive weights
class AdaptiveWeights:
    """Metric weights that move during training, from two statistics kept as EMAs over steps.

    Per metric ``m`` and step, from the batch's normalised gains ``z`` and raw gains ``g``:
    - ``agreement[m]``: EMA of ``consensus_agreement(z)[m]``: do the other metrics confirm the
      improvements ``m`` reports? Why: reward hacking shows up as one metric rising while the
      others fall on the same image (over-sharpening that pleases PIQE while PSNR and SSIM
      drop). Honest restoration moves metrics together; a metric whose rises go against the
      consensus is being gamed, or is blind to what the others see. Either way it should pay
      out less.
    - ``improvement[m]``: EMA of the fraction of trajectories that beat the degraded input on
      ``m`` (``improvement_rate(g)``). Why: a metric the policy already improves almost always
      needs no extra push; one it rarely improves is where the headroom is. A rate rather than
      a raw gain, so that dB and [0, 1] metrics compare.

    Weights: ``w = min_weight + (1 - M * min_weight) * softmax(log(base)
    + agreement_scale * agreement - improvement_scale * improvement)``. The softmax keeps every
    weight positive and the sum 1; ``min_weight`` keeps a distrusted metric visible so that its
    weight can recover if the disagreement passes. Both EMAs start at 0, so step 0 uses the
    base weights (up to the floor), and one noisy batch moves an EMA by only ``1 - decay``. Only
    differences between metrics matter: if all agree equally, nothing moves. With the defaults,
    an agreement gap of 0.5 (sustained) is a factor e^2 ~ 7 in weight, and a metric improved in
    none of the trajectories vs one improved in all is a factor e ~ 2.7. A metric whose
    agreement is undefined in a batch keeps its agreement EMA.
    """

    def __init__(
        self,
        metrics: Sequence[str],
        base_weights: Mapping[str, float] | None = None,
        decay: float = 0.9,
        agreement_scale: float = 4.0,
        improvement_scale: float = 1.0,
        min_weight: float = 0.02,
    ):
        if not metrics or len(set(metrics)) != len(metrics):
            raise ValueError(f"metrics: expected distinct metric names, got {list(metrics)}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: expected a value in [0, 1), got {decay}")
        if not 0.0 <= min_weight * len(metrics) < 1.0:
            raise ValueError(f"min_weight: {min_weight} x {len(metrics)} metrics must be in [0, 1)")
        self.metrics = list(metrics)
        self.base = _as_weights(base_weights, self.metrics)
        self.decay, self.min_weight = float(decay), float(min_weight)
        self.agreement_scale, self.improvement_scale = float(agreement_scale), float(improvement_scale)
        self.agreement = np.zeros(len(self.metrics))
        self.improvement = np.zeros(len(self.metrics))
        self.steps = 0

    def weights(self) -> np.ndarray:
        """[M] current weights: positive, summing to 1."""
        logits = np.log(self.base) + self.agreement_scale * self.agreement - self.improvement_scale * self.improvement
        soft = np.exp(logits - logits.max())
        soft /= soft.sum()
        return self.min_weight + (1.0 - len(self.metrics) * self.min_weight) * soft

    def update(self, normalized: np.ndarray, gains: np.ndarray) -> None:
        """One training step's evidence: [N, M] normalised gains and raw gains."""
        for name, arr in (("normalized", normalized), ("gains", gains)):
            if arr.ndim != 2 or arr.shape[1] != len(self.metrics):
                raise ValueError(
                    f"{name}: expected [N, {len(self.metrics)}] for metrics {self.metrics}, got {arr.shape}"
                )
        agreement = consensus_agreement(normalized)
        known = np.isfinite(agreement)
        self.agreement[known] = self.decay * self.agreement[known] + (1 - self.decay) * agreement[known]
        self.improvement = self.decay * self.improvement + (1 - self.decay) * improvement_rate(gains)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state (floats by metric name), for checkpoints."""
        return {
            "metrics": list(self.metrics),
            "base_weights": dict(zip(self.metrics, self.base.tolist())),
            "agreement": dict(zip(self.metrics, self.agreement.tolist())),
            "improvement": dict(zip(self.metrics, self.improvement.tolist())),
            "steps": self.steps,
            "decay": self.decay,
            "agreement_scale": self.agreement_scale,
            "improvement_scale": self.improvement_scale,
            "min_weight": self.min_weight,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state.get("metrics", [])) != self.metrics:
            raise ValueError(
                f"reward weight state is for metrics {state.get('metrics')}, this reward uses {self.metrics}"
            )
        self.base = np.array([state["base_weights"][m] for m in self.metrics], dtype=float)
        self.agreement = np.array([state["agreement"][m] for m in self.metrics], dtype=float)
        self.improvement = np.array([state["improvement"][m] for m in self.metrics], dtype=float)
        self.steps = int(state["steps"])
        self.decay, self.min_weight = float(state["decay"]), float(state["min_weight"])
        self.agreement_scale = float(state["agreement_scale"])
        self.improvement_scale = float(state["improvement_scale"])


# ------------------------------------------------------------------------------ the reward
@dataclass
class RewardOutput:
    """Rewards [N] and what they are made of (arrays are [N], dicts are by metric name)."""

    rewards: np.ndarray
    quality: np.ndarray
    format_term: np.ndarray
    tool_term: np.ndarray
    gains: dict[str, np.ndarray]  # raw gains over the input, in the metric's units (+ = better)
    normalized: dict[str, np.ndarray]  # group-centred, spread-normalised gains
    contributions: dict[str, np.ndarray]  # weight * normalised gain: the quality term per metric
    weights: dict[str, float]
    agreement: dict[str, float]  # this batch's consensus correlation (NaN: undefined)

    def log_dict(self, prefix: str = "reward/") -> dict[str, float]:
        """Flat scalars for the step's log: every weight, mean raw gain, improvement rate, and
        agreement per metric (agreement left out where this batch leaves it undefined)."""
        out = {
            f"{prefix}mean": float(self.rewards.mean()),
            f"{prefix}quality_mean": float(self.quality.mean()),
            f"{prefix}format_mean": float(self.format_term.mean()),
            f"{prefix}tool_mean": float(self.tool_term.mean()),
        }
        for name in self.weights:
            out[f"{prefix}weight/{name}"] = self.weights[name]
            out[f"{prefix}gain/{name}"] = float(self.gains[name].mean())
            out[f"{prefix}improved/{name}"] = float((self.gains[name] > 0).mean())
            if math.isfinite(self.agreement[name]):
                out[f"{prefix}agreement/{name}"] = self.agreement[name]
        return out


class MultiMetricReward:
    """The reward function of the RL driver (see the module docstring for the formula).

    ``mode="adaptive"`` updates the weights from each call's batch before scoring it (so the
    step that shows a disagreement already feels it, damped by the EMA); ``mode="fixed"`` uses
    ``weights`` (equal if empty) as they are: the fixed-weight ablation."""

    def __init__(
        self,
        metrics: Sequence[str],
        mode: str = "adaptive",
        weights: Mapping[str, float] | None = None,
        lower_better: Mapping[str, bool] | None = None,
        format_penalty: float = 0.5,
        tool_cost: float = 0.05,
        **adaptive_options: float,
    ):
        if mode not in MODES:
            raise ValueError(f"reward mode {mode!r} unknown; expected one of {MODES}")
        directions = {**LOWER_BETTER, **(lower_better or {})}
        unknown = [m for m in metrics if m not in directions]
        if unknown:
            raise ValueError(f"metrics {unknown}: direction unknown; pass lower_better={{name: True/False}}")
        if format_penalty < 0 or tool_cost < 0:
            raise ValueError(f"format_penalty and tool_cost must be >= 0, got {format_penalty}, {tool_cost}")
        self.metrics, self.mode = list(metrics), mode
        self.lower_better = {m: bool(directions[m]) for m in self.metrics}
        self.format_penalty, self.tool_cost = float(format_penalty), float(tool_cost)
        self.adaptive = AdaptiveWeights(self.metrics, weights, **adaptive_options)
        self.fixed_weights = _as_weights(weights, self.metrics)

    @classmethod
    def from_config(cls, reward_cfg: Any, **adaptive_options: float) -> MultiMetricReward:
        """From a recipe's ``reward`` section (metrics, weights, adaptive, format_penalty,
        tool_cost, and the adaptive options decay, agreement_scale, improvement_scale, min_weight)."""
        for key in ("decay", "agreement_scale", "improvement_scale", "min_weight"):
            if key in reward_cfg and key not in adaptive_options:
                adaptive_options[key] = reward_cfg[key]
        return cls(
            list(reward_cfg.metrics),
            mode="adaptive" if reward_cfg.adaptive else "fixed",
            weights=dict(reward_cfg.weights),
            format_penalty=reward_cfg.format_penalty,
            tool_cost=reward_cfg.tool_cost,
            **adaptive_options,
        )

    def current_weights(self) -> dict[str, float]:
        w = self.adaptive.weights() if self.mode == "adaptive" else self.fixed_weights
        return dict(zip(self.metrics, w.tolist()))

    def __call__(
        self,
        final_scores: Sequence[Mapping[str, float]],
        input_scores: Sequence[Mapping[str, float]],
        tool_calls: Sequence[int],
        format_errors: Sequence[int],
        group_size: int,
        update: bool = True,
    ) -> RewardOutput:
        """Rewards of one step's trajectories. ``update=False`` scores without moving the
        adaptive weights (evaluation, or re-scoring a dump)."""
        n = len(final_scores)
        for name, values in (("tool_calls", tool_calls), ("format_errors", format_errors)):
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} rows but final_scores has {n}")
            if any(v < 0 for v in values):
                raise ValueError(f"{name} must be counts >= 0, got {list(values)}")
        gains = metric_gains(final_scores, input_scores, self.metrics, self.lower_better)
        normalized = normalize_gains(gains, group_size)
        if self.mode == "adaptive" and update:
            self.adaptive.update(normalized, gains)
        weights = self.current_weights()
        w = np.array([weights[m] for m in self.metrics])
        quality = normalized @ w
        format_term = -self.format_penalty * np.asarray(format_errors, dtype=float)
        tool_term = -self.tool_cost * np.asarray(tool_calls, dtype=float)
        agreement = consensus_agreement(normalized)
        return RewardOutput(
            rewards=quality + format_term + tool_term,
            quality=quality,
            format_term=format_term,
            tool_term=tool_term,
            gains={m: gains[:, j] for j, m in enumerate(self.metrics)},
            normalized={m: normalized[:, j] for j, m in enumerate(self.metrics)},
            contributions={m: w[j] * normalized[:, j] for j, m in enumerate(self.metrics)},
            weights=weights,
            agreement={m: float(agreement[j]) for j, m in enumerate(self.metrics)},
        )

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "adaptive": self.adaptive.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"reward state was saved in mode {state.get('mode')!r}, this reward runs {self.mode!r}")
        self.adaptive.load_state_dict(state["adaptive"])
