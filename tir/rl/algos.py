"""GRPO as small pure functions over torch tensors: advantages, the clipped policy loss, the KL
penalty, entropy, loss aggregation, and the two losses the actor minimises (``grpo_loss`` for
RL, ``sft_loss`` for SFT), each a function of the per-token log-probs and the batch's tensors.

Shapes: ``N`` rows (trajectories), ``T`` token positions (padded). ``mask`` [N, T] is 1 on the
tokens the policy wrote (assistant tokens) and 0 on prompt, tool/observation and padding tokens,
so only the policy's own tokens carry gradient.

The formulas follow verl (``trainer/ppo/core_py``), the reference framework, so that a
result here can be compared with a verl run:
- GRPO advantage (Shao et al. 2024, DeepSeekMath): ``(r - mean(group)) / (std(group) + eps)``;
- clipped surrogate (Schulman et al. 2017, PPO) with DAPO's asymmetric "clip-higher"
  (Yu et al. 2025): ratio clipped to ``[1 - clip_low, 1 + clip_high]``;
- KL estimators k1, k2, k3 from J. Schulman, "Approximating KL Divergence" (2020).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_KINDS = ("k1", "k2", "k3")
_LOG_RATIO_LIMIT = 20.0  # exp(20) ~ 5e8: keeps a stale or diverged row from overflowing to inf


# ------------------------------------------------------------------------------ checks
def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(
            "expected tensors of one shape [N, T], got " + ", ".join(f"{k} {v}" for k, v in shapes.items())
        )


def _check_2d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a tensor [N, T], got {got}")


# ------------------------------------------------------------------------------ advantages
def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, normalize_std: bool = True
) -> torch.Tensor:
    """GRPO advantages [N] from scalar rewards [N].

    Rows of one group are adjacent (``Batch.repeat`` interleaves them: a a a b b b), so the
    rewards reshape to [N / group_size, group_size]. Each reward minus its group's mean, divided
    by the group's std plus ``eps`` when ``normalize_std`` (Dr. GRPO drops the division: pass
    False).

    The std is the unbiased sample std (Bessel's correction, divide by n - 1), as verl's
    ``compute_grpo_outcome_advantage`` computes it with ``torch.std``. A group whose rewards are
    all equal has std 0 and gets advantage 0 (no NaN): it carries no learning signal. A group of
    one (``group_size=1``) has no baseline; as in verl its advantage is the reward itself
    (mean 0, std 1), i.e. plain REINFORCE.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        got = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards: expected a tensor [N], got {got}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"rewards: {rewards.numel()} rows do not split into groups of {group_size}")
    if eps < 0:
        raise ValueError(f"eps: expected a value >= 0, got {eps}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if group_size == 1:
        return rewards / (1.0 + eps) if normalize_std else rewards.clone()
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (groups.std(dim=1, unbiased=True, keepdim=True) + eps)
    return centred.reshape(-1)


def informative_groups(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """[N / group_size] booleans: the groups whose rewards differ (max - min > ``eps``). A group
    whose rewards are all equal gets advantage 0 on every row (``group_advantages``): it teaches
    nothing, and DAPO's dynamic sampling drops it and draws more photos instead."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards: expected a tensor [N], got {getattr(rewards, 'shape', type(rewards).__name__)}")
    if not isinstance(group_size, int) or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards: {rewards.numel()} rows do not split into groups of {group_size!r}")
    groups = rewards.float().view(-1, group_size)
    return (groups.max(dim=1).values - groups.min(dim=1).values) > eps


def first_informative(flags: list[bool], want: int) -> list[int]:
    """Indices of the first ``want`` informative groups among those drawn so far, in draw order
    (dynamic sampling's batch: groups past ``want`` are dropped, as DAPO drops them)."""
    return [i for i, ok in enumerate(flags) if ok][: max(0, want)]


def expert_shortfall(final_psnr: torch.Tensor, expert_psnr: torch.Tensor, coef: float) -> torch.Tensor:
    """A reward term [N]: ``-coef`` x the dB by which each final image falls short of the expert's
    best schedule for its photo (0 where it matches or beats it, and where the expert's score is
    unknown: NaN). Within a GRPO group the expert's score is one number, so the term ranks the
    group's samples as PSNR does up to the expert's level and no further: what imitation of a
    per-combination label cannot reach, and nothing beyond the toolbox's ceiling to chase."""
    if final_psnr.shape != expert_psnr.shape or final_psnr.dim() != 1:
        raise ValueError(f"expected two tensors [N], got {tuple(final_psnr.shape)} and {tuple(expert_psnr.shape)}")
    if coef < 0:
        raise ValueError(f"coef: expected a value >= 0, got {coef}")
    short = (expert_psnr - final_psnr).clamp(min=0.0)
    return torch.where(torch.isnan(short), torch.zeros_like(short), -coef * short)


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One advantage per row [N] spread over that row's tokens [N, T]; zero off the mask."""
    _check_2d("mask", mask)
    if advantages.dim() != 1 or advantages.shape[0] != mask.shape[0]:
        raise ValueError(
            f"advantages: expected [N] with N = {mask.shape[0]} rows of mask, got {tuple(advantages.shape)}"
        )
    return advantages.unsqueeze(1) * mask.to(advantages.dtype)


# ------------------------------------------------------------------------------ aggregation
def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the mask; 0 (not NaN) when the mask is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """A scalar loss from per-token losses [N, T].

    - ``token-mean``: sum over every unmasked token / number of unmasked tokens: each token
      weighs the same, so long trajectories weigh more (DAPO's token-level loss).
    - ``seq-mean-token-mean``: mean per sequence, then mean over sequences: each trajectory
      weighs the same (the original GRPO objective).
    - ``seq-mean-token-sum``: sum per sequence, then mean over sequences (Dr. GRPO's
      length-unbiased form, up to a constant).

    Fully masked rows (a trajectory with no policy tokens left) carry no loss: the sequence
    modes average over the rows that have at least one token (verl would divide 0 by 0 there),
    and an all-masked batch gives 0.
    """
    _check_2d("loss_mat", loss_mat)
    _check_same_shape(loss_mat=loss_mat, mask=mask)
    mask = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    tokens_per_row = mask.sum(dim=1)
    has_tokens = tokens_per_row > 0
    row_sums = (loss_mat * mask).sum(dim=1)
    if mode == "seq-mean-token-mean":
        per_row = row_sums / tokens_per_row.clamp(min=1.0)
    elif mode == "seq-mean-token-sum":
        per_row = row_sums
    else:
        raise ValueError(f"loss aggregation mode {mode!r} unknown; expected one of {LOSS_AGG_MODES}")
    return per_row[has_tokens].sum() / has_tokens.sum().clamp(min=1)


# ------------------------------------------------------------------------------ losses
def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO/GRPO clipped surrogate loss over the masked tokens, and its metrics.

    ``ratio = exp(logprobs - old_logprobs)``; per token
    ``loss = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))``, i.e. the
    pessimistic (larger) of the unclipped and clipped losses. ``clip_high > clip_low`` is DAPO's
    clip-higher: low-probability tokens with positive advantage may grow further before the
    clip stops their gradient, which keeps entropy from collapsing.

    ``advantages`` is [N] (one per trajectory, broadcast here) or already [N, T].

    Metrics (floats, for logging): ``clip_frac`` (tokens where the clipped branch is taken, i.e.
    the gradient is zero), ``clip_frac_low`` / ``clip_frac_high`` (the ratio below / above the
    clip range there), ``approx_kl`` (mean of old - new log-probs, verl's ``ppo_kl``),
    ``approx_kl_k3`` (the non-negative k3 estimate of the same divergence, see ``kl_penalty``),
    ``ratio_mean``, ``ratio_max``.
    """
    _check_2d("logprobs", logprobs)
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, mask=mask)
    if not (clip_low >= 0 and clip_high >= 0):
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low}, {clip_high}")
    if advantages.dim() == 1:
        advantages = broadcast_to_tokens(advantages, mask)
    _check_same_shape(logprobs=logprobs, advantages=advantages)

    log_ratio = (logprobs - old_logprobs).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_mat = torch.maximum(unclipped, clipped)
    loss = aggregate(loss_mat, mask, agg)

    with torch.no_grad():
        took_clip = (clipped > unclipped).to(ratio.dtype)
        masked_ratio = torch.where(mask.bool(), ratio, torch.ones_like(ratio))
        metrics = {
            "clip_frac": masked_mean(took_clip, mask).item(),
            "clip_frac_low": masked_mean(took_clip * (ratio < 1.0 - clip_low), mask).item(),
            "clip_frac_high": masked_mean(took_clip * (ratio > 1.0 + clip_high), mask).item(),
            "approx_kl": masked_mean(-log_ratio, mask).item(),
            "approx_kl_k3": masked_mean(kl_penalty(logprobs, old_logprobs, "k3"), mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
            "ratio_max": masked_ratio.max().item() if masked_ratio.numel() else 1.0,
        }
    return loss, metrics


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token estimates [N, T] of KL(policy || reference) from sampled tokens' log-probs.

    With ``log_r = ref_logprobs - logprobs`` (tokens sampled from the policy):
    - ``k1 = -log_r``: unbiased, high variance, can be negative;
    - ``k2 = 0.5 * log_r**2``: biased, low variance, >= 0;
    - ``k3 = exp(log_r) - log_r - 1``: unbiased and >= 0, low variance ("low_var_kl" in verl,
      as GRPO uses it). As verl does, ``log_r`` is clamped to [-20, 20] and k3 to [-10, 10], so
      one token far off the reference cannot blow up the loss.

    Positions off ``mask`` (when given) are 0; aggregate with ``aggregate``.
    """
    _check_2d("logprobs", logprobs)
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    log_r = ref_logprobs - logprobs
    if kind == "k1":
        kl = -log_r
    elif kind == "k2":
        kl = 0.5 * log_r.square()
    elif kind == "k3":
        log_r = log_r.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
        kl = (torch.exp(log_r) - log_r - 1.0).clamp(-10.0, 10.0)
    else:
        raise ValueError(f"KL estimator {kind!r} unknown; expected one of {KL_KINDS}")
    if mask is not None:
        _check_same_shape(logprobs=logprobs, mask=mask)
        kl = kl * mask.to(kl.dtype)
    return kl


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dimension: [..., V] -> [...].

    ``logsumexp(z) - sum(softmax(z) * z)``, which stays finite for very negative logits (no
    ``log(0)``), as verl computes it."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


# ------------------------------------------------------------------------------ the losses the actor minimises
@dataclass(frozen=True)
class LossSettings:
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    entropy_coef: float = 0.0
    agg: str = "token-mean"

    @classmethod
    def from_recipe(cls, algo) -> LossSettings:
        return cls(
            algo.clip_ratio_low, algo.clip_ratio_high, algo.kl_coef, algo.kl_kind, algo.entropy_coef, algo.loss_agg
        )


def grpo_loss(logprobs, tensors: dict, settings: LossSettings):
    """The actor's loss on the policy's own tokens (``loss_mask``): the clipped surrogate with
    GRPO advantages, plus ``kl_coef`` x KL(policy || reference), minus ``entropy_coef`` x entropy.

    The engine gives log-probs of the sampled tokens only, not whole distributions, so entropy
    is the sampled estimate ``-log p`` (what is logged) and its bonus a score-function surrogate
    ``-stop_grad(log p) * log p``, whose gradient is the entropy's (on-policy, in expectation)."""
    mask = tensors["loss_mask"]
    old = tensors["old_logprobs"] if "old_logprobs" in tensors else tensors["rollout_logprobs"]
    loss, metrics = policy_loss(
        logprobs, old, tensors["advantages"], mask, settings.clip_low, settings.clip_high, settings.agg
    )
    metrics["pg_loss"] = loss.item()
    if settings.kl_coef > 0:
        kl = aggregate(kl_penalty(logprobs, tensors["ref_logprobs"], settings.kl_kind, mask), mask, settings.agg)
        loss = loss + settings.kl_coef * kl
        metrics["kl"] = kl.item()
    entropy = aggregate(-logprobs.detach(), mask, settings.agg)
    if settings.entropy_coef > 0:
        loss = loss - settings.entropy_coef * aggregate(-logprobs.detach() * logprobs, mask, settings.agg)
    metrics["entropy"] = entropy.item()
    # the rollout engine's log-probs vs the actor's: ~0 when weights were pushed correctly (T = 1)
    metrics["rollout_logprob_diff"] = masked_mean((logprobs.detach() - tensors["rollout_logprobs"]).abs(), mask).item()
    return loss, metrics


def sft_loss(logprobs, tensors):
    """Negative log-likelihood of the policy's tokens (the loss mask: assistant turns only)."""
    nll = -masked_mean(logprobs, tensors["loss_mask"])
    return nll, {"nll": nll.item()}
