"""Weight-free deblurring: blind estimation of a parametric blur kernel, then deconvolution.

The kernel is found by fitting the image's power spectrum. A blurred photo's spectrum is the
sharp photo's (close to a power law c / f^alpha) times the kernel's |K(f)|^2, plus a floor from
noise and 8-bit rounding. So for each candidate kernel we fit
    log P(f) ~ c - alpha log f + log(|K(f)|^2 + floor)
by least squares over c and alpha and keep the candidate with the smallest residual. This
finds the disk radius of defocus and the angle and length of linear motion reliably (a
sharpness criterion on deconvolved results, the usual alternative, picks wrong kernels often).

Two kernel families, as the blur models of imagecorruptions (which AgenticIR's synthesis uses):
- defocus: a disk of radius r on the integer grid, lightly anti-aliased;
- motion: a line of taps with Gaussian weights decaying from one end (the camera's start
  position), parametrised by sigma and angle. Its spectrum's magnitude does not tell the two
  ends apart, so the direction is chosen by deconvolving both ways and keeping the sharper.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np
import scipy.fft

from tool_pool.imaging import (
    estimate_noise_sigma,
    gradient_sparsity,
    grey,
    kernel_spectrum,
    to_float,
    to_uint8,
    wiener_deconvolve,
)
from tool_pool.tool_base import strength_argument, tool

NOISE_FLOOR = 1e-3  # relative level of the flat part of the spectrum (rounding, mild noise)
DEFOCUS_RADII = tuple(np.arange(1.5, 8.01, 0.5))
MOTION_SIGMAS = tuple(np.arange(1.5, 10.01, 0.5))
COARSE_SIGMAS = (2.0, 3.0, 5.0, 8.0)
COARSE_ANGLES = tuple(range(-90, 90, 6))
DEFOCUS_REGULARISATION = 5e-4
MOTION_REGULARISATION = 1e-3
NOISE_REGULARISATION = 20.0  # x noise variance: noisy images need a smoother inverse
RL_ITERATIONS = 25
MIN_SIDE_FOR_ESTIMATION = 32  # below this the spectrum is too coarse to fit: tools pass through


# ---------------------------------------------------------------- kernels (convolution, centred)


@lru_cache(maxsize=64)
def disk_kernel(radius: float) -> np.ndarray:
    """Disk x^2 + y^2 <= r^2 on the integer grid, softened by a 3x3 Gaussian (sigma 0.5)."""
    n = math.ceil(radius) + 1
    y, x = np.mgrid[-n : n + 1, -n : n + 1]
    disk = ((x * x + y * y) <= radius * radius).astype(np.float32)
    disk = cv2.GaussianBlur(disk / disk.sum(), (3, 3), 0.5)
    return disk / disk.sum()


@lru_cache(maxsize=2048)
def motion_kernel(sigma: float, angle: float) -> np.ndarray:
    """Taps i = 0..4 sigma along ``angle`` (degrees) with weights exp(-i^2 / 2 sigma^2)."""
    taps = math.ceil(4 * sigma) + 1
    weights = np.exp(-(np.arange(taps) ** 2) / (2 * sigma**2))
    sin, cos = math.sin(math.radians(angle)), math.cos(math.radians(angle))
    dy = np.array([math.ceil(i * sin - 0.5) for i in range(taps)])
    dx = np.array([math.ceil(i * cos - 0.5) for i in range(taps)])
    kernel = np.zeros((2 * taps + 1, 2 * taps + 1), np.float64)
    np.add.at(kernel, (taps + dy, taps + dx), weights)
    return kernel / kernel.sum()


# ---------------------------------------------------------------- estimation


class SpectrumFit:
    """The log power spectrum of a grey image (Welch: averaged over half-overlapping Hann-windowed
    tiles) and the least-squares misfit of candidate kernels against it."""

    def __init__(self, image_grey: np.ndarray):
        h, w = image_grey.shape
        self.tile = tile = min(128, h, w) // 2 * 2
        step = tile // 2
        window = np.outer(np.hanning(tile), np.hanning(tile))
        power = np.zeros((tile, tile // 2 + 1))
        count = 0
        for y in range(0, h - tile + 1, step):
            for x in range(0, w - tile + 1, step):
                patch = image_grey[y : y + tile, x : x + tile].astype(np.float64)
                power += np.abs(np.fft.rfft2((patch - patch.mean()) * window)) ** 2
                count += 1
        fy = np.fft.fftfreq(tile)[:, None]
        fx = np.fft.rfftfreq(tile)[None, :]
        rho = np.sqrt(fy * fy + fx * fx)
        self.mask = (rho > 2.0 / tile) & (rho < 0.45)  # skip the DC and the corners
        self.log_power = np.log(power[self.mask] / count + 1e-12)
        design = np.stack([np.ones(self.mask.sum()), np.log(rho[self.mask])], axis=1)
        self.design, self.solve = design, np.linalg.pinv(design)

    def fits(self, kernel: np.ndarray) -> bool:
        return max(kernel.shape) <= self.tile

    def misfit(self, kernel: np.ndarray) -> float:
        response = np.abs(kernel_spectrum(kernel, (self.tile, self.tile))[self.mask]) ** 2
        residual = self.log_power - np.log(response + NOISE_FLOOR)
        residual -= self.design @ (self.solve @ residual)
        return float(np.mean(residual**2))


def estimate_defocus_radius(image: np.ndarray) -> float:
    fit = SpectrumFit(grey(to_float(image)))
    candidates = [r for r in DEFOCUS_RADII if fit.fits(disk_kernel(r))]
    return min(candidates, key=lambda r: fit.misfit(disk_kernel(r)))


def estimate_motion(image: np.ndarray) -> tuple[float, float]:
    """(sigma, angle) of the motion kernel, angle in [-90, 90) up to the direction (see module doc).

    Coarse to fine: the angle on a coarse grid of both, then the angle to the degree, then sigma
    on its fine grid at that angle (searching both jointly on a coarse grid trades a slightly
    wrong angle for a too small sigma)."""
    fit = SpectrumFit(grey(to_float(image)))
    sigmas = [s for s in MOTION_SIGMAS if fit.fits(motion_kernel(s, 45.0))]
    score = lambda s, a: fit.misfit(motion_kernel(float(s), float(a)))
    coarse_sigmas = [s for s in COARSE_SIGMAS if s in sigmas] or sigmas[:1]
    sigma, angle = min(((s, a) for s in coarse_sigmas for a in COARSE_ANGLES), key=lambda p: score(*p))
    angle = min((((angle + d + 90) % 180) - 90 for d in range(-5, 6)), key=lambda a: score(sigma, a))
    sigma = min(sigmas, key=lambda s: score(s, angle))
    angle = min((((angle + d + 90) % 180) - 90 for d in range(-2, 3)), key=lambda a: score(sigma, a))
    return sigma, angle


def sharper_direction(image: np.ndarray, sigma: float, angle: float, regularisation: float) -> float:
    """``angle`` or its opposite: whichever deconvolves the luma to the sparser gradients."""
    luma = grey(to_float(image))
    opposite = angle + 180.0
    return min(
        (angle, opposite),
        key=lambda a: gradient_sparsity(wiener_deconvolve(luma, motion_kernel(sigma, a), regularisation)),
    )


# ---------------------------------------------------------------- deconvolution


def richardson_lucy(image: np.ndarray, kernel: np.ndarray, iterations: int = RL_ITERATIONS) -> np.ndarray:
    """Richardson-Lucy deconvolution of a float RGB image in [0, 1].

    Padded by reflection by twice the kernel: RL does not amplify the wrap-around seam the way
    an inverse filter does, and the smaller FFTs keep it fast. One channel at a time: a third of
    the memory (about 60 bytes a pixel)."""
    if image.ndim == 3:
        return np.stack([richardson_lucy(image[..., c], kernel, iterations) for c in range(image.shape[2])], axis=-1)
    pad = 2 * max(kernel.shape)
    padded = cv2.copyMakeBorder(image.astype(np.float32), pad, pad, pad, pad, cv2.BORDER_REFLECT)
    shape = (scipy.fft.next_fast_len(padded.shape[0], real=True), scipy.fft.next_fast_len(padded.shape[1], real=True))
    padded = cv2.copyMakeBorder(
        padded, 0, shape[0] - padded.shape[0], 0, shape[1] - padded.shape[1], cv2.BORDER_REFLECT
    )
    K = kernel_spectrum(kernel, shape, np.float32)
    blur = lambda x, k: scipy.fft.irfft2(scipy.fft.rfft2(x) * k, s=shape)
    observed = np.maximum(padded, 1e-4)
    estimate = observed.copy()
    for _ in range(iterations):
        ratio = observed / np.maximum(blur(estimate, K), 1e-4)
        estimate *= blur(ratio, np.conj(K))
    return estimate[pad : pad + image.shape[0], pad : pad + image.shape[1]]


def regularisation(image: np.ndarray, base: float) -> float:
    return base + NOISE_REGULARISATION * estimate_noise_sigma(image) ** 2


def _too_small(image: np.ndarray) -> bool:
    return min(image.shape[:2]) < MIN_SIDE_FOR_ESTIMATION


BLUR_SIZE = strength_argument(
    default=1.0, low=0.0, high=2.0, what="multiplier of the estimated blur size (1 = as estimated, 0 = no change)"
)


@tool(
    "deblur_defocus_wiener",
    "defocus_deblurring",
    "Sharpens an out-of-focus photo: estimates the lens blur's disk radius from the spectrum and inverts it with a Wiener filter.",
    BLUR_SIZE,
)
def deblur_defocus_wiener(image: np.ndarray, strength: float = 1.0) -> np.ndarray:
    if strength == 0 or _too_small(image):
        return image.copy()
    radius = estimate_defocus_radius(image) * strength
    if radius < 0.5:
        return image.copy()
    return to_uint8(
        wiener_deconvolve(to_float(image), disk_kernel(radius), regularisation(image, DEFOCUS_REGULARISATION))
    )


@tool(
    "deblur_defocus_rl",
    "defocus_deblurring",
    "Sharpens an out-of-focus photo with Richardson-Lucy iterations on an estimated disk blur; gentler than Wiener, fewer ringing artefacts.",
    BLUR_SIZE,
)
def deblur_defocus_rl(image: np.ndarray, strength: float = 1.0) -> np.ndarray:
    if strength == 0 or _too_small(image):
        return image.copy()
    radius = estimate_defocus_radius(image) * strength
    if radius < 0.5:
        return image.copy()
    return to_uint8(richardson_lucy(to_float(image), disk_kernel(radius)))


@tool(
    "deblur_motion_wiener",
    "motion_deblurring",
    "Removes camera-shake streaks: estimates a linear motion kernel (angle and length) from the spectrum and inverts it with a Wiener filter.",
    BLUR_SIZE,
)
def deblur_motion_wiener(image: np.ndarray, strength: float = 1.0) -> np.ndarray:
    if strength == 0 or _too_small(image):
        return image.copy()
    sigma, angle = estimate_motion(image)
    sigma *= strength
    weight = regularisation(image, MOTION_REGULARISATION)
    angle = sharper_direction(image, sigma, angle, weight)
    return to_uint8(wiener_deconvolve(to_float(image), motion_kernel(sigma, angle), weight))


@tool(
    "deblur_motion_rl",
    "motion_deblurring",
    "Removes camera-shake streaks with Richardson-Lucy iterations on an estimated linear motion kernel.",
    BLUR_SIZE,
)
def deblur_motion_rl(image: np.ndarray, strength: float = 1.0) -> np.ndarray:
    if strength == 0 or _too_small(image):
        return image.copy()
    sigma, angle = estimate_motion(image)
    sigma *= strength
    angle = sharper_direction(image, sigma, angle, regularisation(image, MOTION_REGULARISATION))
    return to_uint8(richardson_lucy(to_float(image), motion_kernel(sigma, angle)))


@tool(
    "sharpen_unsharp",
    "defocus_deblurring",
    "Sharpens soft edges with an unsharp mask (adds back the difference to a Gaussian blur); mild and safe on noisy or compressed images, restores no lost detail.",
    strength_argument(what="amount of sharpening (1 = default, 0 = no change)"),
)
def sharpen_unsharp(image: np.ndarray, strength: float = 1.0) -> np.ndarray:
    x = to_float(image)
    blurred = cv2.GaussianBlur(x, (0, 0), 2.0)
    return to_uint8(x + strength * (x - blurred))
