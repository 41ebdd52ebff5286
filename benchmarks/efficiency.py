"""The trained agent against exhaustive traversal: tool calls, wall time and quality per image.

    .venv/bin/python benchmarks/efficiency.py [--checkpoint runs/x/rl/hf] [--test data/test.parquet]
        [--limit 16] [--recipe tiny_cpu] [--pool local] [--engine hf|vllm] [--concurrency N] [--rl-step]
        [key=value ...]

Both agents run through ``tir.eval.agents`` on the same test rows, env and pool, ``--concurrency``
episodes in flight (default 1: clean per-image wall times): the trained policy (greedy, on
``--engine``) and the exhaustive baseline (AgenticIR-like: every tool of each perceived subtask,
keep the best by a no-reference score, roll back and retry). Prints calls, seconds and PSNR/SSIM
per image (mean ± std), the whole set's time per image (first start to last end: the throughput
with episodes in flight; engine start-up excluded) and the ratios exhaustive / trained for calls
and time: the paper's claim is "no redundant tool executions", >2.5x faster than training-free
agents. The pool's result cache is off (``pool.cache_bytes=0``; an override turns it on): the
stand-in's replay, or the second agent, would otherwise be served the search's or the first
agent's calls from it.

Without ``--checkpoint`` the "trained" agent is a STAND-IN, labelled ``expert-replay
(stand-in)``: the expert search's schedule (it knows the degradations and the HQ photo; its
search is run first and not timed) replayed call by call through the env: what a policy that
had learnt the expert perfectly would spend. Its ratios bound what training can reach; they
measure no trained model.

``--rl-step``: one full RL step (``tir.trainer.rl.train_rl`` with ``trainer.total_steps=1``, its
own per-phase timer from ``metrics.jsonl``), once with the shared model-call pool (Ray Serve)
and once with tools loaded in the driver (``pool.backend=local``, the ``ablation_no_pool``
recipe's setting); prints the step's time per phase and the ratio. Needs Ray and a policy
(``model.path``); heavy on a 2-core machine (two Ray runs of a few minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import tir  # noqa: F401  - shims before transformers

STAND_IN = "expert-replay (stand-in)"


class ReplayAgent:
    """Replays a fixed tool schedule per episode (row), then answers: the baselines' interface."""

    name = "expert_replay"
    needs_degradations = False

    def __init__(self, schedules: list[list[str]]):
        self.schedules = schedules

    async def act(self, env, degradations, episode: int = 0) -> None:
        from tir.agent import prompts

        for tool in self.schedules[episode]:
            if env.done:
                break
            await env.step(prompts.ToolCall(tool, {}))
        if not env.done:
            await env.finish()


def expert_schedules(test, pool, settings) -> list[list[str]]:
    """The expert search's schedule of every row (not timed: the stand-in's cost is the replay)."""
    from dataclasses import replace

    from tir.eval.agents import expert_episodes

    async def search():
        return await expert_episodes(pool, test, replace(settings, progress=False), None)

    return [episode["tools"] for episode in asyncio.run(search())]


def summary_line(label: str, cells: dict) -> str:
    def fmt(cell, digits):
        return "n/a" if cell["mean"] is None else f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"

    return (
        f"{label:>26}  calls/img {fmt(cells['tool_calls'], 2):>14}  s/img {fmt(cells['wall_s'], 3):>15}  "
        f"PSNR {fmt(cells['psnr'], 2):>14}  SSIM {fmt(cells['ssim'], 3):>14}"
    )


def agents_benchmark(args, cfg, pool, agent_tools) -> dict:
    from dataclasses import replace

    from tir.data.synth import read_synth, synthesize
    from tir.eval.agent_specs import parse_agent
    from tir.eval.agents import EvalSettings, evaluate_agents
    from tir.eval.cli import subset

    if args.test:
        test = read_synth(args.test)
    else:
        test = synthesize(
            cfg.data.hq, "groupA,groupB,groupC", per_image=1, seed=cfg.run.seed, crop=cfg.data.crop, progress=False
        )
    test = subset(test, args.limit)
    settings = EvalSettings.from_recipe(
        cfg,
        metrics=("psnr", "ssim"),
        concurrency=args.concurrency,
        policy_concurrency=args.concurrency,
        engine=args.engine,
        progress=not args.no_progress,
    )
    settings = replace(settings, tools=agent_tools)
    if args.checkpoint:
        trained_label, trained = "trained", parse_agent(args.checkpoint, "trained")
    else:
        started = time.perf_counter()
        trained_label, trained = STAND_IN, ReplayAgent(expert_schedules(test, pool, settings))
        print(
            f"no --checkpoint: the trained agent is a STAND-IN, the expert search's schedule replayed "
            f"(search, not timed: {time.perf_counter() - started:.1f}s)"
        )
    meta = {"benchmark": "efficiency", "test": args.test or "synthesized groupA,groupB,groupC"}
    if args.exhaustive_toolbox == "same":
        runs = [({trained_label: trained, "exhaustive": "exhaustive"}, settings, args.out)]
    else:  # exhaustive tries every tool the pool serves; the trained agent keeps the tools it was trained with
        out = Path(args.out)
        runs = [
            ({trained_label: trained}, settings, out / "trained"),
            ({"exhaustive": "exhaustive"}, replace(settings, tools=None), out / "exhaustive"),
        ]
    overall, spans, tools = {}, {}, {}
    for agents, run_settings, out_dir in runs:
        report = evaluate_agents(agents, test, pool, settings=run_settings, out_dir=out_dir, meta=meta)
        for label in agents:
            overall[label] = report["aggregates"][label]["overall"]
            spans[label] = report["meta"]["episodes_s"][label] / len(test)
            tools[label] = report["meta"]["tools"]
        print(f"(report: {report['files']['markdown']})")
    mine, theirs = overall[trained_label], overall["exhaustive"]
    groups = ", ".join(f"{g} {c['images']}" for g, c in report["aggregates"]["exhaustive"].items() if g != "overall")
    print(
        f"\n{len(test)} images ({groups}); tools: {trained_label} {len(tools[trained_label])}, exhaustive "
        f"{len(tools['exhaustive'])}; exhaustive told the degradations its cues perceive"
    )
    print(summary_line(trained_label, mine))
    print(summary_line("exhaustive", theirs))
    ratios = {
        "calls": _ratio(theirs["tool_calls"]["mean"], mine["tool_calls"]["mean"]),
        "time": _ratio(theirs["wall_s"]["mean"], mine["wall_s"]["mean"]),
        "set_time": _ratio(spans["exhaustive"], spans[trained_label]),
        "psnr_diff_db": mine["psnr"]["mean"] - theirs["psnr"]["mean"],
    }
    calls = f"x{ratios['calls']:.2f}" if np.isfinite(ratios["calls"]) else f"n/a ({trained_label} made no tool call)"
    print(
        f"whole set, {args.concurrency} episode(s) in flight: {trained_label} {spans[trained_label]:.3f} s/img, "
        f"exhaustive {spans['exhaustive']:.3f} s/img (engine start-up and scoring excluded)"
    )
    print(
        f"exhaustive / {trained_label}: tool calls {calls}, wall time per episode x{ratios['time']:.2f}, "
        f"whole set x{ratios['set_time']:.2f}; PSNR {trained_label} - exhaustive: {ratios['psnr_diff_db']:+.2f} dB"
    )
    return {
        "overall": overall,
        "ratios": ratios,
        "set_s_per_image": spans,
        "tools": tools,
        "images": len(test),
        "concurrency": args.concurrency,
        "stand_in": not args.checkpoint,
    }


def _ratio(a: float, b: float) -> float:
    return float("inf") if not b else a / b


def rl_step_benchmark(args) -> dict:
    """One RL step with the shared pool vs tools in the driver; its phases from metrics.jsonl."""
    import ray

    from tir.config import load_recipe
    from tir.trainer.rl import train_rl

    results = {}
    for backend in ("serve", "local"):
        out = Path(args.out) / f"rl_step_{backend}"
        # one training set for both runs (synthesized by the first when absent); later overrides win
        overrides = [
            f"data.train_path={Path(args.out) / 'rl_step_train.parquet'}",
            "actor.warmup_steps=0",  # one step: a recipe's LR warm-up (the quickstart's: 5) cannot fit in it
            *args.overrides,
            f"pool.backend={backend}",
            "trainer.total_steps=1",
            "trainer.resume=never",
            "trainer.dump_rollouts=false",
            f"run.output_dir={out}",
        ]
        cfg = load_recipe(args.recipe, overrides)
        from tir.cluster import init_ray

        init_ray(cfg.ray)
        started = time.perf_counter()
        try:
            train_rl(cfg)
        finally:
            ray.shutdown()
        total = time.perf_counter() - started
        record = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines() if line.strip()][
            -1
        ]
        phases = {k.removeprefix("time/"): v for k, v in record.items() if k.startswith("time/")}
        results[backend] = {"run_s": total, **phases}
        print(
            f"RL step, pool {backend:>5}: step {phases.get('step', float('nan')):.2f}s (rollout {phases.get('rollout', float('nan')):.2f}s, "
            f"tools busy {phases.get('tools', float('nan')):.2f}s, score {phases.get('score', float('nan')):.2f}s); whole run incl. setup {total:.1f}s"
        )
    serve, local = results["serve"].get("step"), results["local"].get("step")
    if serve and local:
        print(f"step time, tools in the driver / shared pool: x{local / serve:.2f}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", default=None, help="the trained policy (HF folder); none: the expert-replay stand-in"
    )
    parser.add_argument(
        "--test", default=None, help="a `tir data synth` Parquet (default: groupA-C of the builtin photos, synthesized)"
    )
    parser.add_argument("--limit", type=int, default=16, help="test rows, spread evenly (default 16)")
    parser.add_argument("--recipe", default="tiny_cpu")
    from tir.eval.policy import ENGINES

    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="hf",
        help="what runs the trained policy (default hf, transformers; vllm: many episodes in flight)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="episodes in flight for both agents (default 1: clean per-image wall times; the whole set's time "
        "per image is the throughput either way)",
    )
    parser.add_argument(
        "--pool",
        choices=("recipe", "local", "serve"),
        default="local",
        help="pool of the agent comparison (default local: no Ray)",
    )
    parser.add_argument("--out", default="runs/efficiency", help="where the evaluation report (and the RL runs) go")
    parser.add_argument(
        "--rl-step",
        action="store_true",
        help="also time one full RL step: shared pool vs tools in the driver (Ray; minutes)",
    )
    parser.add_argument(
        "--exhaustive-toolbox",
        choices=("same", "all"),
        default="same",
        help="same: exhaustive gets the recipe's tools, as the trained agent; all: every tool the pool serves "
        "(the registry's weight-free tools and pool.manifest's), as a training-free agent would",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    args = parser.parse_args(argv)

    from tir.config import load_recipe
    from tir.data.expert_run import open_pool

    # the result cache off unless asked for: the stand-in's replay, or the second agent, would be
    # served the search's or the first agent's calls from it
    overrides = [
        "pool.cache_bytes=0",
        *args.overrides,
        *([f"pool.backend={args.pool}"] if args.pool != "recipe" else []),
    ]
    cfg = load_recipe(args.recipe, overrides)
    agent_tools = tuple(cfg.pool.tools) or None
    if args.exhaustive_toolbox == "all":  # the pool serves every tool (and the manifest's); the agent keeps its own
        cfg = load_recipe(args.recipe, [*overrides, "pool.tools=[]"])
    pool, release = open_pool(cfg)
    try:
        results = {"agents": agents_benchmark(args, cfg, pool, agent_tools)}
    finally:
        release()
    if args.rl_step:
        results["rl_step"] = rl_step_benchmark(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "efficiency.json").write_text(
        json.dumps(results, indent=1, default=lambda v: v.item() if isinstance(v, np.generic) else str(v))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
