"""The learned degradation recogniser: features, scoring, training, checkpoints, and its use as
the agent's perception (through the pool, by the env and by the baselines)."""

import asyncio

import numpy as np
import pytest

import tir  # noqa: F401 - shims first
from tir.agent.env import perception_cues
from tir.agent.perceive import Perception
from tir.data.degradations import NAMES, degrade_chain
from tir.data.recognizer import (
    DEFAULT_CHECKPOINT,
    MAYBE_FRACTION,
    RecognizerError,
    load_recognizer,
    set_scores,
    with_after_call,
)
from tir.data.recognizer_features import FEATURE_NAMES, FEATURES_DIGEST, NUM_FEATURES, degradation_features
from tir.data.recognizer_train import (
    draw_combo,
    example_features,
    fit,
    load_photos,
    make_example,
    training_combos,
    tune_thresholds,
)
from tir.data.synth import list_sources, load_source
from tool_pool.client import LocalPool
from tool_pool.execution import PoolError

PHOTOS = [load_source(s).image for s in list_sources("builtin") if s.image_id in ("astronaut", "coffee", "rocket")]


def crop(side=128, photo=0):
    return np.ascontiguousarray(PHOTOS[photo][100 : 100 + side, 100 : 100 + side])


# ---------------------------------------------------------------- features


def test_features_have_a_fixed_length_and_move_with_their_degradation():
    clean = crop()
    features = degradation_features(clean)
    assert features.shape == (NUM_FEATURES,) == (len(FEATURE_NAMES),) and np.isfinite(features).all()
    assert degradation_features(crop(32)).shape == (NUM_FEATURES,)  # a x4 thumbnail too
    rng = np.random.default_rng(0)
    index = {name: i for i, name in enumerate(FEATURE_NAMES)}
    jpeg, _ = degrade_chain(clean, ["jpeg"], rng)
    noisy, _ = degrade_chain(clean, ["noise"], rng)
    # quantisation empties the high frequencies of the aligned 8x8 blocks only
    assert degradation_features(jpeg)[index["dct_hf_ratio"]] < features[index["dct_hf_ratio"]] - 0.5
    assert degradation_features(noisy)[index["noise_full"]] > features[index["noise_full"]] + 1.0
    with pytest.raises(ValueError, match="expected an RGB uint8"):
        degradation_features(clean.astype(np.float32))


def test_every_way_of_darkening_uses_fewer_brightness_levels():
    index = {name: i for i, name in enumerate(FEATURE_NAMES)}["value_levels_used"]
    clean = crop()
    for variant in ("gamma", "linear_compress", "constant_shift"):
        dark, _ = degrade_chain(clean, ["dark"], np.random.default_rng(0), params=[{"variant": variant}])
        assert degradation_features(dark)[index] < degradation_features(clean)[index] - 0.1, variant


def test_haze_thickens_towards_the_top_and_its_airlight_is_grey():
    index = {name: i for i, name in enumerate(FEATURE_NAMES)}
    for photo in range(len(PHOTOS)):
        clean = crop(128, photo)
        hazy, _ = degrade_chain(clean, ["haze"], np.random.default_rng(0), params=[{"A": 0.9, "beta": 1.5}])
        before, after = degradation_features(clean), degradation_features(hazy)
        # the synthetic depth puts the top of the frame farther: more haze there than at the bottom
        assert after[index["dark_channel_top_minus_bottom"]] > before[index["dark_channel_top_minus_bottom"]] + 0.05
        assert after[index["airlight_spread"]] < 0.1  # the brightest dark-channel pixels turn grey


def test_motion_blur_keeps_the_laplacian_correlated_along_its_path_even_on_a_thumbnail():
    index = {name: i for i, name in enumerate(FEATURE_NAMES)}
    for lowres in (False, True):
        clean = crop(128)
        blurred, _ = degrade_chain(
            clean, ["motion_blur"], np.random.default_rng(1), params=[{"radius": 15, "sigma": 5}]
        )
        if lowres:  # the x4 thumbnail of group A's motion_blur+lowres: 32 px
            clean, _ = degrade_chain(clean, ["lowres"], np.random.default_rng(0))
            blurred, _ = degrade_chain(blurred, ["lowres"], np.random.default_rng(0))
        sharp, soft = degradation_features(clean), degradation_features(blurred)
        # at 1 px on average over the directions (the farther rings depend more on the content)
        for name in ("acorr_r1_mean", "acorr_r1_max"):
            assert soft[index[name]] > sharp[index[name]] + 0.1, (lowres, name)


def test_training_examples_are_a_function_of_seed_and_index():
    combos = training_combos()
    a, combo_a = make_example(PHOTOS, combos, (96,), seed=3, index=11)
    b, combo_b = make_example(PHOTOS, combos, (96,), seed=3, index=11)
    assert combo_a == combo_b and np.array_equal(a, b)
    # every kind is drawn, none dominates: triples are not 3 in 5 as a uniform draw over combinations gives
    rng = np.random.default_rng(0)
    sizes = [len(draw_combo(combos, rng)) for _ in range(4000)]
    shares = np.bincount(sizes, minlength=4) / len(sizes)
    assert 0.07 < shares[0] < 0.16 and 0.35 < shares[2] < 0.55 and shares[3] < 0.3


def test_partly_restored_examples_leave_some_degradations_and_keep_their_shards_apart(tmp_path):
    combos = {"groupA": training_combos()["groupA"]}
    left_over = []
    for index in range(6):
        degraded, combo = make_example(PHOTOS, combos, (64,), seed=5, index=index)
        restored, left = make_example(PHOTOS, combos, (64,), seed=5, index=index, restored=True)
        again, same = make_example(PHOTOS, combos, (64,), seed=5, index=index, restored=True)
        assert set(left) < set(combo) and same == left and np.array_equal(again, restored)
        assert restored.shape != degraded.shape or not np.array_equal(restored, degraded)  # a tool ran
        left_over.append(len(left))
    assert set(left_over) == {0, 1}  # sometimes one tool call, sometimes both
    example_features(PHOTOS, 4, seed=0, combos=combos, sides=(64,), shard_dir=tmp_path)
    x, y = example_features(PHOTOS, 4, seed=0, combos=combos, sides=(64,), shard_dir=tmp_path, restored=True)
    assert len(list(tmp_path.glob("shard_*_restored_0_*.npz"))) == 1 and len(list(tmp_path.glob("*.npz"))) == 2
    assert (y.sum(axis=1) < 2).all()  # never both of a group-A pair left


def test_a_shard_folder_reused_with_other_photos_is_not_read_as_theirs(tmp_path):
    combos = {"single": [("jpeg",)]}
    first_x, _ = example_features(PHOTOS[:2], 4, seed=0, combos=combos, sides=(64,), shard_dir=tmp_path)
    other_x, _ = example_features(PHOTOS[1:], 4, seed=0, combos=combos, sides=(64,), shard_dir=tmp_path)
    fresh_x, _ = example_features(PHOTOS[1:], 4, seed=0, combos=combos, sides=(64,))  # no cache at all
    assert np.array_equal(other_x, fresh_x) and not np.array_equal(other_x, first_x)
    assert len(list(tmp_path.glob("shard_*.npz"))) == 2  # one per photo set, side by side
    again_x, _ = example_features(PHOTOS[:2], 4, seed=0, combos=combos, sides=(64,), shard_dir=tmp_path)
    assert np.array_equal(again_x, first_x) and len(list(tmp_path.glob("shard_*.npz"))) == 2  # read back


def test_the_standard_test_sets_are_refused_as_training_photos(tmp_path):
    (tmp_path / "Kodak24").mkdir()
    with pytest.raises(RecognizerError, match="standard test set"):
        load_photos([str(tmp_path / "Kodak24")])


# ---------------------------------------------------------------- scores


def test_set_scores_hand_computed():
    predicted = [["noise"], ["noise", "jpeg"], [], ["haze"]]
    truth = [["noise"], ["noise"], ["dark"], ["haze"]]
    scores = set_scores(predicted, truth)
    assert scores["exact_set"] == 0.5 and scores["samples"] == 4
    noise = scores["per_degradation"]["noise"]
    assert noise == {"precision": 1.0, "recall": 1.0, "support": 2}
    assert scores["per_degradation"]["jpeg"] == {"precision": 0.0, "recall": None, "support": 0}
    assert scores["per_degradation"]["dark"] == {"precision": None, "recall": 0.0, "support": 1}


# ---------------------------------------------------------------- training and checkpoints


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A recogniser trained for seconds on three built-in photos: enough to learn JPEG and size."""
    folder = tmp_path_factory.mktemp("recognizer")
    x, y = example_features(PHOTOS, 600, seed=0, workers=1, shard_dir=folder / "features")
    model = fit(x, y, seed=0, steps=300, hidden=32)
    model.thresholds = tune_thresholds(model, x[:200], y[:200])
    model.save(folder)
    return folder, model, (x, y)


@pytest.mark.slow  # trains a small model (~10 s; several times that on a busy machine)
def test_training_is_deterministic_and_the_features_resume_from_their_shards(small_model):
    folder, model, (x, y) = small_model
    again_x, again_y = example_features(PHOTOS, 600, seed=0, workers=1, shard_dir=folder / "features")
    assert np.array_equal(again_x, x) and np.array_equal(again_y, y)  # read back from the shard
    # a shard is named by the feature set: one computed by another version is never read back
    assert [p.name.split("_")[1] for p in (folder / "features").glob("shard_*.npz")] == [FEATURES_DIGEST]
    twin = fit(x, y, seed=0, steps=300, hidden=32)
    probabilities = model.probabilities_of_features(x[:50])
    assert probabilities.shape == (50, len(NAMES))
    assert np.allclose(twin.probabilities_of_features(x[:50]), probabilities, atol=1e-6)


@pytest.mark.slow  # trains a small model (~10 s; several times that on a busy machine)
def test_a_checkpoint_round_trips_and_bad_ones_fail_naming_the_file(small_model, tmp_path):
    folder, model, (x, _) = small_model
    loaded = load_recognizer(folder)
    assert np.allclose(loaded.probabilities_of_features(x[:20]), model.probabilities_of_features(x[:20]))
    assert np.array_equal(loaded.thresholds, model.thresholds)
    (tmp_path / "model.pt").write_bytes((folder / "model.pt").read_bytes()[:100])
    with pytest.raises(RecognizerError, match=r"model\.pt: not a readable recogniser checkpoint"):
        load_recognizer(tmp_path)
    with pytest.raises(RecognizerError, match="no recogniser checkpoint"):
        load_recognizer(tmp_path / "missing")


@pytest.mark.slow  # trains two small models (~10 s)
def test_an_ensemble_averages_its_members_logits_and_round_trips(small_model, tmp_path):
    import torch

    _, model, (x, y) = small_model
    ensemble = fit(x, y, seed=0, steps=300, hidden=32, members=2)
    other = fit(x, y, seed=1, steps=300, hidden=32)
    # member 0 is the single model of seed 0, member 1 the one of seed 1: the mean of their logits
    logit = lambda p: torch.logit(torch.from_numpy(p).double(), eps=1e-12)  # noqa: E731
    mean = (logit(model.probabilities_of_features(x[:30])) + logit(other.probabilities_of_features(x[:30]))) / 2
    assert np.allclose(ensemble.probabilities_of_features(x[:30]), torch.sigmoid(mean).numpy(), atol=1e-5)
    ensemble.save(tmp_path)
    loaded = load_recognizer(tmp_path)
    assert len(loaded.network.members) == 2
    assert np.allclose(loaded.probabilities_of_features(x[:30]), ensemble.probabilities_of_features(x[:30]))


@pytest.mark.slow  # trains a small model (~10 s; several times that on a busy machine)
def test_the_small_model_learns_what_is_easy(small_model):
    _, model, _ = small_model
    rng = np.random.default_rng(5)
    jpeg, _ = degrade_chain(crop(photo=1), ["jpeg"], rng)
    small, _ = degrade_chain(crop(photo=1), ["lowres"], rng)
    assert "jpeg" in model.degradations(jpeg)
    assert "lowres" in model.degradations(small)


# ---------------------------------------------------------------- as the agent's perception


@pytest.mark.slow  # trains a small model (~10 s; several times that on a busy machine)
def test_the_pool_serves_perception_and_the_env_and_baselines_use_it(small_model):
    folder, model, _ = small_model
    pool = LocalPool(["jpeg_deblock_dct", "denoise_dct"])
    rng = np.random.default_rng(1)
    jpeg, _ = degrade_chain(crop(photo=2), ["jpeg"], rng)
    seen = asyncio.run(pool.perceive(jpeg, str(folder)))
    assert set(seen["probabilities"]) == set(NAMES) and seen["degradations"] == model.degradations(jpeg)
    learned = Perception("learned", str(folder))
    assert asyncio.run(learned.degradations(jpeg, pool)) == model.degradations(jpeg)
    line = asyncio.run(learned.observe(jpeg, pool, style="guess"))
    assert line == f"likely={'+'.join(model.degradations(jpeg)) or 'none'}"
    # confidence: the guess, then what it is unsure of (at least half its threshold, below it)
    probabilities = model.probabilities([jpeg])[0]
    assert seen["maybe"] == model.unsure(probabilities)
    limits = dict(zip(model.labels, model.thresholds.tolist()))
    for name in NAMES:
        unsure = MAYBE_FRACTION * limits[name] <= probabilities[name] < limits[name]
        assert (name in seen["maybe"]) == unsure and not (unsure and name in seen["degradations"])
    line = asyncio.run(learned.observe(jpeg, pool, style="confidence"))
    maybe = "+".join(seen["maybe"]) or "none"
    assert line == f"likely={'+'.join(model.degradations(jpeg)) or 'none'} maybe={maybe}"
    with pytest.raises(ValueError, match="needs the learned perception"):
        perception_cues(style="confidence", perception=Perception("thresholds"))
    with pytest.raises(PoolError, match="no recogniser checkpoint"):
        asyncio.run(pool.perceive(jpeg, str(folder / "missing")))
    with pytest.raises(ValueError, match="perception 'oracle' unknown"):
        Perception("oracle")


@pytest.mark.slow  # trains a small model on partly restored examples too (~15 s)
def test_a_recogniser_told_which_images_are_tool_outputs_reads_them_apart(small_model, tmp_path):
    _, _, (x, y) = small_model
    combos = {"groupA": training_combos()["groupA"]}
    rx, ry = example_features(PHOTOS, 120, seed=2, combos=combos, sides=(64,), restored=True)
    model = fit(
        np.concatenate([with_after_call(x, False), with_after_call(rx, True)]), np.concatenate([y, ry]), 0, 300, 32
    )
    model.save(tmp_path)
    loaded = load_recognizer(tmp_path)
    assert loaded.after_call_input and loaded.mean.shape == (NUM_FEATURES + 1,)
    jpeg, _ = degrade_chain(crop(photo=2), ["jpeg"], np.random.default_rng(1))
    before, after = (loaded.probabilities([jpeg], flag)[0] for flag in (False, True))
    assert before != after and after == model.probabilities([jpeg], True)[0]
    # the pool and the perception pass it on, and cache the two answers apart
    pool, learned = LocalPool(["jpeg_deblock_dct"]), Perception("learned", str(tmp_path))
    for flag, expected in ((False, before), (True, after), (False, before)):
        assert asyncio.run(pool.perceive(jpeg, str(tmp_path), after_call=flag))["probabilities"] == expected
        line = asyncio.run(learned.observe(jpeg, pool, style="guess", after_call=flag))
        assert line == f"likely={'+'.join(loaded.decide(expected)) or 'none'}"


@pytest.mark.skipif(
    not (DEFAULT_CHECKPOINT / "model.pt").is_file(), reason="no shipped recogniser checkpoint in this tree"
)
def test_the_shipped_checkpoint_loads_and_matches_this_versions_features():
    model = load_recognizer()
    assert model.labels == NAMES and model.mean.shape == (NUM_FEATURES + model.after_call_input,)
    import json

    card = (DEFAULT_CHECKPOINT / "README.md").read_text()
    scores = json.loads((DEFAULT_CHECKPOINT / "scores.json").read_text())
    assert f"{scores['A']['exact_set']:.1%}" in card  # the card quotes the command's own figures
