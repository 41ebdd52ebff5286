"""Weight-free dehazing, deraining and brightening tools."""

from __future__ import annotations

import cv2
import numpy as np

from tool_pool.imaging import grey, guided_filter, hsv_value_map, to_float, to_uint8
from tool_pool.tool_base import no_arguments, strength_argument, tool

# ---------------------------------------------------------------- dehazing


def dark_channel(x: np.ndarray, patch: int) -> np.ndarray:
    """Minimum over colour channels and a square patch (He et al.'s dark channel)."""
    return cv2.erode(x.min(axis=2), cv2.getStructuringElement(cv2.MORPH_RECT, (patch, patch)))


def atmospheric_light(x: np.ndarray, dark: np.ndarray) -> np.ndarray:
    """Mean colour of the 0.1% pixels with the brightest dark channel (the haziest ones)."""
    count = max(1, dark.size // 1000)
    haziest = np.argpartition(dark.ravel(), -count)[-count:]
    return x.reshape(-1, 3)[haziest].mean(axis=0)


@tool(
    "dehaze_dcp",
    "dehazing",
    "Removes haze and fog with the dark channel prior (per-pixel transmission refined by a guided filter).",
    strength_argument(high=1.15, what="fraction of haze removed relative to the default (omega = 0.85 x strength)"),
)
def dehaze_dcp(image: np.ndarray, strength: float = 1.0) -> np.ndarray:
    omega = min(0.85 * strength, 0.98)  # omega < 1 keeps a trace of haze: looks natural, avoids /0
    x = to_float(image)
    patch = 15 if min(image.shape[:2]) >= 64 else 7
    light = np.maximum(atmospheric_light(x, dark_channel(x, patch)), 1e-3)
    transmission = 1.0 - omega * dark_channel(x / light, patch)
    radius = max(4, min(image.shape[:2]) // 8)
    transmission = guided_filter(grey(x), transmission, radius, 1e-3)
    transmission = np.maximum(transmission, 0.1)[..., None]
    return to_uint8((x - light) / transmission + light)


@tool(
    "dehaze_global",
    "dehazing",
    "Removes an even veil of haze: one transmission for the whole image, set so the darkest pixels become black; safe, no halos, weaker on deep scenes.",
    strength_argument(high=1.0, what="fraction of the estimated veil removed"),
)
def dehaze_global(image: np.ndarray, strength: float = 1.0) -> np.ndarray:
    if strength == 0:
        return image.copy()
    x = to_float(image)
    light = np.maximum(atmospheric_light(x, dark_channel(x, 15 if min(image.shape[:2]) >= 64 else 7)), 1e-3)
    veil = np.percentile((x / light).min(axis=2), 1.0)  # 1st percentile: robust to a few dark pixels
    transmission = max(1.0 - 0.95 * strength * veil, 0.1)
    return to_uint8((x - light) / transmission + light)


# ---------------------------------------------------------------- deraining
# Rain streaks are thin, near-vertical, and add the same brightness to all three channels. An
# opening with a horizontal line removes bright structures narrower than the line (streaks)
# and keeps wider ones; the guided filter puts back edges; the rain layer is taken as the
# part of the difference common to R, G and B, so coloured detail is not removed with it.

STREAK_WIDTH = 7  # px: wider than streaks, narrower than most objects


def remove_bright_layer(x: np.ndarray, background: np.ndarray, strength: float) -> np.ndarray:
    rain = np.clip((x - np.minimum(x, background)).min(axis=2, keepdims=True), 0, None)
    return x - strength * rain


@tool(
    "derain_opening",
    "deraining",
    "Removes rain streaks: a morphological opening across the streaks, edge-refined by a guided filter, subtracted as a grey rain layer.",
    strength_argument(high=1.0, what="fraction of the estimated rain layer removed"),
)
def derain_opening(image: np.ndarray, strength: float = 1.0) -> np.ndarray:
    x = to_float(image)
    opened = to_float(cv2.morphologyEx(image, cv2.MORPH_OPEN, np.ones((1, STREAK_WIDTH), np.uint8)))
    background = guided_filter(grey(opened), opened, 4, 1e-3)
    return to_uint8(remove_bright_layer(x, background, strength))


@tool(
    "derain_median",
    "deraining",
    "Removes rain streaks by taking the darker of the image and its 5x5 median filter (rain only brightens), refined by a guided filter.",
    strength_argument(high=1.0, what="fraction of the estimated rain layer removed"),
)
def derain_median(image: np.ndarray, strength: float = 1.0) -> np.ndarray:
    x = to_float(image)
    darker = np.minimum(x, to_float(cv2.medianBlur(image, 5)))
    background = np.minimum(x, guided_filter(grey(darker), darker, 4, 1e-3))
    return to_uint8(x - strength * (x - background))


# ---------------------------------------------------------------- brightening (HSV value, as AgenticIR)


@tool(
    "brighten_gamma",
    "brightening",
    "Brightens a dark photo with gamma 1.5 on the HSV value channel (lifts shadows most).",
    no_arguments(),
)
def brighten_gamma(image: np.ndarray) -> np.ndarray:
    return hsv_value_map(image, lambda v: 255.0 * (v / 255.0) ** (1 / 1.5))


@tool(
    "brighten_shift",
    "brightening",
    "Brightens a dark photo by adding a constant 40 to the HSV value channel.",
    no_arguments(),
)
def brighten_shift(image: np.ndarray) -> np.ndarray:
    return hsv_value_map(image, lambda v: v + 40.0)


@tool(
    "brighten_clahe",
    "brightening",
    "Brightens and adds local contrast with CLAHE on the HSV value channel.",
    no_arguments(),
)
def brighten_clahe(image: np.ndarray) -> np.ndarray:
    grid = max(1, min(8, min(image.shape[:2]) // 16))
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(grid, grid))
    return hsv_value_map(image, lambda v: clahe.apply(v.astype(np.uint8)).astype(np.float32))
