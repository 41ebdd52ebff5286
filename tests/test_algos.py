"""Tests for tir.rl.algos: hand-computed values, and loop implementations of the published formulas
(GRPO's group normalisation as verl writes it, PPO's clipped objective, Schulman's KL estimators)."""

import math
from collections import defaultdict

import numpy as np
import pytest
import torch

import tir  # noqa: F401  (environment shims first)
from tir.rl.algos import (
    LossSettings,
    aggregate,
    broadcast_to_tokens,
    entropy_from_logits,
    expert_shortfall,
    first_informative,
    group_advantages,
    grpo_loss,
    informative_groups,
    kl_penalty,
    policy_loss,
    sft_loss,
)


# ------------------------------------------------------------------------------ advantages
def test_group_advantages_hand_computed():
    # group 1: mean 2, unbiased std sqrt((1^2 + 0 + 1^2) / 2) = 1; group 2 is constant: 0 (eps keeps 0/0 away)
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), group_size=3, eps=1e-6)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (1 + 1e-6))
    # mean 1; deviations -1 -1 -1 3; unbiased variance 12 / 3 = 4 -> std 2 (biased would be sqrt 3)
    adv = group_advantages(torch.tensor([0.0, 0.0, 0.0, 4.0]), group_size=4, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-0.5, -0.5, -0.5, 1.5]))


def test_group_advantages_identical_rewards_give_zero_not_nan():
    adv = group_advantages(torch.full((8,), 0.7), group_size=4)
    assert torch.equal(adv, torch.zeros(8))


def test_group_advantages_without_std_is_mean_centring():
    adv = group_advantages(torch.tensor([1.0, 3.0, 10.0, 20.0]), group_size=2, normalize_std=False)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -5.0, 5.0]))


def test_dynamic_sampling_keeps_the_first_groups_whose_rewards_differ():
    # groups of 3: flat, differs, flat (equal to within eps), differs by one row only
    rewards = torch.tensor([0.2, 0.2, 0.2, 0.0, 1.0, 0.5, 3.0, 3.0 + 1e-9, 3.0, 1.0, 1.0, 1.5])
    flags = informative_groups(rewards, 3)
    assert flags.tolist() == [False, True, False, True]
    # exactly the groups whose advantages are not all zero
    nonzero = group_advantages(rewards, 3).view(4, 3).abs().amax(dim=1) > 1e-3
    assert nonzero.tolist() == flags.tolist()
    assert first_informative(flags.tolist() + [True, True], want=3) == [1, 3, 4]  # the 6th is dropped
    assert first_informative([False, False], want=2) == []
    with pytest.raises(ValueError, match="groups of 4"):
        informative_groups(rewards[:10], 4)


def test_expert_shortfall_costs_the_db_below_the_experts_best_only():
    final = torch.tensor([20.0, 22.0, 25.0, 18.0])
    expert = torch.tensor([24.0, 24.0, 24.0, float("nan")])  # the last photo has no expert score
    term = expert_shortfall(final, expert, coef=0.1)
    torch.testing.assert_close(term, torch.tensor([-0.4, -0.2, 0.0, 0.0]))
    # within a group it ranks as PSNR does below the expert's level: advantages follow the dB
    adv = group_advantages(term[:3], 3)
    assert adv[0] < adv[1] < adv[2]
    assert torch.equal(expert_shortfall(final, expert, coef=0.0), torch.zeros(4))
    with pytest.raises(ValueError, match="coef"):
        expert_shortfall(final, expert, coef=-1.0)


def _verl_grpo_loop(scores, index, eps, norm_by_std):
    """verl's compute_grpo_outcome_advantage, written as it is there: dict of groups by uid,
    torch.mean / torch.std per group, a group of one gets mean 0 and std 1."""
    id2score = defaultdict(list)
    for i in range(len(scores)):
        id2score[index[i]].append(scores[i])
    id2mean, id2std = {}, {}
    for idx, values in id2score.items():
        if len(values) == 1:
            id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            id2mean[idx], id2std[idx] = torch.mean(torch.stack(values)), torch.std(torch.stack(values))
    out = scores.clone()
    for i in range(len(scores)):
        out[i] = (
            (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + eps) if norm_by_std else scores[i] - id2mean[index[i]]
        )
    return out


@pytest.mark.parametrize("group_size", [1, 2, 5])
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_group_advantages_match_verl_loop(group_size, norm_by_std):
    rewards = torch.randn(20 if group_size != 5 else 15, generator=torch.Generator().manual_seed(group_size))
    index = [f"uid{i // group_size}" for i in range(len(rewards))]  # adjacent rows share a uid (Batch.repeat)
    expected = _verl_grpo_loop(rewards, index, 1e-6, norm_by_std)
    torch.testing.assert_close(group_advantages(rewards, group_size, 1e-6, norm_by_std), expected)


def test_group_advantages_bad_input_is_named():
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match=r"rewards: expected a tensor \[N\]"):
        group_advantages(torch.zeros(2, 3), group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), group_size=0)


def test_broadcast_to_tokens():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    torch.testing.assert_close(out, torch.tensor([[2.0, 2.0, 0.0], [0.0, -1.0, -1.0]]))
    with pytest.raises(ValueError, match="advantages"):
        broadcast_to_tokens(torch.tensor([1.0, 2.0, 3.0]), mask)


# ------------------------------------------------------------------------------ aggregation
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # row 2 fully masked


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", (1 + 2 + 3 + 4) / 4),  # 4 tokens
        ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 4) / 2),  # rows with tokens: 2 and 4 -> 3
        ("seq-mean-token-sum", ((1 + 2 + 3) + 4) / 2),  # 6 and 4 -> 5
    ],
)
def test_aggregate_hand_computed_with_a_fully_masked_row(mode, expected):
    assert aggregate(LOSS, MASK, mode).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregate_all_masked_is_zero_with_zero_gradient(mode):
    loss_mat = torch.randn(2, 3, requires_grad=True)
    out = aggregate(loss_mat, torch.zeros(2, 3), mode)
    out.backward()
    assert out.item() == 0.0 and torch.equal(loss_mat.grad, torch.zeros(2, 3))


def test_aggregate_unknown_mode_and_shape_mismatch():
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        aggregate(LOSS, MASK, "sequence-mean")
    with pytest.raises(ValueError, match="one shape"):
        aggregate(LOSS, MASK[:, :2], "token-mean")


# ------------------------------------------------------------------------------ policy loss
def _logp_pair(ratios):
    """(logprobs, old_logprobs) whose exp-difference is exactly ``ratios``."""
    old = torch.full_like(ratios, -1.0)
    return (old + torch.log(ratios)).requires_grad_(True), old


def test_policy_loss_hand_computed_clipping_both_sides():
    ratios = torch.tensor(
        [
            [1.5, 0.5, 9.0],  # A = +1: 1.5 clipped to 1.28; 0.5 below range but A > 0: not clipped
            [1.1, 0.7, 1.5],  # A = -1: 1.1 inside; 0.7 clipped to 0.8; 1.5 above range but A < 0: not clipped
            [3.0, 3.0, 3.0],
        ]
    )  # fully masked
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    adv = torch.tensor([1.0, -1.0, 2.0])
    per_token = [-1.28, -0.5, 1.1, 0.8, 1.5]  # max(-A r, -A clip(r)) on the 5 unmasked tokens
    logp, old = _logp_pair(ratios)
    loss, metrics = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, agg="token-mean")
    assert loss.item() == pytest.approx(sum(per_token) / 5)
    assert metrics["clip_frac"] == pytest.approx(2 / 5)
    assert metrics["clip_frac_high"] == pytest.approx(1 / 5) and metrics["clip_frac_low"] == pytest.approx(1 / 5)
    assert metrics["ratio_max"] == pytest.approx(1.5)  # the masked 9.0 and 3.0 do not count
    # d loss / d logp = -A * ratio / 5 on unclipped tokens, 0 on clipped and masked ones
    loss.backward()
    expected_grad = torch.tensor([[0.0, -0.5 / 5, 0.0], [1.1 / 5, 0.0, 1.5 / 5], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected_grad)

    seq_mean, _ = policy_loss(logp, old, adv, mask, 0.2, 0.28, agg="seq-mean-token-mean")
    assert seq_mean.item() == pytest.approx(((-1.28 - 0.5) / 2 + (1.1 + 0.8 + 1.5) / 3) / 2)


def test_policy_loss_on_policy_is_minus_mean_advantage():
    # ratio 1 everywhere: nothing clipped, loss = -mean A over tokens, approx KL 0
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    logp = torch.randn(2, 4)
    loss, metrics = policy_loss(logp, logp.clone(), torch.tensor([0.5, -2.0]), mask)
    assert loss.item() == pytest.approx(-(0.5 * 3 - 2.0) / 4)
    assert metrics["clip_frac"] == 0.0 and metrics["approx_kl"] == 0.0 and metrics["approx_kl_k3"] == 0.0


def _ppo_loop(logp, old, adv, mask, lo, hi, agg):
    """The PPO-clip objective as published: maximise min(r A, clip(r, 1-lo, 1+hi) A), one token
    at a time; loss is its negative, aggregated per token or per sequence."""
    rows = []
    for i in range(len(logp)):
        row = []
        for t in range(len(logp[i])):
            if mask[i][t]:
                r = math.exp(logp[i][t] - old[i][t])
                row.append(-min(r * adv[i], min(max(r, 1 - lo), 1 + hi) * adv[i]))
        rows.append(row)
    if agg == "token-mean":
        tokens = [x for row in rows for x in row]
        return sum(tokens) / len(tokens)
    per_seq = [sum(row) / (len(row) if agg == "seq-mean-token-mean" else 1) for row in rows if row]
    return sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_policy_loss_matches_published_formula_loop(agg):
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(6, 7, generator=g, dtype=torch.float64) * 0.3 - 2
    old = logp + torch.randn(6, 7, generator=g, dtype=torch.float64) * 0.3  # ratios spread across the clip range
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    mask = (torch.rand(6, 7, generator=g) > 0.3).long()
    mask[2] = 0  # a fully masked row
    loss, metrics = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, agg=agg)
    expected = _ppo_loop(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, agg)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert 0.0 < metrics["clip_frac"] < 1.0  # the data does exercise both branches


def test_policy_loss_shape_errors_are_named():
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3), clip_low=-0.1)


# ------------------------------------------------------------------------------ KL and entropy
def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    log_r = math.log(0.5)  # ref - logp
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(-log_r)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * log_r**2)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - log_r - 1)


def test_kl_estimators_are_unbiased_for_kl_policy_to_reference():
    # Schulman's note: with x ~ p, k1 and k3 are unbiased estimates of KL(p || q); k3 is >= 0
    # and has lower variance.
    p = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    true_kl = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, ref = p.log()[x].unsqueeze(0), q.log()[x].unsqueeze(0)
    k1, k3 = kl_penalty(logp, ref, "k1"), kl_penalty(logp, ref, "k3")
    assert k1.mean().item() == pytest.approx(true_kl, rel=0.03)
    assert k3.mean().item() == pytest.approx(true_kl, rel=0.03)
    assert (k3 >= 0).all() and k3.var() < k1.var()


def test_kl_penalty_masks_and_clamps():
    logp = torch.tensor([[0.0, 0.0, -50.0]])
    ref = torch.tensor([[-1.0, -2.0, 0.0]])  # last token: log_r = 50, clamped
    out = kl_penalty(logp, ref, "k3", mask=torch.tensor([[1, 0, 1]]))
    assert out[0, 1].item() == 0.0
    assert out[0, 0].item() == pytest.approx(math.exp(-1) + 1 - 1)
    assert out[0, 2].item() == 10.0  # clamped, finite
    with pytest.raises(ValueError, match="k3"):
        kl_penalty(logp, ref, "k4")


def test_entropy_from_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, -1e9, -1e9, -1e9], [1.0, 2.0, 3.0, 4.0]])
    p = torch.softmax(logits[2], dim=-1)
    expected = torch.tensor([math.log(4), 0.0, -(p * p.log()).sum().item()])
    out = entropy_from_logits(logits)
    torch.testing.assert_close(out, expected)
    assert entropy_from_logits(torch.randn(2, 5, 11)).shape == (2, 5)


# ------------------------------------------------------------------------------ the losses


def test_grpo_loss_is_the_policy_gradient_plus_kl_on_the_policys_tokens():
    logprobs = torch.log(torch.tensor([[0.5, 0.2, 0.4, 0.9], [0.5, 0.3, 0.6, 0.5]])).requires_grad_()
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    ref = torch.log(torch.tensor([[0.5, 0.4, 0.4, 0.1], [0.5, 0.3, 0.6, 0.5]]))
    tensors = {
        "loss_mask": mask,
        "rollout_logprobs": logprobs.detach(),
        "ref_logprobs": ref,
        "advantages": torch.tensor([1.0, -2.0]),
    }
    settings = LossSettings(kl_coef=0.5, kl_kind="k3")
    loss, metrics = grpo_loss(logprobs, tensors, settings)
    # on-policy (ratio 1): the surrogate is -mean(A) over the 3 policy tokens; k3 KL of token (0, 1) only
    log_r = np.log(0.4 / 0.2)
    kl = (np.exp(log_r) - log_r - 1) / 3
    assert metrics["pg_loss"] == pytest.approx(-(1 + 1 - 2) / 3, abs=1e-6)
    assert metrics["kl"] == pytest.approx(kl, rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * kl, rel=1e-5)
    assert metrics["entropy"] == pytest.approx(-(np.log(0.2) + np.log(0.4) + np.log(0.3)) / 3, rel=1e-5)
    assert metrics["rollout_logprob_diff"] == 0.0
    loss.backward()
    grad = logprobs.grad
    assert torch.all(grad[mask == 0] == 0)  # prompt and tool tokens carry no gradient
    assert grad[0, 2] < 0 < grad[1, 1]  # descent raises the positive-advantage token, lowers the negative one


def test_entropy_bonus_pushes_probability_off_likely_tokens():
    logprobs = torch.log(torch.tensor([[0.9, 0.1]])).requires_grad_()
    tensors = {"loss_mask": torch.ones(1, 2), "rollout_logprobs": logprobs.detach(), "advantages": torch.zeros(1)}
    loss, _ = grpo_loss(logprobs, tensors, LossSettings(entropy_coef=1.0))
    loss.backward()
    # d loss / d log p = log p / N: descent raises each sampled token's log-prob in proportion to
    # its surprise, the unlikely one most, which flattens the distribution
    assert torch.allclose(logprobs.grad, logprobs.detach() / 2)
    assert logprobs.grad[0, 1] < logprobs.grad[0, 0] < 0


def test_sft_loss_is_the_mean_nll_of_the_policys_tokens_only():
    logprobs = torch.log(torch.tensor([[0.5, 0.2, 0.4], [0.9, 0.25, 0.1]])).requires_grad_()
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    loss, metrics = sft_loss(logprobs, {"loss_mask": mask})
    expected = -(math.log(0.2) + math.log(0.4) + math.log(0.25)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6) and metrics == {"nll": pytest.approx(expected, rel=1e-6)}
    loss.backward()
    assert torch.all(logprobs.grad[mask == 0] == 0)
    assert torch.allclose(logprobs.grad[mask == 1], torch.full((3,), -1 / 3))
