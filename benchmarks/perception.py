"""Perception on photos nothing was trained on: the cue thresholds vs the learned recogniser.

    python benchmarks/perception.py --photos /data/Kodak24 --photos /data/McMaster [--recognizer DIR] [--gap] [--groups A,B]

Test crops are made as ``tir data synth`` makes them (128 px centre crops, seed 7, one per photo
and combination) from the two built-in held-out photos (chelsea, stereo_motorcycle) and from
each ``--photos`` folder (a public test set: evaluation only). For group A, B, C and the
out-of-domain combinations it prints each perception's exact-set accuracy (the guessed set equals
the true one) and per-degradation precision / recall.

``--gap`` also measures what perception costs in restoration: the fixed-order baseline (MAIR's
order prior, one tool per subtask) on the group-A crops, told the true degradations vs perceiving
them with each perception, PSNR against HQ through the same pool (``tir eval``'s code);
``--exhaustive`` adds the exhaustive baseline (slower: every tool of each subtask). ``--gap`` ends
with what each fixed tool gains where its degradation is truly there (groups A-C): the gap is what
perception costs this baseline, and a tool that loses even when it is right (Wiener deconvolution
of defocus blur beside JPEG) makes a missed degradation cheap and a false one dear.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

import tir  # noqa: F401 - environment shims first
from tir.data.degradations import NAMES
from tir.data.perception import likely_degradations, measure_cues
from tir.data.recognizer import load_recognizer, set_scores
from tir.data.synth import list_sources, synthesize
from tir.protocol import Batch

HELD_OUT = ("chelsea", "stereo_motorcycle")
GROUPS = {"A": "groupA", "B": "groupB", "C": "groupC", "ood": "ood"}


def test_crops(photos: str, group: str, seed: int, crop: int) -> Batch:
    sources = [s for s in list_sources("builtin") if s.image_id in HELD_OUT] if photos == "builtin" else photos
    return synthesize(sources, group, per_image=1, seed=seed, crop=crop, progress=False)


def after_first_call(test: Batch) -> tuple[list[np.ndarray], list[list[str]]]:
    """Each crop after the fixed-order baseline's first tool call, and the degradations it leaves:
    what an agent perceives at its second turn."""
    from tir.agent.baselines import restoration_order

    images, truth = [], []
    for lq, degradations in zip(test.column("lq"), test.column("degradations")):
        order = restoration_order(list(degradations))
        images.append(fixed_order_output(lq, order[:1]))
        truth.append(order[1:])
    return images, truth


def perception_table(test: Batch, recognizer, after_one_call: bool = False) -> dict[str, dict]:
    truth = [list(d) for d in test.column("degradations")]
    images = test.column("lq")
    if after_one_call:
        images, truth = after_first_call(test)
    thresholds = [likely_degradations(measure_cues(image)) for image in images]
    learned = [recognizer.degradations(image, after_one_call) for image in images]
    return {"thresholds": set_scores(thresholds, truth), "learned": set_scores(learned, truth)}


def print_scores(source: str, group: str, scores: dict[str, dict]) -> None:
    for name, score in scores.items():
        cells = []
        for degradation in NAMES:
            per = score["per_degradation"][degradation]
            if per["support"]:
                p = "-" if per["precision"] is None else f"{per['precision']:.2f}"
                cells.append(f"{degradation} {p}/{per['recall']:.2f}")
        print(f"| {source} | {group} | {name} | {score['samples']} | {score['exact_set']:.1%} | {', '.join(cells)} |")


def perception_gap(test: Batch, checkpoint: str, exhaustive: bool) -> None:
    from tir.agent.perceive import Perception
    from tir.eval.agents import EvalSettings, evaluate_agents_async
    from tool_pool.client import LocalPool

    agents = ["fixed_order", "exhaustive"] if exhaustive else ["fixed_order"]
    runs = {
        "told the true degradations": ("known", Perception()),
        "perceived: cue thresholds": ("perceived", Perception("thresholds")),
        "perceived: learned recogniser": ("perceived", Perception("learned", checkpoint)),
    }
    print(f"\nPerception gap: group-A crops ({len(test)}), PSNR against HQ (mean ± std), tool calls per image")
    print("| agent | degradations | PSNR | calls |\n|---|---|---|---|")
    rows = {}
    for label, (how, perception) in runs.items():
        settings = EvalSettings(
            metrics=("psnr",), baseline_degradations=how, perception=perception, progress=False, seed=0
        )
        report = asyncio.run(evaluate_agents_async(agents, test, LocalPool(), settings))
        rows[label] = [row for row in report["rows"] if row["agent"] == "fixed_order"]
        for agent in agents:
            overall = report["aggregates"][agent]["overall"]
            psnr, calls = overall["psnr"], overall["tool_calls"]
            print(f"| {agent} | {label} | {psnr['mean']:.2f} ± {psnr['std']:.2f} | {calls['mean']:.2f} |")
    print_gap_sources(rows["told the true degradations"], rows["perceived: learned recogniser"], len(test))


def print_gap_sources(known: list[dict], perceived: list[dict], crops: int, top: int = 6) -> None:
    """Where the learned guess loses: the fixed order's dB below its told-the-truth run, summed by
    combination and divided by all crops, so the shares add up to the gap."""
    lost: dict[str, list[float]] = {}
    for truth, guess in zip(sorted(known, key=lambda r: r["index"]), sorted(perceived, key=lambda r: r["index"])):
        drop = (truth["scores"].get("psnr") or 0.0) - (guess["scores"].get("psnr") or 0.0)
        lost.setdefault(truth["combo"] or "+".join(truth["degradations"]), []).append(drop)
    from scipy.stats import bootstrap

    drops = [d for per_combo in lost.values() for d in per_combo]
    interval = bootstrap((drops,), np.mean, n_resamples=2000, random_state=0).confidence_interval
    print(
        f"\nThe learned guess's gap: {np.mean(drops):.2f} dB, 95% interval {interval.low:.2f}-{interval.high:.2f}"
        " (bootstrap over the crops): how far another draw of crops from these photos could move it."
    )
    print(f"\nWhere the learned guess loses (fixed order; share of the gap over all {crops} crops):")
    print("| combination | crops with a loss > 0.1 dB | dB lost, share of the gap |\n|---|---|---|")
    for combo, drops in sorted(lost.items(), key=lambda item: -sum(item[1]))[:top]:
        print(f"| {combo} | {sum(d > 0.1 for d in drops)} of {len(drops)} | {sum(drops) / crops:.3f} |")


def fixed_order_output(lq: np.ndarray, degradations: list[str]) -> np.ndarray:
    """``lq`` after the fixed-order baseline's tools for ``degradations`` (the tools themselves,
    in process: the same functions the pool serves)."""
    from tir.agent.baselines import FIXED_TOOLS, restoration_order
    from tir.data.degradations import SUBTASK_FOR_DEGRADATION
    from tool_pool.tools import get_tool

    for degradation in restoration_order(degradations):
        lq = get_tool(FIXED_TOOLS[SUBTASK_FOR_DEGRADATION[degradation]])([lq])[0]
    return lq


def print_tool_gains(tests: dict[str, Batch]) -> None:
    """What each fixed tool gains where its degradation is truly there: the fixed order told the
    truth, with and without that one step. A tool that loses here makes the perception gap reward
    missing its degradation, so the gap is a bound on what perception costs only for tools that gain."""
    from tir.agent.baselines import FIXED_TOOLS
    from tir.data.degradations import SUBTASK_FOR_DEGRADATION
    from tool_pool.scorers import get_scorer

    scorer = get_scorer("psnr")  # the pool's rule: an output left at 1/4 size is upscaled to be scored

    def psnr(degradations, lq, hq) -> float:
        return float(scorer.score([fixed_order_output(lq, degradations)], [hq])[0])

    gains: dict[str, dict[str, list[float]]] = {}
    for group, test in tests.items():
        for lq, hq, degradations in zip(test.column("lq"), test.column("hq"), test.column("degradations")):
            full = psnr(list(degradations), lq, hq)
            for name in degradations:
                rest = [d for d in degradations if d != name]
                gains.setdefault(name, {}).setdefault(group, []).append(full - psnr(rest, lq, hq))
    groups = list(tests)
    print("\nWhat each fixed tool gains where its degradation is truly there (fixed order told the truth, with")
    print("vs without that step; dB, mean over the crops that have it, count in brackets):")
    print("| degradation | fixed tool | " + " | ".join(f"group {g}" for g in groups) + " |")
    print("|---|---|" + "---|" * len(groups))
    for name in NAMES:
        if name in gains:
            cells = [
                f"{np.mean(gains[name][g]):+.2f} ({len(gains[name][g])})" if g in gains[name] else "-" for g in groups
            ]
            print(f"| {name} | {FIXED_TOOLS[SUBTASK_FOR_DEGRADATION[name]]} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", action="append", default=[], help="a folder of test photos (repeatable)")
    parser.add_argument("--recognizer", default=None, help="recogniser checkpoint folder (default: the shipped one)")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--gap", action="store_true", help="also measure the perception gap in dB (fixed order)")
    parser.add_argument("--exhaustive", action="store_true", help="with --gap: the exhaustive baseline too")
    parser.add_argument(
        "--groups",
        default=",".join(GROUPS),
        help=f"comma-separated, of {', '.join(GROUPS)} (default: all; --gap needs A)",
    )
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups or (args.gap and "A" not in groups):
        print(
            f"perception benchmark: error: --groups {args.groups}: expected a comma-separated subset of"
            f" {', '.join(GROUPS)}{' including A (--gap measures group A)' if args.gap else ''}",
            file=sys.stderr,
        )
        return 2
    for folder in args.photos:
        if not Path(folder).is_dir():
            print(f"perception benchmark: error: --photos {folder}: no such folder", file=sys.stderr)
            return 2
    recognizer = load_recognizer(args.recognizer)
    started = time.perf_counter()
    print("| photos | group | perception | crops | exact set | precision/recall per degradation |")
    print("|---|---|---|---|---|---|")
    by_group: dict[str, list[Batch]] = {}
    for source in ["builtin", *args.photos]:
        label = "built-in held-out" if source == "builtin" else Path(source).name
        for group, spec in ((g, GROUPS[g]) for g in groups):
            test = test_crops(source, spec, args.seed, args.crop)
            by_group.setdefault(group, []).append(test)
            print_scores(label, group, perception_table(test, recognizer))
            if group == "A":
                print_scores(label, "A, after 1 call", perception_table(test, recognizer, after_one_call=True))
    if args.gap:
        perception_gap(Batch.concat(by_group["A"]), args.recognizer or "default", args.exhaustive)
        print_tool_gains({group: Batch.concat(by_group[group]) for group in ("A", "B", "C") if group in by_group})
    print(f"\n({time.perf_counter() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
