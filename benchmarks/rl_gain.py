"""What GRPO adds to its SFT start: from one SFT checkpoint, K RL steps for each of several seeds,
each RL policy evaluated greedily on held-out photos next to the SFT policy and the expert search
(the ceiling of the toolbox: it knows the degradations and the HQ photo).

    .venv/bin/python benchmarks/rl_gain.py --recipe quickstart --sft runs/quickstart/sft/hf \
        --steps 12 --seeds 0,1,2 --test-dir /work/photos/test/Kodak24 --out runs/rl_gain/default [key=value ...]

- ``--recipe``: the RL recipe (an ablation recipe compares settings; ``key=value`` overrides too,
  e.g. ``algo.dynamic_sampling=true rollout.temperature=1.5``). Its ``data.train_path`` is the RL
  training data; the expert's best score per training photo, for the logged gap, is read from
  ``sft.parquet`` beside it.
- ``--sft``: the SFT checkpoint every seed starts from; without it, ``<run.output_dir>/sft/hf``,
  made by the quickstart's stages 1-4 when missing.
- test sets: the recipe's held-out photos (``data.test_path``, or ``--test``), and, with
  ``--test-dir``, a folder of public photos nothing trains on (degraded as ``data.test_combos``,
  one centre crop per photo and combination, ``--test-dir-limit`` of them spread evenly).

Prints per test set the SFT and expert rows (evaluated once, cached in ``--cache`` by checkpoint
and test set), one row per seed (PSNR, its gain over SFT, SSIM, tool calls, the share of the
SFT -> expert gap closed) and the mean ± sample std over seeds; writes ``results.json`` and
``report.md`` into ``--out``. The SFT and expert rows are cached by checkpoint weights, test rows,
tools and perception, so settings compared against one checkpoint share them (the expert searched
with the reward metrics of the first run that evaluated it). The numbers depend on the CPU (float
reductions and thread counts): compare rows of one machine.

    .venv/bin/python benchmarks/rl_gain.py --out runs/rl_gain/default --report-only   # the table again
    .venv/bin/python benchmarks/rl_gain.py --compare runs/rl_gain/default,runs/rl_gain/dynamic  # a row per setting

On the 2-core CPU machine a seed of 12 quickstart steps takes ~2-4 min of RL (~80 s of it starting
the worker groups) and ~30 s of evaluation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

import tir  # noqa: F401  (environment shims first)

QUANTITIES = ("psnr", "ssim", "tool_calls")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument(
        "--sft", default=None, help="SFT checkpoint (default: <run.output_dir>/sft/hf, made if missing)"
    )
    parser.add_argument("--steps", type=int, default=None, help="RL steps per seed (default: trainer.total_steps)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--test", default=None, help="held-out test set (default: data.test_path)")
    parser.add_argument("--test-dir", default=None, help="a folder of public HQ photos nothing trains on")
    parser.add_argument("--test-dir-limit", type=int, default=48, help="test rows from --test-dir (spread evenly)")
    parser.add_argument("--out", default=None, help="results.json, report.md and each seed's run (required to run)")
    parser.add_argument("--cache", default="runs/rl_gain/cache", help="SFT and expert evaluations, reused")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--report-only", action="store_true", help="print report.md again from --out's results.json")
    parser.add_argument("--compare", default=None, help="comma-separated --out folders: one row per setting")
    args = parser.parse_args(argv)
    if args.compare:
        print(compare([json.loads((Path(f) / "results.json").read_text()) for f in args.compare.split(",")]))
        return 0
    if not args.out:
        parser.error("--out is required to run (or --compare a,b,c)")
    if args.report_only:
        text = report(json.loads((Path(args.out) / "results.json").read_text()))
        (Path(args.out) / "report.md").write_text(text)
        print(text)
        return 0

    from omegaconf import OmegaConf

    from tir.cluster import ray_session
    from tir.config import load_recipe

    cfg = load_recipe(args.recipe, args.overrides)
    check_held_out(cfg, args)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = int(args.steps or cfg.trainer.total_steps)
    with ray_session(cfg.ray):
        from tool_pool.pool import make_pool

        pool = make_pool(cfg.pool)
        sft = Path(args.sft) if args.sft else make_sft(cfg, pool)
        tests = test_sets(cfg, args)
        base = {name: baseline(cfg, pool, test, sft, name, Path(args.cache)) for name, test in tests.items()}
        runs = []
        for seed in seeds:
            run_cfg = OmegaConf.merge(
                cfg,
                {
                    "run": {"seed": seed, "output_dir": str(out / f"seed_{seed}")},
                    "model": {"path": str(sft)},
                    "trainer": {"total_steps": steps, "resume": "never", "save_every": steps, "dump_rollouts": False},
                },
            )
            runs.append(rl_seed(run_cfg, pool, tests, seed))
    results = {"recipe": args.recipe, "overrides": args.overrides, "sft": str(sft), "steps": steps}
    results.update({"baseline": base, "runs": runs})
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = report(results)
    (out / "report.md").write_text(text)
    print(text)
    return 0


# ---------------------------------------------------------------- pieces


def make_sft(cfg, pool) -> Path:
    """The quickstart's stages 1-4 (each skipped when its output exists): the SFT checkpoint."""
    from omegaconf import OmegaConf

    from tir.quickstart import make_data, make_expert, make_policy, run_stage_sft

    out = Path(cfg.run.output_dir)
    policy = make_policy(cfg, out / "tiny_policy")
    train, _ = make_data(cfg)
    expert = make_expert(cfg, pool, train)
    sft_cfg = OmegaConf.merge(cfg, {"model": {"path": str(policy)}, "sft": {"data_path": str(expert)}})
    return run_stage_sft(sft_cfg, out)


def check_held_out(cfg, args) -> None:
    """Before Ray starts: the held-out set must exist unless the quickstart's stages (run without
    ``--sft``) are about to make it."""
    path = Path(args.test or cfg.data.test_path)
    if (args.test or args.sft) and not path.exists():
        raise SystemExit(
            f"rl_gain: no held-out test set at {path} ({'--test' if args.test else 'the recipe data.test_path'}):"
            " pass --test, e.g. runs/quickstart/data/test.parquet, or run without --sft to make it"
        )


def test_sets(cfg, args) -> dict:
    """{"heldout": the recipe's held-out photos, "public": --test-dir's photos (when given)}."""
    from tir.data.synth import read_synth, synthesize
    from tir.eval.cli import subset

    sets = {"heldout": read_synth(args.test or cfg.data.test_path)}
    if args.test_dir:
        path = (
            Path(args.cache)
            / f"public_{Path(args.test_dir).name}_{'+'.join(cfg.data.test_combos)}_{cfg.data.crop}.parquet"
        )
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            every = synthesize(
                args.test_dir,
                ",".join(cfg.data.test_combos),
                per_image=1,
                seed=1,
                crop=cfg.data.crop,
                crop_mode="center",
                progress=False,
            )
            every.to_parquet(path)
        sets["public"] = subset(read_synth(path), args.test_dir_limit)
    return sets


def evaluate(cfg, pool, test, agents: str, folder: Path) -> dict:
    """{agent: {psnr, ssim, tool_calls, images}}: means over the test rows (tir.eval's agents)."""
    from tir.eval.agents import EvalSettings, evaluate_agents

    settings = EvalSettings.from_recipe(cfg, concurrency=4, progress=False)
    report = evaluate_agents(agents, test, pool, settings=settings, out_dir=folder)
    means = {}
    for agent in dict.fromkeys(row["agent"] for row in report["rows"]):
        rows = [r for r in report["rows"] if r["agent"] == agent]
        means[agent] = {
            "psnr": _mean([r["scores"].get("psnr") for r in rows]),
            "ssim": _mean([r["scores"].get("ssim") for r in rows]),
            "tool_calls": _mean([r.get("tool_calls") for r in rows]),
            "images": len(rows),
        }
    return means


def baseline(cfg, pool, test, sft: Path, name: str, cache: Path) -> dict:
    """The SFT policy and the expert search on one test set, cached by checkpoint and test rows."""
    digest = hashlib.sha1()
    for path in sorted(sft.glob("*.safetensors")) + sorted(sft.glob("*.bin")):
        digest.update(path.read_bytes())
    for image in test.column("lq"):
        digest.update(np.ascontiguousarray(image).tobytes())
    digest.update(json.dumps([list(cfg.pool.tools), cfg.model.perception, cfg.model.cue_style]).encode())
    path = cache / f"baseline_{name}_{digest.hexdigest()[:12]}.json"
    if path.exists():
        return json.loads(path.read_text())
    started = time.perf_counter()
    means = evaluate(cfg, pool, test, f"sft={sft},expert", cache / f"eval_{name}_{digest.hexdigest()[:12]}")
    print(f"[rl_gain] SFT and expert on {name} ({len(test)} images): {time.perf_counter() - started:.0f}s")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(means, indent=2))
    return means


def rl_seed(cfg, pool, tests: dict, seed: int) -> dict:
    """One seed: K RL steps from the SFT checkpoint (tir's trainer), then its greedy evaluation."""
    from tir.trainer.rl import train_rl

    started = time.perf_counter()
    summary = train_rl(cfg)
    train_s = time.perf_counter() - started
    hf = Path(summary["hf_checkpoint"])
    evals = {
        name: evaluate(cfg, pool, test, f"rl={hf}", hf.parent / f"eval_{name}")["rl"] for name, test in tests.items()
    }
    end = summary.get("end", {})
    log = {k: end[k] for k in ("reward/gap_to_expert_db", "advantage/flat_groups", "actor/entropy") if k in end}
    print(f"[rl_gain] seed {seed}: {train_s:.0f}s of RL, {time.perf_counter() - started - train_s:.0f}s of evaluation")
    return {"seed": seed, "train_s": train_s, "eval": evals, "log_end": log}


def _mean(values) -> float:
    kept = [float(v) for v in values if v is not None and np.isfinite(float(v))]
    return float(np.mean(kept)) if kept else float("nan")


def gap_closed(sft: float, rl: float, expert: float) -> float:
    """The share of the SFT -> expert PSNR gap RL closed (NaN when there is no gap)."""
    return (rl - sft) / (expert - sft) if expert - sft > 1e-9 else float("nan")


def _pm(values, fmt: str) -> str:
    """Mean ± sample std (the std unsigned)."""
    values = np.asarray(values, dtype=float)
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{fmt.format(values.mean())} ± {fmt.replace('+', '').format(std)}"


def report(results: dict) -> str:
    """Markdown: per test set, SFT and expert rows, a row per seed, and the mean ± std over seeds."""
    lines = [
        f"# RL gain: {results['recipe']} {' '.join(results['overrides'])} ({results['steps']} steps per seed)",
        "",
        f"SFT checkpoint: {results['sft']}",
    ]
    for name, base in results["baseline"].items():
        sft, expert = base["sft"], base["expert"]
        lines += [
            "",
            f"## {name} ({sft['images']} images)",
            "",
            "| agent | PSNR | ΔPSNR vs SFT | SSIM | tool calls | SFT→expert gap closed |",
            "|---|---|---|---|---|---|",
            f"| SFT | {sft['psnr']:.2f} | | {sft['ssim']:.4f} | {sft['tool_calls']:.2f} | |",
            f"| expert search | {expert['psnr']:.2f} | {expert['psnr'] - sft['psnr']:+.2f} | {expert['ssim']:.4f} | "
            f"{expert['tool_calls']:.2f} | 100% |",
        ]
        cols = {q: [] for q in ("psnr", "delta", "ssim", "tool_calls", "closed")}
        for run in results["runs"]:
            rl = run["eval"][name]
            closed = gap_closed(sft["psnr"], rl["psnr"], expert["psnr"])
            for key, value in (
                ("psnr", rl["psnr"]),
                ("delta", rl["psnr"] - sft["psnr"]),
                ("ssim", rl["ssim"]),
                ("tool_calls", rl["tool_calls"]),
                ("closed", closed),
            ):
                cols[key].append(value)
            lines.append(
                f"| RL seed {run['seed']} | {rl['psnr']:.2f} | {rl['psnr'] - sft['psnr']:+.2f} | {rl['ssim']:.4f} | "
                f"{rl['tool_calls']:.2f} | {closed:.0%} |"
            )
        if results["runs"]:
            lines.append(
                f"| **RL mean ± std** | {_pm(cols['psnr'], '{:.2f}')} | {_pm(cols['delta'], '{:+.2f}')} | "
                f"{_pm(cols['ssim'], '{:.4f}')} | {_pm(cols['tool_calls'], '{:.2f}')} | "
                f"{_pm(np.array(cols['closed']) * 100, '{:.0f}')}% |"
            )
            below = sum(d < 0 for d in cols["delta"])
            lines += [
                "",
                f"Seeds below SFT: {below} of {len(cols['delta'])}; worst ΔPSNR {min(cols['delta']):+.2f} dB.",
            ]
    lines += [
        "",
        "| seed | RL wall s | end of run: "
        + ", ".join(sorted({k for r in results["runs"] for k in r["log_end"]}))
        + " |",
    ]
    lines.append("|---|---|---|")
    for run in results["runs"]:
        logged = ", ".join(f"{v:.3f}" for _, v in sorted(run["log_end"].items()))
        lines.append(f"| {run['seed']} | {run['train_s']:.0f} | {logged} |")
    return "\n".join(lines) + "\n"


def compare(all_results: list[dict]) -> str:
    """One row per setting: ΔPSNR vs SFT (mean ± std over seeds) and seeds below SFT, per test set."""
    sets = list(all_results[0]["baseline"])
    head = "| setting | " + " | ".join(f"{name}: ΔPSNR | {name}: seeds < SFT | {name}: gap closed" for name in sets)
    lines = [head + " |", "|---" * (1 + 3 * len(sets)) + "|"]
    for results in all_results:
        cells = [" ".join(results["overrides"]) or "(recipe as is)"]
        for name in sets:
            base = results["baseline"][name]
            sft, expert = base["sft"]["psnr"], base["expert"]["psnr"]
            deltas = [run["eval"][name]["psnr"] - sft for run in results["runs"]]
            closed = [gap_closed(sft, sft + d, expert) * 100 for d in deltas]
            cells += [
                _pm(deltas, "{:+.2f}"),
                f"{sum(d < 0 for d in deltas)} of {len(deltas)}",
                _pm(closed, "{:.0f}") + "%",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
