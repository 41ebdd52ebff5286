"""The ``tir dumps`` command: ``summary DIR`` (``tir.dumps.summary``) and ``view DIR`` (``tir.dumps.viewer``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tir.dumps.plots import write_plots
from tir.dumps.reader import DumpError, load_episodes, parse_steps
from tir.dumps.summary import markdown_report, summarize


def add_dumps_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Subcommands of ``tir dumps``: ``summary DIR`` and ``view DIR``."""
    sub = parser.add_subparsers(dest="dumps_command", required=True, metavar="{summary,view}")
    summary = sub.add_parser(
        "summary",
        help="tables and plots of a run's rollout dumps",
        description="Per-step and overall statistics of the rollout dumps: tool usage by subtask and position, episode "
        "lengths, reward per metric, reward weights, format errors, common tool sequences.",
    )
    summary.add_argument("dir", help="the dumps folder (runs/NAME/rl/dumps)")
    summary.add_argument(
        "--out", default=None, help="folder for summary.md, summary.json and the PNG plots (default: DIR/summary)"
    )
    summary.add_argument("--steps", default=None, help="steps to read: 3, 1,5,9 or 10-20 (default: all)")
    summary.add_argument("--top", type=int, default=5, help="tool sequences listed per degradation combination")
    summary.add_argument(
        "--max-rows", type=int, default=30, help="steps per table, evenly spread (summary.json has all)"
    )
    summary.add_argument("--no-plots", action="store_true", help="tables only")
    view = sub.add_parser(
        "view",
        help="a self-contained HTML page to browse the trajectories",
        description="Write one HTML file (images embedded, no network) to browse trajectories, filter by step, "
        "degradation combination and reward.",
    )
    view.add_argument("dir", help="the dumps folder (runs/NAME/rl/dumps)")
    view.add_argument("--out", default=None, help="the HTML file to write (default: DIR/report.html)")
    view.add_argument("--steps", default=None, help="steps to include: 3, 1,5,9 or 10-20 (default: all)")
    view.add_argument(
        "--max-episodes", type=int, default=500, help="at most this many trajectories (spread over the steps)"
    )
    view.add_argument(
        "--image-side", type=int, default=256, help="images are shrunk to at most this many pixels a side"
    )
    view.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg")
    return parser


def dumps_main(args: argparse.Namespace) -> int:
    try:
        if args.dumps_command == "summary":
            return _summary_main(args)
        return _view_main(args)
    except DumpError as err:
        print(f"tir dumps {args.dumps_command}: error: {err}", file=sys.stderr)
        return 2


def _summary_main(args) -> int:
    episodes = load_episodes(args.dir, parse_steps(args.steps))
    summary = summarize(episodes, top=args.top)
    report = markdown_report(summary, args.max_rows)
    out = Path(args.out) if args.out else Path(args.dir) / "summary"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(report)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    plots = [] if args.no_plots else write_plots(summary, out)
    print(report)
    print(
        f"wrote {out / 'summary.md'}, {out / 'summary.json'}"
        + (f" and {len(plots)} plot(s): {', '.join(p.name for p in plots)}" if plots else "")
    )
    return 0


def _view_main(args) -> int:
    from tir.dumps.viewer import write_viewer

    out = Path(args.out) if args.out else Path(args.dir) / "report.html"
    result = write_viewer(
        args.dir,
        out,
        steps=parse_steps(args.steps),
        max_episodes=args.max_episodes,
        image_side=args.image_side,
        image_format=args.image_format,
    )
    size = out.stat().st_size
    size = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"
    more = (
        f" (of {result['available']}; use --steps or --max-episodes for others)"
        if result["available"] > result["episodes"]
        else ""
    )
    print(
        f"wrote {out} ({size}): {result['episodes']} trajectories{more} from {result['steps']} step(s); open it in a browser"
    )
    return 0


if __name__ == "__main__":  # python -m tir.dumps.cli summary DIR
    _parser = add_dumps_arguments(argparse.ArgumentParser(prog="tir dumps"))
    sys.exit(dumps_main(_parser.parse_args()))
