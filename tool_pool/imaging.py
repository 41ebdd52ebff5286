"""Small image-processing pieces shared by the weight-free tools.

Images inside the tools are float32 in [0, 1] (``to_float``) and go back to uint8 with
``to_uint8``; every function here is pure and works on one image.
"""

from __future__ import annotations

import cv2
import numpy as np

# Opponent colour transform (as BM3D uses): decorrelates RGB so each channel can be denoised
# on its own with the noise level scaled by the row norm.
OPPONENT = np.array([[1 / 3, 1 / 3, 1 / 3], [1 / 2, 0, -1 / 2], [1 / 4, -1 / 2, 1 / 4]], np.float32)
OPPONENT_INV = np.linalg.inv(OPPONENT).astype(np.float32)


def to_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float in [0, 1] -> uint8 (rounded, clipped)."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def grey(image: np.ndarray) -> np.ndarray:
    """Luma of a float RGB image (BT.601 weights), float32."""
    return cv2.cvtColor(np.ascontiguousarray(image, dtype=np.float32), cv2.COLOR_RGB2GRAY)


def estimate_noise_sigma(image: np.ndarray) -> float:
    """Noise standard deviation of an RGB image, in [0, 1] units, averaged over channels.

    Donoho's robust estimator (median absolute value of the finest diagonal Haar wavelet
    coefficients / 0.6745), as ``skimage.restoration.estimate_sigma`` computes it, without
    needing PyWavelets.
    """
    x = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
    h, w = (x.shape[0] // 2) * 2, (x.shape[1] // 2) * 2
    x = x[:h, :w]
    diagonal = (x[0::2, 0::2] - x[0::2, 1::2] - x[1::2, 0::2] + x[1::2, 1::2]) / 2.0
    return float(np.mean([np.median(np.abs(diagonal[..., c])) / 0.6745 for c in range(x.shape[2])]))


def box(x: np.ndarray, radius: int) -> np.ndarray:
    return cv2.boxFilter(x, -1, (2 * radius + 1, 2 * radius + 1), borderType=cv2.BORDER_REFLECT)


def guided_filter(guide: np.ndarray, source: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter with a grey guide (HxW) on a grey or colour source (float32).

    Smooths ``source`` while keeping the edges of ``guide``; ``eps`` is the variance below which
    guide structure counts as flat.
    """
    guide = guide.astype(np.float32)
    source = source.astype(np.float32)
    g = guide[..., None] if source.ndim == 3 else guide
    mean_g, mean_s = box(guide, radius), box(source, radius)
    mean_g3 = mean_g[..., None] if source.ndim == 3 else mean_g
    cov = box(g * source, radius) - mean_g3 * mean_s
    var = box(guide * guide, radius) - mean_g * mean_g
    a = cov / ((var + eps)[..., None] if source.ndim == 3 else var + eps)
    b = mean_s - a * mean_g3
    return box(a, radius) * g + box(b, radius)


def gradient_sparsity(image: np.ndarray) -> float:
    """L1/L2 ratio of gradient magnitudes (Krishnan et al.): lower = sharper, fewer ringing edges."""
    g = grey(np.clip(image, 0, 1)) if image.ndim == 3 else np.clip(image, 0, 1).astype(np.float32)
    gx, gy = np.diff(g, axis=1)[:-1], np.diff(g, axis=0)[:, :-1]
    magnitude = np.sqrt(gx * gx + gy * gy)
    return float(magnitude.sum() / (np.sqrt((magnitude**2).sum()) + 1e-12))


def kernel_spectrum(kernel: np.ndarray, shape: tuple[int, int], dtype=np.float64) -> np.ndarray:
    """rfft2 of a convolution kernel centred at the origin of an array of ``shape`` (complex64
    for ``dtype=np.float32``: scipy.fft keeps single precision, numpy.fft does not)."""
    import scipy.fft

    padded = np.zeros(shape, dtype)
    kh, kw = kernel.shape
    padded[:kh, :kw] = kernel
    padded = np.roll(padded, (-(kh // 2), -(kw // 2)), axis=(0, 1))
    return scipy.fft.rfft2(padded)


def mirror_extend(image: np.ndarray) -> np.ndarray:
    """The image and its mirror images tiled 2x2: periodic without jumps, so FFT filtering does
    not ring from the borders (the DCT's symmetric extension)."""
    tall = np.concatenate([image, image[::-1]], axis=0)
    return np.concatenate([tall, tall[:, ::-1]], axis=1)


def wiener_deconvolve(image: np.ndarray, kernel: np.ndarray, regularisation: float) -> np.ndarray:
    """Deconvolve a float RGB (or grey) image by ``kernel`` (a convolution kernel, centred).

    Regularised by the image gradients (a Tikhonov / Wiener filter with a 1/f^2 image prior):
    X = conj(K) Y / (|K|^2 + lambda |D|^2), computed on the mirror-extended image. Single
    precision, one channel at a time: about 80 bytes a pixel (1 GB for a 4000x3000 photo, where
    double precision on all channels at once took 4.7 GB).
    """
    import scipy.fft

    shape = (2 * image.shape[0], 2 * image.shape[1])  # of the mirror extension
    K = kernel_spectrum(kernel, shape, np.float32)
    denominator = np.abs(K) ** 2
    for step in ([[0, 0, 0], [0, -1, 1], [0, 0, 0]], [[0, 0, 0], [0, -1, 0], [0, 1, 0]]):
        denominator += regularisation * np.abs(kernel_spectrum(np.array(step), shape, np.float32)) ** 2
    gain = np.conj(K, out=K)
    gain /= denominator
    del denominator
    channels = image[..., None] if image.ndim == 2 else image
    out = np.empty(channels.shape, np.float32)
    for c in range(channels.shape[-1]):
        spectrum = scipy.fft.rfft2(mirror_extend(channels[..., c].astype(np.float32)))
        spectrum *= gain
        out[..., c] = scipy.fft.irfft2(spectrum, s=shape)[: image.shape[0], : image.shape[1]]
    return out[..., 0] if image.ndim == 2 else out


def hsv_value_map(image: np.ndarray, fn) -> np.ndarray:
    """Apply ``fn`` (float array in [0, 255] -> same) to the HSV value channel of a uint8 RGB image."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 2] = np.clip(np.rint(fn(hsv[..., 2].astype(np.float32))), 0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


# No-reference metrics score at most this many pixels of an image (tool_pool.scorers): a larger
# one is scored on its centre crop of this area. NIQE takes ~380 bytes a pixel, so a 4000x3000
# photo would ask 4.6 GB; its 1 Mpx centre about 0.4 GB.
NR_MAX_PIXELS = 1 << 20


def bounded_view(image: np.ndarray, max_pixels: int = NR_MAX_PIXELS, min_side: int = 1) -> np.ndarray:
    """``image`` itself, or when it has more than ``max_pixels`` pixels its centre crop of about
    that area and the same aspect (each side kept at least ``min_side``), as a compact copy.
    A crop, not a downscale: no-reference statistics (NIQE's, PIQE's) are scale-dependent, and a
    crop keeps the image's own scale."""
    h, w = image.shape[:2]
    if h * w <= max_pixels:
        return image
    factor = (max_pixels / (h * w)) ** 0.5
    ch, cw = int(h * factor), int(w * factor)
    if ch < min_side:  # a thin image: the short side as the metric needs, the long one what is left
        ch = min(h, min_side)
        cw = min(w, max(min_side, max_pixels // ch))
    elif cw < min_side:
        cw = min(w, min_side)
        ch = min(h, max(min_side, max_pixels // cw))
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[top : top + ch, left : left + cw].copy()
