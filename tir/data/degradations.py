"""The eight degradations of the MiO100 / AgenticIR protocol, and the sets they are combined in.

Each degradation is one function registered in ``DEGRADATIONS`` under the name the whole project
uses, with the signature ``(image, rng, **params) -> (image, applied_params)``:

- ``image`` is RGB uint8 HxWx3; the result is too;
- params given explicitly are checked against the protocol's ranges (``DegradationError`` names
  the degradation, the param and the allowed values) and used as they are; missing ones are drawn
  from ``rng``;
- ``applied_params`` holds every value used, as plain JSON-able python values, so that
  ``fn(image, any_rng, **applied_params)`` reproduces the output exactly. Degradations with a
  random field (noise, rain) draw a ``noise_seed`` for it, which is why that is reproducible too.

Parameter ranges (PROTOCOL.md, as in AgenticIR's synthesis code) are closed intervals unless the
protocol says otherwise (JPEG quality is in [10, 30)).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np

from tir.data.depth import resize_depth, synthetic_depth
from tir.imaging import check_image
from tir.registry import Registry, unknown_name

DEGRADATIONS = Registry("degradation")
NAMES = ("noise", "motion_blur", "defocus_blur", "jpeg", "haze", "rain", "dark", "lowres")
SUBTASK_FOR_DEGRADATION = {
    "noise": "denoising",
    "motion_blur": "motion_deblurring",
    "defocus_blur": "defocus_deblurring",
    "jpeg": "jpeg_artifact_removal",
    "haze": "dehazing",
    "rain": "deraining",
    "dark": "brightening",
    "lowres": "super_resolution",
}
MOTION_KERNELS = ((10, 3), (15, 5), (15, 8))  # (radius, sigma) choices
DEFOCUS_ALIAS_SIGMA = {3: 0.1, 4: 0.5, 6: 0.5}  # disk radius -> anti-aliasing Gaussian sigma
DARK_VARIANTS = {
    "constant_shift": ("shift", 30, 50),
    "gamma": ("gamma", 0.5, 0.7),
    "linear_compress": ("max_value", 100, 150),
}
SEED_LIMIT = 2**32  # noise_seed in [0, 2**32)


class DegradationError(ValueError):
    """A bad image or parameter given to a degradation."""


# ------------------------------------------------------------------------------ parameters
def _reject_unknown(degradation: str, params: dict, known: Sequence[str]) -> None:
    for name in params:
        if name not in known:
            raise DegradationError(f"{degradation}: " + unknown_name("param", name, known))


def _number(
    degradation: str,
    params: dict,
    name: str,
    lo: float,
    hi: float,
    draw: Callable[[], Any],
    *,
    integer: bool = False,
    hi_open: bool = False,
):
    """``params[name]`` checked to lie in [lo, hi] (or [lo, hi)), else ``draw()`` when missing."""
    if params.get(name) is None:
        value = draw()
        return int(value) if integer else float(value)
    value = params[name]
    allowed = f"{'an integer' if integer else 'a number'} in [{lo}, {hi}{')' if hi_open else ']'}"
    is_number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not is_number or (integer and float(value) != int(value)):
        raise DegradationError(f"{degradation}: param {name!r} must be {allowed}, got {value!r}")
    if not (lo <= value < hi if hi_open else lo <= value <= hi):
        raise DegradationError(f"{degradation}: param {name!r}={value!r} is out of range; allowed: {allowed}")
    return int(value) if integer else float(value)


def _choice(degradation: str, params: dict, name: str, choices: Sequence[Any], rng: np.random.Generator):
    if params.get(name) is None:
        return choices[int(rng.integers(len(choices)))]
    if params[name] not in choices:
        raise DegradationError(
            f"{degradation}: param {name!r}={params[name]!r} is not allowed; choose one of {list(choices)}"
        )
    return params[name]


def _noise_seed(degradation: str, params: dict, rng: np.random.Generator) -> int:
    return _number(
        degradation, params, "noise_seed", 0, SEED_LIMIT, lambda: rng.integers(SEED_LIMIT), integer=True, hi_open=True
    )


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image, 0, 255).round().astype(np.uint8)


# ------------------------------------------------------------------------------ the eight
@DEGRADATIONS.register("noise")
def noise(image: np.ndarray, rng: np.random.Generator, **params) -> tuple[np.ndarray, dict]:
    """Colour noise: Gaussian with sigma in [20, 50] (on 0-255), or Poisson with scale in [1, 3]."""
    kind = _choice("noise", params, "kind", ("gaussian", "poisson"), rng)
    strength = ("sigma", 20, 50) if kind == "gaussian" else ("scale", 1, 3)
    _reject_unknown("noise", params, ("kind", strength[0], "noise_seed"))
    value = _number(
        "noise", params, strength[0], strength[1], strength[2], lambda: rng.uniform(strength[1], strength[2])
    )
    seed = _noise_seed("noise", params, rng)
    field = np.random.default_rng(seed)
    x = image.astype(np.float64) / 255.0
    if kind == "gaussian":
        out = x + field.standard_normal(x.shape) * (value / 255.0)
    else:  # basicsr's recipe: photon counts at the image's number of distinct levels
        levels = 2 ** math.ceil(math.log2(max(len(np.unique(image)), 2)))
        out = x + (field.poisson(x * levels) / levels - x) * value
    return _to_uint8(out * 255.0), {"kind": kind, strength[0]: value, "noise_seed": seed}


def motion_kernel(radius: int, sigma: float, angle: float) -> np.ndarray:
    """A line of 2*radius+1 taps with Gaussian weights decaying from the centre along ``angle``
    (degrees), as imagecorruptions' motion blur (which AgenticIR uses), as a correlation kernel."""
    width = 2 * radius + 1
    weights = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
    weights /= weights.sum()
    kernel = np.zeros((2 * width + 1, 2 * width + 1), np.float64)
    sin, cos = math.sin(math.radians(angle)), math.cos(math.radians(angle))
    for i, weight in enumerate(weights):  # tap i samples the pixel shifted by (dy, dx)
        dy, dx = -math.ceil(i * sin - 0.5), -math.ceil(i * cos - 0.5)
        kernel[width - dy, width - dx] += weight
    return kernel


@DEGRADATIONS.register("motion_blur")
def motion_blur(image: np.ndarray, rng: np.random.Generator, **params) -> tuple[np.ndarray, dict]:
    """Linear camera motion: (radius, sigma) in {(10, 3), (15, 5), (15, 8)}, angle in [-90, 90]."""
    _reject_unknown("motion_blur", params, ("radius", "sigma", "angle"))
    given = (params.get("radius"), params.get("sigma"))
    if given == (None, None):
        radius, sigma = MOTION_KERNELS[int(rng.integers(len(MOTION_KERNELS)))]
    elif given in MOTION_KERNELS:
        radius, sigma = given
    else:
        raise DegradationError(
            f"motion_blur: params ('radius', 'sigma')={given} are not allowed; give both, one of {list(MOTION_KERNELS)}"
        )
    angle = _number("motion_blur", params, "angle", -90, 90, lambda: rng.uniform(-90, 90))
    kernel = motion_kernel(int(radius), float(sigma), angle)
    out = cv2.filter2D(image.astype(np.float32), -1, kernel.astype(np.float32), borderType=cv2.BORDER_REPLICATE)
    return _to_uint8(out), {"radius": int(radius), "sigma": int(sigma), "angle": angle}


def defocus_kernel(radius: int, alias_sigma: float) -> np.ndarray:
    """A disk of ``radius`` on a 17x17 grid, softened by a 3x3 Gaussian (imagecorruptions)."""
    grid = np.arange(-8, 9)
    x, y = np.meshgrid(grid, grid)
    disk = ((x**2 + y**2) <= radius**2).astype(np.float32)
    return cv2.GaussianBlur(disk / disk.sum(), ksize=(3, 3), sigmaX=alias_sigma)


@DEGRADATIONS.register("defocus_blur")
def defocus_blur(image: np.ndarray, rng: np.random.Generator, **params) -> tuple[np.ndarray, dict]:
    """Out-of-focus lens: disk kernel of radius in {3, 4, 6}, anti-aliased (sigma in [0.1, 0.5])."""
    _reject_unknown("defocus_blur", params, ("radius", "alias_sigma"))
    radius = _choice("defocus_blur", params, "radius", tuple(DEFOCUS_ALIAS_SIGMA), rng)
    alias = _number("defocus_blur", params, "alias_sigma", 0.1, 0.5, lambda: DEFOCUS_ALIAS_SIGMA[radius])
    out = cv2.filter2D(image.astype(np.float32), -1, defocus_kernel(int(radius), alias))
    return _to_uint8(out), {"radius": int(radius), "alias_sigma": alias}


@DEGRADATIONS.register("jpeg")
def jpeg(image: np.ndarray, rng: np.random.Generator, **params) -> tuple[np.ndarray, dict]:
    """JPEG compression with quality in [10, 30) (OpenCV's encoder; BGR order for its YCbCr)."""
    _reject_unknown("jpeg", params, ("quality",))
    quality = _number("jpeg", params, "quality", 10, 30, lambda: rng.integers(10, 30), integer=True, hi_open=True)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    if not ok:
        raise DegradationError(f"jpeg: OpenCV could not encode an image of shape {image.shape}")
    return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB), {"quality": quality}


@DEGRADATIONS.register("haze")
def haze(image: np.ndarray, rng: np.random.Generator, **params) -> tuple[np.ndarray, dict]:
    """Atmospheric scattering I = J t + A (1 - t), t = exp(-beta d): A in [0.7, 1], beta in [0.6, 1.8].

    ``depth`` (HxW array, larger = farther, any scale and size) is the scene's depth map; it is
    not recorded in the applied params, only ``depth_source`` (a label you may pass with it,
    default "given"). Without one the fallback ``tir.data.depth.synthetic_depth`` is used
    (``depth_source="synthetic"``), which is reproducible from the image alone.
    """
    _reject_unknown("haze", params, ("A", "beta", "depth", "depth_source"))
    depth, source = params.get("depth"), params.get("depth_source")
    if depth is None and source not in (None, "synthetic"):
        raise DegradationError(f"haze: depth_source={source!r} needs the depth map itself, passed as depth=")
    light = _number("haze", params, "A", 0.7, 1.0, lambda: rng.uniform(0.7, 1.0))
    beta = _number("haze", params, "beta", 0.6, 1.8, lambda: rng.uniform(0.6, 1.8))
    h, w = image.shape[:2]
    if depth is None:
        depth, source = synthetic_depth(image), "synthetic"
    else:
        try:
            depth = resize_depth(depth, h, w)
        except ValueError as err:
            raise DegradationError(f"haze: param 'depth': {err}") from err
        source = str(source or "given")
    t = np.exp(-beta * depth)[..., None]
    out = image.astype(np.float64) * t + light * 255.0 * (1.0 - t)
    return _to_uint8(out), {"A": light, "beta": beta, "depth_source": source}


def rain_layer(height: int, width: int, length: int, angle: float, value: int, noise_seed: int) -> np.ndarray:
    """Streaks (float32 HxW in [0, 255]): sparse random seeds smeared by a rotated line kernel,
    as in MiOIR's rain synthesis (AgenticIR uses it). ``value`` sets the seed density."""
    seeds = np.random.default_rng(noise_seed).uniform(0, 256, (height, width))
    seeds[seeds < 256 - value * 0.01] = 0  # keep a fraction value/25600 of the pixels
    seeds = cv2.filter2D(seeds, -1, np.array([[0, 0.1, 0], [0.1, 8, 0.1], [0, 0.1, 0]]))
    # the diagonal line already leans 45 degrees: rotate by angle - 45 so angle 0 is vertical
    rotation = cv2.getRotationMatrix2D((length / 2, length / 2), angle - 45, 1 - length / 100.0)
    streak = cv2.warpAffine(np.diag(np.ones(length)), rotation, (length, length))
    streak = cv2.GaussianBlur(streak, (3, 3), 0)  # gives the streaks a width
    layer = cv2.filter2D(seeds, -1, streak)
    return cv2.normalize(layer, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8).astype(np.float32)


@DEGRADATIONS.register("rain")
def rain(image: np.ndarray, rng: np.random.Generator, **params) -> tuple[np.ndarray, dict]:
    """Rain streaks added onto the image: length in [20, 40], angle in [-30, 30], value in [50, 100]."""
    _reject_unknown("rain", params, ("length", "angle", "value", "noise_seed"))
    length = _number("rain", params, "length", 20, 40, lambda: rng.integers(20, 40, endpoint=True), integer=True)
    angle = _number("rain", params, "angle", -30, 30, lambda: rng.integers(-30, 30, endpoint=True))
    value = _number("rain", params, "value", 50, 100, lambda: rng.integers(50, 100, endpoint=True), integer=True)
    seed = _noise_seed("rain", params, rng)
    layer = rain_layer(image.shape[0], image.shape[1], length, angle, value, seed)
    out = image.astype(np.float32) + layer[..., None]
    return _to_uint8(out), {"length": length, "angle": angle, "value": value, "noise_seed": seed}


@DEGRADATIONS.register("dark")
def dark(image: np.ndarray, rng: np.random.Generator, **params) -> tuple[np.ndarray, dict]:
    """Low light on the HSV value: constant shift down by 30-50, gamma 0.5-0.7 (v^(1/gamma)),
    or linear compression of [min, max] to [0, max_value] with max_value in 100-150."""
    variant = _choice("dark", params, "variant", tuple(DARK_VARIANTS), rng)
    name, lo, hi = DARK_VARIANTS[variant]
    _reject_unknown("dark", params, ("variant", name))
    integer = variant != "gamma"
    draw = (lambda: rng.integers(lo, hi, endpoint=True)) if integer else (lambda: rng.uniform(lo, hi))
    amount = _number("dark", params, name, lo, hi, draw, integer=integer)
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    v = hsv[..., 2].astype(np.float64)
    if variant == "constant_shift":
        v = v - amount
    elif variant == "gamma":
        v = (v / 255.0) ** (1.0 / amount) * 255.0
    else:
        v = (v - v.min()) / max(v.max() - v.min(), 1.0) * amount
    hsv[..., 2] = _to_uint8(v)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), {"variant": variant, name: amount}


@DEGRADATIONS.register("lowres")
def lowres(image: np.ndarray, rng: np.random.Generator, **params) -> tuple[np.ndarray, dict]:
    """Bicubic downscale by 1/4 with MATLAB's imresize (basicsr's exact port, antialiased)."""
    _reject_unknown("lowres", params, ("scale",))
    scale = _choice("lowres", {"scale": 0.25, **params}, "scale", (0.25,), rng)  # fixed: nothing to draw
    if min(image.shape[:2]) < 4:
        raise DegradationError(f"lowres: image of shape {image.shape} is too small to downscale by {scale}")
    from basicsr.utils.matlab_functions import imresize  # heavy import (torch): only when used

    out = imresize(image.astype(np.float32) / 255.0, scale=scale)
    return _to_uint8(np.asarray(out) * 255.0), {"scale": scale}


# ------------------------------------------------------------------------------ applying
def degrade(image: np.ndarray, name: str, rng: np.random.Generator, **params) -> tuple[np.ndarray, dict]:
    """Apply one registered degradation by name (checks the image on the way in)."""
    fn = DEGRADATIONS.get(name)
    check_image(image, f"{name}: input", error=DegradationError)
    return fn(image, rng, **params)


def parse_combo(combo: str | Sequence[str]) -> tuple[str, ...]:
    """'noise+jpeg' or ['noise', 'jpeg'] -> ('noise', 'jpeg'), names checked."""
    names = tuple(n.strip() for n in combo.split("+")) if isinstance(combo, str) else tuple(combo)
    if not names or any(not n for n in names):
        raise DegradationError(f"empty degradation name in combination {combo!r}")
    for name in names:
        DEGRADATIONS.get(name)  # KeyError with a did-you-mean hint
    if len(set(names)) != len(names):
        raise DegradationError(f"combination {combo!r} repeats a degradation")
    return names


def combo_name(combo: str | Sequence[str]) -> str:
    return "+".join(parse_combo(combo))


def degrade_chain(
    image: np.ndarray, names: str | Sequence[str], rng: np.random.Generator, params=None
) -> tuple[np.ndarray, list[dict]]:
    """Apply several degradations in order. ``params``: None, a list aligned with ``names``
    (entries may be None), or a dict name -> params. Returns the image and the applied params."""
    names = parse_combo(names)
    if params is None:
        params = [None] * len(names)
    elif isinstance(params, dict):
        unknown = set(params) - set(names)
        if unknown:
            raise DegradationError(f"params given for degradations not in the chain {names}: {sorted(unknown)}")
        params = [params.get(n) for n in names]
    elif len(params) != len(names):
        raise DegradationError(f"got {len(params)} param dicts for {len(names)} degradations {names}")
    applied = []
    for name, given in zip(names, params):
        image, used = degrade(image, name, rng, **(given or {}))
        applied.append(used)
    return image, applied


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process (python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(str(text).encode("utf-8"), digest_size=8).digest(), "little")


def sample_rng(image_id: str, combo: str | Sequence[str], seed: int) -> np.random.Generator:
    """The generator of one sample: a function of (source image id, combination, seed) only."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DegradationError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng([int(seed), stable_hash(image_id), stable_hash(combo_name(combo))])


# ------------------------------------------------------------------------------ combinations
GROUPS = {
    "groupA": [
        ("rain", "haze"),
        ("motion_blur", "lowres"),
        ("dark", "noise"),
        ("defocus_blur", "jpeg"),
        ("noise", "jpeg"),
        ("rain", "lowres"),
        ("motion_blur", "dark"),
        ("defocus_blur", "haze"),
    ],
    "groupB": [("motion_blur", "jpeg"), ("haze", "noise"), ("defocus_blur", "lowres"), ("rain", "dark")],
    "groupC": [
        ("haze", "motion_blur", "lowres"),
        ("rain", "noise", "lowres"),
        ("dark", "defocus_blur", "jpeg"),
        ("motion_blur", "defocus_blur", "noise"),
    ],
}
# Order of application for combinations the protocol does not list, following how a photo is
# made: the scene (haze, then rain in front of it), the camera's motion and optics, exposure,
# sampling on the sensor, sensor noise, and last the file's compression.
CANONICAL_ORDER = ("haze", "rain", "motion_blur", "defocus_blur", "dark", "lowres", "noise", "jpeg")


def _out_of_domain(size: int) -> list[tuple[str, ...]]:
    """Every combination of ``size`` degradations whose set is in none of groups A, B, C, each in
    canonical order; listed in the lexicographic order of that ordering (deterministic)."""
    listed = {frozenset(c) for group in GROUPS.values() for c in group}
    return [c for c in itertools.combinations(CANONICAL_ORDER, size) if frozenset(c) not in listed]


COMBINATIONS: dict[str, list[tuple[str, ...]]] = {
    **GROUPS,
    "single": [(name,) for name in NAMES],
    "ood2": _out_of_domain(2),
    "ood3": _out_of_domain(3),
}
COMBINATIONS["ood"] = COMBINATIONS["ood2"] + COMBINATIONS["ood3"]


def combinations(name: str) -> list[tuple[str, ...]]:
    if name not in COMBINATIONS:
        raise KeyError(unknown_name("combination set", name, COMBINATIONS))
    return list(COMBINATIONS[name])


def parse_combos(spec: str | Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """'groupA,groupB,noise+jpeg' -> [(group, combo), ...] in order, without duplicates (the first
    mention wins). A set name expands to its combinations; anything else is one explicit
    combination ('noise+jpeg', or 'noise' alone) in the group 'custom'."""
    entries = [e.strip() for e in spec.split(",")] if isinstance(spec, str) else [str(e).strip() for e in spec]
    out, seen = [], set()
    for entry in filter(None, entries):
        if entry in COMBINATIONS:
            pairs = [(entry, c) for c in COMBINATIONS[entry]]
        elif "+" in entry or entry in DEGRADATIONS:
            pairs = [("custom", parse_combo(entry))]
        else:
            raise KeyError(unknown_name("combination set or degradation", entry, list(COMBINATIONS) + list(NAMES)))
        for group, combo in pairs:
            if combo not in seen:
                seen.add(combo)
                out.append((group, combo))
    if not out:
        raise DegradationError(f"no combinations in {spec!r}")
    return out
