"""Weight-free JPEG artefact removal.

Both tools first estimate the quality factor the image was saved with: the luma DCT
coefficients of a decoded JPEG sit on multiples of the quantisation steps, so the standard
(IJG) table scaled to the right quality makes them line up (a periodicity score). Knowing the
steps, the DCT tool smooths the image and then projects it back onto the set of images that
the same JPEG file could have come from (each coefficient stays within half a step of its
decoded value), which removes blocking without blurring what the file really recorded.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy.fft import dctn, idctn

from tool_pool.classical_denoise import dct_denoise_channel
from tool_pool.tool_base import strength_argument, tool

IJG_LUMA = np.array(
    [
        16,
        11,
        10,
        16,
        24,
        40,
        51,
        61,
        12,
        12,
        14,
        19,
        26,
        58,
        60,
        55,
        14,
        13,
        16,
        24,
        40,
        57,
        69,
        56,
        14,
        17,
        22,
        29,
        51,
        87,
        80,
        62,
        18,
        22,
        37,
        56,
        68,
        109,
        103,
        77,
        24,
        35,
        55,
        64,
        81,
        104,
        113,
        92,
        49,
        64,
        78,
        87,
        103,
        121,
        120,
        101,
        72,
        92,
        95,
        98,
        112,
        100,
        103,
        99,
    ],
    np.float64,
).reshape(8, 8)
PROBE_FREQUENCIES = ((0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (1, 2), (2, 1), (2, 2), (0, 3), (3, 0))
QUALITIES = range(5, 96)
LUMA_SMOOTHING, CHROMA_SMOOTHING = 0.17, 0.5  # x rms quantisation step / sqrt(12)

# JPEG's full-range YCbCr (JFIF)
RGB_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
YCC_TO_RGB = np.linalg.inv(RGB_TO_YCC)


def quantisation_table(quality: int) -> np.ndarray:
    """The IJG luma table at ``quality`` (1-100), as libjpeg scales it."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return np.clip(np.floor((IJG_LUMA * scale + 50) / 100), 1, 255)


def block_dct(channel: np.ndarray) -> np.ndarray:
    """DCT of the aligned 8x8 blocks of a channel (level-shifted by 128): (rows, cols, 8, 8)."""
    h, w = channel.shape[0] // 8 * 8, channel.shape[1] // 8 * 8
    blocks = (channel[:h, :w] - 128.0).reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3)
    return dctn(blocks, axes=(2, 3), norm="ortho")


def block_idct(coefficients: np.ndarray) -> np.ndarray:
    rows, cols = coefficients.shape[:2]
    return idctn(coefficients, axes=(2, 3), norm="ortho").transpose(0, 2, 1, 3).reshape(rows * 8, cols * 8) + 128.0


def to_ycc(image: np.ndarray) -> np.ndarray:
    ycc = image.astype(np.float64) @ RGB_TO_YCC.T
    ycc[..., 1:] += 128.0
    return ycc


def to_rgb(ycc: np.ndarray) -> np.ndarray:
    shifted = ycc.copy()
    shifted[..., 1:] -= 128.0
    return np.clip(np.rint(shifted @ YCC_TO_RGB.T), 0, 255).astype(np.uint8)


def estimate_jpeg_quality(image: np.ndarray) -> int:
    """The IJG quality factor whose luma steps best explain the image's DCT coefficients.

    A step that divides the true one also lines the coefficients up, so among the qualities
    scoring within 0.02 of the best the lowest (coarsest steps) wins."""
    coefficients = block_dct(to_ycc(image)[..., 0]).reshape(-1, 8, 8)
    scores = {}
    for quality in QUALITIES:
        table = quantisation_table(quality)
        scores[quality] = np.mean(
            [np.abs(np.mean(np.exp(2j * np.pi * coefficients[:, i, j] / table[i, j]))) for i, j in PROBE_FREQUENCIES]
        )
    best = max(scores.values())
    return min(q for q, s in scores.items() if s >= best - 0.02)


def project_on_quantisation(decoded: np.ndarray, restored: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Clamp each aligned block's DCT coefficient of ``restored`` into the quantisation cell of
    the ``decoded`` one (channel arrays; partial blocks at the border are left as restored)."""
    h, w = decoded.shape[0] // 8 * 8, decoded.shape[1] // 8 * 8
    if h == 0 or w == 0:
        return restored
    cells = np.round(block_dct(decoded) / table)
    clamped = np.clip(block_dct(restored), (cells - 0.5) * table, (cells + 0.5) * table)
    out = restored.copy()
    out[:h, :w] = block_idct(clamped)
    return out


@tool(
    "jpeg_deblock_dct",
    "jpeg_artifact_removal",
    "Removes JPEG blocking and ringing: estimates the JPEG quality, smooths with a sliding-DCT filter, then keeps every block consistent with the file's quantisation.",
    strength_argument(what="smoothing relative to the level implied by the estimated JPEG quality"),
)
def jpeg_deblock_dct(image: np.ndarray, strength: float = 1.0) -> np.ndarray:
    if strength == 0:
        return image.copy()
    table = quantisation_table(estimate_jpeg_quality(image))
    step = strength * np.sqrt(np.mean(table**2)) / np.sqrt(12.0)
    ycc = to_ycc(image)
    luma = dct_denoise_channel(ycc[..., 0], LUMA_SMOOTHING * step)
    luma = project_on_quantisation(ycc[..., 0], luma, table)
    chroma = [dct_denoise_channel(ycc[..., c], CHROMA_SMOOTHING * step) for c in (1, 2)]
    return to_rgb(np.stack([luma, *chroma], axis=-1))


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    _, encoded = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)]
    )
    return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@tool(
    "jpeg_reapply",
    "jpeg_artifact_removal",
    "Reduces JPEG blocking by re-compressing 16 shifted copies at the estimated quality and averaging them (Nosratinia's method).",
    strength_argument(high=1.0, what="blend between the input (0) and the averaged result (1)"),
)
def jpeg_reapply(image: np.ndarray, strength: float = 1.0) -> np.ndarray:
    quality = estimate_jpeg_quality(image)
    h, w = image.shape[:2]
    total = np.zeros(image.shape, np.float64)
    shifts = [(dy, dx) for dy in range(0, 8, 2) for dx in range(0, 8, 2)]
    for dy, dx in shifts:
        shifted = np.pad(image, ((dy, 8), (dx, 8), (0, 0)), mode="reflect")
        total += jpeg_round_trip(shifted, quality)[dy : dy + h, dx : dx + w]
    averaged = total / len(shifts)
    return np.clip(np.rint(image + strength * (averaged - image)), 0, 255).astype(np.uint8)
