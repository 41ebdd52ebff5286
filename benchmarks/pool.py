"""The model-call pool against per-call and per-client tool loading, in one run.

    .venv/bin/python benchmarks/pool.py [--calls 256] [--clients 16] [--size 256] [--fresh-calls 16]

A neural tool (SRVGGNetCompact, the Real-ESRGAN "compact" network, random weights saved as a
release-style checkpoint) restores 256x256 images, three ways:
  (a) pool:   the Ray Serve pool (2 replicas), 16 concurrent clients;
  (b) fresh:  AgenticIR-style, a fresh Python process per call that imports, builds and loads
              the tool, runs it once and exits (measured on --fresh-calls calls: at several
              seconds per call, all 256 would take most of an hour on 2 cores);
  (c) copies: 16 client processes, each loading its own copy once, then calling it.
Prints calls/s, p50/p95 latency and peak memory per way (the summed resident memory of the
processes that hold tools: the pool's replicas, the fresh processes, the client processes;
sampled every 50 ms), and the ratios a/b and a/c.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

import tir  # noqa: F401

ARCH = {
    "type": "SRVGGNetCompact",
    "num_in_ch": 3,
    "num_out_ch": 3,
    "num_feat": 48,
    "num_conv": 16,
    "upscale": 1,
    "act_type": "prelu",
}
TOOL = "denoise_srvgg_bench"


def write_tool(folder: Path) -> Path:
    """A release-style checkpoint ({"params": state_dict}) and a one-tool manifest."""
    import torch
    import yaml

    from tool_pool.neural import build_network

    torch.manual_seed(0)
    torch.save({"params": build_network(ARCH).state_dict()}, folder / "srvgg.pth")
    manifest = folder / "manifest.yaml"
    entry = {
        "name": TOOL,
        "subtask": "denoising",
        "description": "Benchmark denoiser (random weights).",
        "arch": ARCH,
        "checkpoint": str(folder / "srvgg.pth"),
        "device": "cpu",
    }
    manifest.write_text(yaml.safe_dump({"tools": [entry]}))
    return manifest


def rss_mb(processes) -> float:
    total = 0
    for proc in processes:
        try:
            total += proc.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            pass
    return total / 2**20


def pool_replicas():
    return [
        p for p in psutil.process_iter(["cmdline"]) if "ServeReplica:bench_pool" in " ".join(p.info["cmdline"] or [])
    ]


def my_children():
    return psutil.Process().children(recursive=True)


class PeakMemory:
    """Peak summed RSS of the processes ``which()`` lists, sampled every 50 ms."""

    def __init__(self, which):
        self.which = which

    def __enter__(self):
        self.extra_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.05):
            self.extra_mb = max(self.extra_mb, rss_mb(self.which()))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def summarize(name, latencies, seconds, memory):
    lat = np.asarray(latencies)
    return {
        "way": name,
        "calls": len(lat),
        "calls_per_s": len(lat) / seconds,
        "p50_ms": np.percentile(lat, 50) * 1e3,
        "p95_ms": np.percentile(lat, 95) * 1e3,
        "peak_mb": memory.extra_mb,
    }


def run_pool(manifest, images, clients):
    import ray

    from tir.config import load_recipe
    from tool_pool.serve_app import start_pool, stop_pool

    cfg = load_recipe(
        None,
        [
            "pool.name=bench_pool",
            "pool.num_replicas=2",
            "pool.num_cpus_per_replica=1",
            f"pool.manifest={manifest}",
            "pool.max_batch_size=8",
            "pool.call_timeout_s=600",
        ],
    )
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    with PeakMemory(pool_replicas) as memory:
        pool = start_pool(cfg.pool)
        asyncio.run(pool.run(TOOL, images[0]))  # deploy and warm up both replicas' first load
        latencies = []

        async def client(mine):
            for image in mine:
                start = time.perf_counter()
                await pool.run(TOOL, image)
                latencies.append(time.perf_counter() - start)

        async def all_clients():
            await asyncio.gather(*(client(images[c::clients]) for c in range(clients)))

        start = time.perf_counter()
        asyncio.run(all_clients())
        seconds = time.perf_counter() - start
    stats = asyncio.run(pool.stats())[f"tool:{TOOL}"]
    stop_pool(cfg.pool.name)
    ray.shutdown()
    return summarize("(a) pool", latencies, seconds, memory), stats


FRESH_CALL = """
import sys, numpy as np, tir
from tool_pool.neural import register_manifest
from tool_pool.tools import TOOLS
register_manifest(sys.argv[1])
image = np.load(sys.argv[2])
np.save(sys.argv[3], TOOLS.get(sys.argv[4])([image])[0])
"""

CLIENT_COPY = """
import sys, time, json, numpy as np, tir
from tool_pool.neural import register_manifest
from tool_pool.tools import TOOLS
register_manifest(sys.argv[1])
tool = TOOLS.get(sys.argv[3]).load()
print("loaded", flush=True)
sys.stdin.readline()  # wait until every client has loaded: time the calls, as in (a)
latencies = []
for path in sys.argv[2].split(","):
    image = np.load(path)
    start = time.perf_counter()
    tool([image])
    latencies.append(time.perf_counter() - start)
print(json.dumps(latencies), flush=True)
"""


def run_fresh(manifest, image_paths, clients, folder):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def one(i):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", FRESH_CALL, str(manifest), image_paths[i], str(folder / f"out{i}.npy"), TOOL],
            check=True,
            env=env,
            capture_output=True,
        )
        return time.perf_counter() - start

    with PeakMemory(my_children) as memory, ThreadPoolExecutor(clients) as executor:
        start = time.perf_counter()
        latencies = list(executor.map(one, range(len(image_paths))))
        seconds = time.perf_counter() - start
    return summarize("(b) fresh process per call", latencies, seconds, memory)


def run_copies(manifest, image_paths, clients):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with PeakMemory(my_children) as memory:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CLIENT_COPY, str(manifest), ",".join(image_paths[c::clients]), TOOL],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                text=True,
            )
            for c in range(clients)
        ]
        for proc in procs:
            assert proc.stdout.readline().strip() == "loaded"
        start = time.perf_counter()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        latencies = [lat for proc in procs for lat in __import__("json").loads(proc.stdout.readline())]
        seconds = time.perf_counter() - start
        for proc in procs:
            proc.wait()
    return summarize("(c) a copy per client", latencies, seconds, memory)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=256)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--fresh-calls", type=int, default=16)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="tir_pool_bench_"))
    manifest = write_tool(folder)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(args.calls)]
    image_paths = []
    for i, image in enumerate(images):
        np.save(folder / f"in{i}.npy", image)
        image_paths.append(str(folder / f"in{i}.npy"))

    print(
        f"{args.calls} calls of {TOOL} ({ARCH['type']}, {ARCH['num_feat']}x{ARCH['num_conv']}) on {args.size}x{args.size} "
        f"images from {args.clients} concurrent clients; {os.cpu_count()} CPU cores\n",
        flush=True,
    )
    pool, stats = run_pool(manifest, images, args.clients)
    fresh = run_fresh(manifest, image_paths[: args.fresh_calls], args.clients, folder)
    copies = run_copies(manifest, image_paths, args.clients)

    print("| way | calls | calls/s | p50 ms | p95 ms | peak memory of tool processes MB |")
    print("|---|---|---|---|---|---|")
    for row in (pool, fresh, copies):
        print(
            f"| {row['way']} | {row['calls']} | {row['calls_per_s']:.2f} | {row['p50_ms']:,.0f} | {row['p95_ms']:,.0f} | {row['peak_mb']:,.0f} |"
        )
    print(
        f"\nthroughput a/b: {pool['calls_per_s'] / fresh['calls_per_s']:.1f}x   a/c: {pool['calls_per_s'] / copies['calls_per_s']:.2f}x"
    )
    print(f"p50 latency b/a: {fresh['p50_ms'] / pool['p50_ms']:.1f}x   c/a: {copies['p50_ms'] / pool['p50_ms']:.2f}x")
    print(f"peak memory c/a: {copies['peak_mb'] / pool['peak_mb']:.1f}x")
    print(
        f"pool: mean batch {stats['mean_batch']:.2f} (max {stats['max_batch']}), model loads {stats['loads']}, "
        f"mean queue wait {stats['mean_queue_wait_s'] * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
