"""Cheap measured degradation cues: a perception observation for small policies.

A tiny VLM trained on CPU for minutes learns the tool-call format but cannot tell noise, blur,
JPEG and clean photos apart from pixels (PROTOCOL.md, last section). So, when a recipe asks for
it, the environment measures a few numbers on each image the policy sees and writes them as one
short line of text beside the image; the policy learns to read the numbers instead.

Each cue is a small pure function ``(image) -> float`` of one RGB uint8 HxWx3 image, registered
by name in ``CUES``, and takes a few milliseconds on a 128-256 px image:

==============  ===========================================  ================================
cue             what it measures                             moves with
==============  ===========================================  ================================
noise_sigma     noise std (0-255) from the finest diagonal   noise: up (clean ~0-7)
                wavelet band, robust median, per channel
sharpness       min over 4 directions of the RMS change over  motion/defocus blur: down
                1 px relative to over 3 px (half size,       (noise: neutral)
                noise's share removed)
motion          how much that ratio differs between          motion blur: up; defocus: ~1
                perpendicular directions
brightness      mean HSV value (0-1)                         dark: down
haze            mean dark channel (0-1) of a box-blurred     haze: up
                copy
blockiness      mean step across 8x8 block borders relative  jpeg: up (clean ~1)
                to steps inside blocks
rain            mean brightness (0-255) of thin bright       rain: up
                near-vertical streaks
width, height   image size in pixels                         lowres: down
==============  ===========================================  ================================

``measure_cues`` runs several, ``render_cues`` writes them as a fixed, rounded line.
``likely_degradations`` turns them into a guess (one threshold per cue) and ``observe`` writes
both, the line the policy reads: a tiny policy learns words far faster than it learns to compare
numbers written as digits (with numbers alone a tiny SFT'd policy stayed near chance).
``tests/test_perception.py`` measures how well each cue separates its degradation from clean
crops of the built-in photos (and reports where a cue also fires on another degradation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from tir import imaging
from tir.registry import Registry

CUES = Registry("cue")
DEFAULT_CUES = ("noise_sigma", "sharpness", "motion", "brightness", "haze", "blockiness", "rain", "width", "height")
HALVE_FROM = 64  # sharpness works on a half-size copy of images at least this large
JPEG_BLOCK = 8  # JPEG's block size, on a grid at the image's origin
MIN_SIDE = 8  # below this the directional and block statistics have nothing to measure
# Decimals each cue is rendered with: enough to separate its degradation, few enough tokens.
DECIMALS = {
    "noise_sigma": 0,
    "sharpness": 2,
    "motion": 2,
    "brightness": 2,
    "haze": 2,
    "blockiness": 1,
    "rain": 1,
    "width": 0,
    "height": 0,
}
# Cue thresholds, measured on 128 px crops of the built-in photos (the best single threshold
# between clean and degraded crops; tests/test_perception.py checks how often each guess is right).
THRESHOLDS = {
    "noise_sigma": 5.0,
    "blockiness": 1.3,
    "rain": 2.3,
    "haze": 0.3,
    "brightness": 0.35,
    "sharpness": 0.41,
    "motion": 1.1,
}
LOWRES_SIDE = 96  # a photo whose short side is below this is treated as low resolution
# The four directions (dy, dx) that directional statistics look along: 0, 45, 90, 135 degrees.
DIRECTIONS = ((0, 1), (1, 1), (1, 0), (1, -1))
# A Gaussian's median absolute value is 0.6745 sigma (the MAD estimator, as Donoho's).
MAD_TO_SIGMA = 1.0 / 0.6745


def check_image(image: Any, where: str = "image") -> np.ndarray:
    """``image`` itself when it is an RGB uint8 HxWx3 array of at least ``MIN_SIDE`` px a side,
    else a ValueError naming ``where`` (``tir.imaging.check_image`` with the cues' minimum size)."""
    return imaging.check_image(image, where, min_side=MIN_SIDE)


def _gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)


def odd_window(n: float, lo: int, hi: int) -> int:
    """An odd integer near ``n`` clamped to [lo, hi] (lo, hi odd): window sizes that scale with the image."""
    return int(min(hi, max(lo, int(n) // 2 * 2 + 1)))


# ------------------------------------------------------------------------------ noise
def haar_diagonal(channel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The finest diagonal Haar band (HH) of one channel, and which of its 2x2 blocks are unclipped.

    HH is (a - b - c + d) / 2 over each 2x2 block: image structure mostly cancels, white noise of
    std sigma keeps std sigma. Blocks touching 0 or 255 are flagged, since clipping hides noise
    (a noisy black background reads as half as noisy)."""
    h, w = channel.shape
    x = channel[: h // 2 * 2, : w // 2 * 2].astype(np.float32)
    a, b, c, d = x[0::2, 0::2], x[0::2, 1::2], x[1::2, 0::2], x[1::2, 1::2]
    lowest = np.minimum(np.minimum(a, b), np.minimum(c, d))
    highest = np.maximum(np.maximum(a, b), np.maximum(c, d))
    return (a - b - c + d) / 2, (lowest > 0) & (highest < 255)


@CUES.register("noise_sigma")
def noise_sigma(image: np.ndarray) -> float:
    """Estimated noise std on 0-255, averaged over R, G, B: the median absolute HH coefficient
    (as skimage.restoration.estimate_sigma, with Haar instead of db2 and no PyWavelets)."""
    check_image(image)
    sigmas = []
    for k in range(3):
        band, unclipped = haar_diagonal(image[..., k])
        values = band[unclipped] if unclipped.mean() > 0.1 else band.ravel()  # mostly clipped: use all
        sigmas.append(float(np.median(np.abs(values))) * MAD_TO_SIGMA)
    return float(np.mean(sigmas))


# ------------------------------------------------------------------------------ blur
def half_size(gray: np.ndarray) -> np.ndarray:
    """2x2 block means: halves the noise's std while a blur of width w keeps width w/2."""
    h, w = gray.shape
    x = gray[: h // 2 * 2, : w // 2 * 2]
    return (x[0::2, 0::2] + x[0::2, 1::2] + x[1::2, 0::2] + x[1::2, 1::2]) / 4


def _mean_square_step(gray: np.ndarray, dy: int, dx: int, block: int) -> float:
    """Mean (I(p + (dy, dx)) - I(p))^2 over the pairs of pixels within one ``block`` x ``block``
    tile of the grid at the origin: JPEG's block borders are steps that no blur smooths, so
    pairs across them would make a compressed blurred photo read as sharp."""
    h, w = gray.shape
    rows, cols = np.arange(h) // block, np.arange(w) // block
    ys, xs = slice(max(dy, 0), h + min(dy, 0)), slice(max(dx, 0), w + min(dx, 0))
    yt, xt = slice(max(-dy, 0), h + min(-dy, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    same = (rows[ys] == rows[yt])[:, None] & (cols[xs] == cols[xt])[None, :]
    return float(np.square(gray[ys, xs] - gray[yt, xt])[same].mean())


def directional_sharpness(image: np.ndarray) -> np.ndarray | None:
    """For each of ``DIRECTIONS``: the RMS change over 1 px relative to that over 3 px, on the
    gray image (a half-size copy from ``HALVE_FROM`` px on, so that noise weighs less), with the
    noise's share taken out, over pairs within JPEG blocks. None for a flat image.

    At a sharp edge the whole step is taken within one pixel (ratio near 1); across a blur of
    width w it spreads over w pixels (ratio near 1/3 once w >= 3). Being a ratio, it does not
    depend on contrast. White noise of std s adds 2 s^2 to every mean square step whatever its
    length, which would read as sharp: that much is subtracted (s from the Haar band), so a
    noisy blurred photo still reads as blurred."""
    gray, block = _gray(check_image(image)), JPEG_BLOCK
    if min(gray.shape) >= HALVE_FROM:
        gray, block = half_size(gray), JPEG_BLOCK // 2
    band, _ = haar_diagonal(gray)
    noise_power = 2 * (float(np.median(np.abs(band))) * MAD_TO_SIGMA) ** 2
    near = np.array([_mean_square_step(gray, dy, dx, block) for dy, dx in DIRECTIONS]) - noise_power
    far = np.array([_mean_square_step(gray, 3 * dy, 3 * dx, block) for dy, dx in DIRECTIONS]) - noise_power
    if far.max() < 1e-3:
        return None
    # at most 1: only pure noise or a 1-px checkerboard changes more over 1 px than over 3
    return np.minimum(np.sqrt(np.maximum(near, 1e-3) / np.maximum(far, 1e-3)), 1.0)


@CUES.register("sharpness")
def sharpness(image: np.ndarray) -> float:
    """The least sharp direction's ratio, at most 1 (lower = blurrier: ~0.4-0.65 for clean
    photos, ~0.35 blurred): the minimum, so that motion blur, which softens one direction only,
    counts as much as defocus."""
    ratios = directional_sharpness(image)
    return 1.0 if ratios is None else float(ratios.min())


@CUES.register("motion")
def motion(image: np.ndarray) -> float:
    """Anisotropy of blur (>= 1): motion blur softens along its path only (high), defocus blur
    everywhere alike (near 1). Directions are compared with the perpendicular one only (0 with
    90 degrees, 45 with 135): axes and diagonals step different lengths, which alone would
    make fine isotropic texture look anisotropic. The geometric mean of the two pairs' ratios,
    since a path between the two axes of comparison shows in both."""
    ratios = directional_sharpness(image)
    if ratios is None:
        return 1.0
    axes, diagonals = ratios[0] / ratios[2], ratios[1] / ratios[3]
    return float(math.sqrt(max(axes, 1 / axes) * max(diagonals, 1 / diagonals)))


# ------------------------------------------------------------------------------ light and haze
@CUES.register("brightness")
def brightness(image: np.ndarray) -> float:
    """Mean HSV value (max of R, G, B) on 0-1: what the brightening tools act on."""
    check_image(image)
    value = cv2.max(cv2.max(image[..., 0], image[..., 1]), image[..., 2])  # 5x faster than max(axis=2)
    return float(value.mean() / 255.0)


@CUES.register("haze")
def haze(image: np.ndarray) -> float:
    """Mean dark channel on 0-1 (He et al.'s prior): in a haze-free photo most patches hold some
    nearly black pixel in some channel; airlight lifts them all. The patch (15 px, He et al.'s
    size, smaller on small images) is wide enough to find a dark pixel in textured regions.
    A 5 px box blur first, so that noise's dark outliers do not pass for haze-free shadows."""
    side = min(check_image(image).shape[:2])
    box, patch = odd_window(side / 25, 3, 5), odd_window(side / 8, 3, 15)
    smooth = cv2.blur(image, (box, box))
    lowest = cv2.min(cv2.min(smooth[..., 0], smooth[..., 1]), smooth[..., 2])
    dark = cv2.erode(lowest, np.ones((patch, patch), np.uint8))
    return float(dark.mean() / 255.0)


# ------------------------------------------------------------------------------ jpeg
def _border_ratio(steps: np.ndarray) -> float:
    """Mean step at positions 7, 15, ... (block borders, a 1-D profile of |differences|) over
    the median of the mean steps at the 7 other phases; 1 when there are no two full blocks."""
    usable = steps.shape[0] // JPEG_BLOCK * JPEG_BLOCK
    if usable < 2 * JPEG_BLOCK:
        return 1.0
    phases = steps[:usable].reshape(-1, JPEG_BLOCK).mean(axis=0)
    inside = float(np.median(phases[:-1]))
    return float((phases[-1] + 0.05) / (inside + 0.05))  # + 0.05 gray level: a flat image gives 1


@CUES.register("blockiness")
def blockiness(image: np.ndarray) -> float:
    """JPEG's 8x8 grid (aligned with the image origin): how much larger the steps across block
    borders are than the steps at the other 7 offsets, averaged over columns and rows. ~1 for a
    clean photo; noise raises all offsets alike, so it does not fire on noise."""
    gray = _gray(check_image(image))
    across_columns = np.abs(np.diff(gray, axis=1)).mean(axis=0)  # step between column j and j+1
    across_rows = np.abs(np.diff(gray, axis=0)).mean(axis=1)
    return (_border_ratio(across_columns) + _border_ratio(across_rows)) / 2


# ------------------------------------------------------------------------------ rain
def line_kernel(length: int, angle: float) -> np.ndarray:
    """A 1-pixel line of ``length`` (odd) through the centre, ``angle`` degrees from vertical."""
    kernel = np.zeros((length, length), np.uint8)
    centre = length // 2
    sin, cos = math.sin(math.radians(angle)), math.cos(math.radians(angle))
    for s in np.linspace(-centre, centre, 4 * length).tolist():
        kernel[round(centre - s * cos), round(centre + s * sin)] = 1
    return kernel


def streak_strength(gray: np.ndarray, thin: np.ndarray, angles: Sequence[float], length: int) -> float:
    """Mean of the thin bright details (white top-hat with the ``thin`` element) that survive an
    opening by a line at one of ``angles``: the best angle's value, in gray levels."""
    details = gray - cv2.morphologyEx(gray, cv2.MORPH_OPEN, thin)
    return max(float(cv2.morphologyEx(details, cv2.MORPH_OPEN, line_kernel(length, a)).mean()) for a in angles)


@CUES.register("rain")
def rain(image: np.ndarray) -> float:
    """Rain-streak brightness (0-255 gray levels): thin bright lines, long in a direction within
    30 degrees of vertical (rain only brightens, streaks are a few px wide and 20-40 long). The
    same measure turned 90 degrees is subtracted, so that isotropic texture and noise, which
    leave a little of both, cancel (clamped at 0)."""
    gray = _gray(check_image(image))
    width = odd_window(min(gray.shape) / 18, 3, 7)  # wider than a streak: the top-hat keeps streaks
    length = odd_window(min(gray.shape) / 12, 5, 11)  # longer than texture specks, shorter than streaks
    upright = streak_strength(gray, np.ones((1, width), np.uint8), (-30, -15, 0, 15, 30), length)
    sideways = streak_strength(gray, np.ones((width, 1), np.uint8), (90,), length)
    return max(0.0, upright - sideways)


# ------------------------------------------------------------------------------ size
@CUES.register("width")
def width(image: np.ndarray) -> float:
    return float(check_image(image).shape[1])


@CUES.register("height")
def height(image: np.ndarray) -> float:
    return float(check_image(image).shape[0])


# ------------------------------------------------------------------------------ all together
def measure_cues(image: np.ndarray, names: Sequence[str] | None = None) -> dict[str, float]:
    """{name: value} for ``names`` (default ``DEFAULT_CUES``), in that order."""
    check_image(image)
    if isinstance(names, str) or not (names is None or all(isinstance(n, str) for n in names)):
        raise TypeError(f"names: expected a sequence of cue names, got {names!r}")
    names = DEFAULT_CUES if names is None else tuple(names)
    return {name: float(CUES.get(name)(image)) for name in names}  # KeyError with a hint


def _format(name: str, value: float) -> str:
    decimals = DECIMALS.get(name, 2)
    return f"{round(float(value), decimals) + 0.0:.{decimals}f}"  # + 0.0 turns -0.0 into 0.0


def likely_degradations(cues: Mapping[str, float]) -> list[str]:
    """Degradations guessed from measured cues (rough: each threshold separates 80-100% of
    crops), in ``tir.data.degradations.NAMES`` order; a cue that was not measured guesses nothing."""
    from tir.data.degradations import NAMES

    t = THRESHOLDS
    found = {
        name
        for name, cue, hit in (
            ("noise", "noise_sigma", lambda v: v > t["noise_sigma"]),
            ("jpeg", "blockiness", lambda v: v > t["blockiness"]),
            ("rain", "rain", lambda v: v > t["rain"]),
            ("haze", "haze", lambda v: v > t["haze"]),
            ("dark", "brightness", lambda v: v < t["brightness"]),
        )
        if cue in cues and hit(cues[cue])
    }
    small = "width" in cues and "height" in cues and min(cues["width"], cues["height"]) < LOWRES_SIDE
    if small:
        found.add("lowres")
    if not small and cues.get("sharpness", math.inf) < t["sharpness"]:  # a thumbnail always looks sharp-edged
        found.add("motion_blur" if cues.get("motion", 0.0) > t["motion"] else "defocus_blur")
    return [name for name in NAMES if name in found]


CUE_STYLES = ("full", "guess", "confidence")


def observe(
    image: np.ndarray,
    names: Sequence[str] | None = None,
    style: str = "full",
    guess: Sequence[str] | None = None,
    maybe: Sequence[str] | None = None,
) -> str:
    """What the policy reads beside ``image``. ``full``: the rendered cues, then ``likely=`` the
    guessed degradations joined by ``+`` (``none`` when nothing fires). ``guess``: the guess alone
    (``likely=haze+rain``): no numbers that vary from photo to photo, which a tiny policy trained
    for minutes otherwise memorises instead of reading the guess. ``confidence``: the guess and
    the degradations the learned recogniser is unsure of (``likely=haze+rain maybe=dark``), its
    confidence in two coarse steps rather than probabilities. ``guess``: the degradations another
    perception decided on (``tir.agent.perceive``), instead of the cue thresholds'; ``maybe``: the
    ones it is unsure of (needed by ``confidence``)."""
    if style not in CUE_STYLES:
        raise ValueError(f"cue style {style!r} unknown; expected one of {CUE_STYLES}")
    if style == "confidence":
        if guess is None or maybe is None:
            raise ValueError("cue style 'confidence' needs the learned recogniser's guess and unsure degradations")
        return f"likely={'+'.join(guess) or 'none'} maybe={'+'.join(maybe) or 'none'}"
    cues = measure_cues(image, names if style == "full" or guess is None else ())
    guessed = likely_degradations(cues) if guess is None else list(guess)
    line = f"likely={'+'.join(guessed) or 'none'}"
    return line if style == "guess" else f"{render_cues(cues)} {line}"


def render_cues(cues: Mapping[str, float]) -> str:
    """One deterministic line, e.g. ``noise_sigma=23 sharpness=0.31 motion=1.12 brightness=0.41
    haze=0.62 blockiness=1.9 rain=0.4 size=128x128``: ``DEFAULT_CUES`` order first (width and
    height together as ``size``), other cues after by name, each rounded to ``DECIMALS``."""
    if not isinstance(cues, Mapping):
        raise TypeError(f"cues: expected a mapping of cue name -> number, got {type(cues).__name__}")
    for name, value in cues.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float, np.integer, np.floating))
            or not math.isfinite(value)
        ):
            raise ValueError(f"cues: {name!r} must be a finite number, got {value!r}")
    order = [n for n in DEFAULT_CUES if n in cues] + sorted(n for n in cues if n not in DEFAULT_CUES)
    parts = []
    for name in order:
        if name == "height" and "width" in cues:
            continue  # written with width
        if name == "width" and "height" in cues:
            parts.append(f"size={_format('width', cues['width'])}x{_format('height', cues['height'])}")
        else:
            parts.append(f"{name}={_format(name, cues[name])}")
    return " ".join(parts)
