"""``tir tools train``: train a small restoration network for one subtask on synthetic degradations.

    tir tools train --subtask jpeg_artifact_removal --hq /data/BSDS500/train --steps 3000 \\
        --minutes 12 --seed 0 --heldout /data/BSDS500/test --out runs/tools/jpeg_compact

The story: list the training photos (built-in or folders; the field's standard test sets are
refused) -> for each step, a batch of pairs that is a function of (seed, step) alone
(tir/data/tool_data.py: random crops and flips, the subtask's degradation alone or mixed with
those that co-occur with it in groups A-C, at the protocol's parameter ranges) -> L1 loss, Adam,
cosine learning rate over ``--steps``, an exponential moving average (EMA) of the weights ->
every ``--save-every`` steps ``state.pt`` (weights, EMA, optimiser, step) -> at the end the EMA
weights in a release layout (``model.pth`` = ``{"params_ema": ...}``, basicsr's SRVGGNetCompact
keys, which spandrel detects as "Compact"), ``manifest.yaml``, ``scores.json`` and a model card.

Determinism: ``--steps`` fixes the result. Same command, seed and thread count -> the same
weights (float results may differ across CPUs). ``--minutes`` is a wall-time cap only: a run it
stops writes its outputs marked as stopped at step N; the same command again resumes from
``state.pt`` and, reaching ``--steps``, gives exactly the weights of an uninterrupted run
(``--stop-after N`` stops a run after N steps, for splitting it over sessions, the same way).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from tir.data.tool_data import (
    DEGRADATION_FOR_SUBTASK,
    MIX_SHARE,
    SCALES,
    arch_entry,
    batch_of,
    build_compact,
    mixes_of,
    score_set,
)

ARCHS = ("compact",)
SHORT = {"jpeg": "jpeg", "lowres": "sr", "motion_blur": "motion", "defocus_blur": "defocus", "noise": "denoise"}
DEFAULT_HELDOUT = ("chelsea", "stereo_motorcycle")  # built-in photos never trained on
WHAT = {
    "noise": "Removes noise",
    "motion_blur": "Removes camera-motion blur",
    "defocus_blur": "Removes defocus blur",
    "jpeg": "Removes JPEG blocking and ringing",
    "haze": "Removes haze",
    "rain": "Removes rain streaks",
    "dark": "Brightens a dark photo",
    "lowres": "Upscales a low-resolution image x4",
}


# The held-out crops' degradations are drawn with this seed whatever --seed is, so that runs of
# different seeds (and a fine-tune) are scored on the same crops. (It was --seed + 1: seed-0 cards match.)
HELDOUT_SEED = 1


class ToolTrainError(ValueError):
    """A bad option or data source for ``tir tools train``."""


def add_tools_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--subtask", required=True, help="e.g. jpeg_artifact_removal, super_resolution")
    parser.add_argument("--arch", default="compact", help=f"network: {', '.join(ARCHS)} (SRVGGNetCompact)")
    parser.add_argument("--hq", action="append", default=None, help="training photos: 'builtin' or a folder")
    parser.add_argument(
        "--heldout",
        action="append",
        default=None,
        help="held-out photos to score (a folder, test sets allowed; repeatable); default: built-in "
        + ", ".join(DEFAULT_HELDOUT),
    )
    parser.add_argument("--steps", type=int, default=3000, help="optimiser steps: the determinism knob")
    parser.add_argument("--minutes", type=float, default=None, help="wall-time cap on training (resumable)")
    parser.add_argument(
        "--stop-after", type=int, default=None, help="stop after this many steps in this run (resume later)"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--patch", type=int, default=None, help="side of the input patches (default: 64, 32 for x4 SR)")
    parser.add_argument("--feat", type=int, default=None, help="channels (default: 32, 48 for x4 SR)")
    parser.add_argument("--convs", type=int, default=None, help="inner convolutions (default: 8, 12 for x4 SR)")
    parser.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="peak learning rate (cosine decay to 1%%); 2e-3 killed a 10000-step JPEG run",
    )
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    parser.add_argument("--save-every", type=int, default=200, help="steps between resumable states")
    parser.add_argument("--eval-photos", type=int, default=50, help="held-out photos per set (centre crops)")
    parser.add_argument("--eval-size", type=int, default=192, help="side of the held-out crops (target)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (recorded; results depend on it)")
    parser.add_argument(
        "--init", default=None, help="fine-tune: start from this checkpoint's weights (model.pth of the same shape)"
    )
    parser.add_argument("--name", default=None, help="tool name (default: <subtask>_compact)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder: model.pth, manifest.yaml, README.md, scores.json")
    return parser


def check_args(args: argparse.Namespace) -> str:
    """The subtask's degradation, or ToolTrainError naming the bad option."""
    if args.subtask not in DEGRADATION_FOR_SUBTASK:
        raise ToolTrainError(
            f"--subtask {args.subtask!r} is unknown; choose one of {', '.join(DEGRADATION_FOR_SUBTASK)}"
        )
    if args.arch not in ARCHS:
        raise ToolTrainError(f"--arch {args.arch!r} is unknown; choose one of {', '.join(ARCHS)}")
    for name in ("steps", "batch", "save_every", "eval_photos", "eval_size", "threads"):
        if getattr(args, name) < 1:
            raise ToolTrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.stop_after is not None and args.stop_after < 1:
        raise ToolTrainError(f"--stop-after must be >= 1, got {args.stop_after}")
    if args.minutes is not None and args.minutes <= 0:
        raise ToolTrainError(f"--minutes must be > 0, got {args.minutes}")
    degradation = DEGRADATION_FOR_SUBTASK[args.subtask]
    if args.patch is None:
        args.patch = 32 if degradation in SCALES else 64
    if args.patch < 8:
        raise ToolTrainError(f"--patch must be >= 8, got {args.patch}")
    return degradation


def network_shape(args: argparse.Namespace, degradation: str) -> tuple[int, int, int]:
    scale = SCALES.get(degradation, 1)
    return args.feat or (48 if scale > 1 else 32), args.convs or (12 if scale > 1 else 8), scale


def load_training_photos(specs, degradation: str, patch: int) -> tuple[list[str], list[np.ndarray]]:
    from tir.data.recognizer import RecognizerError
    from tir.data.recognizer_train import load_photos

    try:
        ids, photos = load_photos(specs, exclude=DEFAULT_HELDOUT if "builtin" in specs else ())
    except (RecognizerError, FileNotFoundError) as err:
        raise ToolTrainError(str(err)) from None
    side = patch * SCALES.get(degradation, 1)
    kept = [(i, p) for i, p in zip(ids, photos) if min(p.shape[:2]) >= side]
    if not kept:
        raise ToolTrainError(f"no training photo is at least {side} px a side (--patch {patch})")
    return [i for i, _ in kept], [p for _, p in kept]


def load_heldout(specs, limit: int) -> dict[str, list[np.ndarray]]:
    """{set name: photos}: the first ``limit`` photos of each folder, or the built-in held-out ones."""
    from tir.data.synth import SourceImage, list_sources, load_source

    sets = {}
    for spec in specs or ["builtin"]:
        sources = [SourceImage(n) for n in DEFAULT_HELDOUT] if spec == "builtin" else list_sources(spec)
        loaded = [load_source(s) for s in sources[:limit]]
        sets[Path(spec).name] = [item.image for item in loaded if item is not None]
    return sets


def signature(args: argparse.Namespace) -> dict:
    """What a resumed run must share with the run that wrote ``state.pt``."""
    keys = ("subtask", "arch", "hq", "steps", "batch", "patch", "feat", "convs", "lr", "ema", "seed", "threads")
    out = {k: getattr(args, k) for k in keys}
    if getattr(args, "init", None):  # only then: states written before --init existed still resume
        out["init"] = init_digest(args)
    return out


def init_digest(args: argparse.Namespace) -> str | None:
    """sha256 (16 hex) of the ``--init`` checkpoint: a resumed fine-tune must start from the same bytes."""
    if not getattr(args, "init", None):
        return None
    import hashlib

    return hashlib.sha256(Path(args.init).read_bytes()).hexdigest()[:16]


def load_init(network, path: str) -> None:
    """Load a release-layout checkpoint (``params_ema`` or ``params``, else the bare state dict) into
    ``network``; ToolTrainError naming the file when it does not fit."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, ...
        raise ToolTrainError(f"--init {path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if isinstance(state, dict):
        state = state.get("params_ema", state.get("params", state))
    try:
        network.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0]
        raise ToolTrainError(f"--init {path} does not fit this network (--feat/--convs/scale): {first}") from None


# ------------------------------------------------------------------------------ training
def train(args: argparse.Namespace, degradation: str, photos, out: Path, deadline: float | None):
    """Train (resuming from ``out/state.pt`` when there); returns (ema network, steps done)."""
    import copy

    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    feat, convs, scale = network_shape(args, degradation)
    network = build_compact(feat, convs, scale)
    if args.init:
        load_init(network, args.init)
    ema = copy.deepcopy(network).requires_grad_(False)
    optimizer = torch.optim.Adam(network.parameters(), args.lr, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps, eta_min=args.lr * 0.01)
    step, state_path = 0, out / "state.pt"
    args.resumed_from = 0
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["signature"] != json.loads(json.dumps(signature(args))):
            raise ToolTrainError(f"{state_path} was written by a different command; use a fresh --out")
        network.load_state_dict(state["network"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step = args.resumed_from = int(state["step"])

    def save() -> None:
        state = {
            "network": network.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "step": step,
            "signature": json.loads(json.dumps(signature(args))),
        }
        torch.save(state, out / "state.tmp")
        os.replace(out / "state.tmp", state_path)

    network.train()
    stop = args.steps if args.stop_after is None else min(args.steps, step + args.stop_after)
    with tqdm(total=args.steps, initial=step, desc=f"training {args.subtask}", unit="step", file=sys.stderr) as bar:
        while step < stop:
            if deadline is not None and time.monotonic() > deadline:
                break
            lq, target = batch_of(photos, degradation, args.patch, args.batch, args.seed, step)
            loss = torch.nn.functional.l1_loss(network(lq), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), network.parameters()):
                    e.mul_(decay).add_(p.detach(), alpha=1 - decay)
            step += 1
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(l1=f"{loss.item():.4f}", lr=f"{schedule.get_last_lr()[0]:.1e}")
            if step % args.save_every == 0 or step == args.steps:
                save()
    if step % args.save_every and step < args.steps:
        save()  # stopped by the time cap: keep what was done
    return ema.eval(), step


# ------------------------------------------------------------------------------ outputs
def write_outputs(args, degradation, network, step, ids, scores, command, seconds, out: Path) -> None:
    import torch
    import yaml

    feat, convs, scale = network_shape(args, degradation)
    name = args.name or f"{SHORT.get(degradation, degradation)}_compact"
    weights = {k: v.detach().clone().contiguous() for k, v in network.state_dict().items()}
    torch.save({"params_ema": weights}, out / "model.pth")
    entry = {
        "name": name,
        "subtask": args.subtask,
        "description": f"{WHAT[degradation]} with a small trained network (SRVGGNetCompact, {feat} channels, {convs} convs).",
        "arch": arch_entry(feat, convs, scale),
        "checkpoint": "model.pth",
        "scale": scale,
        "param_key": "params_ema",
    }
    (out / "manifest.yaml").write_text(yaml.safe_dump({"tools": [entry]}, sort_keys=False, width=200))
    done = step >= args.steps
    summary = {
        "tool": name,
        "subtask": args.subtask,
        "steps": step,
        "steps_planned": args.steps,
        "complete": done,
        "resumed_from_step": getattr(args, "resumed_from", 0),
        "seed": args.seed,
        "threads": args.threads,
        "parameters": int(sum(v.numel() for v in weights.values())),
        "init": args.init,
        "init_sha256": init_digest(args),
        "held_out": scores,
        "learned_identity": learned_identity(scores),
    }
    (out / "scores.json").write_text(json.dumps(summary, indent=1))
    (out / "README.md").write_text(model_card(args, entry, summary, ids, command, seconds, degradation))


def learned_identity(scores: dict, tolerance_db: float = 0.01) -> bool:
    """True when the network's output equals its input (or bicubic, for SR) on every held-out
    row: a residual network whose last activation died (too high a learning rate for the run's
    length) returns its input and trains no further, with no error anywhere."""
    rows = [row for kinds in scores.values() for row in kinds.values()]
    return bool(rows) and all(abs(row["gain_over_input"]) < tolerance_db for row in rows)


def model_card(args, entry, summary, ids, command, seconds, degradation) -> str:
    baseline = "bicubic x4" if entry["scale"] > 1 else "the degraded input"
    status = "" if summary["complete"] else f" **Stopped at step {summary['steps']}: rerun to finish.**"
    if summary.get("learned_identity"):
        status += f" **The network returns {baseline} unchanged on every held-out crop: do not serve it; train again with a lower --lr.**"
    if summary["resumed_from_step"]:
        status += f" (this run resumed at step {summary['resumed_from_step']}; the same weights as one run)"
    lines = [
        f"# Model card: {entry['name']} ({args.subtask})",
        "",
        f"{entry['description']} {summary['parameters']} parameters; `model.pth` holds",
        '`{"params_ema": state_dict}` with basicsr\'s SRVGGNetCompact keys (spandrel: Compact).',
        "",
        "## Command (the project's own)",
        "",
        f"    {command}",
        "",
        f"## Seed {args.seed}, {args.threads} torch thread(s)",
        "",
        f"{summary['steps']} of {args.steps} Adam steps{status} (batch {args.batch}, {args.patch} px input patches, L1,",
        f"lr {args.lr} cosine to 1%, EMA {args.ema}); wall time {seconds / 60:.1f} min on this machine (held-out scoring included).",
        *(
            [f"Fine-tuned: the run starts from the weights of `{args.init}` (sha256 {summary['init_sha256']}…)."]
            if args.init
            else []
        ),
        f"Pairs: {degradation} alone (share {1 - MIX_SHARE if mixes_of(degradation) else 1:.0%}) or with the degradations that",
        f"co-occur with it in groups A-C ({', '.join('+'.join(c) for c in mixes_of(degradation)) or 'none'}),",
        "parameters drawn at the protocol's ranges; the target is the chain without "
        f"{degradation} (the other degradations stay).",
        "",
        "## Data source",
        "",
        f"- training photos: {len(ids)} from {', '.join(args.hq or ['builtin'])}",
        f"- held-out photos (never trained on): {', '.join(summary['held_out']) or 'none'}",
        "",
        f"## Held-out PSNR (dB, RGB, centre crops of at most {args.eval_size} px)",
        "",
        f"Gains over {baseline} and over the best weight-free tool of the subtask (tool_pool/classical_*.py).",
        "",
        "| set | kind | crops | input | best weight-free | network | gain over input | gain over weight-free |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for set_name, kinds in summary["held_out"].items():
        for kind, row in kinds.items():
            best, over_free = row["best_weight_free"], row["gain_over_best_weight_free"]
            free = f"{best} {row[best]:.2f}" if best else "-"
            over = "-" if over_free is None else f"{over_free:+.2f}"
            lines.append(
                f"| {set_name} | {kind} | {row['crops']} | {row['input']:.2f} | {free} | {row['network']:.2f} | "
                f"{row['gain_over_input']:+.2f} | {over} |"
            )
    lines += ["", "`alone`: the degradation by itself; `mixed`: with a co-occurring one (target keeps that one)."]
    return "\n".join(lines) + "\n"


def tools_train_main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    deadline = time.monotonic() + args.minutes * 60 if args.minutes else None
    try:
        degradation = check_args(args)
        specs = args.hq or ["builtin"]
        for spec in args.heldout or []:
            if spec in specs:
                raise ToolTrainError(f"--heldout {spec} is also a training source (--hq)")
        ids, photos = load_training_photos(specs, degradation, args.patch)
        heldout = load_heldout(args.heldout, args.eval_photos)
    except (ToolTrainError, FileNotFoundError) as err:
        print(f"tir tools train: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        network, step = train(args, degradation, photos, out, deadline)
    except ToolTrainError as err:
        print(f"tir tools train: error: {err}", file=sys.stderr)
        return 2
    scores = {
        set_name: score_set(network, set_photos, degradation, args.subtask, args.eval_size, HELDOUT_SEED, set_name)
        for set_name, set_photos in heldout.items()
    }
    command = (
        "tir tools train " + " ".join(shlex.quote(a) for a in sys.argv[3:])
        if sys.argv[1:3] == ["tools", "train"]
        else "tir tools train ..."
    )
    write_outputs(args, degradation, network, step, ids, scores, command, time.perf_counter() - started, out)
    for set_name, kinds in scores.items():
        for kind, row in kinds.items():
            print(
                f"{set_name} {kind}: network {row['network']:.2f} dB, {row['gain_over_input']:+.2f} over input, "
                f"{row['gain_over_best_weight_free'] or 0:+.2f} over {row['best_weight_free']}"
            )
    done = "" if step >= args.steps else f" (stopped at step {step} of {args.steps}: run again to resume)"
    print(f"wrote {out / 'model.pth'}, manifest.yaml, README.md{done}")
    if learned_identity(scores):
        print(
            f"tir tools train: error: the network in {out / 'model.pth'} returns its input unchanged on every held-out "
            f"crop (gain 0.00 dB): its residual died during training. Train again with a lower --lr (now {args.lr}).",
            file=sys.stderr,
        )
        return 3
    return 0
