"""The statistics a learned degradation recogniser reads: one fixed-length vector per image.

A small CNN trained for minutes on CPU does not find these by itself (a plain 8-layer CNN on
raw crops stayed at the label prior; PROTOCOL.md), so each degradation's telltale statistic is
computed directly and the network learns how to weigh and combine them across photos:

- noise: the finest Haar band's robust std at full and half size (noise halves, texture does not);
- blur: directional sharpness ratios (``tir.data.perception``), Laplacian and gradient energy,
  and the autocorrelation of the Laplacian along 8 directions at 1, 2 and 4 px, at full and half
  size (the Laplacian of a sharp photo is nearly white; motion blur keeps it correlated along its
  path, which still shows on a 32 px thumbnail where the sharpness ratios have too few pixels);
- JPEG: high-frequency DCT energy in 8x8 blocks on the origin grid against a grid shifted by
  4 px (quantisation empties the aligned blocks only; blur empties both), and the step profile
  over the 8 column/row phases;
- haze: dark-channel percentiles, saturation, local contrast, and how they change from the top
  of the frame to the bottom (haze grows with depth, and the top of a photo is usually farther:
  the synthetic depth map assumes it too, ``tir.data.depth``), and the colour of the airlight
  (the brightest dark-channel pixels: grey under haze);
- dark: percentiles of the HSV value (a darkened photo loses its highlights: a shift caps them,
  a linear compression squeezes them under 150), the share of near-black and of exactly black
  pixels (a shift clips the shadows to 0), and how many of the 256 levels it uses;
- rain: the rain cue's upright and sideways streak measures;
- low resolution: the image's size (log2 of each side).

Every feature is a number of moderate range (logs where a statistic spans decades); the model
standardises them with the training set's mean and std, which travel in its checkpoint.
"""

from __future__ import annotations

import hashlib
import math

import cv2
import numpy as np

from tir.data import perception

ANGLES = tuple(range(0, 180, 20))  # directions (degrees) of the directional sharpness profile
ACORR_RADII = (1, 2, 4)  # px at which the Laplacian's autocorrelation is read
ACORR_ANGLES = np.arange(0.0, 180.0, 22.5)  # its directions (degrees)
# Names in vector order: the checkpoint records them, so that a model is never fed features
# computed by another version of this file.
FEATURE_NAMES = (
    *(f"sharp_{k}" for k in range(4)),
    "sharp_min",
    "motion",
    *(f"direction_{k}" for k in range(len(ANGLES))),
    "direction_spread",
    *(
        f"{scale}acorr_r{r}_{stat}"
        for scale in ("", "half_")
        for r in ACORR_RADII
        for stat in ("max", "min", "mean", "along")
    ),
    "noise_full",
    "noise_half",
    "noise_ratio",
    "noise_quarter",
    "chroma_noise_full",
    "chroma_noise_half",
    "laplacian",
    "gradient_p50",
    "gradient_p90",
    "dct_hf_aligned",
    "dct_hf_shifted",
    "dct_hf_ratio",
    "blockiness",
    *(f"phase_{k}" for k in range(8)),
    *(f"value_p{p}" for p in (1, 5, 25, 50, 75, 95, 99)),
    *(f"smooth_value_p{p}" for p in (50, 90, 99, 100)),
    "value_below_10",
    "value_above_90",
    "value_zero",
    "channel_zero",
    "value_levels_used",
    "value_levels_empty",
    "value_range",
    "saturation",
    "contrast",
    "local_contrast",
    *(f"dark_channel_p{p}" for p in (10, 50, 90)),
    "haze_cue",
    "dark_channel_top_minus_bottom",
    "dark_channel_middle_minus_bottom",
    "dark_channel_top_p5",
    "dark_channel_bottom_p5",
    "dark_channel_p5_top_minus_bottom",
    "local_contrast_top_over_bottom",
    "local_contrast_middle_over_bottom",
    "saturation_top_minus_bottom",
    "saturation_middle_minus_bottom",
    "dark_channel_height_correlation",
    "airlight_mean",
    "airlight_spread",
    "rain_upright",
    "rain_sideways",
    "rain_cue",
    "log2_height",
    "log2_width",
)
NUM_FEATURES = len(FEATURE_NAMES)
# Names a feature cache: shards computed by another version of this file are never read back.
FEATURES_DIGEST = hashlib.sha1("\n".join(FEATURE_NAMES).encode()).hexdigest()[:8]


def degradation_features(image: np.ndarray) -> np.ndarray:
    """The feature vector (float32 [NUM_FEATURES]) of one RGB uint8 HxWx3 image (>= 8 px a side)."""
    image = perception.check_image(image)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    parts = [_blur(image, gray), _directions(gray), _blur_path(gray), _noise(image, gray), _edges(gray)]
    dark, local = _dark_channel(image), _local_contrast(gray)  # shared by both haze groups
    parts += [
        _jpeg(gray),
        _light(image),
        _haze(image, gray, dark, local),
        _haze_layout(image, dark, local),
        _rain(gray),
    ]
    parts.append([math.log2(image.shape[0]), math.log2(image.shape[1])])
    out = np.asarray([v for part in parts for v in part], np.float32)
    if out.shape != (NUM_FEATURES,):
        raise AssertionError(f"{out.shape[0]} features computed, FEATURE_NAMES names {NUM_FEATURES}")
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def _blur(image: np.ndarray, gray: np.ndarray) -> list[float]:
    ratios = perception.directional_sharpness(image)
    ratios = np.ones(4) if ratios is None else ratios
    return [*np.sort(ratios).tolist(), float(ratios.min()), perception.motion(image)]


def _directions(gray: np.ndarray) -> list[float]:
    """Sharpness along ``ANGLES`` (sorted: the profile's shape, not its orientation) and its
    spread: the RMS change over 1 px relative to over 3 px, by sub-pixel shifts, on a half-size
    copy of large images. Motion blur leaves one direction soft and its perpendicular sharp."""
    if min(gray.shape) >= perception.HALVE_FROM:
        gray = perception.half_size(gray)
    ratios = []
    for angle in ANGLES:
        dx, dy = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        near, far = _shift_energy(gray, dx, dy), _shift_energy(gray, 3 * dx, 3 * dy)
        ratios.append(math.sqrt((near + 1e-3) / (far + 1e-3)))
    ratios = np.sort(np.asarray(ratios))
    return [*ratios.tolist(), float(math.log(ratios[-1] / ratios[0]))]


def _blur_path(gray: np.ndarray) -> list[float]:
    """``_laplacian_autocorrelation`` of the image and of its half-size copy (the image again
    below ``perception.HALVE_FROM`` px, where halving leaves too little)."""
    full = _laplacian_autocorrelation(gray)
    small = min(gray.shape) < perception.HALVE_FROM
    return full + (full if small else _laplacian_autocorrelation(perception.half_size(gray)))


def _laplacian_autocorrelation(gray: np.ndarray) -> list[float]:
    """At each radius of ``ACORR_RADII``: the max, min and mean over ``ACORR_ANGLES`` of the
    Laplacian's normalised autocorrelation (Hann-windowed, by FFT), and its value along the
    direction where it is largest at 2 px (the blur's path, if there is one)."""
    laplacian = cv2.Laplacian(gray, cv2.CV_32F)
    h, w = laplacian.shape
    window = np.outer(np.hanning(h), np.hanning(w)).astype(np.float32)
    power = np.abs(np.fft.rfft2((laplacian - laplacian.mean()) * window)) ** 2
    correlation = np.fft.irfft2(power, s=(h, w))
    correlation = np.fft.fftshift(correlation / (correlation[0, 0] + 1e-6)).astype(np.float32)
    rings = []
    for r in ACORR_RADII:
        xs = (w // 2 + r * np.cos(np.radians(ACORR_ANGLES))).astype(np.float32)[None]
        ys = (h // 2 - r * np.sin(np.radians(ACORR_ANGLES))).astype(np.float32)[None]
        rings.append(cv2.remap(correlation, xs, ys, cv2.INTER_LINEAR)[0])
    along = int(rings[ACORR_RADII.index(2)].argmax())
    return [float(v) for ring in rings for v in (ring.max(), ring.min(), ring.mean(), ring[along])]


def _shift_energy(gray: np.ndarray, dx: float, dy: float) -> float:
    """Mean squared change of ``gray`` under a shift by (dx, dy) px, away from the borders."""
    shift = np.float32([[1, 0, dx], [0, 1, dy]])
    moved = cv2.warpAffine(gray, shift, gray.shape[::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    m = 4
    return float(np.square(moved - gray)[m:-m, m:-m].mean())


def _robust_sigma(gray: np.ndarray) -> float:
    band, _ = perception.haar_diagonal(gray)
    return float(np.median(np.abs(band))) * perception.MAD_TO_SIGMA


def _noise(image: np.ndarray, gray: np.ndarray) -> list[float]:
    """Noise at three scales (white noise halves per halving, texture does not) and in the chroma
    channels (JPEG removes the fine luma noise first; blotchy chroma noise survives it)."""
    full = _robust_sigma(gray)
    half_gray = perception.half_size(gray) if min(gray.shape) >= 16 else gray
    half = _robust_sigma(half_gray)
    quarter = _robust_sigma(perception.half_size(half_gray)) if min(half_gray.shape) >= 16 else half
    chroma = cv2.cvtColor(image, cv2.COLOR_RGB2YCrCb)[..., 1:].astype(np.float32)
    chroma_full = np.mean([_robust_sigma(chroma[..., k]) for k in range(2)])
    chroma_half = (
        np.mean([_robust_sigma(perception.half_size(chroma[..., k])) for k in range(2)])
        if min(gray.shape) >= 16
        else chroma_full
    )
    return [
        math.log1p(full),
        math.log1p(half),
        math.log((full + 0.5) / (half + 0.5)),
        math.log1p(quarter),
        math.log1p(float(chroma_full)),
        math.log1p(float(chroma_half)),
    ]


def _edges(gray: np.ndarray) -> list[float]:
    laplacian = cv2.Laplacian(gray, cv2.CV_32F)
    gx, gy = cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1)
    magnitude = np.sqrt(gx * gx + gy * gy)
    p50, p90 = np.percentile(magnitude, (50, 90))
    return [math.log1p(float(laplacian.var())), math.log1p(float(p50)), math.log1p(float(p90))]


def _block_dct_hf(gray: np.ndarray, offset: int) -> float:
    """Mean energy of the high-frequency DCT coefficients (u + v >= 8) of the 8x8 blocks of a
    grid starting at ``offset`` px, relative to their AC energy (0 when nothing fits)."""
    block = perception.JPEG_BLOCK
    x = gray[offset:, offset:]
    h, w = x.shape[0] // block * block, x.shape[1] // block * block
    if h < block or w < block:
        return 0.0
    tiles = x[:h, :w].reshape(h // block, block, w // block, block).transpose(0, 2, 1, 3).reshape(-1, block, block)
    basis = _dct_matrix(block)
    coefficients = basis @ (tiles - 128.0) @ basis.T
    energy = coefficients**2
    u, v = np.meshgrid(np.arange(block), np.arange(block), indexing="ij")
    high = energy[:, (u + v) >= block].sum(axis=1)
    ac = energy.reshape(len(energy), -1)[:, 1:].sum(axis=1)
    return float(high.sum() / (ac.sum() + 1e-6))


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)
    basis = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    basis[0] /= math.sqrt(2)
    return basis.astype(np.float32)


def _jpeg(gray: np.ndarray) -> list[float]:
    aligned, shifted = _block_dct_hf(gray, 0), _block_dct_hf(gray, perception.JPEG_BLOCK // 2)
    steps = (np.abs(np.diff(gray, axis=1)).mean(axis=0), np.abs(np.diff(gray, axis=0)).mean(axis=1))
    profile = np.zeros(perception.JPEG_BLOCK)
    for step in steps:
        usable = step.shape[0] // perception.JPEG_BLOCK * perception.JPEG_BLOCK
        if usable >= perception.JPEG_BLOCK:
            phases = step[:usable].reshape(-1, perception.JPEG_BLOCK).mean(axis=0)
            profile += phases / (phases.mean() + 0.05) / 2
    ratio = math.log((aligned + 1e-4) / (shifted + 1e-4))
    blockiness = math.log(perception.blockiness(np.repeat(gray[..., None], 3, axis=2).astype(np.uint8)))
    return [math.log(aligned + 1e-4), math.log(shifted + 1e-4), ratio, blockiness, *profile.tolist()]


def _light(image: np.ndarray) -> list[float]:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    value, saturation = hsv[..., 2].astype(np.float32) / 255.0, hsv[..., 1].astype(np.float32) / 255.0
    percentiles = np.percentile(value, (1, 5, 25, 50, 75, 95, 99)).tolist()
    # after a 5x5 blur, so that noise added to a darkened photo does not pass for highlights
    smooth = np.percentile(cv2.blur(value, (5, 5)), (50, 90, 99, 100)).tolist()
    # a shift down clips every shadow to exactly 0, which photos rarely hold (noise added later
    # clips half of it back to 0): the share of zeros tells a darkened photo from a dark one
    zeros = [float((hsv[..., 2] == 0).mean()), float((image.min(axis=2) == 0).mean())]
    return [
        *percentiles,
        *smooth,
        float((value < 0.1).mean()),
        float((value > 0.9).mean()),
        *zeros,
        *_levels(hsv[..., 2]),
        float(saturation.mean()),
    ]


def _levels(value: np.ndarray) -> list[float]:
    """How much of the 8-bit range the brightness uses: the share of the 256 levels present, the
    share of empty levels between its 1st and 99th percentiles, and that span. Darkening squeezes
    the photo into fewer levels (a linear compression keeps at most 150, a shift clips the
    shadows) and a tone curve that stretches the highlights leaves gaps between them. Part of
    this is how the dark degradation is synthesised (on 8 bits): what it is worth on real
    low-light photos is not measured."""
    counts = np.bincount(value.ravel(), minlength=256)
    low, high = np.percentile(value, (1, 99)).astype(int)
    span = counts[low : high + 1]
    return [float((counts > 0).mean()), float((span == 0).mean()), float(high - low) / 255.0]


def _haze(image: np.ndarray, gray: np.ndarray, dark: np.ndarray, local: np.ndarray) -> list[float]:
    contrast = float(gray.std() / 255.0)
    return [contrast, float(local.mean() / 255.0), *np.percentile(dark, (10, 50, 90)).tolist(), perception.haze(image)]


def _local_contrast(gray: np.ndarray) -> np.ndarray:
    """The standard deviation of the gray levels in each 7x7 window (0-255)."""
    mean = cv2.blur(gray, (7, 7))
    return np.sqrt(np.maximum(cv2.blur(gray * gray, (7, 7)) - mean * mean, 0.0))


def _dark_channel(image: np.ndarray) -> np.ndarray:
    """The dark channel (min over RGB, then over a patch of about 1/8 of the short side), in [0, 1]."""
    lowest = cv2.min(cv2.min(image[..., 0], image[..., 1]), image[..., 2])
    patch = max(3, min(15, min(image.shape[:2]) // 8) // 2 * 2 + 1)
    return cv2.erode(lowest, np.ones((patch, patch), np.uint8)).astype(np.float32) / 255.0


def _thirds(plane: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top, middle and bottom thirds of a plane's rows (the middle is the whole plane under 3 rows)."""
    k = max(1, plane.shape[0] // 3)
    middle = plane[k:-k] if plane.shape[0] > 2 * k else plane
    return plane[:k], middle, plane[-k:]


def _haze_layout(image: np.ndarray, dark: np.ndarray, local: np.ndarray) -> list[float]:
    """Haze thickens with depth, and the top of a frame is usually farther than its bottom: the
    dark channel rises and the local contrast and saturation fall towards the top. A bright sky or
    a pale wall raises the dark channel too, but the airlight haze adds is grey (A is one number
    for R, G and B), which the spread of the brightest dark-channel pixels' colour reads."""
    local = local / 255.0
    saturation = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float32) / 255.0
    d_top, d_mid, d_bottom = (float(t.mean()) for t in _thirds(dark))
    p5_top, _, p5_bottom = (float(np.percentile(t, 5)) for t in _thirds(dark))
    c_top, c_mid, c_bottom = (float(t.mean()) + 1e-3 for t in _thirds(local))
    s_top, s_mid, s_bottom = (float(t.mean()) for t in _thirds(saturation))
    rows = dark.mean(axis=1)
    height = np.linspace(1.0, 0.0, len(rows))
    correlation = float(np.corrcoef(rows, height)[0, 1]) if rows.std() > 1e-6 else 0.0
    flat = dark.ravel()
    brightest = np.argpartition(flat, -max(1, flat.size // 100))[-max(1, flat.size // 100) :]
    airlight = image.reshape(-1, 3)[brightest].astype(np.float32).mean(axis=0) / 255.0
    return [
        d_top - d_bottom,
        d_mid - d_bottom,
        p5_top,
        p5_bottom,
        p5_top - p5_bottom,
        math.log(c_top / c_bottom),
        math.log(c_mid / c_bottom),
        s_top - s_bottom,
        s_mid - s_bottom,
        correlation,
        float(airlight.mean()),
        float(airlight.max() - airlight.min()),
    ]


def _rain(gray: np.ndarray) -> list[float]:
    width = perception.odd_window(min(gray.shape) / 18, 3, 7)
    length = perception.odd_window(min(gray.shape) / 12, 5, 11)
    upright = perception.streak_strength(gray, np.ones((1, width), np.uint8), (-30, -15, 0, 15, 30), length)
    sideways = perception.streak_strength(gray, np.ones((width, 1), np.uint8), (90,), length)
    return [math.log1p(upright), math.log1p(sideways), math.log1p(max(0.0, upright - sideways))]
