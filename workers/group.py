"""Worker groups on Ray: N actors of one worker class in a placement group, joined in a
torch.distributed process group, driven from the single controller by dispatch-marked methods.

    class Actor(Worker):
        @dispatch(Dispatch.DP_SPLIT)
        def forward_logprobs(self, batch): ...

    actors = WorkerGroup(Actor, num_workers=2, name="actor", resources={"CPU": 1})
    out = actors.forward_logprobs(batch)            # split by rank, run, concatenate in order
    future = actors.forward_logprobs.future(batch)  # the same, without blocking; await it or .get()

A worker that dies surfaces as ``WorkerDiedError`` naming the group, the rank and the method.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import os
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tir.protocol import Batch
from workers import rendezvous


class Dispatch(enum.Enum):
    ONE_TO_ALL = "one_to_all"  # every rank gets the same arguments; returns a list, one per rank
    DP_SPLIT = "dp_split"  # Batch arguments are chunked by rank; Batch results are concatenated
    RANK_ZERO = "rank_zero"  # only rank 0 runs it; returns its result


def dispatch(mode: Dispatch) -> Callable[[Callable], Callable]:
    """Mark a worker method as callable on the whole group with the given dispatch mode."""

    def mark(method: Callable) -> Callable:
        method._tir_dispatch = mode
        return method

    return mark


class WorkerDiedError(RuntimeError):
    def __init__(self, group: str, rank: int, method: str, cause: BaseException):
        self.group, self.rank, self.method = group, rank, method
        super().__init__(f"worker group {group!r}: rank {rank} died during {method}(): {type(cause).__name__}: {cause}")


class WorkerCallError(RuntimeError):
    """The method raised inside a live worker (the worker survives)."""

    def __init__(self, group: str, rank: int, method: str, cause: BaseException):
        self.group, self.rank, self.method = group, rank, method
        super().__init__(f"worker group {group!r}: rank {rank} raised in {method}(): {cause}")


class Worker:
    """Base class of every worker: knows its rank and joins the group's process group."""

    def __init__(self, rank: int, world_size: int, group_name: str):
        self.rank, self.world_size, self.group_name = rank, world_size, group_name
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0")

    def master_address(self) -> tuple[str, int]:
        """This worker's node IP and a free port on it: rank 0 hosts the rendezvous."""
        host = ray.util.get_node_ip_address()
        return host, rendezvous.free_port(host)

    def init_distributed(self, host: str, port: int, backend: str, timeout_s: float) -> None:
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR=host, MASTER_PORT=str(port))
        if backend == "gloo":
            rendezvous.keep_gloo_on_loopback(host)
        if backend == "nccl":
            import torch

            torch.cuda.set_device(0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        timeout = datetime.timedelta(seconds=timeout_s)
        store, self._store_listener = rendezvous.open_store(host, port, self.rank, self.world_size, timeout)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size, timeout=timeout)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def call(self, method: str, *args, **kwargs) -> Any:
        return getattr(self, method)(*args, **kwargs)


def _dispatch_mode(worker_cls: type, method: str) -> Dispatch:
    fn = getattr(worker_cls, method, None)
    if fn is None or not callable(fn):
        raise AttributeError(f"{worker_cls.__name__} has no method {method!r}")
    return getattr(fn, "_tir_dispatch", Dispatch.ONE_TO_ALL)


class GroupFuture:
    """Results of one group call still running; ``get()`` blocks, ``await`` does not."""

    def __init__(self, group: WorkerGroup, method: str, ranks: list[int], refs: list, collect: Callable):
        self.group, self.method, self.ranks, self.refs, self._collect = group, method, ranks, refs, collect

    def get(self, timeout: float | None = None) -> Any:
        # Take results as they finish, so a dead rank is reported at once even while the
        # others wait for it inside a collective.
        results: dict[int, Any] = {}
        pending = dict(zip(self.refs, self.ranks))
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if not ready:
                raise GetTimeoutError(f"worker group {self.group.name!r}: {self.method}() timed out after {timeout}s")
            ref = ready[0]
            rank = pending.pop(ref)
            results[rank] = self._get_one(ref, rank)
        return self._collect([results[r] for r in self.ranks])

    def _get_one(self, ref, rank: int) -> Any:
        try:
            return ray.get(ref)
        except RayActorError as err:
            raise WorkerDiedError(self.group.name, rank, self.method, err) from err
        except RayTaskError as err:
            raise WorkerCallError(self.group.name, rank, self.method, err.cause or err) from err

    def __await__(self):
        return asyncio.get_running_loop().run_in_executor(None, self.get).__await__()


class _GroupMethod:
    def __init__(self, group: WorkerGroup, name: str):
        self.group, self.name = group, name

    def __call__(self, *args, **kwargs) -> Any:
        return self.future(*args, **kwargs).get()

    def future(self, *args, **kwargs) -> GroupFuture:
        return self.group.call_async(self.name, *args, **kwargs)


class WorkerGroup:
    """N Ray actors of ``worker_cls`` in one placement group, joined by torch.distributed."""

    def __init__(
        self,
        worker_cls: type,
        num_workers: int,
        name: str,
        resources: dict[str, float] | None = None,
        strategy: str = "PACK",
        backend: str | None = "gloo",
        init_args: Sequence[Any] = (),
        init_kwargs: dict[str, Any] | None = None,
        dist_timeout_s: float = 300.0,
        runtime_env: dict | None = None,
        pg_timeout_s: float = 120.0,
    ):
        if not issubclass(worker_cls, Worker):
            raise TypeError(f"{worker_cls.__name__} must subclass workers.group.Worker")
        if num_workers < 1:
            raise ValueError(f"worker group {name!r}: num_workers must be >= 1, got {num_workers}")
        self.worker_cls, self.name, self.num_workers = worker_cls, name, num_workers
        bundle = dict(resources or {"CPU": 1})
        self.placement_group = placement_group(
            [dict(bundle) for _ in range(num_workers)], strategy=strategy, name=f"{name}_pg"
        )
        if not self.placement_group.wait(pg_timeout_s):
            remove_placement_group(self.placement_group)
            raise RuntimeError(
                f"worker group {name!r}: {num_workers} bundles of {bundle} ({strategy}) could not be placed within "
                f"{pg_timeout_s}s; the cluster has {ray.available_resources()}"
            )
        remote_cls = ray.remote(worker_cls)
        options = {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0)}
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU", "memory")}
        if custom:
            options["resources"] = custom
        if runtime_env:
            options["runtime_env"] = runtime_env
        self.workers = [
            remote_cls.options(
                name=f"{name}_{rank}_{os.getpid()}_{id(self):x}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=rank
                ),
                **options,
            ).remote(rank, num_workers, name, *init_args, **(init_kwargs or {}))
            for rank in range(num_workers)
        ]
        if backend:
            host, port = self._rank_call(0, "master_address").get()
            self.run_on_all("init_distributed", host, port, backend, dist_timeout_s)

    # calling ------------------------------------------------------------------------------
    def __getattr__(self, method: str) -> _GroupMethod:
        if method.startswith("_"):
            raise AttributeError(method)
        _dispatch_mode(self.worker_cls, method)  # fail early on a typo
        return _GroupMethod(self, method)

    def call_async(self, method: str, *args, **kwargs) -> GroupFuture:
        mode = _dispatch_mode(self.worker_cls, method)
        if mode is Dispatch.RANK_ZERO:
            return self._rank_call(0, method, *args, **kwargs)
        if mode is Dispatch.DP_SPLIT:
            per_rank_args = self._split(args, kwargs)
            refs = [w.call.remote(method, *a, **k) for w, (a, k) in zip(self.workers, per_rank_args)]
            return GroupFuture(self, method, list(range(self.num_workers)), refs, _concat_results)
        refs = [w.call.remote(method, *args, **kwargs) for w in self.workers]
        return GroupFuture(self, method, list(range(self.num_workers)), refs, list)

    def run_on_all(self, method: str, *args, **kwargs) -> list[Any]:
        """Every rank runs the method with the same arguments, whatever its dispatch mark."""
        refs = [w.call.remote(method, *args, **kwargs) for w in self.workers]
        return GroupFuture(self, method, list(range(self.num_workers)), refs, list).get()

    def _rank_call(self, rank: int, method: str, *args, **kwargs) -> GroupFuture:
        ref = self.workers[rank].call.remote(method, *args, **kwargs)
        return GroupFuture(self, method, [rank], [ref], lambda results: results[0])

    def _split(self, args: tuple, kwargs: dict) -> list[tuple[tuple, dict]]:
        def pieces(value):
            if isinstance(value, Batch):
                if len(value) < self.num_workers:
                    raise ValueError(
                        f"worker group {self.name!r}: a batch of {len(value)} rows cannot be split over "
                        f"{self.num_workers} ranks"
                    )
                return [ray.put(piece) for piece in value.chunk(self.num_workers)]
            return [value] * self.num_workers

        split_args = [pieces(a) for a in args]
        split_kwargs = {k: pieces(v) for k, v in kwargs.items()}
        return [
            (tuple(a[r] for a in split_args), {k: v[r] for k, v in split_kwargs.items()})
            for r in range(self.num_workers)
        ]

    # lifecycle ----------------------------------------------------------------------------
    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        remove_placement_group(self.placement_group)

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _concat_results(results: list[Any]) -> Any:
    if results and all(isinstance(r, Batch) for r in results):
        return Batch.concat(results)
    return results
