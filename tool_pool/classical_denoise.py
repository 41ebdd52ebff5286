"""Weight-free denoising tools. Each estimates the noise level itself (``estimate_noise_sigma``);
the optional ``strength`` multiplies that estimate."""

from __future__ import annotations

import cv2
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from skimage.restoration import denoise_tv_chambolle

from tool_pool.imaging import OPPONENT, OPPONENT_INV, estimate_noise_sigma, to_float, to_uint8
from tool_pool.tool_base import strength_argument, tool

PATCH = 8
HARD_THRESHOLD = 2.7  # x sigma: BM3D's hard-threshold factor
STEP = 3  # stride between the overlapping patches: 1 is best and 9x slower; 3 loses ~0.3 dB
BAND_ROWS = 256  # rows per band on tall images (memory: about 1 MB per column of the band)
BAND_MARGIN = 24  # context rows each side of a band: a pixel depends on rows up to 2 * PATCH away


def _dct_basis(n: int = PATCH) -> np.ndarray:
    """The orthonormal 2-D DCT-II as an (n*n, n*n) matrix acting on flattened patches."""
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    c = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(np.where(k == 0, 1.0, 2.0) / n)
    return np.kron(c, c).astype(np.float32)


DCT = _dct_basis()


def _patches(x: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    windows = sliding_window_view(x, (PATCH, PATCH))[::STEP, ::STEP]
    return windows.reshape(-1, PATCH * PATCH), windows.shape[:2]


def _aggregate(patches: np.ndarray, weights: np.ndarray, grid: tuple[int, int], shape) -> np.ndarray:
    """Put weighted overlapping patches back and divide by the summed weights."""
    out = np.zeros(shape, np.float32)
    total = np.zeros(shape, np.float32)
    patches = (patches * weights[:, None]).reshape(grid[0], grid[1], PATCH, PATCH)
    weights = weights.reshape(grid).astype(np.float32)
    rows, cols = grid[0] * STEP, grid[1] * STEP
    for i in range(PATCH):
        for j in range(PATCH):
            out[i : i + rows : STEP, j : j + cols : STEP] += patches[:, :, i, j]
            total[i : i + rows : STEP, j : j + cols : STEP] += weights
    return out / np.maximum(total, 1e-8)


def dct_denoise_channel(x: np.ndarray, sigma: float, band_rows: int = BAND_ROWS) -> np.ndarray:
    """Two-stage sliding-DCT shrinkage of one channel (float32, any range; sigma in its units).

    Stage 1 hard-thresholds the DCT of overlapping 8x8 patches at 2.7 sigma; stage 2 uses that
    estimate as a pilot for an empirical Wiener filter (BM3D's two steps without block
    matching). Patches are weighted by the inverse of how much they keep, as BM3D does.

    Tall images go through in bands of ``band_rows`` rows with ``BAND_MARGIN`` rows of context each
    side, on the whole image's patch grid: the result is the one-pass result, and memory is that
    of one band (a 4000x3000 photo would otherwise need about 3 GB of patches).
    """
    pad = PATCH
    xp = np.pad(x.astype(np.float32), pad, mode="reflect")
    height = x.shape[0]
    if height <= band_rows + 2 * BAND_MARGIN:
        return _two_stage(xp, sigma)[pad:-pad, pad:-pad]
    out = np.empty(x.shape, np.float32)
    for start in range(0, height, band_rows):
        stop = min(start + band_rows, height)
        lo = max(start + pad - BAND_MARGIN, 0)
        lo -= lo % STEP  # on the whole image's patch grid
        hi = min(stop + pad + BAND_MARGIN, xp.shape[0])
        out[start:stop] = _two_stage(xp[lo:hi], sigma)[start + pad - lo : stop + pad - lo, pad:-pad]
    return out


def _two_stage(xp: np.ndarray, sigma: float) -> np.ndarray:
    noisy, grid = _patches(xp)
    coefficients = noisy @ DCT.T
    keep = np.abs(coefficients) > HARD_THRESHOLD * sigma
    keep[:, 0] = True  # the patch mean is never thresholded
    weights = 1.0 / keep.sum(axis=1)
    pilot = _aggregate((coefficients * keep) @ DCT, weights, grid, xp.shape)

    pilot_coefficients = _patches(pilot)[0] @ DCT.T
    power = pilot_coefficients**2
    shrink = power / (power + sigma**2)
    weights = 1.0 / np.maximum((shrink**2).sum(axis=1), 1e-3)
    return _aggregate((coefficients * shrink) @ DCT, weights, grid, xp.shape)


def dct_denoise(image: np.ndarray, sigma: float) -> np.ndarray:
    """Denoise a float RGB image in [0, 1] with noise ``sigma`` per RGB channel."""
    opponent = image @ OPPONENT.T
    norms = np.sqrt((OPPONENT**2).sum(axis=1))  # noise of each opponent channel
    channels = [dct_denoise_channel(opponent[..., c], sigma * norms[c]) for c in range(3)]
    return np.stack(channels, axis=-1) @ OPPONENT_INV.T


@tool(
    "denoise_dct",
    "denoising",
    "Removes strong random noise (grain) with a two-stage sliding-DCT filter; the best weight-free denoiser here.",
    strength_argument(),
)
def denoise_dct(image: np.ndarray, strength: float = 1.0) -> np.ndarray:
    # 1.1: the estimate reads low for strong noise, which clipping at 0 and 255 partly hides
    sigma = 1.1 * strength * estimate_noise_sigma(image)
    if sigma <= 1e-4:
        return image.copy()
    return to_uint8(dct_denoise(to_float(image), sigma))


@tool(
    "denoise_tv",
    "denoising",
    "Removes noise by total-variation smoothing, which keeps edges but flattens fine texture.",
    strength_argument(),
)
def denoise_tv(image: np.ndarray, strength: float = 1.0) -> np.ndarray:
    weight = strength * estimate_noise_sigma(image)
    if weight <= 1e-4:
        return image.copy()
    return to_uint8(denoise_tv_chambolle(to_float(image), weight=weight, channel_axis=-1))


@tool(
    "denoise_nlm",
    "denoising",
    "Removes noise with OpenCV's fast non-local means, averaging similar patches across the image.",
    strength_argument(),
)
def denoise_nlm(image: np.ndarray, strength: float = 1.0) -> np.ndarray:
    h = 0.8 * strength * estimate_noise_sigma(image) * 255.0
    if h <= 0.1:
        return image.copy()
    return cv2.fastNlMeansDenoisingColored(np.ascontiguousarray(image), None, h, h, 7, 21)
