"""SFT: teach the policy the expert's tool schedules. ``tir train sft recipe=... key=value``.

The story (``sft_main``, top to bottom):

    recipe -> the resolved config next to the outputs (<run.output_dir>/sft/)
    Ray, the tool pool, the policy's processor, the served tools, perception cues if the recipe shows them
    expert trajectories (`tir data expert`) -> held-out photos set aside -> tokenized rows, built by
        the agent loop itself (tir.data.sft_rows), so they are what the policy sees at rollout time
    the actor group (FSDP2 or DeepSpeed over actor.num_workers), resumed from the last checkpoint
    evaluate the untrained policy; then per epoch: shuffled batches -> train_step with the loss
        on the policy's own tokens only -> checkpoint -> weights to the evaluation engine ->
        tool-choice accuracy on the held-out photos (greedy episodes with real tools)
    an HF checkpoint (<out>/hf) that `tir restore --agent <out>/hf` and the RL trainer load

Outputs in <run.output_dir>/sft/: config.yaml, metrics.jsonl (one line per step and per
evaluation; a resumed run drops the records of the steps it repeats), tensorboard/,
checkpoints/ (``tir.trainer.checkpoint``: engine state + ``state.json`` holding the
``Progress``, written atomically; ``latest.json`` names the newest), hf/, summary.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tir.config import value_or
from tir.rl.algos import sft_loss
from tir.trainer import checkpoint
from tir.trainer.run_log import RunLogger

DEFAULT_HELDOUT = ("chelsea", "stereo_motorcycle")  # 2 of the 8 built-in photos: never trained on


def sft_main(cli_args: list[str]) -> int:
    """``tir train sft recipe=... key=value ...``; exit status."""
    from tir.cluster import ray_session
    from tir.config import load_recipe, split_cli_overrides

    recipe, overrides = split_cli_overrides(cli_args)
    cfg = load_recipe(recipe or "sft_tiny_cpu", overrides)
    with ray_session(cfg.ray):
        return run_sft(cfg)


def run_sft(cfg) -> int:
    from tir.agent.env import recipe_cues
    from tir.agent.loop import LoopSettings, pool_tool_schemas
    from tir.agent.models import load_policy
    from tir.agent.prompts import policy_schemas
    from tir.config import save_resolved
    from tir.data.expert import ExpertSettings
    from tir.data.sft_rows import TRAIN_COLUMNS, sft_rows, split_by_image
    from tir.protocol import Batch
    from tool_pool.pool import make_pool
    from workers.actor import actor_group
    from workers.rollout.hf_engine import HFEngine

    out = Path(cfg.run.output_dir) / "sft"
    save_resolved(cfg, out)
    print(f"[sft] recipe resolved -> {out / 'config.yaml'}")

    pool = make_pool(cfg.pool)
    model, processor = load_policy(cfg.model.path, dtype=cfg.model.dtype)
    schemas = policy_schemas(asyncio.run(pool_tool_schemas(pool, list(cfg.pool.tools) or None)), cfg.model.tool_prompt)
    cues = recipe_cues(cfg.model)
    loop = LoopSettings.from_recipe(cfg.rollout, cfg.get("env"))
    tie_margin = ExpertSettings.from_recipe(cfg).tie_margin  # what the expert counted as a tie

    data_path = value_or(cfg, "sft.data_path", f"{cfg.run.output_dir}/data/sft.parquet")
    if not Path(data_path).exists():
        print(
            f"[sft] error: no expert trajectories at {data_path}; make them with `tir data expert --in ... --out {data_path}`"
        )
        return 2
    train_expert, heldout = split_by_image(
        Batch.from_parquet(data_path), value_or(cfg, "sft.heldout_images", DEFAULT_HELDOUT)
    )
    heldout = evaluation_subset(heldout, value_or(cfg, "sft.eval_samples", 64), cfg.run.seed)
    started = time.perf_counter()
    train = sft_rows(processor, train_expert, schemas, loop, cues).select(TRAIN_COLUMNS)
    tokens = sum(len(ids) for ids in train.column("input_ids"))
    print(
        f"[sft] {len(train)} training trajectories ({tokens} tokens, cues {'on' if cues else 'off'}) tokenized in "
        f"{time.perf_counter() - started:.1f}s; {len(heldout)} held-out samples"
    )

    epochs, batch_size = int(cfg.sft.epochs), int(value_or(cfg, "sft.batch_size", cfg.trainer.batch_size))
    eval_every = max(1, int(value_or(cfg, "sft.eval_every", 1)))  # epochs between held-out evaluations
    steps_per_epoch = len(epoch_batches(len(train), batch_size, cfg.actor.num_workers, cfg.run.seed, 0))
    train_s = 0.0  # seconds in train steps (this process's share of the run)
    keep = int(value_or(cfg, "trainer.keep_checkpoints", 2))
    with contextlib.ExitStack() as stack:
        actors = stack.enter_context(
            actor_group(cfg, name="sft_actor", lr=cfg.sft.lr, total_steps=max(1, steps_per_epoch * epochs))
        )
        progress = resume(actors, out, cfg.trainer.resume, steps_per_epoch)
        log = stack.enter_context(
            RunLogger(out, steps_per_epoch * epochs, progress.step + 1, cfg.trainer.log_every, prefix="sft")
        )
        engine = HFEngine(
            model=model, processor=processor, max_batch_size=cfg.rollout.max_batch_size, seed=cfg.run.seed
        )

        def evaluate(epoch: int) -> None:
            push_weights(actors, engine)
            accuracy = evaluate_heldout(engine, processor, pool, heldout, schemas, loop, cues, tie_margin)
            progress.evaluations.append({"epoch": epoch, **accuracy})
            log.record(progress.step, {"kind": "eval", "epoch": epoch, **accuracy})
            tie = f" (ties the sample's best: {accuracy['first_call_tie']:.0%})" if "first_call_tie" in accuracy else ""
            log.print(
                f"epoch {epoch} held-out: first call {accuracy['first_call']:.0%}{tie}, subtask {accuracy['first_subtask']:.0%}, "
                f"sequence {accuracy['sequence']:.0%}, well-formed {accuracy['format_ok']:.0%} ({accuracy['samples']} samples)"
            )

        if not progress.evaluations:
            evaluate(0)  # the policy before SFT
        if progress.epoch >= epochs:
            log.print(
                f"all {epochs} epochs were already trained (checkpoint {checkpoint.latest_checkpoint(out)}); writing the HF checkpoint only"
            )
        for epoch in range(progress.epoch, epochs):
            batches = epoch_batches(len(train), batch_size, cfg.actor.num_workers, cfg.run.seed, epoch)
            for index in range(progress.step_in_epoch, len(batches)):
                step_started = time.perf_counter()
                metrics = actors.train_step(train.take(batches[index]), sft_loss)[0]
                train_s += time.perf_counter() - step_started
                progress.step_in_epoch, progress.step = index + 1, progress.step + 1
                log.step(progress.step, {"kind": "train", "epoch": epoch + 1, "global_step": progress.step, **metrics})
                if cfg.trainer.save_every and progress.step % cfg.trainer.save_every == 0 and index + 1 < len(batches):
                    checkpoint.save_checkpoint(out, actors, progress, keep)
            progress.epoch, progress.step_in_epoch = epoch + 1, 0
            if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
                evaluate(epoch + 1)
            checkpoint.save_checkpoint(out, actors, progress, keep)

        hf = actors.save_hf(str(out / "hf"))[0]
    summary = {
        "before": progress.evaluations[0],
        "after": progress.evaluations[-1],
        "epochs": epochs,
        "steps": progress.step,
        "train_rows": len(train),
        "cues": bool(cues),
        "train_s": train_s,
        "hf_checkpoint": hf,
    }
    checkpoint.write_json(out / "summary.json", summary)
    print(
        f"[sft] first-call accuracy {summary['before']['first_call']:.0%} -> {summary['after']['first_call']:.0%} "
        f"({progress.step} steps, {train_s:.0f}s training); HF checkpoint: {hf}"
    )
    return 0


# ---------------------------------------------------------------- the pieces the story calls


def evaluation_subset(heldout, size: int, seed: int):
    """At most ``size`` held-out rows, a fixed random draw (the same every epoch and run)."""
    if len(heldout) <= size:
        return heldout
    return heldout.take(sorted(np.random.default_rng([seed, 7]).permutation(len(heldout))[:size].tolist()))


def epoch_batches(rows: int, batch_size: int, num_workers: int, seed: int, epoch: int) -> list[list[int]]:
    """Row indices of each batch of one epoch: a permutation fixed by (seed, epoch), so that a
    run resumed mid-epoch skips exactly the batches it trained. A last batch too small to give
    every worker a row joins the one before."""
    if rows < num_workers:
        raise ValueError(f"{rows} training rows cannot feed {num_workers} actor workers")
    order = np.random.default_rng([seed, epoch]).permutation(rows).tolist()
    batches = [order[start : start + batch_size] for start in range(0, rows, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < num_workers:
        last = batches.pop()
        batches[-1] += last
    return batches


def push_weights(actors, engine) -> None:
    """The actors' current weights into the evaluation engine (rank 0 holds the full state)."""
    weights = actors.state_dict_for_rollout()[0]
    engine.update_weights(weights.items())


def evaluate_heldout(engine, processor, pool, heldout, schemas, loop, cues, tie_margin: float) -> dict:
    from tir.eval.tool_choice import evaluate_tool_choice

    accuracy, _ = asyncio.run(evaluate_tool_choice(engine, processor, pool, heldout, schemas, loop, cues, tie_margin))
    return accuracy


# ---------------------------------------------------------------- checkpoints and resume


@dataclass
class Progress:
    """Where an SFT run stands: what its checkpoint's ``state.json`` holds."""

    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # batches of the current epoch already trained
    step: int = 0  # batches trained in all
    steps_per_epoch: int = 0
    evaluations: list = field(default_factory=list)  # {"epoch": e, accuracies...}; epoch 0: before SFT


def resume(actors, out: Path, how: str, steps_per_epoch: int) -> Progress:
    """``trainer.resume``: "auto" (the latest checkpoint if any), "never", or a checkpoint dir."""
    path = checkpoint.checkpoint_to_resume(out, how)
    if path is None:
        return Progress(steps_per_epoch=steps_per_epoch)
    progress = checkpoint.load_checkpoint(path, actors, Progress)
    if progress.steps_per_epoch != steps_per_epoch:
        raise ValueError(
            f"checkpoint {path} was trained with {progress.steps_per_epoch} steps per epoch, this run has "
            f"{steps_per_epoch}: the data or sft batch size changed (use trainer.resume=never to start over)"
        )
    print(f"[sft] resumed from {path}: {progress.epoch} epoch(s) and {progress.step_in_epoch} step(s) done")
    return progress
