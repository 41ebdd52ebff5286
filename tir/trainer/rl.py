"""Multi-turn GRPO with the adaptive multi-metric reward: ``tir train rl recipe=... key=value``.

The story (``train_rl``, then ``rl_step``, top to bottom):

    setup   the resolved recipe next to the outputs; the tool pool, the policy's processor and
            tools; the training photos; the worker groups: actor (trains: FSDP2 or DeepSpeed),
            reference (frozen: the KL term), rollout (vLLM replicas, or the transformers engine
            in this process); resume from the latest checkpoint
    a step  sample images -> rollout n trajectories per image (agent loop, tools via the pool)
            -> score the final images (pool) [-> with algo.dynamic_sampling, drop the groups whose
            rewards are all equal and draw more photos: tir.trainer.rl_collect]
            -> reward (adaptive weights; algo.expert_gap_coef: the dB short of the expert's best)
            -> group advantages
            -> reference log-probs -> actor update (clipped policy loss on the policy's own
            tokens, KL to the reference, entropy) -> push the weights to the rollout engines
            -> dump -> log -> checkpoint
            (trainer.rollout_mode: one_step_off: the next step's rollouts run during the reference
            log-probs and the update; the weights are pushed before they start: tir.trainer.rl_ahead)
    end     an HF checkpoint of the policy (``hf/``) that `tir restore --agent` loads

One optimizer step per rollout batch: the rollout engines hold the actor's current weights, so
the rollout log-probs are the "old" policy's (the importance ratio starts at 1; the clip bounds
any engine mismatch; one-step-off, they are one update older: staleness 1). At a temperature
other than 1 they are not (the engines report
``log_softmax(logits / T)``), and the actor recomputes them.

Outputs in <run.output_dir>/rl/: config.yaml, placement.json (the node of every worker and pool
replica), metrics.jsonl, tensorboard/, dumps/step_NNNNNN.parquet, checkpoints/, hf/, summary.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tir.config import value_or
from tir.dumps.writer import DumpWriter, step_dump
from tir.rl import algos
from tir.trainer import checkpoint
from tir.trainer.rl_ahead import RolloutSchedule
from tir.trainer.rl_collect import (  # noqa: F401 - loop_settings, step_seed and the scoring: here for callers
    collect,
    fill_missing,
    loop_settings,
    score_trajectories,
    step_seed,
)
from tir.trainer.rl_setup import (
    SetupError,
    check_metrics,
    close_engine,
    expert_scores,
    load_processor,
    policy_path,
    record_placement,
    start_rollout_engine,
    training_data,
)
from tir.trainer.run_log import (
    RunLogger,
    StepTimer,
    advantage_metrics,
    committed_tools,
    episode_metrics,
    expert_gap_metrics,
    exploration_metrics,
    summarize,
)

TRAIN_COLUMNS = ("input_ids", "loss_mask", "images", "rollout_logprobs")


def rl_main(cli_args: list[str]) -> int:
    """``tir train rl recipe=... key=value ...``; exit status."""
    from tir.cluster import ray_session
    from tir.config import load_recipe, split_cli_overrides

    recipe, overrides = split_cli_overrides(cli_args)
    cfg = load_recipe(recipe or "tiny_cpu", overrides)
    try:
        with ray_session(cfg.ray):
            train_rl(cfg)
    except SetupError as err:  # before the first step: no policy, no data, a metric that cannot score
        print(f"[rl] error: {err}")
        return 2
    return 0


@contextlib.contextmanager
def setting_up():
    """A file missing while the run sets up (the policy, the training data, the checkpoint
    ``trainer.resume`` names) is a ``SetupError``: ``rl_main`` says it in one line. One missing
    later, mid-run, is not a recipe mistake: it propagates with its traceback."""
    try:
        yield
    except FileNotFoundError as err:
        raise SetupError(str(err)) from err


def train_rl(cfg) -> dict:
    """The whole run (see the module docstring); the summary it writes to ``summary.json``."""
    from tir.agent.env import recipe_cues
    from tir.agent.loop import pool_tool_schemas
    from tir.agent.prompts import policy_schemas
    from tir.config import save_resolved
    from tir.rl.reward import MultiMetricReward
    from tool_pool.pool import make_pool
    from workers.actor import actor_group, reference_group

    out = Path(cfg.run.output_dir) / "rl"
    save_resolved(cfg, out)
    with setting_up():
        model_path = policy_path(cfg.model.path)
        samples, stream = training_data(cfg)
        pool = make_pool(cfg.pool)
        schemas = policy_schemas(
            asyncio.run(pool_tool_schemas(pool, list(cfg.pool.tools) or None)), cfg.model.tool_prompt
        )
        check_metrics(pool, samples, list(cfg.reward.metrics))
        run = Run(
            cfg=cfg,
            out=out,
            samples=samples,
            stream=stream,
            pool=pool,
            schemas=schemas,
            processor=load_processor(model_path),
            cues=recipe_cues(cfg.model),
            reward_fn=MultiMetricReward.from_config(cfg.reward),
            loss_fn=functools.partial(algos.grpo_loss, settings=algos.LossSettings.from_recipe(cfg.algo)),
        )
        run.expert_psnr = expert_scores(cfg, samples)
    known = int(np.isfinite(run.expert_psnr).sum())
    print(
        f"[rl] policy {model_path}; {len(samples)} training samples ({known} with the expert's best PSNR); "
        f"{len(schemas)} tools; out: {out}"
    )

    with contextlib.ExitStack() as stack:
        started = time.perf_counter()
        with setting_up():
            run.actors = stack.enter_context(actor_group(cfg, model_path=model_path))
            if cfg.algo.kl_coef > 0:  # no KL term, no reference to keep
                run.reference = stack.enter_context(reference_group(cfg, model_path=model_path))
            run.engine = start_rollout_engine(cfg, model_path)
            stack.callback(close_engine, run.engine)
            schedule = RolloutSchedule(run, str(value_or(cfg, "trainer.rollout_mode", "sync")))
            stack.callback(schedule.close)  # before the engine closes: a batch in flight uses it
            state = resume(run, cfg.trainer.resume, schedule)
            if state.step:
                sync_weights(run.actors, run.engine)  # the engines started from model.path
        print(
            f"[rl] worker groups ready in {time.perf_counter() - started:.1f}s: actor and reference {cfg.actor.engine} x "
            f"{cfg.actor.num_workers}{'' if run.reference else ' (reference off: algo.kl_coef=0)'}, rollout {type(run.engine).__name__}"
            f" ({schedule.mode})"
        )
        record_placement(run)
        dumps = stack.enter_context(DumpWriter(out / "dumps")) if cfg.trainer.dump_rollouts else None
        log = stack.enter_context(RunLogger(out, cfg.trainer.total_steps, state.step + 1, cfg.trainer.log_every))
        for step in range(state.step + 1, cfg.trainer.total_steps + 1):
            state, metrics, dump = rl_step(run, state, step, schedule)
            if dumps is not None:
                started = time.perf_counter()
                dumps.write(step, dump)
                metrics["time/dump"] = time.perf_counter() - started  # waiting for the writer only
            if step % max(1, cfg.trainer.save_every) == 0 or step == cfg.trainer.total_steps:
                started = time.perf_counter()
                checkpoint.save_checkpoint(
                    out, run.actors, state, keep=int(value_or(cfg, "trainer.keep_checkpoints", 2)), extra=schedule.save
                )
                metrics["time/checkpoint"] = time.perf_counter() - started
            log.step(step, metrics)
        hf = run.actors.save_hf(str(out / "hf"))[0]
    summary = summarize(out, hf)
    checkpoint.write_json(out / "summary.json", summary)
    print(f"[rl] {progress_line(summary)}; HF checkpoint: {hf}")
    return summary


def progress_line(summary: dict) -> str:
    """Start -> end of the run: the reward, and each metric's raw gain over the degraded input.
    The reward's quality term is centred within each group (its mean is 0 by construction), so
    ``reward/mean`` moves with the format and tool terms only; the gains say whether the
    restorations improved."""
    start, end = summary["start"], summary["end"]
    parts = [f"reward {start.get('reward/mean', math.nan):+.3f} -> {end.get('reward/mean', math.nan):+.3f}"]
    for key in sorted(k for k in end if k.startswith("reward/gain/")):
        parts.append(f"{key.split('/')[-1]} gain {start.get(key, math.nan):+.3f} -> {end[key]:+.3f}")
    parts.append(
        f"tool calls {start.get('episode/tool_calls', math.nan):.2f} -> {end.get('episode/tool_calls', math.nan):.2f}"
    )
    return f"over {summary['steps']} steps (means of the first and last {summary['window']}): " + ", ".join(parts)


@dataclass
class Run:
    """What every step uses: the recipe, data, pool, reward and the worker groups."""

    cfg: Any
    out: Path
    samples: Any  # Batch of training samples (SAMPLE_COLUMNS)
    stream: checkpoint.DataStream
    pool: Any
    schemas: list
    processor: Any
    cues: Any
    reward_fn: Any
    loss_fn: Any
    actors: Any = None
    reference: Any = None
    engine: Any = None
    engine_stale: bool = False  # the actor was updated since the engines last got its weights
    expert_psnr: Any = None  # [len(samples)] the expert's best PSNR per training sample (NaN: unknown)


def rl_step(
    run: Run, state: checkpoint.TrainState, step: int, schedule: RolloutSchedule | None = None
) -> tuple[checkpoint.TrainState, dict, Any]:
    """One GRPO step; the new state, the step's metrics and its trajectories (for the dump)."""
    import torch

    cfg, n, timer = run.cfg, run.cfg.rollout.n, StepTimer()
    schedule = schedule or RolloutSchedule(run)
    # batch_size photos, each rolled out n times (a GRPO group: adjacent rows), scored; with
    # dynamic sampling, flat groups dropped and more photos drawn (tir.trainer.rl_collect).
    # One-step-off: collected during the previous step's update, with the weights before it.
    got = schedule.take(step, state.data_position, timer)
    trajectories, finals, inputs = got.trajectories, got.finals, got.inputs
    with timer("reward"):
        reward = run.reward_fn(
            finals, inputs, trajectories.column("num_tool_calls"), trajectories.column("format_errors"), group_size=n
        )
        final_psnr = np.array([f.get("psnr", np.nan) for f in finals], dtype=float)
        coef = float(value_or(cfg, "algo.expert_gap_coef", 0.0))
        if coef > 0:  # the dB short of the expert's best schedule, in the reward (and the dump's)
            term = algos.expert_shortfall(torch.tensor(final_psnr), torch.tensor(got.expert_psnr), coef).numpy()
            reward.quality, reward.rewards = reward.quality + term, reward.rewards + term
        advantages = algos.group_advantages(
            torch.tensor(reward.rewards), n, cfg.algo.adv_eps, cfg.algo.adv_normalize_std
        )
    batch = trajectories.select(TRAIN_COLUMNS).with_column("advantages", advantages.tolist())
    position = state.data_position + got.photos_drawn
    if schedule.ahead:  # the engines are idle: give them the latest weights, start the next step's rollouts
        if run.engine_stale:
            with timer("weight_sync"):
                sync_weights(run.actors, run.engine)
            run.engine_stale = False
        if step < cfg.trainer.total_steps:
            schedule.start_next(step + 1, position)
    if run.reference is not None:
        with timer("reference"):
            batch = with_logprobs(batch, run.reference, "ref_logprobs")
    if recompute_old_logprobs(cfg):
        with timer("old_logprobs"):
            batch = with_logprobs(batch, run.actors, "old_logprobs")
    with timer("update"):
        update = run.actors.train_step(batch, run.loss_fn, "tokens" if cfg.algo.loss_agg == "token-mean" else "rows")[0]
    if schedule.ahead:  # the engines may still be generating: the weights go at the next step's start
        run.engine_stale = True
    else:
        with timer("weight_sync"):
            sync_weights(run.actors, run.engine)

    state = checkpoint.TrainState(
        step=step,
        data_position=position,
        reward=run.reward_fn.state_dict(),
        data_fingerprint=state.data_fingerprint,
        config_hash=state.config_hash,
    )
    metrics = {
        **reward.log_dict("reward/"),
        **episode_metrics(trajectories),
        **{f"actor/{k}": v for k, v in update.items()},
        **advantage_metrics(reward.rewards, advantages.numpy(), n, trajectories.column("loss_mask")),
        **exploration_metrics(committed_tools(trajectories), n),
        **expert_gap_metrics(final_psnr, got.expert_psnr),
        **got.metrics(n),
        **timer.breakdown(trajectories),
        **pool_cache_metrics(run.pool),
    }
    dump = step_dump(trajectories, batch, reward, advantages.tolist(), finals, inputs).with_meta(
        step=step, config_hash=state.config_hash
    )
    return state, metrics, dump


def pool_cache_metrics(pool) -> dict[str, float]:
    """The pool's result cache (tool_pool.cache): hits, misses, seconds saved, MiB held."""
    from tool_pool.cache import cache_metrics

    return asyncio.run(cache_metrics(pool))


# ------------------------------------------------------------------------------ setup


def sync_weights(actors, engine) -> None:
    """The actors' weights into the rollout engine(s): a rollout group pulls them from actor
    rank 0 bucket by bucket; a local engine gets the full state dict."""
    if hasattr(engine, "sync_from"):
        engine.sync_from(actors)
    else:
        engine.update_weights(actors.state_dict_for_rollout()[0].items())


def resume(run: Run, how: str, schedule: RolloutSchedule | None = None) -> checkpoint.TrainState:
    """``trainer.resume``: the checkpoint's state (actors and reward weights restored, and in
    one-step-off mode the batch it collected ahead), or a fresh state."""
    from tir.config import config_hash

    fresh = checkpoint.TrainState(data_fingerprint=run.stream.fingerprint, config_hash=config_hash(run.cfg))
    path = checkpoint.checkpoint_to_resume(run.out, how)
    if path is None:
        return fresh
    state = checkpoint.load_checkpoint(path, run.actors)
    checkpoint.check_resumable(state, run.stream, path)
    if state.reward is not None:
        run.reward_fn.load_state_dict(state.reward)
    ahead = schedule is not None and schedule.ahead and schedule.restore(path, state.step + 1)
    print(
        f"[rl] resumed from {path}: {state.step} step(s) done, continuing at step {state.step + 1}"
        + (" with the rollouts it collected ahead" if ahead else "")
    )
    return state


def recompute_old_logprobs(cfg) -> bool:
    return bool(value_or(cfg, "algo.recompute_old_logprobs", float(cfg.rollout.temperature) != 1.0))


# ------------------------------------------------------------------------------ scoring


def with_logprobs(batch, group, column: str):
    """``batch`` plus per-token log-probs from a worker group (reference: ``ref_logprobs``)."""
    scored = group.forward_logprobs(batch.select(["input_ids", "images"]))
    values = scored.table.column(scored.columns[0])
    return batch.with_column(column, values)
