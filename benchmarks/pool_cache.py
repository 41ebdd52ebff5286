"""The pool's result cache (tool_pool/cache.py): the same work with the cache off and on, side by
side in one run, outputs compared for identity.

    .venv/bin/python benchmarks/pool_cache.py [--crops 16] [--photos 8] [--n 4] [--policy runs/quickstart/rl/hf]

1. Expert search (``tir.data.expert.expert_batch``, the quickstart's recipe and toolbox) over
   ``--crops`` training crops, three times over the same crops as the quickstart and its
   ablations do: the quickstart's settings, ``sft.expert_rule=sample``
   (ablation_per_sample_expert) and ``sft.perturb=false`` (ablation_no_perturbation). Each pass
   on a pool with the cache off and on, in the same process; the expert rows must be identical.
   Printed per pass: seconds off / on and the ratio. The first pass is cold (nothing to reuse
   but what one search repeats); the later passes reuse the first's calls.
2. An RL step's pool work at group size ``--n``: ``--photos`` training photos, each rolled out
   ``--n`` times (adjacent rows, the same seeds as ``tir.trainer.rl``) by ``--policy`` (the
   quickstart's RL policy; a random tiny policy constrained to tool calls when it is absent),
   then every final image and each group's input scored as ``rl_step`` does. Once with the
   cache off, once on, on fresh pools; trajectories and scores must be identical. Printed: the
   seconds the pool computed (tools, metrics, perception: sum of ``run_s``), the RL log's
   ``time/tools`` (seconds some episode waited on a tool) plus the scoring phase, and the
   ratios off / on.

Local pools (``tool_pool.client.LocalPool``: the cache code is the one every Serve replica runs).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import tir  # noqa: E402, F401  - shims before transformers
from tir.config import load_recipe  # noqa: E402
from tool_pool.cache import cache_totals  # noqa: E402
from tool_pool.client import LocalPool  # noqa: E402

TIMING_FIELDS = ("search_s", "seconds", "timings", "wall_s", "tool_s")


def same(a, b) -> bool:
    """Deep equality of rows: arrays by bytes, timings ignored."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return all(k in TIMING_FIELDS or (k in a and k in b and same(a[k], b[k])) for k in keys)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return a == b


def pool_seconds(stats: dict) -> float:
    """Seconds the pool spent computing (every tool, metric and recogniser call)."""
    return sum(row["run_s"] for row in stats.values())


def training_crops(cfg, count: int):
    from tir.data.synth import read_synth, synthesize

    path = Path(cfg.data.train_path)
    if path.exists():
        samples = read_synth(path)
    else:
        combos = ",".join(cfg.data.train_combos)
        samples = synthesize(cfg.data.hq, combos, per_image=1, seed=0, crop=cfg.data.crop, progress=False)
    step = max(1, len(samples) // count)  # spread over photos and combinations
    return samples.take([i * step % len(samples) for i in range(count)])


def warm_up(cfg, samples) -> None:
    """Load every metric and touch every tool once (not timed, on an image no pass uses)."""
    pool, image = LocalPool(cfg.pool.tools, cache_bytes=0), np.ascontiguousarray(samples.column("hq")[0][::-1])
    asyncio.run(pool.score(list(cfg.reward.metrics), image, image))
    for tool in cfg.pool.tools:
        asyncio.run(pool.run(tool, image))


# ---------------------------------------------------------------- 1. expert search


def expert_passes(cfg, samples) -> list[tuple[str, float, float, bool, dict]]:
    from tir.data import expert

    base = expert.ExpertSettings.from_recipe(cfg)
    passes = [
        ("quickstart", base),
        ("expert_rule=sample", replace(base, expert_rule="sample")),
        ("perturb=false", replace(base, perturb=False)),
    ]
    pools = {
        "off": LocalPool(cfg.pool.tools, cache_bytes=0),
        "on": LocalPool(cfg.pool.tools, cache_bytes=cfg.pool.cache_bytes),
    }
    results = []
    for name, settings in passes:
        seconds, rows = {}, {}
        for mode, pool in pools.items():
            started = time.perf_counter()
            batch = asyncio.run(expert.expert_batch(pool, samples, settings))
            seconds[mode], rows[mode] = time.perf_counter() - started, batch.rows()
        identical = same(rows["off"], rows["on"])
        results.append((name, seconds["off"], seconds["on"], identical, cache_totals(asyncio.run(pools["on"].stats()))))
    return results


# ---------------------------------------------------------------- 2. an RL step's group


def open_policy(policy: Path, cfg, schemas):
    """The rollout engine and the loop's settings (the quickstart's, at RL step 1)."""
    from tir.agent import prompts, tiny_policy
    from tir.agent.loop import LoopSettings
    from tir.trainer.rl import step_seed
    from workers.rollout.hf_engine import HFEngine

    settings = LoopSettings.from_recipe(cfg.rollout, cfg.get("env"), seed=step_seed(cfg.run.seed, 1))
    if policy.is_dir():
        return HFEngine(str(policy)), settings, str(policy)
    with tempfile.TemporaryDirectory() as folder:
        engine = HFEngine(tiny_policy.build_tiny_policy(folder, schemas))
    calls = tuple(prompts.format_call(prompts.ToolCall(s["name"], {})) for s in schemas)
    return engine, replace(settings, choices=calls), "random tiny policy (constrained to tool calls)"


def rl_group(engine, settings, cfg, samples, schemas, n: int, cache_bytes: int) -> dict:
    """One RL step's rollouts and scoring on a fresh pool: seconds per phase, as the RL log has
    them, and what the pool computed for the rollouts (tools, perception) and for the scores."""
    from tir.agent.env import recipe_cues
    from tir.agent.loop import rollout
    from tir.rl.reward import MultiMetricReward
    from tir.trainer.rl import score_trajectories
    from tir.trainer.run_log import busy_seconds

    pool = LocalPool(cfg.pool.tools, cache_bytes=cache_bytes)
    groups = samples.repeat(n)
    started = time.perf_counter()
    batch = asyncio.run(rollout(engine, engine.processor, pool, groups, settings, schemas, recipe_cues(cfg.model)))
    rollout_s = time.perf_counter() - started
    env_stats = asyncio.run(pool.stats())
    started = time.perf_counter()
    finals, inputs = asyncio.run(
        score_trajectories(pool, batch, MultiMetricReward.from_config(cfg.reward), n, cfg.rollout.concurrency)
    )
    score_s = time.perf_counter() - started
    stats = asyncio.run(pool.stats())
    return {
        "tools_s": busy_seconds(batch.column("timings"), "env"),
        "score_s": score_s,
        "env_pool_s": pool_seconds(env_stats),
        "score_pool_s": pool_seconds(stats) - pool_seconds(env_stats),
        "rollout_s": rollout_s,
        "calls": sum(len(c) for c in batch.column("tool_calls")),
        "cache": cache_totals(stats),
        "outputs": (batch.column("tool_calls"), batch.column("final_image"), finals, inputs),
    }


RL_ROWS = (
    ("tools_s", "time/tools (RL log)"),
    ("env_pool_s", "  pool compute: tools+perception"),
    ("score_s", "time/score (RL log)"),
    ("score_pool_s", "  pool compute: metrics"),
    ("rollout_s", "time/rollout (with generation)"),
)


def rl_rounds(engine, settings, cfg, photos, schemas, n: int, rounds: int) -> tuple[dict, dict, bool]:
    """``rounds`` x (cache off, cache on), alternating: the median of each figure per mode, the
    last run's cache totals, and whether every run gave the same trajectories and scores."""
    runs = {"off": [], "on": []}
    for _ in range(rounds):
        for mode, size in (("off", 0), ("on", cfg.pool.cache_bytes)):
            runs[mode].append(rl_group(engine, settings, cfg, photos, schemas, n, size))
    first = runs["off"][0]["outputs"]
    identical = all(same(first, r["outputs"]) for mode in runs for r in runs[mode])
    medians = {mode: {k: float(np.median([r[k] for r in rs])) for k, _ in RL_ROWS} for mode, rs in runs.items()}
    medians["on"]["calls"], medians["on"]["cache"] = runs["on"][-1]["calls"], runs["on"][-1]["cache"]
    return medians["off"], medians["on"], identical


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--crops", type=int, default=16, help="crops the expert search runs over")
    parser.add_argument("--photos", type=int, default=8, help="photos of the RL step (trainer.batch_size)")
    parser.add_argument("--n", type=int, default=4, help="rollouts per photo (rollout.n)")
    parser.add_argument("--policy", type=Path, default=REPO / "runs/quickstart/rl/hf")
    parser.add_argument("--rounds", type=int, default=3, help="RL step runs per mode (median)")
    parser.add_argument("--skip", choices=("expert", "rl"), default=None)
    args = parser.parse_args()

    from tir.agent.loop import pool_tool_schemas
    from tir.agent.prompts import policy_schemas

    cfg = load_recipe(args.recipe, [])
    crops = training_crops(cfg, max(args.crops, args.photos))
    warm_up(cfg, crops)
    failed = False
    print(
        f"recipe {args.recipe}: {len(cfg.pool.tools)} tools, metrics {list(cfg.reward.metrics)}, {cfg.data.crop} px crops"
    )
    if args.skip != "expert":
        print(f"\n1. expert search over {args.crops} crops (s; cache off | on | off/on | identical output)")
        total = {"off": 0.0, "on": 0.0}
        for name, off, on, identical, cache in expert_passes(cfg, crops.slice(0, args.crops)):
            total["off"], total["on"] = total["off"] + off, total["on"] + on
            failed |= not identical
            print(
                f"   {name:20s} {off:7.1f} {on:7.1f} {off / on:6.2f}x  {'yes' if identical else 'NO'}   "
                f"(cache so far: {cache['cache_hits']:.0f} hits, {cache['cache_misses']:.0f} misses, "
                f"{cache['cache_bytes'] / 2**20:.1f} MiB, {cache['cache_saved_s']:.1f} s saved)"
            )
        print(f"   {'all three':20s} {total['off']:7.1f} {total['on']:7.1f} {total['off'] / total['on']:6.2f}x")
    if args.skip != "rl":
        schemas = policy_schemas(
            asyncio.run(pool_tool_schemas(LocalPool(cfg.pool.tools), list(cfg.pool.tools))), cfg.model.tool_prompt
        )
        engine, settings, label = open_policy(args.policy, cfg, schemas)
        photos = crops.slice(0, args.photos)
        rl_group(engine, settings, cfg, photos.slice(0, 1), schemas, 1, 0)  # warm up the engine
        off, on, identical = rl_rounds(engine, settings, cfg, photos, schemas, args.n, args.rounds)
        failed |= not identical
        print(
            f"\n2. an RL step: {args.photos} photos x n={args.n}, {label}; {on['calls']} tool calls; "
            f"median of {args.rounds} rounds (s)"
        )
        print(f"   {'':34s} {'off':>7s} {'on':>7s} {'off/on':>7s}")
        for key, what in RL_ROWS:
            print(f"   {what:34s} {off[key]:7.2f} {on[key]:7.2f} {off[key] / max(on[key], 1e-9):6.2f}x")
        cache = on["cache"]
        print(
            f"   cache: {cache['cache_hits']:.0f} hits, {cache['cache_misses']:.0f} misses "
            f"({cache['cache_hit_rate']:.0%}), {cache['cache_saved_s']:.1f} s saved; "
            f"trajectories and scores identical in every run: {'yes' if identical else 'NO'}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
