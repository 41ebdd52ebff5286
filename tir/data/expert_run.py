"""``tir data expert``: the expert search over a whole sample set, resumable shard by shard.

The search itself (per sample: schedules, scores, the expert rule, perturbation) is
``tir.data.expert``; this module runs it over a set, writes ``<out>.parts/`` shards as it goes,
and is the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

from tir.data.degradations import stable_hash
from tir.data.expert import ExpertSettings, search_batch, served_tools_by_subtask, settings_dict, trajectory_batch
from tir.paths import check_output_file
from tir.protocol import Batch


def parts_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".parts")


def run_shards(
    pool,
    samples: Batch,
    out: str | Path,
    settings: ExpertSettings,
    shard_size: int = 16,
    concurrency: int = 8,
    progress: bool = True,
) -> Batch:
    """Search every row of ``samples``, shard by shard into ``<out>.parts/`` (each shard
    atomically), then choose the experts and their trajectories over the whole set and write
    ``out`` (atomically). Shards already there are kept: rerunning after a kill searches only
    the rest. A rerun with other settings or inputs is refused."""
    from tqdm import tqdm

    from tir.data.synth import check_manifest

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    folder = parts_dir(out)
    fingerprint = {
        "samples": len(samples),
        "seeds": _fingerprint(samples),
        "shard_size": shard_size,
        "settings": settings_dict(settings),
    }
    check_manifest(folder, fingerprint)
    starts = list(range(0, len(samples), shard_size))
    paths = [folder / f"part-{index:05d}.parquet" for index in range(len(starts))]
    finished = sum(min(shard_size, len(samples) - start) for start, path in zip(starts, paths) if path.exists())

    async def whole_run():  # one event loop for the whole run: pool clients are bound to it
        tools = await served_tools_by_subtask(pool)
        with tqdm(
            total=len(samples), initial=finished, desc="expert search", unit="sample", disable=not progress
        ) as bar:
            if finished:
                bar.write(f"resuming: {finished} of {len(samples)} samples already searched in {folder}")
            for start, path in zip(starts, paths):
                if not path.exists():
                    chunk = samples.slice(start, start + shard_size)
                    (await search_batch(pool, chunk, settings, tools, concurrency, bar.update)).to_parquet(path)
        searched = Batch.concat([Batch.from_parquet(p) for p in paths])
        with tqdm(total=len(samples), desc="trajectories", unit="sample", disable=not progress) as bar:
            return await trajectory_batch(pool, searched, settings, tools, concurrency, bar.update)

    batch = asyncio.run(whole_run())
    batch.to_parquet(out)
    return batch


def _fingerprint(samples: Batch) -> str:
    keys = [
        f"{i}:{c}:{s}" for i, c, s in zip(samples.column("image_id"), samples.column("combo"), samples.column("seed"))
    ]
    return f"{stable_hash('|'.join(keys)):016x}"


def add_expert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``tir data expert``."""
    parser.add_argument(
        "--in", dest="inp", required=True, help="samples from `tir data synth` (.parquet file or shard folder)"
    )
    parser.add_argument("--out", required=True, help="output .parquet (shards go to <out>.parts/ while it runs)")
    parser.add_argument(
        "--recipe", default="tiny_cpu", help="recipe naming the pool, the reward's metrics and the sft section"
    )
    parser.add_argument("--shard-size", type=int, default=16, help="samples per shard: what a kill can lose at most")
    parser.add_argument("--concurrency", type=int, default=8, help="samples searched at once")
    parser.add_argument(
        "--no-perturb", action="store_true", help="expert schedules only (the ablation); overrides sft.perturb"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. pool.backend=local sft.beam_width=2"
    )
    return parser


def expert_main(args: argparse.Namespace) -> int:
    from tir.config import RecipeError, load_recipe
    from tir.data.synth import read_synth

    try:
        cfg = load_recipe(args.recipe, list(args.overrides))
        samples = read_synth(args.inp)
        if args.limit is not None:
            samples = samples.slice(0, args.limit)
        settings = ExpertSettings.from_recipe(cfg, perturb=False if args.no_perturb else None)
        check_output_file(args.out, f"--out {args.out!r}")
    except (RecipeError, FileNotFoundError, ValueError) as err:
        print(f"tir data expert: error: {err}", file=sys.stderr)
        return 2
    pool, release = open_pool(cfg)
    try:
        started = time.perf_counter()
        batch = run_shards(
            pool, samples, args.out, settings, args.shard_size, args.concurrency, progress=not args.no_progress
        )
    finally:
        release()
    print(summary(batch, time.perf_counter() - started))
    print(f"wrote {len(batch)} expert trajectories to {args.out}")
    return 0


def open_pool(cfg):
    """The recipe's pool and a function that releases what this process started."""
    from tool_pool.pool import make_pool

    if cfg.pool.backend == "local":
        return make_pool(cfg.pool), lambda: None
    import ray

    from tir.cluster import init_ray

    was_running = ray.is_initialized()
    init_ray(cfg.ray)
    return make_pool(cfg.pool), (lambda: None) if was_running else ray.shutdown


def summary(batch: Batch, seconds: float) -> str:
    calls, scores, search = (
        np.asarray(batch.column(c), float) for c in ("search_tool_calls", "search_score_calls", "search_s")
    )
    perturbed = int(np.sum(batch.column("perturbed")))
    modes = json.dumps({m: batch.column("search_mode").count(m) for m in sorted(set(batch.column("search_mode")))})
    relabelled = sum(e != s for e, s in zip(batch.column("expert_tools"), batch.column("sample_expert_tools")))
    orders = batch.meta.get("combination_orders") or {}
    lines = [
        f"{len(batch)} samples in {seconds:.1f}s; search per sample: {calls.mean():.1f} tool calls, {scores.mean():.1f} "
        f"scorings, {search.mean():.2f}s (modes {modes}); perturbed rows: {perturbed} ({perturbed / max(1, len(batch)):.0%})",
        f"expert rule: {batch.meta.get('expert', {}).get('expert_rule', '?')}; {relabelled} of {len(batch)} experts differ from "
        f"their sample's own best schedule",
    ]
    lines += [f"  {combo}: {' -> '.join(order)}" for combo, order in orders.items()]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m tir.data.expert_run ...
    sys.exit(expert_main(add_expert_arguments(argparse.ArgumentParser(prog="tir data expert")).parse_args()))
