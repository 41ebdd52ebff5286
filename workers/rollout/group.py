"""The rollout worker group: N engine replicas as Ray actors behind a least-loaded router.

    group = rollout_group(recipe)                     # rollout.engine x rollout.num_replicas
    batch = await rollout(group, processor, pool, samples, settings)   # tir.agent.loop: one request per turn
    group.update_weights(state_dict)                  # tensors the driver holds -> every replica
    group.sync_from(actors)                           # actor rank 0 -> object store -> replicas
    group.sync_from(actors, transport="broadcast")    # a torch.distributed group (NCCL on GPUs)
    group.close()

The group is itself a ``RolloutEngine``: the agent loop treats it as one engine. Each request
goes to the replica with the fewest requests in flight (ties: the one that got fewest so far),
so trajectories spread over replicas turn by turn and a slow replica gets less work.

Weight updates are bucketed (``bucket_mb``): a bucket at a time travels and is loaded, so neither
the object store nor a rollout replica ever holds a second full copy of the model (the trainer's
rank 0 holds the full state dict its ``state_dict_for_rollout`` gathers). Each replica pauses
generation from the first bucket to the last (in-flight requests finish first, new ones wait),
so no reply mixes weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from workers.group import Worker, WorkerDiedError, WorkerGroup
from workers.rollout import weight_sync
from workers.rollout.base import RolloutEngine, make_rollout_engine

TRANSPORTS = ("object_store", "broadcast")


class RolloutReplica(Worker):
    """One engine in a Ray actor (an async actor: many requests at once)."""

    def __init__(
        self, rank: int, world_size: int, group_name: str, engine: str, model_path: str, options: dict | None = None
    ):
        super().__init__(rank, world_size, group_name)
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # these describe the group, not a process group:
            os.environ.pop(name, None)  # vLLM would take them for its own
        options = dict(options or {})
        options["seed"] = options.get("seed", 0) + rank  # replicas sample differently
        self.engine = make_rollout_engine(engine, model_path, **options)
        self.streams = hasattr(self.engine, "begin_weight_update")  # vLLM: one reload fed bucket by bucket
        self._gate: asyncio.Condition | None = None
        self._inflight, self._updating = 0, False

    def ready(self) -> bool:
        return True

    def stats(self) -> dict:
        return dict(getattr(self.engine, "stats", {}))

    async def generate(self, requests: list[dict]) -> list[dict]:
        gate = self._condition()
        async with gate:
            await gate.wait_for(lambda: not self._updating)
            self._inflight += 1
        try:
            return await self.engine.generate(requests)
        finally:
            async with gate:
                self._inflight -= 1
                gate.notify_all()

    async def begin_weight_update(self, specs: list) -> None:
        gate = self._condition()
        async with gate:
            await gate.wait_for(lambda: not self._updating)
            self._updating = True
            await gate.wait_for(lambda: self._inflight == 0)
        if self.streams:
            try:
                await self.engine.begin_weight_update(specs)
            except BaseException:
                await self._reopen()
                raise

    async def load_weight_bucket(self, bucket: dict) -> int:
        if self.streams:
            return await self.engine.load_weight_bucket(bucket)
        self.engine.update_weights(bucket.items())  # engines that load any subset at any time
        return len(bucket)

    async def finish_weight_update(self) -> None:
        try:
            if self.streams:
                await self.engine.finish_weight_update()
        finally:
            await self._reopen()

    # the broadcast transport
    def weight_group_size(self) -> int:
        """Ranks this replica takes in a broadcast group (one per vLLM worker)."""
        return getattr(self.engine, "weight_group_size", 1)

    async def join_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str) -> None:
        if self.streams:
            await self.engine.join_weight_group(host, port, rank_offset, world_size, backend)
        else:
            self._weight_group = await asyncio.to_thread(
                weight_sync.open_weight_group, host, port, rank_offset, world_size, backend
            )
        self._weight_backend = backend

    async def receive_weight_bucket(self, specs: list) -> int:
        if self.streams:
            await self.engine.receive_weight_bucket(specs)
            return len(specs)
        tensors = await asyncio.to_thread(weight_sync.receive_bucket, self._weight_group, specs, self._weight_backend)
        self.engine.update_weights(tensors)
        return len(tensors)

    async def shutdown(self) -> None:
        await self.engine.shutdown()

    def _condition(self) -> asyncio.Condition:
        if self._gate is None:  # created in the actor's event loop
            self._gate = asyncio.Condition()
        return self._gate

    async def _reopen(self) -> None:
        async with self._condition():
            self._updating = False
            self._gate.notify_all()


class RolloutGroup(RolloutEngine):
    """``num_replicas`` replicas of one registered engine; ``resources`` is each replica's bundle
    (e.g. ``{"CPU": 1}`` or ``{"CPU": 2, "GPU": 4}`` for tensor parallel 4)."""

    def __init__(
        self,
        engine: str,
        model_path: str,
        num_replicas: int = 1,
        resources: Mapping[str, float] | None = None,
        options: Mapping[str, Any] | None = None,
        name: str = "rollout",
        bucket_mb: float = 256,
    ):
        self.name, self.bucket_bytes = name, int(bucket_mb * 2**20)
        self.workers = WorkerGroup(
            RolloutReplica,
            num_workers=num_replicas,
            name=name,
            resources=dict(resources or {"CPU": 1}),
            backend=None,
            init_kwargs={"engine": engine, "model_path": os.fspath(model_path), "options": dict(options or {})},
        )
        self.replicas = self.workers.workers
        try:
            self._get([r.ready.remote() for r in self.replicas], "__init__")  # surfaces start-up errors now
        except BaseException:
            self.workers.shutdown()
            raise
        self.in_flight = [0] * num_replicas
        self.routed = [0] * num_replicas
        self._lock = threading.Lock()  # routing may happen from several event loops' threads
        self._weight_group: dict | None = None

    # ------------------------------------------------------------ generation: the router

    async def generate(self, requests: Sequence[Mapping[str, Any]]) -> list[dict]:
        return list(await asyncio.gather(*(self._route(dict(r)) for r in requests)))

    def pick_replica(self) -> int:
        """The replica with the fewest requests in flight; ties go to the one routed fewest."""
        return min(range(len(self.replicas)), key=lambda i: (self.in_flight[i], self.routed[i], i))

    async def _route(self, request: dict) -> dict:
        with self._lock:
            index = self.pick_replica()
            self.in_flight[index] += 1
            self.routed[index] += 1
        try:
            [result] = await self.replicas[index].generate.remote([request])
        except RayActorError as err:
            raise WorkerDiedError(self.name, index, "generate", err) from err
        finally:
            with self._lock:
                self.in_flight[index] -= 1
        return result

    # ------------------------------------------------------------ weight updates

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]] | Mapping[str, Any]) -> None:
        """Tensors held here (HF names, the full model for vLLM) -> object store -> every replica."""
        import torch

        items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
        pairs = [(name, torch.as_tensor(tensor)) for name, tensor in items]
        plan = list(weight_sync.buckets(pairs, self.bucket_bytes))

        def load(index: int) -> list:
            ref = ray.put(dict(plan[index]))
            return [r.load_weight_bucket.remote(ref) for r in self.replicas]

        self._update([[weight_sync.spec(n, t) for n, t in bucket] for bucket in plan], load)

    def sync_from(self, actors, transport: str = "object_store", backend: str | None = None) -> None:
        """Load the weights of an actor group (``workers.actor.actor_group``) into every replica.

        ``object_store``: rank 0 returns one bucket at a time as a Ray object; the driver only
        passes references. ``broadcast``: rank 0 broadcasts each tensor in a process group with
        every inference worker (``backend`` "nccl" by default on GPUs, "gloo" otherwise); the
        group is made on the first call and kept.
        """
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        sender = actors.workers[0]
        staged = self._get(
            [w.__ray_call__.remote(weight_sync.stage_weights, self.bucket_bytes) for w in actors.workers],
            "stage_weights",
        )
        plan = staged[0]
        try:
            if transport == "object_store":

                def load(index: int) -> list:
                    ref = sender.__ray_call__.remote(weight_sync.staged_bucket, [name for name, _, _ in plan[index]])
                    return [r.load_weight_bucket.remote(ref) for r in self.replicas]
            else:
                backend = self._join_weight_group(sender, backend)

                def load(index: int) -> list:
                    names = [name for name, _, _ in plan[index]]
                    receivers = [r.receive_weight_bucket.remote(plan[index]) for r in self.replicas]
                    return receivers + [sender.__ray_call__.remote(weight_sync.send_staged_bucket, names, backend)]

            self._update(plan, load)
        finally:
            ray.get(sender.__ray_call__.remote(weight_sync.release_staged))

    def _update(self, plan: list[list], load) -> None:
        """Begin on every replica (checks names and shapes: nothing loaded on error), load the
        buckets one after the other, finish on every replica even after an error."""
        specs = [s for bucket in plan for s in bucket]
        self._get([r.begin_weight_update.remote(specs) for r in self.replicas], "begin_weight_update")
        try:
            for index in range(len(plan)):
                self._get(load(index), "load_weight_bucket")
        finally:
            self._get([r.finish_weight_update.remote() for r in self.replicas], "finish_weight_update")

    def _join_weight_group(self, sender, backend: str | None) -> str:
        """Make the broadcast group with this sender, unless it exists (a new sender, e.g. a new
        actor group, gets a new group)."""
        known = self._weight_group
        if known is not None and known["sender"] == sender._actor_id and backend in (None, known["backend"]):
            return known["backend"]
        backend = backend or ("nccl" if ray.get(sender.__ray_call__.remote(_has_cuda)) else "gloo")
        sizes = self._get([r.weight_group_size.remote() for r in self.replicas], "weight_group_size")
        host, port = ray.get(sender.master_address.remote())
        world = 1 + sum(sizes)
        offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        joins = [
            r.join_weight_group.remote(host, port, offset, world, backend) for r, offset in zip(self.replicas, offsets)
        ]
        joins.append(sender.__ray_call__.remote(weight_sync.join_as_sender, host, port, world, backend))
        self._get(joins, "join_weight_group")
        self._weight_group = {"sender": sender._actor_id, "backend": backend}
        return backend

    # ------------------------------------------------------------ the rest

    def stats(self) -> list[dict]:
        """Each replica engine's counters, plus the requests the router sent it."""
        stats = self._get([r.stats.remote() for r in self.replicas], "stats")
        return [{**s, "routed": routed} for s, routed in zip(stats, self.routed)]

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a dead replica has nothing left to shut down
            ray.get([r.shutdown.remote() for r in self.replicas], timeout=60)
        self.workers.shutdown()

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.close)

    def _get(self, refs: list, method: str) -> list:
        try:
            return ray.get(refs)
        except RayActorError as err:
            raise WorkerDiedError(self.name, -1, method, err) from err
        except RayTaskError as err:
            raise (err.cause if isinstance(err.cause, Exception) else err) from None


def _has_cuda(worker) -> bool:
    import torch

    return torch.cuda.is_available()


def rollout_group(recipe, model_path: str | None = None, name: str = "rollout", **options) -> RolloutGroup:
    """The rollout group a recipe describes (``rollout.*``, ``model.dtype``, ``run.seed``);
    keyword options go to the engine."""
    cfg = recipe.rollout
    gpus = float(cfg.num_gpus_per_replica)
    if gpus and gpus < cfg.tensor_parallel_size:
        raise ValueError(
            f"rollout.tensor_parallel_size {cfg.tensor_parallel_size} needs as many GPUs per replica, got {gpus}"
        )
    engine_options = {"dtype": recipe.model.dtype, "seed": recipe.run.seed}
    if cfg.engine == "vllm":
        engine_options.update(
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_images=cfg.max_turns + 1,
        )  # the photo, then one per tool call
    elif cfg.engine == "hf" and gpus:
        engine_options["device"] = "cuda"
    engine_options.update(options)
    return RolloutGroup(
        cfg.engine,
        model_path or recipe.model.path,
        num_replicas=cfg.num_replicas,
        resources=replica_bundle(cfg),
        options=engine_options,
        name=name,
    )


def replica_bundle(rollout) -> dict[str, float]:
    """One replica's placement-group bundle, from the recipe's ``rollout`` section: its CPUs, its
    GPUs, and the custom resources (``rollout.resources``) that pin it to nodes."""
    from tir.config import custom_resources

    gpus = float(rollout.num_gpus_per_replica)
    return {"CPU": float(rollout.num_cpus_per_replica), **({"GPU": gpus} if gpus else {}), **custom_resources(rollout)}
