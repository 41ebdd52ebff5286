"""Rollout throughput, vLLM vs transformers, and the cost of a live weight update.

    .venv/bin/python benchmarks/rollout.py [--episodes 64] [--max-turns 3] [--group]

The tiny policy (built offline, random weights) plays ``--episodes`` restoration episodes
through the async agent loop (``tir.agent.loop``), once with each backend, in this process:
the same samples, settings and tools. Replies are constrained to well-formed calls of cheap
weight-free tools (``choices``), so every turn calls a tool and shows the policy a new image, as
a trained policy's would; the tools are cheap so that the engines, not the tools, set the pace.
Prints trajectories/s and generated tokens/s of each backend and their ratio.

Then each engine loads the full policy again with ``update_weights`` (vLLM: buckets through
/dev/shm into a layerwise reload; transformers: copies in place) and the time per MB is printed.
``--group`` also times the Ray path: a one-replica vLLM rollout group fed through the object store.
"""

import argparse
import asyncio
import os
import tempfile
import time

import tir  # noqa: F401  - shims before transformers
from tir.agent import models, prompts, tiny_policy
from tir.agent.loop import LoopSettings, rollout
from tir.data.synth import synthesize
from tool_pool.client import LocalPool
from tool_pool.tools import tool_schemas

TOOLS = ["brighten_shift", "brighten_gamma", "dehaze_global", "sharpen_unsharp", "jpeg_reapply"]


def play(engine, processor, samples, settings) -> dict:
    started = time.perf_counter()
    batch = asyncio.run(
        rollout(engine, processor, LocalPool(TOOLS), samples, settings, tool_schemas=tool_schemas(TOOLS))
    )
    wall = time.perf_counter() - started
    generated = sum(sum(mask) for mask in batch.column("loss_mask"))
    turns = sum(batch.column("num_turns"))
    errors = sum(bool(e) for e in batch.column("error"))
    return {
        "wall": wall,
        "trajectories_s": len(batch) / wall,
        "tokens_s": generated / wall,
        "tokens": generated,
        "turns": turns,
        "errors": errors,
        "images": sum(len(images) for images in batch.column("images")),
    }


def time_update(update, state_dict, repeats: int = 3) -> dict:
    megabytes = sum(t.numel() * t.element_size() for t in state_dict.values()) / 2**20
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        update(state_dict)
        seconds.append(time.perf_counter() - started)
    best = min(seconds)
    return {"mb": megabytes, "s": best, "ms_per_mb": 1000 * best / megabytes}


def group_update(path: str, state_dict) -> dict:
    import ray

    from workers.rollout.group import RolloutGroup

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    group = RolloutGroup(
        "vllm", path, num_replicas=1, resources={"CPU": 1}, options={"max_images": 8, "max_model_len": 4096}
    )
    try:
        return time_update(group.update_weights, state_dict)
    finally:
        group.close()
        ray.shutdown()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument(
        "--hf-batch-size", type=int, default=16, help="the transformers engine's largest generate batch"
    )
    parser.add_argument("--group", action="store_true", help="also time a weight update through a Ray rollout group")
    args = parser.parse_args()

    photos = synthesize("builtin", "noise,jpeg,haze,dark", per_image=1, seed=0, crop=args.crop, progress=False)
    samples = photos.take([i % len(photos) for i in range(args.episodes)])
    calls = tuple(prompts.format_call(prompts.ToolCall(name, {})) for name in TOOLS)
    settings = LoopSettings(
        max_turns=args.max_turns, max_new_tokens=32, choices=calls, concurrency=args.episodes, seed=0
    )
    with tempfile.TemporaryDirectory(prefix="tir_bench_policy_") as folder:
        path = str(tiny_policy.build_tiny_policy(os.path.join(folder, "tiny"), tool_schemas(TOOLS)))
        results, updates, vllm_start = run_all(args, path, samples, settings)
    report(args, results, updates, vllm_start)


def run_all(args, path: str, samples, settings):
    from workers.rollout.hf_engine import HFEngine
    from workers.rollout.vllm_engine import VLLMEngine

    model, processor = models.load_policy(path)
    state_dict = model.state_dict()

    started = time.perf_counter()
    vllm = VLLMEngine(path, max_images=args.max_turns + 1, max_model_len=4096)
    vllm_start = time.perf_counter() - started
    hf = HFEngine(path, max_batch_size=args.hf_batch_size)
    results, updates = {}, {}
    try:
        for name, engine in (("vllm", vllm), ("hf", hf)):
            play(engine, processor, samples.slice(0, 2), settings)  # warm up: first calls load tools, allocate
            results[name] = play(engine, processor, samples, settings)
        updates["vllm (shm buckets)"] = time_update(vllm.update_weights, state_dict)
        updates["hf (in place)"] = time_update(lambda weights: hf.update_weights(weights.items()), state_dict)
    finally:
        asyncio.run(vllm.shutdown())
    if args.group:
        updates["vllm group (object store)"] = group_update(path, state_dict)
    return results, updates, vllm_start


def report(args, results, updates, vllm_start):
    print(
        f"\n{args.episodes} episodes x <= {args.max_turns} turns, tiny policy ({updates['hf (in place)']['mb']:.1f} MB "
        f"of float32 weights), {len(TOOLS)} cheap tools, {args.crop} px crops, all episodes in flight; vLLM start-up {vllm_start:.0f} s\n"
    )
    print(
        f"{'backend':8s} {'wall s':>7s} {'traj/s':>7s} {'tokens/s':>9s} {'tokens':>7s} {'turns':>6s} {'images':>7s} {'errors':>7s}"
    )
    for name, r in results.items():
        print(
            f"{name:8s} {r['wall']:7.1f} {r['trajectories_s']:7.2f} {r['tokens_s']:9.0f} {r['tokens']:7d} {r['turns']:6d} {r['images']:7d} {r['errors']:7d}"
        )
    ratio = results["vllm"]["tokens_s"] / results["hf"]["tokens_s"]
    print(
        f"\nvLLM / transformers: {results['vllm']['trajectories_s'] / results['hf']['trajectories_s']:.2f}x trajectories/s, {ratio:.2f}x tokens/s"
    )
    print(f"\n{'weight update':28s} {'MB':>6s} {'s':>7s} {'ms/MB':>7s}")
    for name, u in updates.items():
        print(f"{name:28s} {u['mb']:6.1f} {u['s']:7.3f} {u['ms_per_mb']:7.1f}")


if __name__ == "__main__":
    main()
