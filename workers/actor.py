"""Actor and reference workers: a training engine (FSDP2, DeepSpeed or plain) on each rank of a
WorkerGroup.

    actors = actor_group(recipe)                      # WorkerGroup of ActorWorker, engine built
    old = actors.forward_logprobs(batch)              # Batch with "logprobs", rows in order
    metrics = actors.train_step(batch, loss_fn)[0]    # every rank returns the same global metrics
    weights = actors.state_dict_for_rollout()[0]      # rank 0 holds the full state dict
    actors.save_checkpoint("runs/x/ckpt/step_5")

The engine is built by ``init_model()``, after the WorkerGroup has joined the ranks' process
group (sharding needs it). ``actor_group`` / ``reference_group`` do both.
"""

from __future__ import annotations

import os

from tir.protocol import Batch
from workers.group import Dispatch, Worker, WorkerGroup, dispatch


class ActorWorker(Worker):
    """One data-parallel rank of the policy being trained."""

    trainable = True

    def __init__(
        self,
        rank: int,
        world_size: int,
        group_name: str,
        model_path: str,
        engine: str = "fsdp2",
        options: dict | None = None,
    ):
        super().__init__(rank, world_size, group_name)
        self.model_path, self.engine_name, self.options = str(model_path), engine, dict(options or {})
        self.engine = None

    @dispatch(Dispatch.ONE_TO_ALL)
    def init_model(self) -> str:
        from workers.engines import make_training_engine

        self.engine = make_training_engine(self.engine_name, self.model_path, self.options, trainable=self.trainable)
        return self.engine_name

    def _engine(self):
        if self.engine is None:
            raise RuntimeError(f"worker group {self.group_name!r}: call init_model() first")
        return self.engine

    @dispatch(Dispatch.DP_SPLIT)
    def forward_logprobs(self, batch: Batch) -> Batch:
        """Log-prob of every token given the previous ones, aligned with input_ids."""
        return self._engine().forward_logprobs(batch, column="logprobs")

    @dispatch(Dispatch.DP_SPLIT)
    def train_step(self, batch: Batch, loss_fn, loss_weight: str = "tokens") -> dict:
        return self._engine().train_step(batch, loss_fn, loss_weight=loss_weight)

    @dispatch(Dispatch.ONE_TO_ALL)
    def state_dict_for_rollout(self):
        """The full state dict on rank 0, None on the others (all ranks take part in gathering)."""
        return self._engine().state_dict_for_rollout()

    @dispatch(Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, path: str) -> str:
        return self._engine().save_checkpoint(path)

    @dispatch(Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, path: str) -> int:
        self._engine().load_checkpoint(path)
        return self.engine.step

    @dispatch(Dispatch.ONE_TO_ALL)
    def save_hf(self, path: str) -> str:
        return self._engine().save_hf(path)


class ReferenceWorker(ActorWorker):
    """A frozen copy of the initial policy: reference log-probs for the KL penalty."""

    trainable = False

    @dispatch(Dispatch.DP_SPLIT)
    def forward_logprobs(self, batch: Batch) -> Batch:
        """Log-probs under the reference policy, as the column ``ref_logprobs``."""
        return self._engine().forward_logprobs(batch, column="ref_logprobs")

    def train_step(self, batch: Batch, loss_fn, loss_weight: str = "tokens") -> dict:
        raise RuntimeError("the reference policy is frozen: it has no train_step")


def engine_options(recipe, **overrides) -> dict:
    from dataclasses import asdict

    from workers.engines.base import EngineOptions

    return asdict(EngineOptions.from_recipe(recipe, **overrides))


def worker_bundle(actor) -> dict[str, float]:
    """One worker's placement-group bundle, from the recipe's ``actor`` section: its CPUs, its
    GPUs, and the custom resources (``actor.resources``) that pin it to nodes."""
    from tir.config import custom_resources

    gpus = float(actor.num_gpus_per_worker)
    return {"CPU": float(actor.num_cpus_per_worker), **({"GPU": gpus} if gpus else {}), **custom_resources(actor)}


def _group(worker_cls: type, recipe, name: str, model_path: str | None, **overrides) -> WorkerGroup:
    actor = recipe.actor
    group = WorkerGroup(
        worker_cls,
        num_workers=actor.num_workers,
        name=name,
        resources=worker_bundle(actor),
        backend="nccl" if actor.num_gpus_per_worker else "gloo",
        init_kwargs={
            "model_path": os.fspath(model_path or recipe.model.path),
            "engine": actor.engine,
            "options": engine_options(recipe, **overrides),
        },
    )
    try:
        group.init_model()
    except BaseException:
        group.shutdown()
        raise
    return group


def actor_group(recipe, name: str = "actor", model_path: str | None = None, **overrides) -> WorkerGroup:
    """The actor WorkerGroup of a recipe (``actor.*``), engine built; overrides go to EngineOptions."""
    return _group(ActorWorker, recipe, name, model_path, **overrides)


def reference_group(recipe, name: str = "reference", model_path: str | None = None, **overrides) -> WorkerGroup:
    return _group(ReferenceWorker, recipe, name, model_path, **overrides)
