"""Tests for tir.rl.reward: hand-computed steps, the weight update rule, checkpoint state, and a
reward-hacking case on real photos scored with the real IQA metrics."""

import json
import math
from itertools import pairwise

import numpy as np
import pytest
import torch

import tir  # noqa: F401  (environment shims first)
from tir.config import load_recipe
from tir.rl.algos import group_advantages
from tir.rl.reward import (
    AdaptiveWeights,
    MultiMetricReward,
    consensus_agreement,
    improvement_rate,
    metric_gains,
    normalize_gains,
)


# ------------------------------------------------------------------------------ pure steps
def test_metric_gains_flip_lower_better_metrics():
    gains = metric_gains(
        [{"psnr": 25.0, "niqe": 4.0}], [{"psnr": 20.0, "niqe": 6.0}], ["psnr", "niqe"], {"psnr": False, "niqe": True}
    )
    np.testing.assert_allclose(gains, [[5.0, 2.0]])  # +5 dB; NIQE fell by 2: also better


def test_normalize_gains_hand_computed_and_unit_free():
    # the same relative gains in dB and in [0, 1] units: group 1 differs by +-1 (+-0.01), group 2 not at all
    gains = np.array([[1.0, 0.01], [3.0, 0.03], [10.0, 0.1], [10.0, 0.1]])
    out = normalize_gains(gains, group_size=2)
    # centred: -1 1 0 0; pooled population std sqrt((1 + 1 + 0 + 0) / 4) = sqrt(0.5)
    expected = np.array([-1, 1, 0, 0]) / math.sqrt(0.5)
    np.testing.assert_allclose(out[:, 0], expected)
    np.testing.assert_allclose(out[:, 1], expected)  # the units are gone


def test_normalize_gains_flat_metric_is_zero_and_groups_must_divide():
    out = normalize_gains(np.array([[2.0, 1.0], [2.0, 3.0], [5.0, 0.0], [5.0, 1.0]]), group_size=2)
    assert np.all(out[:, 0] == 0.0) and np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="groups of group_size=3"):
        normalize_gains(np.zeros((4, 2)), group_size=3)


def test_consensus_agreement_hand_computed():
    z = np.array(
        [
            [1.0, 1.0, -1.0],  # metric 2 falls while 0 and 1 rise
            [-1.0, -1.0, 1.0],  # metric 2 rises while 0 and 1 fall: the hacking signature
            [1.0, 1.0, 1.0],
            [-1.0, -1.0, -1.0],
        ]
    )
    # metric 0: up = [1, 0, 1, 0], others = mean(z1, z2) = [0, 0, 1, -1] -> 1 / sqrt(2 * 2) = 0.5 (same for 1)
    # metric 2: up = [0, 1, 1, 0], others = [1, -1, 1, -1] -> (-1 + 1) / sqrt(2 * 4) = 0
    np.testing.assert_allclose(consensus_agreement(z), [0.5, 0.5, 0.0])
    # rising only where the others fall, in proportion: -1
    np.testing.assert_allclose(consensus_agreement(np.array([[1.0, -1.0, -1.0], [0.0, 0.0, 0.0]]))[0], -1.0)


def test_consensus_agreement_undefined_cases_are_nan():
    assert np.isnan(consensus_agreement(np.array([[1.0], [-1.0]]))).all()  # one metric: no others
    out = consensus_agreement(np.array([[-1.0, 1.0, 1.0], [-2.0, -1.0, -1.0]]))
    assert np.isnan(out[0]) and np.isfinite(out[1:]).all()  # metric 0 never rises


def test_improvement_rate():
    gains = np.array([[1.0, -1.0], [0.5, 0.0], [-0.1, 0.0], [2.0, 0.0]])
    np.testing.assert_allclose(improvement_rate(gains), [0.75, 0.0])  # no change is not an improvement


# ------------------------------------------------------------------------------ adaptive weights
def test_adaptive_weights_start_at_base_and_follow_the_documented_rule():
    aw = AdaptiveWeights(["a", "b", "c"])
    np.testing.assert_allclose(aw.weights(), [1 / 3] * 3)  # equal base, no evidence yet
    z = np.array([[1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])  # agreement .5 .5 0
    gains = np.array([[1.0, 1.0, 1.0], [-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, -1.0, 1.0]])  # rates .5 .25 1
    aw.update(z, gains)
    agreement = np.array([0.05, 0.05, 0.0])  # 0.9 * 0 + 0.1 * observed
    improvement = np.array([0.05, 0.025, 0.1])
    logits = np.log(1 / 3) + 4.0 * agreement - 1.0 * improvement
    soft = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(aw.weights(), 0.02 + (1 - 3 * 0.02) * soft)
    assert aw.steps == 1


def _hacking_batch(rng, n=32):
    """Normalised gains where a, b, c move together and 'hack' rises exactly where they fall."""
    honest = rng.normal(size=n)
    z = np.stack([honest + 0.3 * rng.normal(size=n) for _ in range(3)] + [-honest + 0.3 * rng.normal(size=n)], axis=1)
    return z, z + 0.5  # raw gains: mostly improving on every metric


def test_sustained_disagreement_down_weights_the_metric():
    aw = AdaptiveWeights(["a", "b", "c", "hack"])
    rng = np.random.default_rng(0)
    history = []
    for _ in range(20):
        aw.update(*_hacking_batch(rng))
        w = aw.weights()
        assert np.all(w >= 0.02) and w.sum() == pytest.approx(1.0)
        history.append(w[3])
    assert all(later < earlier for earlier, later in pairwise(history))
    assert history[-1] < 0.25 * min(w[:3])


def test_metrics_not_yet_improved_are_up_weighted():
    aw = AdaptiveWeights(["rarely", "often"])
    z = np.tile(np.array([[1.0], [-1.0], [0.5], [-0.5]]), (1, 2))  # identical columns: equal agreement
    gains = np.array([[1.0, 1.0], [-1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0]])  # improved in 25% vs 75%
    for _ in range(10):
        aw.update(z, gains)
    w = aw.weights()
    assert w[0] > w[1] and w.sum() == pytest.approx(1.0)


def test_adaptive_weights_state_round_trips_through_json():
    rng = np.random.default_rng(1)
    aw = AdaptiveWeights(["a", "b", "c", "hack"], {"a": 2, "b": 1, "c": 1, "hack": 1}, decay=0.8)
    for _ in range(3):
        aw.update(*_hacking_batch(rng))
    restored = AdaptiveWeights(["a", "b", "c", "hack"])
    restored.load_state_dict(json.loads(json.dumps(aw.state_dict())))
    np.testing.assert_array_equal(restored.weights(), aw.weights())
    batch = _hacking_batch(rng)  # and they go on identically
    aw.update(*batch)
    restored.update(*batch)
    np.testing.assert_array_equal(restored.weights(), aw.weights())
    with pytest.raises(ValueError, match="for metrics"):
        AdaptiveWeights(["a", "b"]).load_state_dict(aw.state_dict())


def test_adaptive_weights_bad_arguments():
    with pytest.raises(ValueError, match="min_weight"):
        AdaptiveWeights(["a", "b"], min_weight=0.5)
    with pytest.raises(ValueError, match="not in metrics"):
        AdaptiveWeights(["a", "b"], {"c": 1.0})
    with pytest.raises(ValueError, match="positive"):
        AdaptiveWeights(["a", "b"], {"a": 1.0, "b": 0.0})


# ------------------------------------------------------------------------------ the reward
def test_fixed_reward_hand_computed_with_format_and_tool_terms():
    reward = MultiMetricReward(
        ["psnr", "ssim", "niqe"],
        mode="fixed",
        weights={"psnr": 2, "ssim": 1, "niqe": 1},
        format_penalty=0.5,
        tool_cost=0.05,
    )
    start = {"psnr": 20.0, "ssim": 0.5, "niqe": 8.0}
    finals = [
        {"psnr": 26.0, "ssim": 0.6, "niqe": 5.0},  # better psnr and niqe, worse ssim
        {"psnr": 22.0, "ssim": 0.7, "niqe": 7.0},
    ]
    out = reward(finals, [start, start], tool_calls=[2, 1], format_errors=[0, 1], group_size=2)
    # a group of two: each normalised gain is +-1; weights 0.5 0.25 0.25
    np.testing.assert_allclose(out.quality, [0.5 - 0.25 + 0.25, -0.5])
    np.testing.assert_allclose(out.rewards, [0.5 - 2 * 0.05, -0.5 - 0.5 - 0.05])
    np.testing.assert_allclose(out.gains["psnr"], [6.0, 2.0])
    np.testing.assert_allclose(out.gains["niqe"], [3.0, 1.0])  # lower is better: flipped
    np.testing.assert_allclose(out.contributions["psnr"], [0.5, -0.5])
    assert out.weights == {"psnr": 0.5, "ssim": 0.25, "niqe": 0.25}


def test_tool_cost_ranks_the_redundant_trajectory_lower():
    reward = MultiMetricReward(["psnr", "ssim", "niqe"], tool_cost=0.05)
    same = {"psnr": 25.0, "ssim": 0.8, "niqe": 5.0}
    start = {"psnr": 20.0, "ssim": 0.5, "niqe": 8.0}
    out = reward([same, same], [start, start], tool_calls=[1, 3], format_errors=[0, 0], group_size=2)
    assert out.rewards[0] - out.rewards[1] == pytest.approx(2 * 0.05)  # same image, two extra calls


def test_fixed_mode_and_update_false_leave_weights_alone():
    rng = np.random.default_rng(2)
    metrics = ["psnr", "ssim", "niqe", "piqe"]
    finals = [dict(zip(metrics, rng.normal(size=4))) for _ in range(8)]
    starts = [dict(zip(metrics, rng.normal(size=4))) for _ in range(8)]
    fixed, adaptive = MultiMetricReward(metrics, mode="fixed"), MultiMetricReward(metrics)
    for _ in range(3):
        fixed(finals, starts, [0] * 8, [0] * 8, group_size=4)
        adaptive(finals, starts, [0] * 8, [0] * 8, group_size=4, update=False)
    assert fixed.current_weights() == dict.fromkeys(metrics, 0.25)
    assert adaptive.adaptive.steps == 0 and adaptive.current_weights() == pytest.approx(dict.fromkeys(metrics, 0.25))
    out = adaptive(finals, starts, [0] * 8, [0] * 8, group_size=4)
    assert adaptive.adaptive.steps == 1
    logged = out.log_dict()
    json.dumps(logged, allow_nan=False)  # plain JSON for the JSONL log
    assert all(f"reward/weight/{m}" in logged for m in metrics)


def test_reward_bad_input_is_named():
    reward = MultiMetricReward(["psnr", "niqe"])
    start = {"psnr": 20.0, "niqe": 8.0}
    with pytest.raises(ValueError, match=r"final_scores\[1\] has no score for metric 'niqe'"):
        reward([start, {"psnr": 1.0}], [start, start], [0, 0], [0, 0], group_size=2)
    with pytest.raises(ValueError, match=r"final_scores\[0\]\['psnr'\] is nan"):
        reward([{"psnr": float("nan"), "niqe": 1.0}, start], [start, start], [0, 0], [0, 0], group_size=2)
    with pytest.raises(ValueError, match="tool_calls has 1 rows"):
        reward([start, start], [start, start], [0], [0, 0], group_size=2)
    with pytest.raises(ValueError, match="direction unknown"):
        MultiMetricReward(["psnr", "my_metric"])
    assert MultiMetricReward(["psnr", "my_metric"], lower_better={"my_metric": True}).lower_better["my_metric"]
    with pytest.raises(ValueError, match="adaptive"):
        MultiMetricReward(["psnr"], mode="learned")
    with pytest.raises(ValueError, match="saved in mode"):
        MultiMetricReward(["psnr"], mode="fixed").load_state_dict(MultiMetricReward(["psnr"]).state_dict())


def test_from_config_reads_the_recipe():
    reward = MultiMetricReward.from_config(load_recipe("tiny_cpu").reward)
    assert reward.mode == "adaptive" and reward.metrics == ["psnr", "ssim", "niqe"]
    fixed = MultiMetricReward.from_config(
        load_recipe("tiny_cpu", ["reward.adaptive=false", "reward.tool_cost=0.1"]).reward
    )
    assert fixed.mode == "fixed" and fixed.tool_cost == 0.1


# ------------------------------------------------------------------------------ reward hacking
# Real photos, a real degradation (Gaussian noise, sigma 20, the protocol's noise), real pyiqa
# metrics. Each GRPO group (one photo) holds four trajectories:
#   no-op (answers at once), Gaussian-blur denoising, TV denoising (the honest restoration),
#   and TV denoising + strong unsharp masking (the hacking tool).
# Measured: the sharpening lowers PIQE ~3x (34 -> 11, "better") while PSNR drops 3-4 dB, SSIM
# drops and NIQE mostly gets worse: one no-reference metric rising while the rest fall. A
# recipe that values perceptual quality (PIQE counted twice) makes the fixed sum pay for it.
HACK_METRICS = ["psnr", "ssim", "niqe", "piqe"]
PERCEPTUAL_WEIGHTS = {"psnr": 1.0, "ssim": 1.0, "niqe": 1.0, "piqe": 2.0}
HONEST, HACKER = 2, 3  # positions in each group


@pytest.fixture(scope="module")
def hacking_batch():
    from skimage import data, filters, restoration

    from tir.data.degradations import degrade
    from tool_pool.scorers import get_scorer

    scorers = {m: get_scorer(m, device="cpu") for m in HACK_METRICS}

    def scores(image, hq):
        return {m: float(s.score([image], [hq] if s.full_reference else None)[0]) for m, s in scorers.items()}

    def to_uint8(x):
        return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)

    photos = [data.astronaut()[:192, 100:292], data.coffee()[:192, 100:292], data.chelsea()[:192, :192]]
    finals, inputs = [], []
    for seed, hq in enumerate(photos):
        lq, _ = degrade(hq, "noise", np.random.default_rng(seed), kind="gaussian", sigma=20.0, noise_seed=seed)
        x = lq / 255.0
        tv = restoration.denoise_tv_chambolle(x, weight=0.06, channel_axis=-1)
        oversharpened = tv + 2.0 * (tv - filters.gaussian(tv, sigma=1.0, channel_axis=-1))
        outputs = [lq, to_uint8(filters.gaussian(x, sigma=1.0, channel_axis=-1)), to_uint8(tv), to_uint8(oversharpened)]
        group = [scores(out, hq) for out in outputs]
        finals += group
        inputs += [group[0]] * len(group)  # the no-op's final image is the degraded input
    return finals, inputs


@pytest.mark.slow  # 1-5 s on a quiet 2-core machine, 10-30 s beside other work: not in `make test-fast`
def test_hacking_case_is_real(hacking_batch):
    finals, _ = hacking_batch
    for g in range(3):
        honest, hacker = finals[4 * g + HONEST], finals[4 * g + HACKER]
        assert hacker["piqe"] < 0.5 * honest["piqe"]  # the inflated no-reference metric
        assert hacker["psnr"] < honest["psnr"] - 2.0 and hacker["ssim"] < honest["ssim"]  # fidelity destroyed


@pytest.mark.slow  # its fixture: real NIQE, PIQE, PSNR and SSIM on 12 restorations (see above)
def test_adaptive_reward_ranks_the_hacker_below_the_honest_restoration(hacking_batch):
    finals, inputs = hacking_batch
    calls, errors = [1] * 12, [0] * 12
    fixed = MultiMetricReward(HACK_METRICS, mode="fixed", weights=PERCEPTUAL_WEIGHTS)
    adaptive = MultiMetricReward(HACK_METRICS, mode="adaptive", weights=PERCEPTUAL_WEIGHTS)
    piqe_weights = []
    for step in range(20):
        fixed_out = fixed(finals, inputs, calls, errors, group_size=4)
        adaptive_out = adaptive(finals, inputs, calls, errors, group_size=4)
        piqe_weights.append(adaptive_out.weights["piqe"])
        fixed_r, adaptive_r = fixed_out.rewards.reshape(3, 4), adaptive_out.rewards.reshape(3, 4)
        # the fixed sum is hacked at every step: the hacker gets the best reward of its group
        assert np.all(fixed_r.argmax(axis=1) == HACKER)
        if step == 0:  # before the weights have moved, the adaptive reward is fooled too
            assert np.all(adaptive_r[:, HACKER] > adaptive_r[:, HONEST])
    assert all(later < earlier for earlier, later in pairwise(piqe_weights))
    assert fixed_out.weights["piqe"] == 0.4 and piqe_weights[-1] < 0.25  # measured: 0.36 at step 0, 0.19 at 19
    # after 20 steps the honest restoration wins every group, and GRPO favours it over the hacker
    assert np.all(adaptive_r.argmax(axis=1) == HONEST)
    fixed_adv = group_advantages(torch.tensor(fixed_out.rewards), group_size=4).reshape(3, 4)
    adaptive_adv = group_advantages(torch.tensor(adaptive_out.rewards), group_size=4).reshape(3, 4)
    assert torch.all(fixed_adv.argmax(dim=1) == HACKER) and torch.all(adaptive_adv.argmax(dim=1) == HONEST)
    assert torch.all(adaptive_adv[:, HACKER] < fixed_adv[:, HACKER])
