"""Moving policy weights from the trainer to rollout engines, in buckets (no vLLM import here).

Two transports, both bucketed so that no rollout process (nor the object store) ever holds a
second full copy of the model:

- the object store (CPU, and anywhere): the trainer's rank 0 returns one bucket at a time as a
  Ray object; every replica fetches it and loads it; the next bucket follows;
- a broadcast group (GPUs): rank 0 of the trainer and every inference worker join a
  torch.distributed process group of their own (NCCL on GPUs, gloo on CPUs) and the trainer
  broadcasts each tensor. Only the gloo flavour runs on the CPU machines this was written on.

The trainer-side functions take an actor worker (``workers.actor.ActorWorker``) as their first
argument: the rollout group runs them inside the actor processes with Ray's ``__ray_call__``,
so the tensors go from the trainer's memory straight to the object store or the wire.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from workers import rendezvous

Spec = tuple[str, str, list[int]]  # (HF name, dtype name, shape)


def buckets(pairs: Iterable[tuple[str, Any]], bucket_bytes: int) -> Iterator[list[tuple[str, Any]]]:
    """Consecutive groups of about ``bucket_bytes`` (a larger tensor goes alone), in order."""
    bucket, size = [], 0
    for name, tensor in pairs:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def spec(name: str, tensor: torch.Tensor) -> Spec:
    return (name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape))


def shm_dir() -> str:
    """Where weight files go: RAM-backed when the OS has /dev/shm."""
    return (
        "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else os.environ.get("TMPDIR", "/tmp")
    )


# ---------------------------------------------------------------- the broadcast group (both ends)


_LISTENERS: list = []  # rank 0's rendezvous sockets (a new sender makes a new group: one socket each)


def open_weight_group(host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float = 300.0):
    """A process group of its own (not the process's default group, which the trainer's FSDP and
    vLLM's tensor parallelism already use). Rank 0 is the trainer's sender and hosts the store.
    ``backend``: "nccl" (GPUs) or "gloo" (CPUs). Every rank must call this at the same time."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "gloo":
        rendezvous.keep_gloo_on_loopback(host)
    store, listener = rendezvous.open_store(host, port, rank, world_size, timeout)
    _LISTENERS.append(listener)  # the store's socket lives as long as the process's groups do
    if backend == "nccl":  # GPU path: written for GPUs, never run on the CPU machines it was built on
        from torch.distributed import ProcessGroupNCCL

        return ProcessGroupNCCL(store, rank, world_size, ProcessGroupNCCL.Options())
    if backend == "gloo":
        from torch.distributed import ProcessGroupGloo

        return ProcessGroupGloo(store, rank, world_size, timeout)
    raise ValueError(f"weight group backend must be 'nccl' or 'gloo', got {backend!r}")


def group_device(backend: str) -> torch.device:
    """Where broadcast tensors live: NCCL moves GPU memory, gloo CPU memory."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def send_bucket(group, tensors: Iterable[torch.Tensor], backend: str) -> None:
    """Rank 0: broadcast each tensor in order (contiguous: the backend sends raw memory)."""
    device = group_device(backend)
    for tensor in tensors:
        group.broadcast(tensor.detach().to(device).contiguous(), 0).wait()


def receive_bucket(group, specs: Iterable[Spec], backend: str) -> list[tuple[str, torch.Tensor]]:
    """Any other rank: receive the tensors ``specs`` announce, in the sender's order."""
    device = group_device(backend)
    out = []
    for name, dtype, shape in specs:
        tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        group.broadcast(tensor, 0).wait()
        out.append((name, tensor))
    return out


# ---------------------------------------------------------------- the trainer's side (in actor workers)


def stage_weights(worker, bucket_bytes: int) -> list[list[Spec]] | None:
    """Every actor rank runs this (gathering a sharded model is collective); rank 0 keeps the
    full state dict and returns its buckets as specs, the others return None."""
    state = worker.state_dict_for_rollout()
    if state is None:
        return None
    worker._tir_staged_weights = dict(state)
    return [[spec(name, tensor) for name, tensor in bucket] for bucket in buckets(state.items(), bucket_bytes)]


def staged_bucket(worker, names: list[str]) -> dict[str, torch.Tensor]:
    """Rank 0: the named tensors, returned as one Ray object (the object store carries them)."""
    return {name: worker._tir_staged_weights[name] for name in names}


def release_staged(worker) -> None:
    worker.__dict__.pop("_tir_staged_weights", None)


def join_as_sender(worker, host: str, port: int, world_size: int, backend: str, timeout_s: float = 300.0) -> None:
    worker._tir_weight_group = open_weight_group(host, port, 0, world_size, backend, timeout_s)


def send_staged_bucket(worker, names: list[str], backend: str) -> None:
    send_bucket(worker._tir_weight_group, (worker._tir_staged_weights[name] for name in names), backend)
