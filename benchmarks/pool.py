"""The model-call pool against per-call and per-client tool loading, in one run.

    .venv/bin/python benchmarks/pool.py [--calls 256] [--clients 16] [--size 256] [--fresh-calls 16]
                                        [--set pool.KEY=VALUE ...] [--manifest M [--tool NAME]]

A neural tool (SRVGGNetCompact, the Real-ESRGAN "compact" network, random weights saved as a
release-style checkpoint; or, with ``--manifest tool_pool/manifests/trained.yaml``, the project's
trained jpeg_compact) restores 256x256 images, four ways:
  (a) pool:   the Ray Serve pool (2 replicas), 16 concurrent clients;
  (b) fresh:  AgenticIR-style, a fresh Python process per call that imports, builds and loads
              the tool, runs it once and exits (measured on --fresh-calls calls: at several
              seconds per call, all 256 would take most of an hour on 2 cores);
  (c) copies: 16 client processes, each loading its own copy once, then calling it;
  (d) raw:    the limit: one process per replica, with the replica's torch threads, running
              its share of the images through the tool as a replica's forward passes do
              (pool.forward_batch images at a time; on a CPU replica one).
Every image is distinct (the warm-up calls use others), so the pool's result cache (on, as
deployed) never hits; the printed cache hits say so. Prints calls/s, p50/p95 latency and peak
memory per way (the summed resident memory of the processes that hold tools: the pool's
replicas, the fresh processes, the client processes; sampled every 50 ms), the ratios, and the
profile of the pool's calls: where a call's time went, stage by stage, measured in the replica
(timestamps carried in each answer) and at the client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from tool_pool.execution import NAMESPACE, STATS_ACTOR_SUFFIX

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


def cpu_by_process(processes) -> dict[int, float]:
    """CPU seconds (user + system) each process has used so far."""
    out = {}
    for proc in processes:
        try:
            times = proc.cpu_times()
            out[proc.pid] = times.user + times.system
        except psutil.Error:
            pass
    return out


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two ``cpu_by_process`` readings (by the processes of the second;
    one that started in between counts whole). The machine is shared: this is what the benchmark's
    own processes used, whatever else runs."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def everything_mine():
    return [psutil.Process(), *my_children()]  # for (a): the clients' process, Ray's, the replicas


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


def pool_config(manifest, overrides):
    from tir.config import load_recipe

    return load_recipe(
        None,
        [
            "pool.name=bench_pool",
            "pool.num_replicas=2",
            "pool.num_cpus_per_replica=1",
            f"pool.manifest={manifest}",
            "pool.max_batch_size=8",
            "pool.call_timeout_s=600",
            *overrides,
        ],
    ).pool


def run_pool(cfg, images, warmup, clients):
    import ray

    from tool_pool.client import CallProfile
    from tool_pool.serve_app import start_pool, stop_pool

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    with PeakMemory(pool_replicas) as memory:
        pool = start_pool(cfg)

        async def warm():  # deploy, and load the tool on every replica (routing is random)
            await asyncio.gather(*(pool.run(TOOL, image) for image in warmup))

        asyncio.run(warm())
        pool.profile = CallProfile()
        latencies = []

        async def client(mine):
            for image in mine:
                start = time.perf_counter()
                await pool.run(TOOL, image)
                latencies.append(time.perf_counter() - start)

        async def all_clients():
            await asyncio.gather(*(client(images[c::clients]) for c in range(clients)))

        cpu = cpu_by_process(everything_mine())
        start = time.perf_counter()
        asyncio.run(all_clients())
        seconds = time.perf_counter() - start
        cpu = cpu_used(cpu, cpu_by_process(everything_mine()))
    stats = asyncio.run(pool.stats())[f"tool:{TOOL}"]
    actor = ray.get_actor(cfg.name + STATS_ACTOR_SUFFIX, namespace=NAMESPACE)
    stats["replicas"] = ray.get(actor.replicas.remote())
    stop_pool(cfg.name)
    ray.shutdown()
    row = summarize(f"(a) pool, {cfg.num_replicas} replicas", latencies, seconds, memory)
    return {**row, "cpu_s": cpu / len(latencies)}, stats, pool.profile


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
latencies, cpu = [], time.process_time()
for path in sys.argv[2].split(","):
    image = np.load(path)
    start = time.perf_counter()
    tool([image])
    latencies.append(time.perf_counter() - start)
print(json.dumps(latencies), flush=True)
print(f"{(time.process_time() - cpu) / len(latencies) * 1e3:.0f}", flush=True)
"""


RAW_BATCHED = """
import sys, time, json, numpy as np, torch, tir
from tool_pool.neural import register_manifest
from tool_pool.tools import TOOLS
register_manifest(sys.argv[1])
torch.set_num_threads(int(sys.argv[4]))
tool = TOOLS.get(sys.argv[3]).load()
images = [np.load(path) for path in sys.argv[2].split(",")]
tool(images[:1])  # warm: first-call allocations, as the pool's warm-up calls do
print("loaded", flush=True)
sys.stdin.readline()
batch, latencies, cpu = int(sys.argv[5]), [], time.process_time()
for i in range(0, len(images), batch):
    start = time.perf_counter()
    tool(images[i : i + batch])
    latencies += [time.perf_counter() - start] * len(images[i : i + batch])
print(json.dumps(latencies), flush=True)
print(f"{(time.process_time() - cpu) / len(images) * 1e3:.0f}", flush=True)
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

    before = psutil.Process().cpu_times()
    with PeakMemory(my_children) as memory, ThreadPoolExecutor(clients) as executor:
        start = time.perf_counter()
        latencies = list(executor.map(one, range(len(image_paths))))
        seconds = time.perf_counter() - start
    after = psutil.Process().cpu_times()  # the fresh processes, waited for: counted as children
    cpu = after.children_user + after.children_system - before.children_user - before.children_system
    return {**summarize("(b) fresh process per call", latencies, seconds, memory), "cpu_s": cpu / len(latencies)}


def run_copies(manifest, image_paths, clients):
    return run_processes(CLIENT_COPY, manifest, image_paths, clients, [], "(c) a copy per client", 1)


def run_raw(manifest, image_paths, cfg):
    from tool_pool.serve_app import forward_batch, torch_threads

    threads = torch_threads(cfg.torch_threads, cfg.num_cpus_per_replica)
    batch = forward_batch(cfg.forward_batch, cfg.num_gpus_per_replica) or cfg.max_batch_size
    name = f"(d) raw forward, {cfg.num_replicas} processes x {threads} threads, {batch} images per forward"
    extra = [str(threads), str(batch)]
    return run_processes(RAW_BATCHED, manifest, image_paths, cfg.num_replicas, extra, name, threads)


def run_processes(script, manifest, image_paths, count, extra, name, threads):
    """``count`` processes of ``script``, each on its share of the images, timed from when all have loaded."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with PeakMemory(my_children) as memory:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(manifest), ",".join(image_paths[c::count]), TOOL, *extra],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                text=True,
            )
            for c in range(count)
        ]
        for proc in procs:
            assert proc.stdout.readline().strip() == "loaded"
        cpu = cpu_by_process(my_children())
        start = time.perf_counter()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        latencies = [lat for proc in procs for lat in json.loads(proc.stdout.readline())]
        seconds = time.perf_counter() - start
        cpu = cpu_used(cpu, cpu_by_process(my_children()))
        cpu_ms = [float(proc.stdout.readline()) for proc in procs]  # forward CPU ms per image, per process
        for proc in procs:
            proc.wait()
    return {
        **summarize(name, latencies, seconds, memory),
        "cpu_ms": float(np.mean(cpu_ms)),
        "cpu_s": cpu / len(latencies),
    }


def print_profile(profile, stats):
    means = profile.means()
    total = means["total"]
    print(f"\nprofile of one pooled call (mean of {profile.calls} computed calls, {profile.cached} from a cache):")
    print("| stage | where measured | ms | share of the call |")
    print("|---|---|---|---|")
    where = {
        "send": "client send -> replica method starts (serialise, route, actor queue, deserialise)",
        "admit": "replica: checks, cache key",
        "queue": "replica: waiting for its batch to start (earlier batches' forwards, batch wait)",
        "form": "replica: grouping, model lookup",
        "forward": f"replica: the tool on the batch (mean batch {profile.images / max(profile.calls, 1):.2f})",
        "back": "replica: batch end -> method returns (futures, cache store)",
        "receive": "replica returns -> client has it (serialise, transfer, deserialise)",
    }
    for stage, text in where.items():
        print(f"| {stage} | {text} | {means[stage] * 1e3:,.1f} | {means[stage] / total:.0%} |")
    print(f"| total | client latency | {total * 1e3:,.1f} | 100% |")
    threads = sorted(r["torch_threads"] for r in stats["replicas"].values())
    print(
        f"pool: mean batch {stats['mean_batch']:.2f} (max {stats['max_batch']}), model loads {stats['loads']}, "
        f"cache hits {stats.get('cache_hits', 0)}, torch threads per replica {threads}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=256)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--fresh-calls", type=int, default=16)
    parser.add_argument("--set", nargs="*", default=[], metavar="pool.KEY=VALUE", help="pool recipe overrides")
    parser.add_argument("--ways", default="abcd", help="which ways to run (a: pool, always run)")
    parser.add_argument(
        "--manifest", default=None, help="serve a tool of this manifest (trained weights) instead of the random one"
    )
    parser.add_argument("--tool", default=None, help="with --manifest: the tool (default: its first)")
    args = parser.parse_args()

    global TOOL
    folder = Path(tempfile.mkdtemp(prefix="tir_pool_bench_"))
    if args.manifest:
        from tool_pool.neural import load_manifest, manifest_path

        manifest = manifest_path(args.manifest)
        specs = {spec.name: spec for spec in load_manifest(manifest)}
        TOOL = args.tool or next(iter(specs))
        if TOOL not in specs:
            parser.error(f"--tool {TOOL!r} is not in {manifest} (it has {', '.join(specs)})")
        arch = specs[TOOL].arch or {"type": "detected by spandrel"}
        described = f"{arch['type']}, {arch.get('num_feat', '?')}x{arch.get('num_conv', '?')}, trained"
    else:
        manifest = write_tool(folder)
        described = f"{ARCH['type']}, {ARCH['num_feat']}x{ARCH['num_conv']}, random weights"
    cfg = pool_config(manifest, args.set)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(args.calls)]
    warmup = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(4 * cfg.num_replicas)]
    image_paths = []
    for i, image in enumerate(images):
        np.save(folder / f"in{i}.npy", image)
        image_paths.append(str(folder / f"in{i}.npy"))

    print(
        f"{args.calls} calls of {TOOL} ({described}) on {args.size}x{args.size} "
        f"images from {args.clients} concurrent clients; {os.cpu_count()} CPU cores; load {os.getloadavg()[0]:.2f}\n",
        flush=True,
    )
    rows = {}
    rows["a"], stats, profile = run_pool(cfg, images, warmup, args.clients)
    if "b" in args.ways:
        rows["b"] = run_fresh(manifest, image_paths[: args.fresh_calls], args.clients, folder)
    if "c" in args.ways:
        rows["c"] = run_copies(manifest, image_paths, args.clients)
    if "d" in args.ways:
        rows["d"] = run_raw(manifest, image_paths, cfg)

    rows["a"]["cpu_ms"] = profile.means()["cpu_per_image"] * 1e3
    print(
        "| way | calls | calls/s | p50 ms | p95 ms | peak memory of tool processes MB | forward CPU ms per image "
        "| CPU s per call, all its processes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows.values():
        cpu = f"{row['cpu_ms']:,.0f}" if "cpu_ms" in row else "-"
        print(
            f"| {row['way']} | {row['calls']} | {row['calls_per_s']:.2f} | {row['p50_ms']:,.0f} | {row['p95_ms']:,.0f} "
            f"| {row['peak_mb']:,.0f} | {cpu} | {row['cpu_s']:.2f} |"
        )
    pool = rows["a"]
    print()
    for way in "bcd":
        if way in rows:
            other = rows[way]
            print(
                f"a/{way}: throughput {pool['calls_per_s'] / other['calls_per_s']:.2f}x, "
                f"p50 latency {other['p50_ms'] / pool['p50_ms']:.2f}x lower, "
                f"peak memory {other['peak_mb'] / pool['peak_mb']:.2f}x lower, "
                f"CPU per call {other['cpu_s'] / pool['cpu_s']:.2f}x lower"
            )
    print_profile(profile, stats)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
