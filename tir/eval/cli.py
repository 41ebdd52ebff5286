"""``tir eval``: the command line over ``tir.eval.agents.evaluate_agents``.

    tir eval --test data/test.parquet --agents identity,random,fixed_order,exhaustive,expert,sft=runs/x/sft/hf \
             --out runs/x/eval [--recipe tiny_cpu] [--limit N] [--seed 0] [--pool local] [--engine auto] [key=value ...]

Policies run on vLLM (all images in flight) or transformers: see ``tir.eval.policy``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from tir.eval.agent_specs import KNOWN_AGENTS, AgentSpec, EvalError, parse_agents
from tir.eval.agents import EvalSettings, evaluate_agents
from tir.eval.policy import ENGINES, engine_label, resolve_engine
from tir.paths import check_writable_folder
from tir.protocol import Batch


def subset(test: Batch, limit: int | None) -> Batch:
    """At most ``limit`` rows, spread evenly over the file (so every group keeps its share)."""
    if limit is None or limit >= len(test):
        return test
    if limit < 1:
        raise EvalError(f"--limit must be >= 1, got {limit}")
    return test.take(np.unique(np.linspace(0, len(test) - 1, limit).round().astype(int)).tolist())


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--test", required=True, help="test samples from `tir data synth` (.parquet file or shard folder)"
    )
    parser.add_argument(
        "--agents",
        default="identity,random,fixed_order,exhaustive,expert",
        help=f"comma-separated: {', '.join(KNOWN_AGENTS)}, policy checkpoint folders, NAME=CHECKPOINT",
    )
    parser.add_argument("--out", required=True, help="folder for report.md, eval.json and quality_vs_calls.png")
    parser.add_argument(
        "--recipe", default="tiny_cpu", help="recipe naming the pool, its tools, metrics, cues and rollout settings"
    )
    parser.add_argument("--limit", type=int, default=None, help="only N test rows, spread evenly over the file")
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the random agent and the policy's requests (default: run.seed)"
    )
    parser.add_argument(
        "--pool",
        choices=("recipe", "local", "serve"),
        default="recipe",
        help="the recipe's pool backend, or force one (local: no Ray)",
    )
    parser.add_argument(
        "--metrics", default=None, help="comma-separated pyiqa metrics (default: psnr, ssim and the reward's)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="episodes in flight per agent (default 1: clean per-image wall times; policies on vLLM: 16)",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="what runs policy checkpoints: vLLM, transformers (hf, the reference), or auto: vLLM when it is "
        "installed and the checkpoint is a local folder (default)",
    )
    parser.add_argument("--max-turns", type=int, default=None, help="turns per episode (default: rollout.max_turns)")
    parser.add_argument(
        "--baseline-degradations",
        choices=("perceived", "known"),
        default="perceived",
        help="what fixed_order/exhaustive are told: perceived from cues (as a policy), or the true ones",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="recipe overrides, e.g. pool.tools=[] model.perception_cues=false",
    )
    return parser


def eval_main(args: argparse.Namespace) -> int:
    from tir.config import RecipeError, load_recipe
    from tir.data.expert_run import open_pool
    from tir.data.synth import SynthReadError, read_synth

    try:
        overrides = list(args.overrides) + ([f"pool.backend={args.pool}"] if args.pool != "recipe" else [])
        cfg = load_recipe(args.recipe, overrides)
        if not Path(args.test).exists():
            raise EvalError(
                f"test set {args.test!r} does not exist; make one with `tir data synth --combos groupA,groupB,groupC --out {args.test}`"
            )
        specs = parse_agents(args.agents)
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise EvalError(f"--out {args.out!r} is a file; expected a folder")
        try:
            check_writable_folder(args.out, f"--out {args.out!r}")
        except ValueError as err:
            raise EvalError(str(err)) from None
        test = subset(read_synth(args.test), args.limit)
        metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip()) if args.metrics else None
        settings = EvalSettings.from_recipe(
            cfg,
            metrics=metrics,
            seed=args.seed,
            concurrency=args.concurrency,
            policy_concurrency=args.concurrency,
            engine=args.engine,
            max_turns=args.max_turns,
            baseline_degradations=args.baseline_degradations,
            progress=not args.no_progress,
        )
        for spec in specs.values():
            warn_if_trained_otherwise(spec, cfg)
            if spec.kind == "policy":
                engine, why = resolve_engine(args.engine, spec.path)
                print(f"tir eval: policy {spec.label} runs on the {engine_label(engine)} ({why})", file=sys.stderr)
    except (EvalError, RecipeError, FileNotFoundError, SynthReadError) as err:
        print(f"tir eval: error: {err}", file=sys.stderr)
        return 2
    pool, release = open_pool(cfg)
    try:
        meta = {
            "test": str(args.test),
            "recipe": str(args.recipe),
            "pool_backend": cfg.pool.backend,
            "limit": args.limit,
        }
        report = evaluate_agents(specs, test, pool, settings=settings, out_dir=args.out, meta=meta)
    except EvalError as err:
        print(f"tir eval: error: {err}", file=sys.stderr)
        return 2
    finally:
        release()
    print(report["markdown"])
    print(f"wrote {', '.join(report['files'].values())} ({report['meta']['wall_s']:.1f}s)")
    return 0


def warn_if_trained_otherwise(spec: AgentSpec, cfg) -> None:
    """A checkpoint next to its run's config.yaml: say when it saw other tools or cues than this
    evaluation offers (its tool calls would then be refused or its inputs unfamiliar)."""
    if spec.kind != "policy":
        return
    run_cfg = Path(spec.path).parent / "config.yaml"
    if not run_cfg.is_file():
        return
    from omegaconf import OmegaConf

    trained = OmegaConf.load(run_cfg)
    tools, cues = (
        OmegaConf.select(trained, "pool.tools", default=None),
        OmegaConf.select(trained, "model.perception_cues", default=None),
    )
    if tools is not None and list(tools) != list(cfg.pool.tools):
        print(
            f"tir eval: warning: {spec.label} was trained with pool.tools={list(tools) or 'all'}, this evaluation offers "
            f"{list(cfg.pool.tools) or 'all'} (override pool.tools=... to match)",
            file=sys.stderr,
        )
    if cues is not None and bool(cues) != bool(cfg.model.perception_cues):
        print(
            f"tir eval: warning: {spec.label} was trained with model.perception_cues={bool(cues)}, this evaluation uses "
            f"{bool(cfg.model.perception_cues)}",
            file=sys.stderr,
        )
    tool_prompt = OmegaConf.select(trained, "model.tool_prompt", default=None)
    if tool_prompt is not None and str(tool_prompt) != str(cfg.model.tool_prompt):
        print(
            f"tir eval: warning: {spec.label} was trained with model.tool_prompt={tool_prompt}, this evaluation uses "
            f"{cfg.model.tool_prompt}",
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> int:
    """``python -m tir.eval.cli ...``."""
    return eval_main(
        add_eval_arguments(
            argparse.ArgumentParser(
                prog="tir eval",
                description="Any agent on a test set, through the same env and pool, scored against HQ.",
            )
        ).parse_args(argv)
    )


if __name__ == "__main__":
    sys.exit(main())
