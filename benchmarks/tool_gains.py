"""How much each restoration tool improves the degradation it is meant for.

For every registered tool and every single degradation whose subtask matches the tool's, degrade
a few crops of scikit-image's colour photos (tir.data.degradations, fixed seeds), run the tool, and
report the mean PSNR/SSIM gain over the degraded input and the time per call. For
super-resolution the degraded input is the LQ image upscaled x4 with bicubic interpolation
(as the protocol scores it), so bicubic itself gains 0.

    .venv/bin/python benchmarks/tool_gains.py [--size 256] [--crops 2] [--tools denoise_dct,...]
        [--manifest tool_pool/manifests/trained.yaml]

``--manifest`` adds a manifest's neural tools (the trained ones: none of these photos is among
their training photos), each run on one torch thread.

Prints a Markdown table (time = CPU time per image on one thread); about a minute of CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy loads its BLAS: per-core, comparable timings

import cv2
import numpy as np
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import tir  # noqa: F401  (environment shims first)
from tir.data.degradations import DEGRADATIONS, SUBTASK_FOR_DEGRADATION
from tool_pool.tools import TOOLS, get_tool

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def photo_crops(size: int, per_photo: int, seed: int = 0) -> list[np.ndarray]:
    """``per_photo`` random size x size crops of each colour photo, plus the motorcycle's left view."""
    rng = np.random.default_rng(seed)
    photos = [getattr(data, name)()[..., :3] for name in PHOTOS] + [data.stereo_motorcycle()[0]]
    crops = []
    for photo in photos:
        h, w = photo.shape[:2]
        for _ in range(per_photo):
            y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            crops.append(np.ascontiguousarray(photo[y : y + size, x : x + size]))
    return crops


def degrade_all(name: str, crops: list[np.ndarray], seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [DEGRADATIONS.get(name)(crop, rng)[0] for crop in crops]


def as_scored(lq: np.ndarray, hq: np.ndarray) -> np.ndarray:
    """A 1/4-size image is upscaled (bicubic) before full-reference scoring."""
    if lq.shape == hq.shape:
        return lq
    return cv2.resize(lq, (hq.shape[1], hq.shape[0]), interpolation=cv2.INTER_CUBIC)


def scores(images: list[np.ndarray], references: list[np.ndarray]) -> tuple[float, float]:
    psnr = [peak_signal_noise_ratio(r, as_scored(i, r), data_range=255) for i, r in zip(images, references)]
    ssim = [
        structural_similarity(r, as_scored(i, r), channel_axis=-1, data_range=255) for i, r in zip(images, references)
    ]
    return float(np.mean(psnr)), float(np.mean(ssim))


def measure(tool_names: list[str], crops: list[np.ndarray]) -> list[dict]:
    rows, degraded_cache = [], {}
    for name in tool_names:
        tool = get_tool(name)
        for degradation, subtask in SUBTASK_FOR_DEGRADATION.items():
            if subtask != tool.subtask:
                continue
            if degradation not in degraded_cache:
                lqs = degrade_all(degradation, crops)
                degraded_cache[degradation] = (lqs, scores(lqs, crops))
            lqs, (psnr_in, ssim_in) = degraded_cache[degradation]
            start = time.process_time()  # CPU time: not inflated when other jobs share the machine
            outputs = tool(lqs)
            ms = (time.process_time() - start) * 1000 / len(lqs)
            psnr_out, ssim_out = scores(outputs, crops)
            rows.append(
                {
                    "tool": name,
                    "subtask": subtask,
                    "degradation": degradation,
                    "psnr_in": psnr_in,
                    "gain": psnr_out - psnr_in,
                    "ssim_gain": ssim_out - ssim_in,
                    "ms": ms,
                }
            )
            print(f"  {name:24s} {degradation:13s} {psnr_out - psnr_in:+6.2f} dB {ms:7.1f} ms", file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| tool | subtask | degradation | degraded PSNR | gain dB | SSIM gain | ms per call |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["subtask"], -r["gain"])):
        lines.append(
            f"| {r['tool']} | {r['subtask']} | {r['degradation']} | {r['psnr_in']:.2f} | {r['gain']:+.2f} | {r['ssim_gain']:+.3f} | {r['ms']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="crop side in pixels (HQ; 'lowres' makes 1/4 of it)")
    parser.add_argument("--crops", type=int, default=2, help="crops per photo (6 photos)")
    parser.add_argument("--tools", default="", help="comma-separated tool names (default: all registered)")
    parser.add_argument("--manifest", default=None, help="also the neural tools of this manifest")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    if args.manifest:
        import torch

        from tool_pool.neural import register_manifest

        torch.set_num_threads(1)
        unavailable = register_manifest(args.manifest)
        if unavailable:
            print(f"unavailable in {args.manifest}: {unavailable}", file=sys.stderr)
    names = [n.strip() for n in args.tools.split(",") if n.strip()] or TOOLS.names()
    crops = photo_crops(args.size, args.crops)
    rows = measure(names, crops)
    print(
        f"{len(crops)} crops of {args.size}x{args.size} px from scikit-image's colour photos; CPU ms per image, one thread.\n"
    )
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
