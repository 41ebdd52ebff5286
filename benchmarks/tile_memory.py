"""Peak memory of a neural tool on a large photo (issue 18, item 4): automatic tiling keeps it bounded.

A denoise-style scale-1 Compact network (Real-ESRGAN's SRVGGNetCompact, random weights; the
memory does not depend on them) is saved as a release checkpoint, named in a manifest by its path
only (spandrel detects it) and run on one 4000x3000 photo. Without tiles one of its activations
alone would take feat x H x W x 4 bytes (3 GB at 64 features); with the automatic 512-px tiles
the process peak stays well under 4 GB. Peak RSS is the process's (``resource.getrusage``), so
it includes torch itself; run under ``/usr/bin/time -v`` for an outside view:

    /usr/bin/time -v .venv/bin/python benchmarks/tile_memory.py            # 64 features, 16 convs
    .venv/bin/python benchmarks/tile_memory.py --feat 32 --conv 8          # quicker on 2 cores
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--feat", type=int, default=64, help="Compact's features (64: realesr-general)")
    parser.add_argument("--conv", type=int, default=16, help="Compact's body convolutions")
    parser.add_argument("--tile", type=int, default=None, help="manifest tile (default: automatic)")
    args = parser.parse_args()

    import torch
    import yaml
    from spandrel.architectures.Compact import Compact

    import tir  # noqa: F401 - shims before spandrel imports torchvision
    from tool_pool.neural import AUTO_TILE, TILE_ABOVE, register_manifest
    from tool_pool.tools import get_tool

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        network = Compact(num_feat=args.feat, num_conv=args.conv, upscale=1)
        torch.save({"params": network.state_dict()}, Path(folder) / "denoise_x1.pth")
        del network
        entry = {
            "name": "denoise_compact_bench",
            "subtask": "denoising",
            "description": "Benchmark denoiser (random weights).",
            "checkpoint": "denoise_x1.pth",
        }
        if args.tile:
            entry["tile"] = args.tile
        manifest = Path(folder) / "manifest.yaml"
        manifest.write_text(yaml.safe_dump({"tools": [entry]}))
        register_manifest(manifest)
        tool = get_tool(entry["name"]).load()
        photo = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
        before_rss, before_peak = rss_mb(), peak_mb()
        start = time.perf_counter()
        out = tool([photo])[0]
        seconds = time.perf_counter() - start
    tile = args.tile or (AUTO_TILE if args.height * args.width > TILE_ABOVE else None)
    untiled_gb = args.feat * args.height * args.width * 4 / 2**30
    print(f"network: spandrel {tool.network.arch}, {args.feat} features, {args.conv} convs, x{tool.scale}")
    print(f"photo {args.width}x{args.height} -> {out.shape[1]}x{out.shape[0]}, tile {tile}, {seconds:.1f} s")
    print(f"RSS before the call {before_rss:.0f} MB (peak so far {before_peak:.0f} MB)")
    print(f"peak RSS {peak_mb():.0f} MB  (one untiled activation alone: {untiled_gb:.1f} GB)")


if __name__ == "__main__":
    main()
