"""Depth maps for the haze degradation.

Haze follows the atmospheric model I = J t + A (1 - t) with t = exp(-beta d), so it needs a depth
map d (larger = farther). MiO100 ships a predicted depth map per image; most photo folders do
not. Three sources, recorded in the data as ``depth_source``:

- ``"file"``: a depth map the user supplies next to the photos (``load_depth`` / ``find_depth``);
- ``"stereo"``: derived from a stereo disparity (the builtin ``stereo_motorcycle`` photo);
- ``"synthetic"``: the documented fallback ``synthetic_depth``: a smooth map built from where a
  pixel sits in the frame and how bright its neighbourhood is. It is deterministic (a function
  of the image only), so a haze sample with a synthetic depth is reproducible from its params.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

DEPTH_SUFFIXES = (".npy", ".png", ".tif", ".tiff", ".mat")

# Weights of the two cues in the synthetic depth: position dominates, luminance modulates.
POSITION_WEIGHT = 0.6
LUMINANCE_WEIGHT = 0.4


def synthetic_depth(image: np.ndarray) -> np.ndarray:
    """A smooth stand-in depth map in (0, 1], float32 HxW, for an RGB uint8 image.

    Two cues of outdoor photos: the top of the frame is usually farther than the bottom (sky,
    horizon, ground plane), and bright, low-texture regions are often sky or distant (the same
    observation behind the dark-channel prior). The luminance is blurred at a scale of 1/16 of
    the image so the haze stays smooth and does not copy the image's texture.
    """
    h, w = image.shape[:2]
    rows = np.linspace(1.0, 0.0, h, dtype=np.float32)[:, None].repeat(w, axis=1)
    luminance = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    sigma = max(h, w) / 16.0
    luminance = cv2.GaussianBlur(luminance, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
    depth = POSITION_WEIGHT * rows + LUMINANCE_WEIGHT * luminance
    return normalise_depth(depth + 0.05)  # + 0.05: even the nearest pixel gets a little haze


def normalise_depth(depth: np.ndarray) -> np.ndarray:
    """Divide by the maximum (as MiO100's synthesis does), float32, finite, non-negative."""
    depth = np.nan_to_num(np.asarray(depth, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    depth = np.clip(depth, 0.0, None)
    top = float(depth.max()) if depth.size else 0.0
    if top <= 0:
        raise ValueError("depth map is empty or all zero: cannot normalise it")
    return depth / top


def resize_depth(depth: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a depth map to an image's size (bicubic, as MiO100) and normalise it."""
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth map must be 2-D (HxW), got shape {depth.shape}")
    if depth.shape != (height, width):
        depth = cv2.resize(depth, (width, height), interpolation=cv2.INTER_CUBIC)
    return normalise_depth(depth)


def depth_from_disparity(disparity: np.ndarray) -> np.ndarray:
    """Depth ~ 1 / disparity; invalid (inf, nan, <= 0) pixels take the nearest valid value
    (OpenCV's inpainting overshoots wildly on float maps)."""
    from scipy import ndimage

    disparity = np.asarray(disparity, dtype=np.float32)
    invalid = ~np.isfinite(disparity) | (disparity <= 0)
    if invalid.all():
        raise ValueError("disparity map has no valid (finite, positive) pixel")
    depth = np.zeros_like(disparity)
    depth[~invalid] = 1.0 / disparity[~invalid]
    if invalid.any():
        _, (rows, cols) = ndimage.distance_transform_edt(invalid, return_indices=True)
        depth = depth[rows, cols]
    return normalise_depth(depth)


def load_depth(path: str | Path) -> np.ndarray:
    """Read a depth map: .npy, a 8/16-bit single-channel image, or MiO100's .mat (``data_obj``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        depth = np.load(path)
    elif suffix == ".mat":
        from scipy.io import loadmat

        content = loadmat(path)
        keys = [k for k in content if not k.startswith("__")]
        key = "data_obj" if "data_obj" in content else (keys[0] if len(keys) == 1 else None)
        if key is None:
            raise ValueError(f"{path}: expected a 'data_obj' array (MiO100 layout), found keys {keys}")
        depth = content[key]
    else:
        depth = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if depth is None:
            raise ValueError(f"{path}: unreadable depth image")
        if depth.ndim == 3:
            depth = depth[..., 0]
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"{path}: depth map must be 2-D, got shape {depth.shape}")
    return depth


def find_depth(depth_dir: str | Path, image_id: str) -> Path | None:
    """The depth file for an image id (its path relative to the photo folder) in ``depth_dir``.

    Looked for, in order: ``<stem>.npy|.png|.tif|.tiff|.mat`` and MiO100's
    ``<stem>/predict_depth.mat`` (stem = the id without its extension).
    """
    stem = Path(depth_dir) / Path(image_id).with_suffix("")
    for candidate in [stem.with_name(stem.name + s) for s in DEPTH_SUFFIXES] + [stem / "predict_depth.mat"]:
        if candidate.is_file():
            return candidate
    return None
