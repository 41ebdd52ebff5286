"""What the RL driver sets up before its first step: the policy's path and processor, the training
data and its order, the rollout engine, a probe of the reward's metrics, and where every part of
the run was placed (``placement.json``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from tir.config import value_or
from tir.trainer import checkpoint

SAMPLE_COLUMNS = ("image_id", "combo", "degradations", "seed", "lq", "hq")


class SetupError(RuntimeError):
    """The run cannot start as the recipe says (the message says why)."""


def policy_path(path: str) -> str:
    """``model.path``: a checkpoint folder, a hub name, or a run's SFT output folder (its
    ``hf/`` checkpoint is used): ``tir.agent.models.resolve_policy``, asking for ``config.json``
    only (the processor is loaded next, and says what it misses)."""
    from tir.agent.models import resolve_policy

    return resolve_policy(path, need_processor=False)


def load_processor(model_path: str):
    from transformers import AutoProcessor

    import tir  # noqa: F401  - environment shims before transformers imports torchvision

    return AutoProcessor.from_pretrained(model_path)


def training_data(cfg):
    """The training samples (``data.train_path``, synthesized from ``data.*`` when absent), less
    the photos SFT holds out for evaluation, and the DataStream that orders them."""
    from tir.data.sft_rows import split_by_image
    from tir.data.synth import read_synth, synthesize
    from tir.trainer.sft import DEFAULT_HELDOUT

    path = Path(cfg.data.train_path)
    if not path.exists():
        print(
            f"[rl] no training data at {path}: synthesizing it from {cfg.data.hq!r} ({', '.join(cfg.data.train_combos)})"
        )
        synthesize(
            cfg.data.hq,
            ",".join(cfg.data.train_combos),
            per_image=cfg.data.per_image,
            seed=cfg.run.seed,
            crop=cfg.data.crop,
            crop_mode=value_or(cfg, "data.crop_mode", "center"),
        ).to_parquet(path)
    samples, _ = split_by_image(read_synth(path), value_or(cfg, "sft.heldout_images", DEFAULT_HELDOUT))
    if not len(samples):
        raise FileNotFoundError(f"{path} holds no samples outside the held-out photos")
    samples = samples.select(SAMPLE_COLUMNS)
    fingerprint = checkpoint.data_fingerprint(
        samples.column("image_id"), samples.column("combo"), samples.column("seed")
    )
    return samples, checkpoint.DataStream(len(samples), cfg.run.seed, fingerprint)


def expert_scores(cfg, samples, metric: str = "psnr") -> np.ndarray:
    """The expert's best score per training sample (its ``sample_expert_scores``: the best schedule
    the search found for that photo), from the SFT data (``sft.data_path``, or ``sft.parquet``
    beside the training data); NaN for a sample it does not hold, or everywhere without it. What
    RL can reach with the same tools: the step's ``reward/gap_to_expert_db``."""
    import json

    import pyarrow.parquet as pq

    out = np.full(len(samples), np.nan)
    paths = [value_or(cfg, "sft.data_path", None), Path(cfg.data.train_path).parent / "sft.parquet"]
    path = next((Path(p) for p in paths if p and Path(p).exists()), None)
    if path is None:
        return out
    try:
        table = pq.read_table(path, columns=["image_id", "combo", "seed", "sample_expert_scores"]).to_pydict()
    except Exception as err:  # noqa: BLE001 - a diagnostic: the run goes on without it
        print(f"[rl] the expert's scores in {path} are unreadable ({type(err).__name__}: {err}); gap not logged")
        return out
    best = {}
    for image_id, combo, seed, scores in zip(
        *(table[k] for k in ("image_id", "combo", "seed", "sample_expert_scores"))
    ):
        value = json.loads(scores).get(metric) if scores else None
        if value is not None:
            best[(image_id, combo, int(seed))] = float(value)
    keys = zip(samples.column("image_id"), samples.column("combo"), samples.column("seed"))
    return np.array([best.get((i, c, int(s)), np.nan) for i, c, s in keys])


def start_rollout_engine(cfg, model_path: str):
    """The rollout engine the recipe names: ``rollout.engine=hf`` with one replica, no GPU and no
    placement (``rollout.resources``) is the transformers engine in this process (no actor to
    start: tests, small CPU runs); anything else is a rollout group (``rollout.num_replicas`` Ray
    actors behind a router)."""
    local = not cfg.rollout.num_gpus_per_replica and not value_or(cfg, "rollout.resources", None)
    if cfg.rollout.engine == "hf" and cfg.rollout.num_replicas <= 1 and local:
        from workers.rollout.hf_engine import HFEngine

        return HFEngine(model_path, dtype=cfg.model.dtype, max_batch_size=cfg.rollout.max_batch_size, seed=cfg.run.seed)
    from workers.rollout.group import rollout_group

    return rollout_group(cfg, model_path=model_path)


def record_placement(run) -> dict:
    """Where the run's parts landed, by Ray node id: the driver, each rank of each worker group,
    each pool replica; and each node's IP and custom resources (what ``*.resources`` in a recipe
    ask for). Written to ``placement.json`` beside the outputs: a multi-node run shows there
    that it was placed as its recipe says."""
    import ray

    from workers.rollout.group import RolloutGroup

    here = ray.get_runtime_context().get_node_id()
    placement: dict[str, Any] = {"driver": here, "actor": run.actors.node_id()}
    if run.reference is not None:
        placement["reference"] = run.reference.node_id()
    placement["rollout"] = run.engine.workers.node_id() if isinstance(run.engine, RolloutGroup) else [here]
    placement["pool"] = [here]  # pool.backend=local: the tools run in this process
    if run.cfg.pool.backend == "serve":
        from tool_pool.serve_app import replica_nodes

        try:
            placement["pool"] = replica_nodes(run.cfg.pool.name)
        except Exception as err:  # noqa: BLE001 - no dashboard (state API) is no reason to stop a run
            placement["pool"] = f"unknown ({type(err).__name__}: {err})"
    placement["nodes"] = {node["NodeID"]: node_summary(node) for node in ray.nodes() if node["Alive"]}
    checkpoint.write_json(run.out / "placement.json", placement)
    return placement


def node_summary(node: dict) -> dict:
    """One node of ``ray.nodes()``: its IP, whether it is the head, its custom resources."""
    resources = node["Resources"]
    custom = {
        k: v
        for k, v in resources.items()
        if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith(("node:", "accelerator_type:"))
    }
    return {"ip": node["NodeManagerAddress"], "head": "node:__internal_head__" in resources, "resources": custom}


def close_engine(engine) -> None:
    if hasattr(engine, "close"):
        engine.close()
    else:
        asyncio.run(engine.shutdown())


def check_metrics(pool, samples, metrics) -> None:
    """Score one training photo with every reward metric: a metric the pool cannot run (its
    weights missing, say) stops the run here, by name, instead of scoring nothing every step."""
    from tool_pool.client import at_reference_size
    from tool_pool.execution import PoolError

    lq, hq = samples.column("lq")[0], samples.column("hq")[0]

    async def probe(metric):
        try:
            await pool.score([metric], at_reference_size(lq, hq), hq)
        except PoolError as err:
            return f"{metric} ({err})"

    async def probe_all():
        return await asyncio.gather(*(probe(m) for m in metrics))

    failed = [f for f in asyncio.run(probe_all()) if f]
    if failed:
        raise SetupError(f"reward metric(s) the pool cannot score: {'; '.join(failed)}")
