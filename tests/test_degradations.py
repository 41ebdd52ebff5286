import json

import numpy as np
import pytest
import skimage.data

import tir  # noqa: F401  (environment shims before basicsr)
from tir.data.degradations import (
    CANONICAL_ORDER,
    COMBINATIONS,
    DEGRADATIONS,
    NAMES,
    SUBTASK_FOR_DEGRADATION,
    DegradationError,
    combinations,
    degrade,
    degrade_chain,
    parse_combos,
    sample_rng,
    stable_hash,
)


@pytest.fixture(scope="module")
def photo():
    """A textured 96x96 crop (face, suit, background) of a real photo."""
    return np.ascontiguousarray(skimage.data.astronaut()[200:296, 200:296])


@pytest.fixture(scope="module")
def smooth():
    """A smooth mid-grey gradient: noise on it is never clipped, so its std is measurable."""
    ramp = np.linspace(70, 180, 64)
    return np.repeat(np.add.outer(ramp, ramp[::-1])[..., None] / 2 + 30, 3, axis=2).round().astype(np.uint8)


def gradient_energy(image):
    g = image.astype(np.float64).mean(axis=2)
    return float((np.diff(g, axis=0) ** 2).mean() + (np.diff(g, axis=1) ** 2).mean())


def dark_channel(image):
    return image.min(axis=2).astype(np.float64)


def blockiness(image):
    """Mean step across 8x8 JPEG block borders over the mean step elsewhere (~1 for a photo)."""
    steps = np.abs(np.diff(image.astype(np.float64).mean(axis=2), axis=1))
    border = np.arange(steps.shape[1]) % 8 == 7
    return steps[:, border].mean() / steps[:, ~border].mean()


def test_the_eight_names_and_their_subtasks():
    assert DEGRADATIONS.names() == sorted(NAMES)
    assert set(SUBTASK_FOR_DEGRADATION) == set(NAMES)
    assert SUBTASK_FOR_DEGRADATION["lowres"] == "super_resolution"
    assert len(set(SUBTASK_FOR_DEGRADATION.values())) == 8


@pytest.mark.parametrize("name", NAMES)
def test_applied_params_reproduce_the_output_exactly(photo, name):
    out, applied = degrade(photo, name, np.random.default_rng(7))
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert not np.array_equal(out, photo if out.shape == photo.shape else out[:0])
    replayed = json.loads(json.dumps(applied))  # JSON-serialisable plain values
    assert replayed == applied
    again, applied_again = degrade(photo, name, np.random.default_rng(12345), **replayed)
    assert np.array_equal(out, again)
    assert applied_again == applied


def test_noise_residual_std_is_near_sigma(smooth):
    out, applied = degrade(smooth, "noise", np.random.default_rng(0), kind="gaussian", sigma=30)
    residual = out.astype(np.float64) - smooth
    assert applied["sigma"] == 30.0
    assert abs(residual.std() - 30) < 2
    assert abs(residual.mean()) < 1
    poisson, _ = degrade(smooth, "noise", np.random.default_rng(0), kind="poisson", scale=3)
    assert (poisson.astype(np.float64) - smooth).std() > 5


@pytest.mark.parametrize(
    "variant, amount",
    [("constant_shift", {"shift": 40}), ("gamma", {"gamma": 0.6}), ("linear_compress", {"max_value": 120})],
)
def test_dark_lowers_brightness(photo, variant, amount):
    out, applied = degrade(photo, "dark", np.random.default_rng(0), variant=variant, **amount)
    assert applied == {"variant": variant, **amount}
    assert out.mean() < photo.mean() - 10
    assert out.max(axis=2).max() <= max(photo.max(axis=2).max(), 150)


def test_haze_raises_dark_channel_and_lowers_contrast(photo):
    out, applied = degrade(photo, "haze", np.random.default_rng(0), A=0.9, beta=1.5)
    assert applied["depth_source"] == "synthetic"
    assert dark_channel(out).mean() > dark_channel(photo).mean() + 20
    assert out.astype(np.float64).std() < 0.8 * photo.astype(np.float64).std()


def test_haze_with_a_given_depth_is_thicker_far_away(photo):
    depth = np.repeat(np.linspace(1.0, 0.0, 24)[:, None], 24, axis=1)  # top far; any size works
    out, applied = degrade(photo, "haze", np.random.default_rng(0), depth=depth, depth_source="file", A=1.0, beta=1.8)
    assert applied == {"A": 1.0, "beta": 1.8, "depth_source": "file"}
    lift = dark_channel(out) - dark_channel(photo)
    assert lift[:24].mean() > lift[-24:].mean() + 30
    with pytest.raises(DegradationError, match="haze.*depth_source='file'.*depth="):
        degrade(photo, "haze", np.random.default_rng(0), **applied)  # the map itself is not in the params
    again, _ = degrade(photo, "haze", np.random.default_rng(1), depth=depth, **applied)
    assert np.array_equal(out, again)


@pytest.mark.parametrize("name", ["motion_blur", "defocus_blur"])
def test_blur_lowers_gradient_energy(photo, name):
    for seed in range(3):
        out, _ = degrade(photo, name, np.random.default_rng(seed))
        assert gradient_energy(out) < 0.6 * gradient_energy(photo)
    flat = np.full((40, 40, 3), 123, np.uint8)
    assert np.array_equal(degrade(flat, name, np.random.default_rng(0))[0], flat)  # kernels sum to one


def test_motion_blur_smears_along_its_angle(photo):
    horizontal, _ = degrade(photo, "motion_blur", None, radius=15, sigma=8, angle=0)
    g = horizontal.astype(np.float64).mean(axis=2)
    assert (np.diff(g, axis=1) ** 2).mean() < 0.5 * (np.diff(g, axis=0) ** 2).mean()


def test_jpeg_adds_8x8_blockiness(photo):
    out, applied = degrade(photo, "jpeg", np.random.default_rng(0), quality=10)
    assert applied == {"quality": 10}
    assert blockiness(photo) < 1.2
    assert blockiness(out) > 1.5


def test_rain_adds_bright_streaks_and_never_darkens(photo):
    out, applied = degrade(photo, "rain", np.random.default_rng(0), length=30, angle=10, value=80)
    diff = out.astype(np.int64) - photo
    assert diff.min() >= 0
    assert (diff > 50).mean() > 0.02
    assert set(applied) == {"length", "angle", "value", "noise_seed"}


def test_lowres_is_a_quarter_size_bicubic(photo):
    out, applied = degrade(photo, "lowres", None)
    assert out.shape == (24, 24, 3) and applied == {"scale": 0.25}
    assert abs(out.mean() - photo.mean()) < 2
    flat = np.full((16, 20, 3), 77, np.uint8)
    assert np.array_equal(degrade(flat, "lowres", None)[0], np.full((4, 5, 3), 77, np.uint8))


@pytest.mark.parametrize(
    "name, params, param",
    [
        ("noise", {"kind": "gaussian", "sigma": 60}, "sigma"),
        ("noise", {"kind": "gaussian", "scale": 2}, "scale"),  # scale belongs to poisson
        ("noise", {"kind": "speckle"}, "kind"),
        ("jpeg", {"quality": 30}, "quality"),
        ("jpeg", {"quality": 12.5}, "quality"),
        ("motion_blur", {"radius": 12, "sigma": 3}, "radius"),
        ("motion_blur", {"angle": 120}, "angle"),
        ("defocus_blur", {"radius": 5}, "radius"),
        ("haze", {"A": 1.2}, "A"),
        ("haze", {"beta": "thick"}, "beta"),
        ("rain", {"length": 10}, "length"),
        ("dark", {"variant": "gamma", "gamma": 2.0}, "gamma"),
        ("dark", {"variant": "moonlight"}, "variant"),
        ("lowres", {"scale": 0.5}, "scale"),
        ("lowres", {"factor": 4}, "factor"),
    ],
)
def test_bad_params_name_the_degradation_and_the_param(photo, name, params, param):
    with pytest.raises(DegradationError, match=rf"^{name}: .*{param}"):
        degrade(photo, name, np.random.default_rng(0), **params)


def test_out_of_range_message_gives_the_allowed_range(photo):
    with pytest.raises(DegradationError, match=r"'sigma'=60 is out of range; allowed: a number in \[20, 50\]"):
        degrade(photo, "noise", None, kind="gaussian", sigma=60)
    with pytest.raises(DegradationError, match=r"quality.*\[10, 30\)"):
        degrade(photo, "jpeg", None, quality=30)


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32), [[1, 2, 3]]]
)
def test_bad_images_are_refused(bad):
    with pytest.raises(DegradationError, match="noise: input: expected an RGB uint8 HxWx3 image"):
        degrade(bad, "noise", np.random.default_rng(0))


def test_unknown_names_suggest_the_closest(photo):
    with pytest.raises(KeyError, match="did you mean 'noise'"):
        degrade(photo, "nosie", np.random.default_rng(0))
    with pytest.raises(KeyError, match="did you mean 'jpeg'"):
        degrade_chain(photo, "noise+jpg", np.random.default_rng(0))


def test_chain_is_reproducible_from_image_id_combo_and_seed(photo):
    def run(image_id, combo, seed):
        return degrade_chain(photo, combo, sample_rng(image_id, combo, seed))

    out, applied = run("astronaut", "rain+haze", 3)
    again, applied_again = run("astronaut", ("rain", "haze"), 3)
    assert np.array_equal(out, again) and applied == applied_again
    assert not np.array_equal(out, run("astronaut", "rain+haze", 4)[0])
    assert not np.array_equal(out, run("coffee", "rain+haze", 3)[0])
    assert len(applied) == 2 and set(applied[1]) == {"A", "beta", "depth_source"}
    replay, _ = degrade_chain(photo, ["rain", "haze"], np.random.default_rng(99), params=applied)
    assert np.array_equal(out, replay)
    by_name, _ = degrade_chain(
        photo, ["rain", "haze"], np.random.default_rng(99), params={"rain": applied[0], "haze": applied[1]}
    )
    assert np.array_equal(out, by_name)


def test_chain_applies_in_order(photo):
    out, applied = degrade_chain(photo, "motion_blur+lowres", np.random.default_rng(0))
    assert out.shape == (24, 24, 3) and applied[1] == {"scale": 0.25}
    with pytest.raises(DegradationError, match="2 param dicts for 1"):
        degrade_chain(photo, "noise", np.random.default_rng(0), params=[{}, {}])
    with pytest.raises(DegradationError, match="repeats"):
        degrade_chain(photo, "noise+noise", np.random.default_rng(0))


def test_stable_hash_is_fixed_across_processes():
    # python's hash() of a str changes per process; this value must not.
    assert stable_hash("astronaut") == 17121418898048577625
    with pytest.raises(DegradationError, match="seed"):
        sample_rng("astronaut", "noise", -1)


def test_named_combination_sets():
    assert COMBINATIONS["groupA"] == [
        ("rain", "haze"),
        ("motion_blur", "lowres"),
        ("dark", "noise"),
        ("defocus_blur", "jpeg"),
        ("noise", "jpeg"),
        ("rain", "lowres"),
        ("motion_blur", "dark"),
        ("defocus_blur", "haze"),
    ]
    assert len(combinations("groupB")) == 4 and all(len(c) == 2 for c in combinations("groupB"))
    assert len(combinations("groupC")) == 4 and all(len(c) == 3 for c in combinations("groupC"))
    assert combinations("groupC")[1] == ("rain", "noise", "lowres")
    assert sorted(c[0] for c in combinations("single")) == sorted(NAMES)
    listed = {frozenset(c) for g in ("groupA", "groupB", "groupC") for c in COMBINATIONS[g]}
    ood = combinations("ood")
    assert len(ood) == len(set(ood)) == 16 + 52  # all 28 pairs and 56 triples minus the 12 + 4 listed
    assert not {frozenset(c) for c in ood} & listed
    assert all(list(c) == sorted(c, key=CANONICAL_ORDER.index) for c in ood)
    assert ood == combinations("ood2") + combinations("ood3") and ood[0] == ("haze", "motion_blur")
    with pytest.raises(KeyError, match="did you mean 'groupA'"):
        combinations("grupA")


def test_parse_combos():
    parsed = parse_combos("groupA, groupB")
    assert len(parsed) == 12 and parsed[0] == ("groupA", ("rain", "haze")) and parsed[8][0] == "groupB"
    assert parse_combos("noise+jpeg,haze") == [("custom", ("noise", "jpeg")), ("custom", ("haze",))]
    # a combination named twice keeps its first group
    assert parse_combos("groupA,noise+jpeg").count(("groupA", ("noise", "jpeg"))) == 1
    assert len(parse_combos("groupA,noise+jpeg")) == 8
    with pytest.raises(KeyError, match="did you mean 'groupC'"):
        parse_combos("groupD")
    with pytest.raises(KeyError, match="did you mean 'dark'"):
        parse_combos("rain+drak")
