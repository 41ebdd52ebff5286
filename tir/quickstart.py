"""The quickstart: the whole TIR-Agent pipeline on one CPU machine, one command (``make demo``).

    tir quickstart [recipe=quickstart] [key=value ...]

The story, top to bottom (each stage skips itself when its output exists, so a killed run
continues where it stopped; a run folder made from other inputs, another recipe or other model
files, is set aside first, see ``claim_run_folder``):

    1. a tiny random Qwen2.5-VL policy, built offline          -> <out>/tiny_policy
    2. training and test sets from scikit-image's photos; the test photos are the held-out ones
       SFT never trains on                                      -> <out>/data/{train,test}.parquet
    3. expert trajectories: tool schedules searched through the pool, perturbed
                                                                -> <out>/data/sft.parquet
    4. SFT on the expert trajectories                          -> <out>/sft/hf
    5. multi-turn GRPO from the SFT policy                      -> <out>/rl/hf, rl/dumps
    6. evaluation of the SFT and RL agents against the training-free baselines, on the test set
    7. the report: the table, plots, the reward curve, before/after images, the dump summary and
       the trajectory viewer                                    -> <out>/report/

Everything runs on one Ray cluster with one shared tool pool. The recipe's numbers set the scale
(``recipes/quickstart.yaml``); the same stages run the GPU recipes with real checkpoints.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPORT_EXAMPLES = 4  # before/after image strips in the report


def main(cli_args: list[str]) -> int:
    from tir.cluster import ray_session
    from tir.config import RecipeError, load_recipe, split_cli_overrides

    recipe, overrides = split_cli_overrides(cli_args)
    try:
        cfg = load_recipe(recipe or "quickstart", overrides)
    except RecipeError as err:
        print(f"tir quickstart: {err}", file=sys.stderr)
        return 2
    with ray_session(cfg.ray):
        return run_quickstart(cfg)


def run_quickstart(cfg) -> int:
    from omegaconf import OmegaConf

    from tool_pool.pool import make_pool

    out = Path(cfg.run.output_dir)
    claim_run_folder(out, run_inputs(cfg))
    clock = Stages()
    pool = make_pool(cfg.pool)  # one pool for every stage

    with clock("1/7 tiny policy"):
        policy = make_policy(cfg, out / "tiny_policy")
    with clock("2/7 data"):
        train, test = make_data(cfg)
    with clock("3/7 expert trajectories"):
        expert_path = make_expert(cfg, pool, train)
    with clock("4/7 SFT"):
        sft_cfg = OmegaConf.merge(cfg, {"model": {"path": str(policy)}, "sft": {"data_path": str(expert_path)}})
        sft_hf = run_stage_sft(sft_cfg, out)
    with clock("5/7 GRPO"):
        rl_cfg = OmegaConf.merge(cfg, {"model": {"path": str(sft_hf)}})
        rl_hf = run_stage_rl(rl_cfg, out)
    with clock("6/7 evaluation"):
        report = evaluate(cfg, pool, test, {"sft": sft_hf, "rl": rl_hf}, out / "eval")
    with clock("7/7 report"):
        folder = write_report(cfg, out, report, clock)
    print(report["markdown"])
    print(f"[quickstart] done in {clock.total():.0f}s; report: {folder}/README.md")
    return 0


INPUTS_FILE = "inputs.json"


def run_inputs(cfg) -> dict[str, str]:
    """What the stages' outputs depend on besides the code: the resolved recipe (less ``ray``,
    which only says where to run) and a digest of each model file it reads, the recogniser's
    checkpoint and the neural tools' manifest and weights. A new shipped recogniser changes the
    perception lines of the expert data, so every stage after the data must run again."""
    import hashlib

    from omegaconf import OmegaConf

    from tir.config import config_hash
    from tir.data.recognizer import checkpoint_file

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"

    inputs = {"recipe": config_hash(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "ray"]))}
    if cfg.model.get("perception") == "learned":
        inputs["recogniser"] = digest(checkpoint_file(cfg.model.perception_model))
    if cfg.pool.get("manifest"):
        from tool_pool.neural import load_manifest

        inputs["manifest"] = digest(Path(cfg.pool.manifest))
        served = set(cfg.pool.tools or [])  # empty: the pool serves every tool, the manifest's too
        for spec in load_manifest(cfg.pool.manifest):
            if not served or spec.name in served:  # new weights of a tool the run never calls change nothing
                inputs[f"tool:{spec.name}"] = digest(Path(spec.checkpoint))
    return inputs


def claim_run_folder(out: Path, inputs: dict[str, str]) -> None:
    """Make ``out`` the folder of a run from ``inputs``. A folder holding a run from other inputs
    (or from a version that did not record them) is renamed aside, never deleted, so that no stage
    reuses an output the new inputs would not have produced; the inputs are then recorded."""
    import os

    record = out / INPUTS_FILE
    if out.is_dir() and any(out.iterdir()):
        before = json.loads(record.read_text()) if record.is_file() else None
        if before == inputs:
            return
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = next(
            path
            for k in range(1000)
            if not (path := out.with_name(f"{out.name}.stale-{stamp}" + (f"-{k}" if k else ""))).exists()
        )
        changed = sorted(k for k in inputs.keys() | (before or {}).keys() if (before or {}).get(k) != inputs.get(k))
        why = f"other {', '.join(changed)}" if before is not None else f"no {INPUTS_FILE}: made by an older version"
        out.rename(aside)
        print(f"[quickstart] {out} holds a run from other inputs ({why}); moved it to {aside}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(inputs, indent=1, sort_keys=True))
    os.replace(tmp, record)


class Stages:
    """Times each stage and prints its start and end (the run's progress at a glance)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        import contextlib

        @contextlib.contextmanager
        def timed():
            print(f"[quickstart] {name} ...", flush=True)
            started = time.perf_counter()
            yield
            self.seconds[name] = time.perf_counter() - started
            print(f"[quickstart] {name}: {self.seconds[name]:.0f}s", flush=True)

        return timed()

    def total(self) -> float:
        return sum(self.seconds.values())


# ---------------------------------------------------------------- the stages


def make_policy(cfg, folder: Path) -> Path:
    from tir.agent.tiny_policy import build_tiny_policy
    from tool_pool.tools import tool_schemas

    if (folder / "config.json").exists():
        return folder
    return Path(build_tiny_policy(folder, tool_schemas(), seed=cfg.run.seed))


def make_data(cfg):
    """(train, test) Batches of the built-in photos. The test set holds the held-out photos only;
    the training set has them too, but SFT keeps their rows for its held-out accuracy and RL
    leaves them out (``split_by_image``), so no agent trains on a test photo."""
    from tir.data.sft_rows import split_by_image
    from tir.data.synth import read_synth, synthesize
    from tir.trainer.sft import DEFAULT_HELDOUT

    train_path, test_path = Path(cfg.data.train_path), Path(cfg.data.test_path)
    if not train_path.exists():
        synthesize(
            cfg.data.hq,
            ",".join(cfg.data.train_combos),
            per_image=cfg.data.per_image,
            seed=cfg.run.seed,
            crop=cfg.data.crop,
            crop_mode="random",
        ).to_parquet(train_path)
    if not test_path.exists():
        every = synthesize(
            cfg.data.hq,
            ",".join(cfg.data.test_combos),
            per_image=cfg.data.test_per_image,
            seed=cfg.run.seed + 1,
            crop=cfg.data.crop,
            crop_mode="random",
        )
        split_by_image(every, DEFAULT_HELDOUT)[1].to_parquet(test_path)
    train, test = read_synth(train_path), read_synth(test_path)
    print(
        f"[quickstart] {len(train)} training samples, {len(test)} test samples (held-out photos {', '.join(DEFAULT_HELDOUT)})"
    )
    return train, test


def make_expert(cfg, pool, train) -> Path:
    from tir.data.expert import ExpertSettings
    from tir.data.expert_run import run_shards, summary

    path = Path(cfg.run.output_dir) / "data" / "sft.parquet"
    if not path.exists():
        started = time.perf_counter()
        batch = run_shards(pool, train, path, ExpertSettings.from_recipe(cfg), progress=True)
        print(summary(batch, time.perf_counter() - started))
    return path


def run_stage_sft(cfg, out: Path) -> Path:
    from tir.trainer.sft import run_sft

    hf = out / "sft" / "hf"
    if not (hf / "config.json").exists() and run_sft(cfg) != 0:
        raise RuntimeError("SFT failed (see the messages above)")
    return hf


def run_stage_rl(cfg, out: Path) -> Path:
    from tir.trainer.rl import train_rl

    hf = out / "rl" / "hf"
    if not (hf / "config.json").exists():
        train_rl(cfg)
    return hf


def evaluate(cfg, pool, test, checkpoints: dict, folder: Path) -> dict:
    from tir.eval.agents import EvalSettings, evaluate_agents

    agents = [
        "identity",
        "random",
        "fixed_order",
        "exhaustive",
        *(f"{name}={path}" for name, path in checkpoints.items()),
    ]
    settings = EvalSettings.from_recipe(cfg, concurrency=4)
    return evaluate_agents(
        ",".join(agents), test, pool, out_dir=folder, settings=settings, meta={"recipe": cfg.run.name}
    )


# ---------------------------------------------------------------- the report


def write_report(cfg, out: Path, report: dict, clock: Stages) -> Path:
    """<out>/report/: README.md (the tables and timings), the eval plot, the reward curve,
    before/after strips, the dump summary and the trajectory viewer."""
    from tir.dumps.cli import dumps_main

    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    for name in report.get("files", {}).values():
        if name and Path(name).exists():
            shutil.copy(name, folder / Path(name).name)
    reward_curve(out / "rl" / "metrics.jsonl", folder / "reward_curve.png")
    examples = before_after(out / "rl" / "dumps", folder)
    dumps = out / "rl" / "dumps"
    if dumps.exists():
        dumps_main(_namespace(command="summary", folder=str(dumps), out=str(folder / "dumps_summary")))
        dumps_main(_namespace(command="view", folder=str(dumps), out=str(folder / "trajectories.html")))
    sft = json.loads((out / "sft" / "summary.json").read_text()) if (out / "sft" / "summary.json").exists() else {}
    lines = [
        f"# TIR-Agent quickstart ({cfg.run.name})",
        "",
        "## Evaluation on held-out photos",
        "",
        report["markdown"],
        "",
        "![quality vs tool calls](quality_vs_calls.png)",
        "",
        "## SFT: tool choice on held-out photos",
        "",
    ]
    if sft:
        lines += [
            "| when | first call | first call ties the sample's best | subtask | sequence | well-formed |",
            "|---|---|---|---|---|---|",
        ]
        for when in ("before", "after"):
            e = sft[when]
            lines.append(
                f"| {when} SFT | {e['first_call']:.0%} | {e.get('first_call_tie', float('nan')):.0%} | {e['first_subtask']:.0%} | "
                f"{e['sequence']:.0%} | {e['format_ok']:.0%} |"
            )
    lines += [
        "",
        "## GRPO",
        "",
        "![reward curve](reward_curve.png)",
        "",
        "Rollout dumps: `dumps_summary/`, viewer: `trajectories.html`.",
        "",
    ]
    lines += ["## Before / after (last RL step: degraded, the policy's result, HQ)", ""] + [
        f"![{e}]({e})" for e in examples
    ]
    lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---|"] + [
        f"| {k} | {v:.0f} |" for k, v in clock.seconds.items()
    ]
    (folder / "README.md").write_text("\n".join(lines) + "\n")
    return folder


def _namespace(**values):
    import argparse

    from tir.dumps.cli import add_dumps_arguments

    parser = add_dumps_arguments(argparse.ArgumentParser())
    args = [values["command"], values["folder"], "--out", values["out"]]
    return parser.parse_args(args)


def reward_curve(metrics_path: Path, png: Path) -> None:
    """Mean reward and PSNR gain per RL step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.exists():
        return
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records if "reward/mean" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["reward/mean"] for r in records if "reward/mean" in r], marker="o", label="reward (mean)")
    gains = [r.get("reward/gain/psnr") for r in records if "reward/mean" in r]
    if all(g is not None for g in gains):
        ax.plot(steps, gains, marker="s", label="PSNR gain over input (dB)")
    ax.set_xlabel("RL step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def before_after(dumps: Path, folder: Path) -> list[str]:
    """A few (degraded | the policy's result | HQ) strips from the last dumped RL step."""
    import cv2

    from tir.dumps.reader import list_dumps, read_dump

    found = list_dumps(dumps) if dumps.exists() else {}
    if not found:
        return []
    batch = read_dump(dumps, max(found), columns=["lq", "final_image", "hq", "combo"])
    names = []
    for index in range(min(REPORT_EXAMPLES, len(batch))):
        row = batch.take([index]).rows()[0]
        hq = row["hq"]
        tiles = [
            cv2.resize(image, (hq.shape[1], hq.shape[0]), interpolation=cv2.INTER_NEAREST)
            for image in (row["lq"], row["final_image"], hq)
        ]
        name = f"example_{index}_{row['combo']}.png"
        cv2.imwrite(str(folder / name), cv2.cvtColor(np.concatenate(tiles, axis=1), cv2.COLOR_RGB2BGR))
        names.append(name)
    return names
