"""The weight-free restoration tools: registry, argument and image checks, and that each tool
really improves the degradation of its subtask (real tir.data.degradations on real photo crops)."""

import json

import numpy as np
import pytest
from skimage import data
from skimage.metrics import peak_signal_noise_ratio

import tir  # noqa: F401  (shims first)
from tir.data.degradations import DEGRADATIONS, SUBTASK_FOR_DEGRADATION
from tool_pool.classical_deblur import estimate_defocus_radius, estimate_motion
from tool_pool.classical_jpeg import estimate_jpeg_quality
from tool_pool.imaging import estimate_noise_sigma
from tool_pool.tools import (
    SUBTASKS,
    TOOLS,
    FunctionTool,
    ToolArgumentError,
    ToolInputError,
    get_tool,
    register_tool,
    tool_schemas,
    tools_for_subtask,
    validate_arguments,
)

CLASSICAL = [name for name in TOOLS.names() if isinstance(TOOLS.get(name), FunctionTool)]

# One fixed instance of each degradation (explicit params: the test does not depend on a draw).
DEGRADATION_FOR_SUBTASK = {
    "denoising": ("noise", {"kind": "gaussian", "sigma": 30.0, "noise_seed": 1}),
    "motion_deblurring": ("motion_blur", {"radius": 15, "sigma": 5, "angle": 30.0}),
    "defocus_deblurring": ("defocus_blur", {"radius": 4}),
    "dehazing": ("haze", {"A": 0.9, "beta": 1.2}),
    "deraining": ("rain", {"length": 30, "angle": 10, "value": 80, "noise_seed": 2}),
    "brightening": ("dark", {"variant": "gamma", "gamma": 0.6}),
    "jpeg_artifact_removal": ("jpeg", {"quality": 15}),
    "super_resolution": ("lowres", {}),
}


def crops(size: int) -> list[np.ndarray]:
    """Two textured photo crops: a face and a cat."""
    return [
        np.ascontiguousarray(data.astronaut()[40 : 40 + size, 160 : 160 + size]),
        np.ascontiguousarray(data.chelsea()[60 : 60 + size, 120 : 120 + size]),
    ]


def degrade(image: np.ndarray, subtask: str) -> np.ndarray:
    name, params = DEGRADATION_FOR_SUBTASK[subtask]
    return DEGRADATIONS.get(name)(image, np.random.default_rng(0), **params)[0]


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    if image.shape != reference.shape:  # x1/4 input: scored after bicubic x4, as the protocol does
        image = get_tool("sr_bicubic")([image])[0]
    return peak_signal_noise_ratio(reference, image, data_range=255)


# ---------------------------------------------------------------- each tool restores its degradation


@pytest.mark.parametrize("name", CLASSICAL)
def test_tool_improves_its_degradation(name):
    tool = get_tool(name)
    hqs = crops(128)
    lqs = [degrade(hq, tool.subtask) for hq in hqs]
    outs = tool(lqs)
    for lq, out in zip(lqs, outs):
        assert out.dtype == np.uint8
        assert out.shape == (lq.shape[0] * tool.scale, lq.shape[1] * tool.scale, 3)
    gain = np.mean([psnr(o, hq) - psnr(lq, hq) for o, lq, hq in zip(outs, lqs, hqs)])
    # bicubic is the reference the protocol scores against: it gains nothing by definition
    margin = -0.01 if name == "sr_bicubic" else 0.1
    assert gain > margin, f"{name}: PSNR gain {gain:+.2f} dB on {DEGRADATION_FOR_SUBTASK[tool.subtask][0]}"


def test_every_subtask_has_two_tools_that_work_without_weights():
    assert set(SUBTASK_FOR_DEGRADATION.values()) == set(SUBTASKS)
    for subtask in SUBTASKS:
        assert len([t for t in tools_for_subtask(subtask) if isinstance(t, FunctionTool)]) >= 2, subtask


def test_batched_call_equals_per_image_calls():
    a, b = crops(64)
    b = b[:48]  # a different size in the same batch
    for name in CLASSICAL:
        tool = get_tool(name)
        together = tool([a, b])
        assert len(together) == 2
        for image, out in zip((a, b), together):
            np.testing.assert_array_equal(out, tool([image])[0], err_msg=name)


def test_tools_do_not_modify_their_input():
    image = crops(64)[0]
    before = image.copy()
    for name in CLASSICAL:
        get_tool(name)([image])
        np.testing.assert_array_equal(image, before, err_msg=name)


@pytest.mark.parametrize(
    "name",
    [
        "deblur_defocus_wiener",
        "deblur_motion_wiener",
        "dehaze_global",
        "jpeg_deblock_dct",
        "sharpen_unsharp",
        "denoise_tv",
    ],
)
def test_zero_strength_leaves_the_image_unchanged(name):
    image = crops(64)[1]
    np.testing.assert_array_equal(get_tool(name)([image], strength=0.0)[0], image)


def test_strength_changes_the_result():
    lq = degrade(crops(96)[0], "denoising")
    light, strong = get_tool("denoise_dct")([lq, lq], strength=0.5), get_tool("denoise_dct")([lq], strength=2.0)
    assert np.abs(strong[0].astype(int) - lq).mean() > np.abs(light[0].astype(int) - lq).mean()


# ---------------------------------------------------------------- the estimators the tools rely on


def test_noise_level_estimate():
    hq = crops(128)[0]
    for sigma in (20.0, 40.0):
        lq = DEGRADATIONS.get("noise")(hq, np.random.default_rng(0), kind="gaussian", sigma=sigma)[0]
        assert abs(estimate_noise_sigma(lq) * 255 - sigma) < 0.2 * sigma


@pytest.mark.parametrize("quality", [12, 25])
def test_jpeg_quality_is_recovered(quality):
    lq = DEGRADATIONS.get("jpeg")(crops(128)[1], None, quality=quality)[0]
    assert estimate_jpeg_quality(lq) == quality


@pytest.mark.parametrize("radius", [3, 6])
def test_defocus_radius_is_recovered(radius):
    lq = DEGRADATIONS.get("defocus_blur")(crops(128)[0], None, radius=radius)[0]
    assert estimate_defocus_radius(lq) == radius


def test_motion_angle_and_length_are_recovered():
    lq = DEGRADATIONS.get("motion_blur")(crops(128)[0], None, radius=10, sigma=3, angle=-50.0)[0]
    sigma, angle = estimate_motion(lq)
    assert abs(angle - (-50.0)) <= 5 and abs(sigma - 3) <= 1


# ---------------------------------------------------------------- registry and schemas


def test_registry_lookup_and_did_you_mean():
    assert get_tool("denoise_dct").subtask == "denoising"
    with pytest.raises(KeyError, match="did you mean 'denoise_dct'"):
        get_tool("denoise_dtc")


def test_tools_for_subtask_and_unknown_subtask():
    names = [t.name for t in tools_for_subtask("super_resolution")]
    assert {"sr_bicubic", "sr_lanczos", "sr_backprojection"} <= set(names)
    assert all(get_tool(n).scale == 4 for n in names if n.startswith("sr_"))
    with pytest.raises(KeyError, match="unknown subtask"):
        tools_for_subtask("sharpening")


def test_tool_schemas_are_function_descriptions():
    schemas = tool_schemas()
    assert {s["name"] for s in schemas} >= set(CLASSICAL)
    json.dumps(schemas)  # plain JSON, ready for a prompt
    for schema in schemas:
        assert set(schema) == {"name", "description", "parameters"}
        assert schema["parameters"]["type"] == "object" and schema["description"].strip()
        assert schema["name"].islower() and " " not in schema["name"]
    only = tool_schemas(["dehaze_dcp"])
    assert [s["name"] for s in only] == ["dehaze_dcp"]
    assert only[0]["parameters"]["properties"]["strength"]["maximum"] == 1.15
    only[0]["parameters"]["properties"].clear()  # a copy: the tool's own schema is untouched
    assert "strength" in get_tool("dehaze_dcp").parameters["properties"]


def test_registering_a_name_twice_is_an_error():
    clash = FunctionTool(
        "denoise_dct", "denoising", "another", lambda image: image, {"type": "object", "properties": {}}
    )
    with pytest.raises(ValueError, match="registered twice"):
        register_tool(clash)


def test_bad_tool_definitions_are_rejected():
    with pytest.raises(ValueError, match="snake_case"):
        FunctionTool("Bad Name", "denoising", "x", lambda i: i, {"type": "object", "properties": {}})
    with pytest.raises(KeyError, match="unknown subtask"):
        FunctionTool("ok_name", "sharpening", "x", lambda i: i, {"type": "object", "properties": {}})


# ---------------------------------------------------------------- argument validation


def test_arguments_get_defaults_and_are_coerced():
    schema = get_tool("denoise_dct").parameters
    assert validate_arguments("denoise_dct", schema, {}) == {"strength": 1.0}
    assert validate_arguments("denoise_dct", schema, {"strength": 2}) == {"strength": 2.0}  # an int is a number


@pytest.mark.parametrize(
    "args, message",
    [
        ({"strenght": 1.0}, r"has no argument 'strenght' \(accepted: strength\)"),
        ({"strength": "high"}, 'must be a number, got "high"'),
        ({"strength": True}, "must be a number, got true"),
        ({"strength": 5.0}, "must be <= 3.0, got 5.0"),
        ({"strength": -1}, "must be >= 0.0, got -1"),
        ({"strength": float("nan")}, "must be a finite number"),
    ],
)
def test_bad_arguments_raise_a_clear_typed_error(args, message):
    with pytest.raises(ToolArgumentError, match=message) as info:
        get_tool("denoise_dct")([crops(64)[0]], **args)
    assert "denoise_dct" in str(info.value) and isinstance(info.value, ValueError)


def test_tools_without_arguments_reject_any():
    with pytest.raises(ToolArgumentError, match="accepted: none"):
        get_tool("sr_bicubic")([crops(64)[0]], strength=1.0)


# ---------------------------------------------------------------- image validation


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((32, 32, 3), np.uint8), "expects a list of images.*wrap a single image"),
        ([np.zeros((32, 32, 3), np.float32)], "image 0: expected an RGB uint8 HxWx3 image.*, got ndarray float32"),
        ([np.full((32, 32, 3), np.nan, np.float32)], r"float32 \(32, 32, 3\) containing NaN"),
        (
            [np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.uint8)],
            r"image 1: expected an RGB uint8 HxWx3 image.*, got ndarray uint8 \(32, 32\)",
        ),
        ([np.zeros((32, 32, 4), np.uint8)], r"HxWx3.*\(32, 32, 4\)"),
        ([np.zeros((4, 32, 3), np.uint8)], "at least 8x8 px, got a 4x32 image"),
        (["not an image"], "expected an RGB uint8 HxWx3 image.*, got str"),
    ],
)
def test_bad_images_raise_a_clear_typed_error(images, message):
    with pytest.raises(ToolInputError, match=message):
        get_tool("denoise_tv")(images)


def test_empty_batch_gives_empty_result():
    assert get_tool("dehaze_dcp")([]) == []


def _dense_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The former dense resize matrix of sr_backprojection: the reference for the sparse one."""
    import math

    from tool_pool.classical_resize import cubic

    scale = n_out / n_in
    antialias = scale < 1
    width = 4.0 / scale if antialias else 4.0
    centres = np.arange(1, n_out + 1) / scale + 0.5 * (1 - 1 / scale)
    taps = math.ceil(width) + 2
    index = np.floor(centres - width / 2)[:, None] + np.arange(taps)[None, :]
    distance = centres[:, None] - index
    weights = scale * cubic(distance * scale) if antialias else cubic(distance)
    weights /= weights.sum(axis=1, keepdims=True)
    index = index.astype(int) - 1
    index = np.where(index < 0, -index - 1, index)
    index = np.where(index >= n_in, 2 * n_in - index - 1, index)
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.repeat(np.arange(n_out), taps), index.ravel()), weights.ravel())
    return matrix


def test_backprojection_sparse_matches_the_dense_matrices():
    from tool_pool.classical_resize import BACK_PROJECTION_STEPS, SCALE, resize_matrix, separable, sr_backprojection

    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    h, w = image.shape[:2]
    for n_in, n_out in ((h, h * SCALE), (w, w * SCALE), (h * SCALE, h), (w * SCALE, w)):
        np.testing.assert_allclose(resize_matrix(n_in, n_out).toarray(), _dense_resize_matrix(n_in, n_out), atol=1e-12)

    def dense(rows, x, cols):
        return np.stack([rows @ x[..., c] @ cols.T for c in range(x.shape[2])], axis=-1)

    up_rows, up_cols = _dense_resize_matrix(h, h * SCALE), _dense_resize_matrix(w, w * SCALE)
    down_rows, down_cols = _dense_resize_matrix(h * SCALE, h), _dense_resize_matrix(w * SCALE, w)
    low = image.astype(np.float64)
    estimate = dense(up_rows, low, up_cols)
    for _ in range(BACK_PROJECTION_STEPS):
        estimate += dense(up_rows, low - dense(down_rows, estimate, down_cols), up_cols)
    sparse_rows, sparse_cols = resize_matrix(h, h * SCALE), resize_matrix(w, w * SCALE)
    sparse_estimate = separable(sparse_rows, low, sparse_cols)
    for _ in range(BACK_PROJECTION_STEPS):
        shrunk = separable(resize_matrix(h * SCALE, h), sparse_estimate, resize_matrix(w * SCALE, w))
        sparse_estimate += separable(sparse_rows, low - shrunk, sparse_cols)
    np.testing.assert_allclose(sparse_estimate, estimate, atol=1e-6, rtol=0)
    reference = np.clip(np.rint(estimate), 0, 255).astype(np.uint8)
    out = sr_backprojection(image)
    assert out.shape == (h * SCALE, w * SCALE, 3)
    # the float estimates agree to ~1e-12; after rounding, at most a value exactly at .5 could differ
    assert np.abs(out.astype(int) - reference.astype(int)).max() <= 1
    assert np.mean(out != reference) < 1e-4


def test_dct_denoising_in_bands_equals_one_pass():
    from tool_pool.classical_denoise import dct_denoise_channel

    x = np.random.default_rng(0).random((301, 64)).astype(np.float32)  # 301: bands end off the patch grid
    whole = dct_denoise_channel(x, 0.1, band_rows=10**6)
    banded = dct_denoise_channel(x, 0.1, band_rows=40)
    np.testing.assert_array_equal(banded, whole)
    assert np.abs(whole - x).mean() > 0.01  # it did denoise
