"""How learnable are the expert's labels? The ceiling of first-call accuracy for each expert rule.

A policy sees the degraded photo (and, on CPU recipes, the perception guess), not the HQ photo,
so the best it can do is answer each observation with the label most often seen with it. This
script measures that ceiling on held-out photos from a `tir data expert` file (which keeps every
scored schedule in ``search_candidates``), for both expert rules:

- ``sample``: each sample's own best schedule (near ties to the conventional one);
- ``combination``: one order of subtasks per combination (``tir.data.expert_rules.combination_orders``);
- ``combination_tools``: one schedule of tools per combination (the same with one tool per subtask).

For each rule: the accuracy of a lookup table learned on the training photos, keyed by the true
combination (perfect perception) or by the perception guess (``tir.data.perception``), and what the
rule costs in PSNR/SSIM against each sample's best-scoring schedule.

    .venv/bin/python benchmarks/expert_labels.py runs/quickstart/data/sft.parquet
    .venv/bin/python benchmarks/expert_labels.py runs/ablation_neural_tools/data/sft.parquet \
        --manifest tool_pool/manifests/trained.yaml   # an expert file with neural tools
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tir.data import expert  # noqa: E402
from tir.data.perception import likely_degradations, measure_cues  # noqa: E402
from tir.protocol import Batch  # noqa: E402
from tir.trainer.sft import DEFAULT_HELDOUT  # noqa: E402
from tool_pool.tools import get_tool  # noqa: E402


def labels_by_rule(rows: list[dict], tie_margin: float) -> dict[str, list[list[str]]]:
    """{rule: each row's expert tools}, recomputed from the scored candidates."""
    subtask_of = {t: get_tool(t).subtask for r in rows for c in r["search_candidates"] for t in c["tools"]}
    tools_by_subtask = collections.defaultdict(list)
    for tool, subtask in sorted(subtask_of.items()):
        tools_by_subtask[subtask].append(tool)
    sample = []
    for r in rows:
        ranked = sorted(r["search_candidates"], key=lambda c: -c["quality"])
        schedules = [expert.Schedule(tuple(c["tools"]), (), None, c["scores"], c["quality"]) for c in ranked]
        sample.append(list(expert.pick_expert(schedules, tools_by_subtask, tie_margin).tools))
    searched = [{**r, "sample_expert_tools": tools} for r, tools in zip(rows, sample)]
    labels = {"sample": sample}
    for rule, by_tools in (("combination", False), ("combination_tools", True)):
        orders = expert.combination_orders(searched, subtask_of, by_tools)
        labels[rule] = [
            expert.choose_expert(r, orders[r["combo"]], tools_by_subtask, tie_margin, by_tools)[0] for r in searched
        ]
    return labels


def lookup_accuracy(keys: list[str], labels: list[str], train: np.ndarray) -> float:
    """Held-out accuracy of answering each key with its most frequent training label (keys never
    seen in training get the overall most frequent label)."""
    table = collections.defaultdict(collections.Counter)
    for key, label, is_train in zip(keys, labels, train):
        if is_train:
            table[key][label] += 1
    overall = collections.Counter(label for label, is_train in zip(labels, train) if is_train).most_common(1)[0][0]
    answers = [table[key].most_common(1)[0][0] if table[key] else overall for key in keys]
    held = ~train
    return float(np.mean([a == label for a, label, h in zip(answers, labels, held) if h]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("expert_file", help="output of `tir data expert` (needs search_candidates)")
    parser.add_argument("--heldout", default=",".join(DEFAULT_HELDOUT), help="comma-separated held-out photo ids")
    parser.add_argument("--tie-margin", type=float, default=1.0)
    parser.add_argument("--manifest", default=None, help="the manifest of the neural tools the expert file names")
    args = parser.parse_args(argv)
    if args.manifest:  # its tools must be registered to know their subtasks
        from tool_pool.neural import register_manifest

        register_manifest(args.manifest)

    batch = Batch.from_parquet(args.expert_file)
    rows = batch.select(["image_id", "combo", "lq", "search_candidates"]).rows()
    train = np.array([r["image_id"] not in set(args.heldout.split(",")) for r in rows])
    if train.all() or not train.any():
        parser.error(f"--heldout {args.heldout!r} must name some but not all photos of {args.expert_file}")
    guesses = ["+".join(likely_degradations(measure_cues(r["lq"]))) or "none" for r in rows]
    combos = [r["combo"] for r in rows]
    best = [max(r["search_candidates"], key=lambda c: c["quality"]) for r in rows]
    print(
        f"{args.expert_file}: {len(rows)} rows, {int((~train).sum())} held out ({args.heldout}); tie margin {args.tie_margin}"
    )
    print(
        f"perception guess names exactly the true degradations in {np.mean([set(g.split('+')) == set(c.split('+')) for g, c in zip(guesses, combos)]):.0%} of rows"
    )
    print(
        "| expert rule | first-call ceiling, perfect perception | first-call ceiling, perception guess | PSNR vs the search's best | SSIM vs the search's best |"
    )
    print("|---|---|---|---|---|")
    for rule, tools in labels_by_rule(rows, args.tie_margin).items():
        firsts = [t[0] if t else "answer" for t in tools]  # an expert with no call answers at once
        chosen = [next(c for c in r["search_candidates"] if c["tools"] == t) for r, t in zip(rows, tools)]
        cost = {
            m: np.mean([c["scores"].get(m, np.nan) - b["scores"].get(m, np.nan) for c, b in zip(chosen, best)])
            for m in ("psnr", "ssim")
        }
        print(
            f"| {rule} | {lookup_accuracy(combos, firsts, train):.0%} | {lookup_accuracy(guesses, firsts, train):.0%} "
            f"| {cost['psnr']:+.2f} dB | {cost['ssim']:+.4f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
