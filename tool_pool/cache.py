"""The pool's content-addressed result cache: a call whose tool (or metric, or recogniser),
arguments and input image bytes were seen before is answered with the stored result.

- Key: the model id (``tool:<name>``, ``metric:<name>``, ``perception:<checkpoint>``), the
  canonical JSON of the validated arguments (defaults filled in, so an explicit default and an
  omitted one are the same call) and a blake2b digest of each input image's shape, dtype and
  bytes (a no-reference metric's key leaves the reference out: it does not read it).
- Only deterministic models are cached (``is_deterministic``): a tool or scorer says so with its
  ``deterministic`` attribute (True by default: the weight-free tools are pure functions of image
  and arguments); a model on a CUDA device counts as non-deterministic unless
  ``torch.use_deterministic_algorithms(True)`` is on (cuDNN/cuBLAS kernels may reorder float sums).
- Bounded in bytes, least recently used first out; 0 disables it. A result larger than the
  bound is not stored.
- Identical requests in flight are computed once: the first computes, the others wait on the
  same future (a ``concurrent.futures.Future``, so waiters may be in other threads' event loops).
- Stored results are frozen (arrays copied and made read-only); callers get copies, so mutating
  a result cannot corrupt the cache. Failed calls are never stored.

The cache lives where the work is done: one per ``LocalPool``, one per Serve replica (a replica
restart loses its cache, never a call). Per model, ``snapshot()`` gives ``cache_hits``,
``cache_misses``, ``cache_saved_s`` (the original compute seconds of every hit), ``cache_bytes``
and ``cache_entries``; ``pool.stats()`` merges them into each model's row.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import hashlib
import json
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import numpy as np

DEFAULT_CACHE_BYTES = 256 * 2**20  # per LocalPool / per Serve replica
ENTRY_OVERHEAD = 256  # bytes counted per entry beyond its values (key, bookkeeping)
COUNTERS = ("cache_hits", "cache_misses", "cache_saved_s")  # summed over replicas, dead ones included
LEVELS = ("cache_bytes", "cache_entries")  # what a live cache holds now
FIELDS = COUNTERS + LEVELS


def image_digest(image: np.ndarray | None) -> str:
    """blake2b of an image's shape, dtype and bytes ("-" for no image)."""
    if image is None:
        return "-"
    array = np.ascontiguousarray(image)
    digest = hashlib.blake2b(f"{array.shape}|{array.dtype.str}|".encode(), digest_size=20)
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def request_key(model_id: str, args: dict | None, *images: np.ndarray | None) -> tuple[str, str, tuple[str, ...]]:
    """The cache key of one request (see the module's docstring)."""
    canonical = json.dumps(args or {}, sort_keys=True, separators=(",", ":"), default=repr)
    return model_id, canonical, tuple(image_digest(im) for im in images)


def is_deterministic(model: Any) -> bool:
    """Whether ``model`` (a tool, a scorer, a recogniser) gives the same output for the same
    input: its ``deterministic`` attribute (default True), and not on CUDA unless torch's
    deterministic mode is on. A neural tool not loaded yet is judged by its manifest's device."""
    if not getattr(model, "deterministic", True):
        return False
    device = getattr(model, "device", None) or getattr(getattr(model, "spec", None), "device", None) or "cpu"
    device = str(device)
    if device == "auto" or device.startswith("cuda"):
        import torch

        on_cuda = device.startswith("cuda") or torch.cuda.is_available()
        return not on_cuda or torch.are_deterministic_algorithms_enabled()
    return True


def freeze(value: Any) -> Any:
    """A private, immutable copy of a result: arrays read-only, containers copied."""
    if isinstance(value, np.ndarray):
        out = value.copy()
        out.flags.writeable = False
        return out
    if isinstance(value, dict):
        return {k: freeze(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """What a caller gets for a stored result: a copy it may change (arrays writable again)."""
    return copy.deepcopy(value)


def size_of(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(size_of(k) + size_of(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(size_of(v) for v in value) + 8 * len(value)
    if isinstance(value, (str, bytes)):
        return len(value)
    return 16


class Timed(NamedTuple):
    """What a ``compute`` may return to say how long the work itself took (without the wait for
    a worker thread or a batch); the cache unwraps it and counts those seconds as saved on a hit."""

    value: Any
    seconds: float


class _Abandoned(Exception):
    """The computing request was cancelled: a waiter computes for itself."""


class _Entry:
    __slots__ = ("value", "nbytes", "seconds", "model")

    def __init__(self, value: Any, nbytes: int, seconds: float, model: str):
        self.value, self.nbytes, self.seconds, self.model = value, nbytes, seconds, model


class ResultCache:
    """Bounded LRU of frozen results keyed by ``request_key``; thread-safe."""

    def __init__(self, capacity_bytes: int = DEFAULT_CACHE_BYTES):
        if capacity_bytes < 0:
            raise ValueError(f"cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity = int(capacity_bytes)
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._in_flight: dict[tuple, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self.nbytes = 0
        self._rows: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(FIELDS, 0))

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[tuple]:
        """Keys held, least recently used first."""
        with self._lock:
            return list(self._entries)

    async def get_or_compute(
        self,
        model: str,
        key: tuple | None,
        compute: Callable[[], Awaitable[Any]],
        storable: Callable[[Any], bool] = lambda value: True,
        copy_out: bool = True,
    ) -> Any:
        """The stored result for ``key``, the result of an identical request in flight, or
        ``await compute()`` (stored when ``storable``). ``key`` None (a non-deterministic model)
        or a disabled cache: just ``compute()``."""
        if key is None or not self.enabled:
            value = await compute()
            return value.value if isinstance(value, Timed) else value
        out = thaw if copy_out else (lambda value: value)
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self._count_hit(model, entry.seconds)
                    future, owner = None, False
                else:
                    future = self._in_flight.get(key)
                    owner = future is None
                if owner:
                    future = self._in_flight[key] = concurrent.futures.Future()
                    future.set_running_or_notify_cancel()  # a cancelled waiter cannot cancel it
                    self._rows[model]["cache_misses"] += 1
            if entry is not None:
                return out(entry.value)  # copied outside the lock
            if owner:  # the caller gets the computed value itself; the cache keeps a frozen copy
                return await self._compute(model, key, future, compute, storable)
            try:
                value, seconds, stored = await asyncio.wrap_future(future)
            except _Abandoned:
                continue  # the computing request was cancelled: try again (perhaps computing)
            if stored:  # shared a computation (an error answer that is not stored is not a hit)
                with self._lock:
                    self._count_hit(model, seconds)
            return out(value)

    async def _compute(self, model, key, future, compute, storable) -> Any:
        started = time.perf_counter()
        try:
            value = await compute()
        except BaseException as err:
            with self._lock:
                del self._in_flight[key]
            future.set_exception(err if isinstance(err, Exception) else _Abandoned())
            raise
        seconds = time.perf_counter() - started
        if isinstance(value, Timed):
            value, seconds = value
        frozen = freeze(value)
        stored = storable(value)
        with self._lock:
            del self._in_flight[key]
            if stored:
                self._store(model, key, frozen, seconds)
        future.set_result((frozen, seconds, stored))
        return value

    def _count_hit(self, model: str, seconds: float) -> None:
        row = self._rows[model]
        row["cache_hits"] += 1
        row["cache_saved_s"] += seconds

    def _store(self, model: str, key: tuple, value: Any, seconds: float) -> None:
        nbytes = size_of(value) + ENTRY_OVERHEAD
        if nbytes > self.capacity or key in self._entries:
            return
        while self.nbytes + nbytes > self.capacity:
            _, old = self._entries.popitem(last=False)
            self._account(old, -1)
        self._entries[key] = _Entry(value, nbytes, seconds, model)
        self._account(self._entries[key], +1)

    def _account(self, entry: _Entry, sign: int) -> None:
        self.nbytes += sign * entry.nbytes
        row = self._rows[entry.model]
        row["cache_bytes"] += sign * entry.nbytes
        row["cache_entries"] += sign

    def clear(self) -> None:
        with self._lock:
            for entry in self._entries.values():
                self._account(entry, -1)
            self._entries.clear()

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Per model: hits, misses, seconds saved, bytes and entries held."""
        with self._lock:
            return {model: dict(row) for model, row in self._rows.items()}


def cache_totals(stats: dict[str, dict[str, float]]) -> dict[str, float]:
    """The cache columns of ``pool.stats()`` summed over models, plus the hit rate."""
    totals = {name: sum(float(row.get(name, 0)) for row in stats.values()) for name in FIELDS}
    looked_up = totals["cache_hits"] + totals["cache_misses"]
    totals["cache_hit_rate"] = totals["cache_hits"] / looked_up if looked_up else 0.0
    return totals


async def cache_metrics(pool, prefix: str = "pool/") -> dict[str, float]:
    """The pool's cache as log scalars (the RL log, every step): hits, misses and seconds saved
    since the pool started, the hit rate, and what it holds now (MiB, entries)."""
    totals = cache_totals(await pool.stats())
    return {
        f"{prefix}cache_hits": totals["cache_hits"],
        f"{prefix}cache_misses": totals["cache_misses"],
        f"{prefix}cache_hit_rate": totals["cache_hit_rate"],
        f"{prefix}cache_saved_s": totals["cache_saved_s"],
        f"{prefix}cache_mib": totals["cache_bytes"] / 2**20,
        f"{prefix}cache_entries": totals["cache_entries"],
    }
