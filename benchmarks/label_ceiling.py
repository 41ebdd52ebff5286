"""How far a policy that acts on the perceived degradations alone can get: the ceiling RL works under.

    .venv/bin/python benchmarks/label_ceiling.py --train runs/rl_data/bsds_train.parquet --train-limit 320 \
        --test runs/quickstart/data/test.parquet [--test runs/eval_pub/kodak24_A.parquet ...] [--recipe quickstart] \
        [--max-calls 2] [--out runs/label_ceiling]

Every schedule of at most ``--max-calls`` distinct tools of the recipe's toolbox (65 for 8 tools and
2 calls, the empty one included) is replayed through the env on every crop and scored (PSNR
against HQ, as ``tir eval`` scores). Each crop is also perceived as the policy's observation
perceives it (the recipe's ``model.perception``). Printed per test set:

- the per-crop oracle: the best schedule of each crop (knows HQ; the toolbox's ceiling at this
  length);
- the label-conditioned ceiling: for each perceived set, the schedule with the best mean PSNR on
  the TRAINING crops perceived the same way, applied to the test crops. A policy whose every
  decision is a function of the perceived set, trained perfectly on that distribution, reaches
  this; a set never seen in training gets the best schedule over all training crops;
- the same chosen on the test crops themselves (optimistic: it fits the test set);
- the true-label ceiling: the same with the TRUE degradations in place of the perceived ones, i.e.
  a policy with perfect perception that still picks one schedule per combination. A goal above
  it needs a policy that decides per photo from the pixels, not better perception.

A policy that acts on the perceived set only, not on the pixels, cannot beat its ceiling by
much; an RL gain above SFT is bounded by the distance between the two. The policy also perceives
again after each call, so its true ceiling can be a little higher than this static one.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import tir  # noqa: E402, F401  - shims before transformers


def schedules_of(tools: list[str], max_calls: int) -> list[tuple[str, ...]]:
    """Every sequence of at most ``max_calls`` distinct tools, shortest first."""
    return [s for n in range(max_calls + 1) for s in itertools.permutations(tools, n)]


def schedule_table(cfg, path: str, limit: int, max_calls: int) -> dict:
    """PSNR [crop, schedule] and the perceived set of each crop of the ``tir data synth`` file."""
    from efficiency import ReplayAgent

    from tir.agent.perceive import Perception
    from tir.data.synth import read_synth
    from tir.eval.agents import EvalSettings, evaluate_agents
    from tool_pool.client import LocalPool

    test = read_synth(path)
    if limit and len(test) > limit:
        test = test.take(sorted(np.random.default_rng(0).choice(len(test), limit, replace=False).tolist()))
    tools = list(cfg.pool.tools)
    pool = LocalPool(tools)  # schedules share their prefixes: the result cache computes each once
    perception = Perception.from_recipe(cfg.model)

    async def perceive():
        return [tuple(await perception.degradations(lq, pool)) for lq in test.column("lq")]

    seen = asyncio.run(perceive())
    schedules = schedules_of(tools, max_calls)
    settings = EvalSettings.from_recipe(cfg, metrics=("psnr",), concurrency=2, progress=False)
    print(f"{path}: {len(test)} crops x {len(schedules)} schedules ...", flush=True)
    agents = {f"s{k}": ReplayAgent([list(s)] * len(test)) for k, s in enumerate(schedules)}
    report = evaluate_agents(agents, test, pool, settings=settings)
    table = np.zeros((len(test), len(schedules)))
    for row in report["rows"]:
        table[row["index"], int(row["agent"][1:])] = row["scores"]["psnr"]
    true = [tuple(sorted(labels)) for labels in test.column("degradations")]
    return {"table": table, "seen": seen, "true": true, "schedules": schedules}


def best_per_set(table: np.ndarray, seen: list[tuple]) -> dict[tuple, int]:
    """For each perceived set, the schedule with the best mean PSNR over the crops perceived so."""
    groups = collections.defaultdict(list)
    for index, labels in enumerate(seen):
        groups[labels].append(index)
    return {labels: int(table[rows].mean(axis=0).argmax()) for labels, rows in groups.items()}


def apply(choice: dict[tuple, int], fallback: int, table: np.ndarray, seen: list[tuple]) -> float:
    return float(np.mean([table[i, choice.get(labels, fallback)] for i, labels in enumerate(seen)]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="a `tir data synth` Parquet of training crops")
    parser.add_argument("--train-limit", type=int, default=320, help="training crops, drawn with seed 0 (0: all)")
    parser.add_argument("--test", action="append", required=True, help="a `tir data synth` Parquet (repeatable)")
    parser.add_argument("--test-limit", type=int, default=0, help="test crops per file, drawn with seed 0 (0: all)")
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--max-calls", type=int, default=2)
    parser.add_argument("--out", default="runs/label_ceiling")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.max_calls < 0:
        parser.error(f"--max-calls must be >= 0, got {args.max_calls}")

    from tir.config import load_recipe

    cfg = load_recipe(args.recipe, args.overrides)
    started = time.perf_counter()
    train = schedule_table(cfg, args.train, args.train_limit, args.max_calls)
    choice = best_per_set(train["table"], train["seen"])
    true_choice = best_per_set(train["table"], train["true"])
    fallback = int(train["table"].mean(axis=0).argmax())
    print(f"training crops: {len(train['seen'])}, {len(choice)} perceived sets ({time.perf_counter() - started:.0f}s)")
    results = {}
    for path in args.test:
        test = schedule_table(cfg, path, args.test_limit, args.max_calls)
        table, seen = test["table"], test["seen"]
        results[path] = {
            "crops": len(seen),
            "per_crop_oracle": float(table.max(axis=1).mean()),
            "label_ceiling": apply(choice, fallback, table, seen),
            "label_ceiling_fit_on_test": apply(best_per_set(table, seen), fallback, table, seen),
            "true_label_ceiling": apply(true_choice, fallback, table, test["true"]),
            "unseen_sets_crops": sum(labels not in choice for labels in seen),
            "no_call": float(table[:, 0].mean()),
        }
        r = results[path]
        print(
            f"{path}: {r['crops']} crops; no call {r['no_call']:.2f} dB; label-conditioned ceiling "
            f"{r['label_ceiling']:.2f} (chosen on the test crops: {r['label_ceiling_fit_on_test']:.2f}; "
            f"{r['unseen_sets_crops']} crops with a set unseen in training); told the true degradations "
            f"{r['true_label_ceiling']:.2f}; per-crop oracle {r['per_crop_oracle']:.2f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = {
        "|".join(labels) or "(none)": " -> ".join(train["schedules"][k]) or "(stop)" for labels, k in choice.items()
    }
    told = {"|".join(labels): " -> ".join(train["schedules"][k]) or "(stop)" for labels, k in true_choice.items()}
    summary = {"results": results, "choice": table, "choice_told_the_truth": told}
    (out / "label_ceiling.json").write_text(json.dumps(summary, indent=1))
    print(f"(the chosen schedule per perceived set: {out / 'label_ceiling.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
