"""How much of a rollout's wall time is spent waiting on tools: the async loop vs a sequential one.

    .venv/bin/python benchmarks/agent_loop.py [--episodes 64] [--max-turns 3] [--pool local|serve]

The tiny policy (built offline, random weights) plays ``--episodes`` restoration episodes on
degraded crops of the built-in photos, through the transformers engine and the tool pool. Its
replies are constrained to well-formed calls of the benchmark's tools (``choices``), so every
turn calls a tool, as a trained policy would. The same episodes run twice:

- sequential: one episode at a time (``concurrency=1``): while a tool runs, nothing generates;
- async: every episode in flight; generation of some overlaps the tool calls of others, and the
  engine batches the turns that are ready together.

"Waiting on tools" is the wall time during which some episode waits on the env (a tool call
through the pool) while no generation runs: time the policy engine sits idle because of tools.
Prints both loops' wall time, that share, the engine's busy share, and the ratios.
"""

import argparse
import asyncio
import tempfile
import time

import tir  # noqa: F401  - shims before transformers
from tir.agent import prompts, tiny_policy
from tir.agent.loop import LoopSettings, rollout, sequential
from tir.data.synth import synthesize
from tool_pool.tools import tool_schemas

# Mid-weight weight-free tools (tens to hundreds of ms on a crop), one per subtask but super-
# resolution (which would grow every later image 4x and make the run size-bound).
TOOLS = [
    "denoise_dct",
    "deblur_motion_rl",
    "deblur_defocus_rl",
    "dehaze_dcp",
    "derain_median",
    "brighten_clahe",
    "jpeg_deblock_dct",
]


def union_length(intervals) -> float:
    """Total length covered by (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def waiting_on_tools_only(batch) -> float:
    """Seconds during which some episode awaited the env and none awaited generation."""
    spans = [span for timings in batch.column("timings") for span in timings["spans"]]
    env = [(s, e) for kind, s, e in spans if kind == "env"]
    generate = [(s, e) for kind, s, e in spans if kind == "generate"]
    return union_length(env + generate) - union_length(generate)


def run(engine, processor, pool, samples, settings):
    busy_before, batches_before, requests_before = (
        engine.stats["busy_s"],
        engine.stats["batches"],
        engine.stats["requests"],
    )
    started = time.perf_counter()
    batch = asyncio.run(rollout(engine, processor, pool, samples, settings, tool_schemas=tool_schemas(TOOLS)))
    wall = time.perf_counter() - started
    batches = engine.stats["batches"] - batches_before
    return {
        "wall": wall,
        "tool_wait_share": waiting_on_tools_only(batch) / wall,
        "engine_busy_share": (engine.stats["busy_s"] - busy_before) / wall,
        "tool_calls": sum(len(calls) for calls in batch.column("tool_calls")),
        "tool_s": sum(t["tool_s"] for t in batch.column("timings")),
        "mean_batch": (engine.stats["requests"] - requests_before) / max(batches, 1),
    }


def open_pool(kind: str):
    from tool_pool.client import LocalPool

    if kind == "local":
        return LocalPool(TOOLS), lambda: None
    import ray

    from tir.config import load_recipe
    from tool_pool.serve_app import start_pool, stop_pool

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    cfg = load_recipe("tiny_cpu", ["pool.name=bench_pool"])
    pool = start_pool(cfg.pool)
    return pool, lambda: (stop_pool(cfg.pool.name), ray.shutdown())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--max-batch-size", type=int, default=16, help="the engine's largest generate batch")
    parser.add_argument("--pool", choices=("local", "serve"), default="local")
    args = parser.parse_args()

    from workers.rollout.hf_engine import HFEngine

    photos = synthesize(
        "builtin",
        "noise,jpeg,haze,rain,dark,motion_blur,defocus_blur,noise+jpeg",
        per_image=1,
        seed=0,
        crop=args.crop,
        progress=False,
    )
    samples = photos.take([i % len(photos) for i in range(args.episodes)])
    with tempfile.TemporaryDirectory() as folder:
        engine = HFEngine(
            tiny_policy.build_tiny_policy(folder, tool_schemas(TOOLS)), max_batch_size=args.max_batch_size
        )
    calls = tuple(prompts.format_call(prompts.ToolCall(name, {})) for name in TOOLS)
    settings = LoopSettings(max_turns=args.max_turns, max_new_tokens=32, choices=calls, concurrency=args.episodes)
    pool, close = open_pool(args.pool)
    try:
        run(engine, engine.processor, pool, samples.slice(0, 2), settings)  # warm up: first calls load and compile
        results = {
            "sequential": run(engine, engine.processor, pool, samples, sequential(settings)),
            "async": run(engine, engine.processor, pool, samples, settings),
        }
    finally:
        close()

    print(
        f"{args.episodes} episodes x {args.max_turns} turns, tiny policy on the hf engine (batches <= {args.max_batch_size}), "
        f"{args.pool} pool, {len(TOOLS)} tools, {args.crop} px crops\n"
    )
    print(
        f"{'loop':12s} {'wall s':>8s} {'waiting on tools':>17s} {'engine busy':>12s} {'tool calls':>11s} {'tool s':>8s} {'mean batch':>11s}"
    )
    for name, r in results.items():
        print(
            f"{name:12s} {r['wall']:8.1f} {r['tool_wait_share']:16.1%} {r['engine_busy_share']:11.1%} {r['tool_calls']:11d} {r['tool_s']:8.1f} {r['mean_batch']:11.1f}"
        )
    seq, asy = results["sequential"], results["async"]
    print(
        f"\nshare of wall time waiting on tools: sequential {seq['tool_wait_share']:.1%}, async {asy['tool_wait_share']:.1%}, "
        f"ratio {seq['tool_wait_share'] / max(asy['tool_wait_share'], 1e-9):.1f}x"
    )
    print(f"wall time: sequential / async = {seq['wall'] / asy['wall']:.2f}x")


if __name__ == "__main__":
    main()
