"""`tir demo`: the oracle baseline demo, an upper bound that sees the HQ photo (no policy, no training).

    tir demo [recipe=...] [key=value ...]

recipe -> degrade the built-in photos (tir.data.synth) -> start the cluster-wide tool pool on Ray Serve
-> restore every sample with a greedy oracle schedule (undo the degradations last-first; at each
step try every tool of the matching subtask through the pool and keep the one with the best PSNR
against the HQ photo) -> score -> write the Batch to Parquet and a Markdown table.

The oracle sees the HQ photo, so this is an upper-bound-style baseline for the trained agent, not
the agent itself: the whole pipeline with the trained agent is `tir quickstart` (`make demo`).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tir.config import config_hash, load_recipe, save_resolved, split_cli_overrides
from tir.data.degradations import SUBTASK_FOR_DEGRADATION
from tir.protocol import Batch


async def greedy_oracle_restore(pool, lq: np.ndarray, hq: np.ndarray, degradations: list[str], tools_by_subtask: dict):
    """Undo degradations last-first, picking each step's best tool by PSNR against ``hq``; a
    step whose best tool makes things worse is skipped (recorded as "skip")."""
    image, calls, chosen = lq, 0, []
    current = (await pool.score(["psnr"], image, hq))["psnr"]
    for name in reversed(degradations):
        candidates = tools_by_subtask[SUBTASK_FOR_DEGRADATION[name]]
        outputs = await asyncio.gather(*(pool.run(tool, image) for tool in candidates))
        scores = [s["psnr"] for s in await asyncio.gather(*(pool.score(["psnr"], out, hq) for out in outputs))]
        calls += len(candidates)
        best = int(np.argmax(scores))
        if scores[best] > current:
            image, current = outputs[best], scores[best]
            chosen.append(candidates[best])
        else:
            chosen.append("skip")
    return image, chosen, calls


async def restore_all(pool, batch: Batch, tools_by_subtask: dict, metrics: list[str], concurrency: int = 16):
    lqs, hqs, chains = batch.column("lq"), batch.column("hq"), batch.column("degradations")
    # enough samples in flight to fill the pool's batches, not so many that calls wait minutes
    slots = asyncio.Semaphore(concurrency)

    async def one(i):
        async with slots:
            return await restore_one(i)

    async def restore_one(i):
        restored, chosen, calls = await greedy_oracle_restore(pool, lqs[i], hqs[i], chains[i], tools_by_subtask)
        before, after = await asyncio.gather(pool.score(metrics, lqs[i], hqs[i]), pool.score(metrics, restored, hqs[i]))
        return i, restored, chosen, calls, before, after

    results = [None] * len(batch)
    with tqdm(total=len(batch), desc="restoring", unit="img") as bar:
        for next_done in asyncio.as_completed([one(i) for i in range(len(batch))]):
            i, *rest = await next_done
            results[i] = rest
            bar.update()
    return results


def report_table(batch: Batch, metric: str = "psnr") -> str:
    rows = defaultdict(list)
    for combo, before, after, calls in zip(
        batch.column("combo"), batch.column("before"), batch.column("after"), batch.column("tool_calls")
    ):
        rows[combo].append((before[metric], after[metric], calls))
    lines = [
        f"| combination | n | degraded {metric} | restored {metric} | gain | tool calls/img |",
        "|---|---|---|---|---|---|",
    ]
    for combo, values in sorted(rows.items()):
        b, a, c = (np.mean([v[k] for v in values]) for k in range(3))
        lines.append(f"| {combo} | {len(values)} | {b:.2f} | {a:.2f} | {a - b:+.2f} | {c:.1f} |")
    return "\n".join(lines)


def main(cli_args: list[str]) -> int:
    import ray

    from tir.cluster import init_ray
    from tir.data.degradations import parse_combos
    from tir.data.synth import list_sources, synthesize
    from tool_pool.pool import make_pool
    from tool_pool.tools import tools_for_subtask

    recipe, overrides = split_cli_overrides(cli_args)
    cfg = load_recipe(recipe or "tiny_cpu", overrides)
    out_dir = Path(cfg.run.output_dir) / "demo"
    save_resolved(cfg, out_dir)
    print(f"[demo] recipe resolved -> {out_dir / 'config.yaml'}")

    combos = parse_combos(",".join(cfg.data.test_combos))
    batch = synthesize(list_sources(cfg.data.hq), combos, per_image=1, seed=cfg.run.seed, crop=cfg.data.crop)
    print(f"[demo] {len(batch)} degraded samples ({len(combos)} combinations) from {cfg.data.hq!r}")

    init_ray(cfg.ray)
    started = time.perf_counter()
    pool = make_pool(cfg.pool)
    print(f"[demo] tool pool ({cfg.pool.backend}) ready in {time.perf_counter() - started:.1f}s")
    available = set(asyncio.run(pool.available_tools()))
    tools_by_subtask = {
        s: [t.name for t in tools_for_subtask(s) if t.name in available] for s in set(SUBTASK_FOR_DEGRADATION.values())
    }

    started = time.perf_counter()
    results = asyncio.run(restore_all(pool, batch, tools_by_subtask, ["psnr", "ssim"]))
    seconds = time.perf_counter() - started
    restored, chosen, calls, before, after = map(list, zip(*results))
    batch = (
        batch.with_column("restored", restored)
        .with_column("tools", chosen)
        .with_column("tool_calls", calls)
        .with_column("before", before, kind="json")
        .with_column("after", after, kind="json")
        .with_meta(config_hash=config_hash(cfg))
    )
    batch.to_parquet(out_dir / "restored.parquet")
    table = report_table(batch)
    stats = asyncio.run(pool.stats())
    (out_dir / "report.md").write_text(f"# Greedy oracle restoration through the tool pool\n\n{table}\n")
    print(table)
    total_calls = sum(row["calls"] for name, row in stats.items() if name.startswith("tool:"))
    mean_batch = np.mean([row["mean_batch"] for row in stats.values()])
    print(
        f"[demo] {len(batch)} images in {seconds:.1f}s; {total_calls} tool calls through the pool, mean batch {mean_batch:.2f}"
    )
    print(f"[demo] wrote {out_dir / 'restored.parquet'} and {out_dir / 'report.md'}")
    ray.shutdown()
    return 0
