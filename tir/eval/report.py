"""What ``tir eval`` writes: per-group aggregates, a Markdown table, a JSON file and a quality-vs-cost plot.

- aggregates (``aggregate``): per agent and group (A, B, C, their union "A-C", ood, single, ...)
  and overall: mean, sample std and n of each metric and of the per-image counts.

- ``report.md``: the settings, a PSNR overview (agents x groups), then one full table per group:
  every metric, tool calls, turns, wall seconds and format errors per image, as mean ± std (n).
- ``eval.json``: the meta, the aggregates ({agent: {group: {quantity: {mean, std, n, missing}}}})
  and one row per (agent, image): scores of the final image and of the degraded input, calls,
  turns, the tools it kept, stop reason, wall seconds, errors.
- ``quality_vs_calls.png``: overall quality (PSNR, else the first metric) against tool calls per
  image, one point per agent, error bars one std.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# Metrics where lower is better (shown with a down arrow in the header).
LOWER_BETTER = {"lpips", "niqe", "piqe", "brisque", "gmsd", "dists"}
COUNT_HEADERS = {"tool_calls": "tool calls", "turns": "turns", "wall_s": "wall s", "format_errors": "format errors"}
# The test set's group column -> the group a report shows (ood2 and ood3 are both out of domain).
GROUP_NAMES = {
    "groupA": "A",
    "groupB": "B",
    "groupC": "C",
    "ood": "ood",
    "ood2": "ood",
    "ood3": "ood",
    "single": "single",
}
GROUP_ORDER = ("A", "B", "C", "A-C", "ood", "single", "custom", "overall")
# Per-image quantities besides the metrics, in table order.
COUNTS = ("tool_calls", "turns", "wall_s", "format_errors")


def render_markdown(report: dict, timing: bool = True) -> str:
    """The report as Markdown; ``timing=False`` leaves out wall times (the only column that
    differs between two runs of the same evaluation)."""
    meta, aggregates = report["meta"], report["aggregates"]
    metrics = meta["metrics"]
    lines = ["# Evaluation", ""]
    tools = (
        f"- tools offered: {', '.join(meta['tools'])}; perception cues: {'on' if meta['cues'] else 'off'}; "
        f"baselines' degradations: {meta['baseline_degradations']}"
    )
    lines += [
        f"- test set: {meta.get('test', '(in memory)')}, {meta['images']} images; seed {meta['seed']}; max turns {meta['max_turns']}",
        f"- metrics: {', '.join(metrics)} (against HQ; outputs smaller than HQ upscaled bicubically to its size first)",
        tools,
    ]
    lines += [f"- **{label}**: {text}" for label, text in meta["agents"].items()]
    lines += [
        "",
        "Cells: mean ± std (sample std over images); n in the group header (n per metric when some images could not be scored).",
        "",
    ]
    groups = list(dict.fromkeys(g for per_agent in aggregates.values() for g in per_agent))
    headline = "psnr" if "psnr" in metrics else metrics[0]
    lines += [
        f"## {headline.upper()} by group",
        "",
        "| agent | " + " | ".join(groups) + " |",
        "|---" * (len(groups) + 1) + "|",
    ]
    for agent, per_group in aggregates.items():
        lines.append(
            f"| {agent} | "
            + " | ".join(_mean_std(per_group[g][headline], 2) if g in per_group else "" for g in groups)
            + " |"
        )
    quantities = [*metrics, *(q for q in COUNT_HEADERS if timing or q != "wall_s")]
    header = [_metric_header(m) for m in metrics] + [COUNT_HEADERS[q] for q in quantities[len(metrics) :]]
    for group in groups if len(groups) > 2 else groups[:1]:  # one group: its table is the overall one
        sizes = {per_group[group]["images"] for per_group in aggregates.values() if group in per_group}
        lines += [
            "",
            f"## {group} ({'/'.join(str(s) for s in sorted(sizes))} images)",
            "",
            "| agent | " + " | ".join(header) + " |",
            "|---" * (len(header) + 1) + "|",
        ]
        for agent, per_group in aggregates.items():
            if group in per_group:
                cells = per_group[group]
                lines.append(
                    f"| {agent} | "
                    + " | ".join(_mean_std(cells[q], _digits(q), cells["images"]) for q in quantities)
                    + " |"
                )
    spans = meta.get("episodes_s") or {}
    if timing and spans and meta["images"]:
        lines += [
            "",
            "The whole set's time per image (first episode's start to the last one's end, over the images; engine "
            "start-up and scoring excluded): "
            + ", ".join(f"{agent} {seconds / meta['images']:.3f} s" for agent, seconds in spans.items()),
        ]
    errors = {
        agent: per_group["overall"]["errors"]
        for agent, per_group in aggregates.items()
        if per_group["overall"]["errors"]
    }
    if errors:
        lines += [
            "",
            "Episodes that crashed (scored on the image they had reached): "
            + ", ".join(f"{a} {n}" for a, n in errors.items()),
        ]
    return "\n".join(lines) + "\n"


def _metric_header(metric: str) -> str:
    return metric.upper() + (" ↓" if metric in LOWER_BETTER else " ↑")


def _digits(quantity: str) -> int:
    return {"psnr": 2, "wall_s": 3, "tool_calls": 2, "turns": 2, "format_errors": 2}.get(
        quantity, 3 if quantity in ("niqe", "piqe") else 4
    )


def _mean_std(cell: dict, digits: int, images: int | None = None) -> str:
    if cell["mean"] is None:
        return "n/a"
    text = f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"
    return text + (f" (n={cell['n']})" if images is not None and cell["n"] != images else "")


def write_outputs(report: dict, out_dir) -> dict[str, str]:
    """report.md, eval.json and quality_vs_calls.png in ``out_dir``; their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "report.md", "json": out / "eval.json", "plot": out / "quality_vs_calls.png"}
    _atomic_write(files["markdown"], report["markdown"])
    body = {key: report[key] for key in ("meta", "aggregates", "rows")}
    _atomic_write(files["json"], json.dumps(body, indent=1, default=_json_default))
    plot_quality_vs_calls(report, files["plot"])
    return {kind: str(path) for kind, path in files.items()}


def plot_quality_vs_calls(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = report["meta"]["metrics"]
    metric = "psnr" if "psnr" in metrics else metrics[0]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for index, (agent, per_group) in enumerate(report["aggregates"].items()):
        quality, calls = per_group["overall"][metric], per_group["overall"]["tool_calls"]
        if quality["mean"] is None:
            continue
        ax.errorbar(
            calls["mean"],
            quality["mean"],
            xerr=calls["std"],
            yerr=quality["std"],
            fmt="o",
            capsize=4,
            color=f"C{index % 10}",
            label=agent,
        )
        ax.annotate(agent, (calls["mean"], quality["mean"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel("tool calls per image (mean ± std)")
    ax.set_ylabel(f"{metric.upper()} vs HQ (mean ± std)")
    ax.set_title(f"Quality vs tool calls ({report['meta']['images']} images)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def group_name(group: str | None) -> str:
    return GROUP_NAMES.get(group or "custom", group or "custom")


def cell(values: Sequence[float | None]) -> dict:
    """mean, sample std (0 for one value) and n of the values that are not None; n counts
    those, ``missing`` the rest."""
    known = np.array([v for v in values if v is not None], dtype=float)
    n = int(known.size)
    return {
        "mean": float(known.mean()) if n else None,
        "std": float(known.std(ddof=1)) if n > 1 else (0.0 if n else None),
        "n": n,
        "missing": len(values) - n,
    }


def aggregate(rows: Sequence[Mapping], metrics: Sequence[str]) -> dict:
    """{agent: {group: {quantity: cell}}} for each metric and COUNTS; groups in GROUP_ORDER
    (those present), "A-C" when more than one of A, B, C is and other groups too (else it
    would repeat "overall"), and "overall" always."""
    out: dict[str, dict] = {}
    for agent in dict.fromkeys(row["agent"] for row in rows):
        mine = [row for row in rows if row["agent"] == agent]
        present = {row["group"] for row in mine}
        groups = {g: [r for r in mine if r["group"] == g] for g in sorted(present, key=_group_rank)}
        if len(present & {"A", "B", "C"}) > 1 and present - {"A", "B", "C"}:  # else it is "overall"
            groups["A-C"] = [r for r in mine if r["group"] in ("A", "B", "C")]
        groups["overall"] = mine
        out[agent] = {
            g: {
                **{m: cell([r["scores"].get(m) for r in members]) for m in metrics},
                **{q: cell([r[q] for r in members]) for q in COUNTS},
                "images": len(members),
                "errors": sum(1 for r in members if r.get("error")),
            }
            for g, members in sorted(groups.items(), key=lambda item: _group_rank(item[0]))
        }
    return out


def _group_rank(group: str) -> tuple:
    return (GROUP_ORDER.index(group), "") if group in GROUP_ORDER else (GROUP_ORDER.index("custom"), group)
