"""The model card ``tir perception train`` writes beside a recogniser checkpoint (README.md)."""

from __future__ import annotations

from collections.abc import Sequence

from tir.data.degradations import NAMES


def model_card(
    args,
    command: str,
    ids: Sequence[str],
    heldout_ids: Sequence[str],
    validation_ids: Sequence[str],
    scores: dict,
    seconds: float,
    crop_sides: Sequence[int],
    kind_weights: dict[str, int],
) -> str:
    lines = [
        "# Model card: degradation recogniser",
        "",
        f"A small MLP{' ensemble' if getattr(args, 'members', 1) > 1 else ''} over image statistics (tir/data/recognizer_features.py) that names which of the eight",
        "degradations a photo shows (multi-label).",
        "",
        "## Command (the project's own)",
        "",
        f"    {command}",
        "",
        f"## Seed: {args.seed}",
        "",
        f"{args.samples} synthetic training examples ({', '.join(map(str, crop_sides))} px crops, flips, mild exposure/colour",
        f"changes; kinds weighted {kind_weights}){restored_note(args.restored)}; {args.steps} AdamW steps, hidden {args.hidden}{members_note(args)};",
        f"wall time {seconds / 60:.1f} min on this machine.",
        "",
        "## Data source",
        "",
        f"- training photos: {len(ids)} from {', '.join(args.hq)} (validation, for the thresholds: {len(validation_ids)} of them)",
        f"- held-out photos (never trained on): {', '.join(heldout_ids) if heldout_ids else 'none'}",
        "",
        "## Held-out scores (128 px crops of the held-out photos)",
        "",
        "| set | crops | exact set | " + " | ".join(NAMES) + " |",
        "|---|---|---|" + "---|" * len(NAMES),
    ]
    for label, score in scores.items():
        cells = []
        for name in NAMES:
            p, r = score["per_degradation"][name]["precision"], score["per_degradation"][name]["recall"]
            cells.append("-" if r is None else f"{'-' if p is None else f'{p:.2f}'}/{r:.2f}")
        lines.append(f"| {label} | {score['samples']} | {score['exact_set']:.1%} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cells: precision/recall. `benchmarks/perception.py` compares it with the cue thresholds on public test sets.",
    ]
    if "A, partly restored" in scores:
        lines.append(
            '"A, partly restored": the same kind of crops after a tool for some of their degradations; the truth is'
            f" the degradations left ({'trained on such examples' if args.restored else 'not trained on them: --restored is 0'})."
        )
    return "\n".join(lines) + "\n"


def members_note(args) -> str:
    members = getattr(args, "members", 1)
    return f", {members} MLPs from seeds {args.seed}-{args.seed + members - 1} (logits averaged)" if members > 1 else ""


def restored_note(count: int) -> str:
    return f", plus {count} partly restored (a random weight-free tool for some of their degradations)" if count else ""
