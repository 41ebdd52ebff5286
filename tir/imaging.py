"""The project's image contract, checked in one place: an RGB uint8 HxWx3 numpy array.

Batches (``tir.protocol``), the environment, the degradations, the perception cues, the tools and
the model-call pool all take images in this form and refuse anything else with the same message,
which names the input, what was expected and what was got::

    lq[1]: expected an RGB uint8 HxWx3 image, got ndarray float64 (2, 2, 3)

This module imports numpy only, so that ``tir`` and ``tool_pool`` can both use it cheaply.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EXPECTED = "an RGB uint8 HxWx3 image"


def describe(image: Any) -> str:
    """What ``image`` is, for an error message: ``ndarray float32 (32, 32)``, ``list``... A float
    array holding NaN or infinity says so (the usual cause of a float image)."""
    if not isinstance(image, np.ndarray):
        return type(image).__name__
    text = f"ndarray {image.dtype} {image.shape}"
    if image.dtype.kind in "fc" and not np.isfinite(image).all():
        text += " containing NaN or infinity"
    return text


def check_image(image: Any, where: str = "image", *, min_side: int = 0, error: Any = ValueError) -> np.ndarray:
    """``image`` itself when it is an RGB uint8 HxWx3 numpy array, else ``error(message)``.

    ``where`` names the input in the message (``"lq[1]"``, ``"tool 'denoise_tv', image 0"``).
    ``min_side``: the smallest height and width accepted (the tools and the perception cues need
    a few pixels; 0, the default, accepts any size). ``error``: the exception class the caller
    raises (any callable taking the message), ``ValueError`` by default. Nothing is converted:
    grey HxW, RGBA and float images are refused, never fixed up."""
    expected = EXPECTED + (f" of at least {min_side}x{min_side} px" if min_side > 0 else "")
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        raise error(f"{where}: expected {expected}, got {describe(image)}")
    if min(image.shape[:2]) < min_side:
        raise error(f"{where}: expected {expected}, got a {image.shape[0]}x{image.shape[1]} image (too small)")
    return image
