"""The globally shared model-call pool: one Ray Serve application serves every tool call and
every IQA score of the cluster.

- Multiplexing: a request names its model (``tool:<name>`` or ``metric:<name>``); a replica keeps
  the most used ones loaded (``@serve.multiplexed``) and loads others lazily.
- Dynamic batching: concurrent calls are queued per replica (``@serve.batch``) and grouped by
  model, image size and arguments, so one forward pass serves many callers. Serve keeps one
  queue per replica, not per model, so the model id travels with each request into the batch.
- A bad request is answered with an error payload, never an exception that could take the
  replica (or the batch it shares with others) down.
- Result cache (``tool_pool.cache``): each replica keeps its own, checked before a request joins
  a batch; identical requests in flight on a replica are computed once. A replica restart loses
  its cache, never a call (the client re-sends calls of a dead replica).
- Pool metrics go to one named stats actor, queryable from any process; each replica reports
  its cache's counters there, and a dead replica's bytes and entries stop counting.
- Profile: every answer carries ``timing`` (seconds per stage inside the replica, and wall-clock
  arrival and reply times for the client to measure the transfer each way: ``ServePool.profile``).
- Compute thread: a replica runs every forward on one thread of its own, so its event loop keeps
  admitting requests, answering cache hits and replying while a forward runs (the next batch
  forms meanwhile); the models need not be thread-safe.
- Threads: a replica runs torch with ``pool.torch_threads`` intra-op threads ("auto": the CPUs it
  is given, rounded up). Batch wait: ``pool.batch_wait_scale`` times its recent forward time, at
  most ``pool.batch_wait_timeout_s`` (a GPU replica's millisecond forwards wait microseconds, a CPU
  replica's second-long ones the cap). Images per tool forward: ``pool.forward_batch`` ("auto":
  the whole batch on a GPU, one at a time on a CPU, where stacking costs more CPU per image; the
  batch still shares one trip through the queue). Each replica reports these to the stats actor
  (``replicas()``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import ray
from ray import serve

from tool_pool.cache import COUNTERS as CACHE_COUNTERS
from tool_pool.cache import DEFAULT_CACHE_BYTES, ResultCache, is_deterministic, request_key
from tool_pool.execution import (
    NAMESPACE,
    STATS_ACTOR_SUFFIX,
    PoolError,
    PoolStats,
    check_image,
    get_recognizer_or_error,
    get_scorer_or_error,
    perceive_batch,
    resolve_tool,
    run_tool_batch,
    score_batch,
    validated_arguments,
)
from tool_pool.neural import manifest_path

SERVE_NAMESPACE = "serve"  # where Serve's replica actors live


@ray.remote(num_cpus=0)
class PoolStatsActor:
    def __init__(self):
        self.stats = PoolStats()
        self.caches: dict[str, dict] = {}  # replica actor name -> its cache's latest snapshot
        self.retired: dict[str, dict] = {}  # the counters (hits, misses, seconds saved) of dead replicas
        self.settings: dict[str, dict] = {}  # replica actor name -> what it runs with (torch threads)

    def record(
        self,
        batches: list[tuple],
        loads: list[str],
        cache: tuple[str, dict] | None = None,
        settings: tuple[str, dict] | None = None,
    ) -> None:
        if settings is not None:
            self.settings[settings[0]] = settings[1]
        for model, size, wait, run_s, errors in batches:
            self.stats.record_batch(model, size, wait, run_s, errors)
        for model in loads:
            self.stats.record_load(model)
        if cache is not None:
            replica, rows = cache
            self.caches[replica] = rows

    def snapshot(self) -> dict:
        for replica in list(self.caches):
            try:
                ray.get_actor(replica, namespace=SERVE_NAMESPACE)
            except ValueError:  # the replica is gone: its cache with it, its counters stay
                for model, row in self.caches.pop(replica).items():
                    kept = self.retired.setdefault(model, dict.fromkeys(CACHE_COUNTERS, 0))
                    for name in CACHE_COUNTERS:
                        kept[name] += row[name]
        return self.stats.snapshot(self.retired, *self.caches.values())

    def replicas(self) -> dict[str, dict]:
        """Per replica that ran a batch: what it ran its last one with (``torch_threads``,
        ``batch_wait_s``, the ``forward_s`` average the wait is scaled to)."""
        return dict(self.settings)

    def cache_replicas(self) -> list[str]:
        """The replicas whose caches count in the last snapshot (the live ones)."""
        return sorted(self.caches)


class _Loaded:
    """What the multiplexer caches per model id. Serve calls ``__del__`` when it evicts an entry
    (least recently used first), which frees a neural tool's weights on this replica."""

    def __init__(self, model):
        self.model = model

    def __del__(self):
        unload = getattr(self.model, "unload", None)
        if unload is not None:
            unload()


def _error(err: PoolError) -> dict:
    return {"error": err.kind, "message": str(err).split("] ", 1)[-1]}


def torch_threads(setting, num_cpus: float) -> int:
    """Torch intra-op threads for a replica: ``setting``, or for "auto" the CPUs it is given
    rounded up, at least 1 (a GPU replica's CPUs only feed its GPU: usually 1)."""
    if setting in (None, "auto"):
        return max(1, math.ceil(num_cpus))
    threads = int(setting)
    if threads < 1:
        raise ValueError(f"pool.torch_threads must be 'auto' or >= 1, got {setting!r}")
    return threads


def forward_batch(setting, num_gpus: float) -> int:
    """Images per tool forward pass within a batch (0: the whole batch): ``setting``, or for
    "auto" the whole batch on a GPU replica and 1 on a CPU one, where stacking costs CPU per image
    (SRVGGNetCompact, 256x256, one thread: 314 ms an image alone, 410 in twos, 463 in eights)."""
    if setting in (None, "auto"):
        return 0 if num_gpus > 0 else 1
    images = int(setting)
    if images < 1:
        raise ValueError(f"pool.forward_batch must be 'auto' or >= 1, got {setting!r}")
    return images


def scaled_batch_wait(forward_s: float | None, scale: float, cap: float) -> float:
    """How long a replica's next batch waits for more requests: ``scale`` times its recent
    forward time, at most ``cap`` (``pool.batch_wait_timeout_s``); the cap before any forward, or
    always with scale 0."""
    if forward_s is None or scale <= 0:
        return cap
    return min(cap, scale * forward_s)


class ToolPoolDeployment:
    """One replica of the pool. Configured (batch size, models per replica) by ``build_app``."""

    def __init__(
        self,
        stats_actor_name: str,
        tools: list[str],
        manifest: str | None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        threads: int = 1,
        batch_wait: tuple[float, float] = (0.01, 0.0),
        forward_batch: int = 0,
    ):
        import tir  # noqa: F401 - environment shims before torchvision-based tools load
        import tool_pool.tools  # noqa: F401 - registers the built-in tools
        from tir.cluster import keep_serve_replica_on_loopback

        keep_serve_replica_on_loopback()

        if manifest:
            from tool_pool.neural import register_manifest

            register_manifest(manifest)
        self.allowed = list(tools)
        self.stats_actor = ray.get_actor(stats_actor_name, namespace=NAMESPACE)
        self.cache = ResultCache(cache_bytes)
        self.replica = ray.get_runtime_context().get_actor_name() or "local"
        self.threads = threads
        self.forward_batch = forward_batch  # images per tool forward pass; 0: the whole batch
        self.wait_cap, self.wait_scale = batch_wait
        self.forward_s: float | None = None  # moving average of a batch's forward time
        # One thread runs every forward of this replica: models need not be thread-safe, and
        # torch's intra-op pool stays warm on it.
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pool-forward")

    # models -------------------------------------------------------------------------------
    async def get_model(self, model_id: str):
        # replaced per app by a @serve.multiplexed wrapper in build_app
        kind, name = model_id.split(":", 1)
        if kind == "perception":
            model = get_recognizer_or_error(name)
        else:
            model = resolve_tool(name, self.allowed) if kind == "tool" else get_scorer_or_error(name)
        if kind == "tool" and hasattr(model, "load"):
            try:
                model.load()  # a neural tool reads its checkpoint now, once per replica
            except Exception as err:  # noqa: BLE001 - a missing or corrupt checkpoint
                raise PoolError("unavailable", str(err)) from None
        self.stats_actor.record.remote([], [model_id])
        return _Loaded(model)

    # requests -----------------------------------------------------------------------------
    async def run(self, image, args: dict) -> dict:
        arrived = (time.time(), time.perf_counter())
        model_id = serve.get_multiplexed_model_id()
        try:
            tool = (await self.get_model(model_id)).model
            check_image(image)
            args = validated_arguments(tool, args)
        except PoolError as err:
            return _error(err)
        key = request_key(model_id, args, image) if is_deterministic(tool) else None
        return await self.cached(model_id, key, (model_id, image, args, time.perf_counter(), {}), arrived)

    async def score(self, image, reference) -> dict:
        arrived = (time.time(), time.perf_counter())
        model_id = serve.get_multiplexed_model_id()
        try:
            scorer = (await self.get_model(model_id)).model
            check_image(image)
            if reference is not None:
                check_image(reference, "reference")
        except PoolError as err:
            return _error(err)
        read = reference if scorer.full_reference else None  # a no-reference metric ignores it
        key = request_key(model_id, None, image, read) if is_deterministic(scorer) else None
        return await self.cached(model_id, key, (model_id, image, reference, time.perf_counter(), {}), arrived)

    async def perceive(self, image, after_call: bool = False) -> dict:
        arrived = (time.time(), time.perf_counter())
        model_id = serve.get_multiplexed_model_id()
        try:
            recognizer = (await self.get_model(model_id)).model
            check_image(image)
        except PoolError as err:
            return _error(err)
        # a batch holds one kind (requests are grouped by their args); one kind when the flag is ignored
        args = {"after_call": bool(after_call) and recognizer.after_call_input}
        key = request_key(model_id, args, image) if is_deterministic(recognizer) else None
        return await self.cached(model_id, key, (model_id, image, args, time.perf_counter(), {}), arrived)

    async def cached(self, model_id: str, key: tuple | None, request: tuple, arrived: tuple) -> dict:
        """The answer from this replica's cache, or from the batch ``request`` joins (stored
        unless it is an error), with its ``timing``; the cache's counters go to the stats actor."""
        answer = await self.cache.get_or_compute(
            model_id, key, lambda: self.batched(request), storable=lambda a: "error" not in a, copy_out=False
        )
        if self.cache.enabled:
            self.stats_actor.record.remote([], [], (self.replica, self.cache.snapshot()))
        return {**answer, "timing": _timing(arrived, request[3], request[4])}

    async def available_tools(self) -> list[str]:
        from tool_pool.tools import TOOLS

        return [
            n
            for n in TOOLS.names()
            if (not self.allowed or n in self.allowed) and getattr(TOOLS.get(n), "available", True)
        ]

    async def batched(self, requests: list[tuple]) -> list[dict]:
        # replaced per app by a @serve.batch wrapper in build_app
        started = time.perf_counter()
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (model_id, image, extra, _, _) in enumerate(requests):
            key = (model_id, image.shape, repr(sorted(extra.items())) if isinstance(extra, dict) else None)
            groups[key].append(i)
        answers: list[dict] = [None] * len(requests)  # type: ignore[list-item]
        records = []
        loop = asyncio.get_running_loop()
        for (model_id, _, _), rows in groups.items():
            t0 = time.perf_counter()
            wait = sum(started - requests[i][3] for i in rows)
            forward, cpu, done = t0, 0.0, t0
            try:
                model = (await self.get_model(model_id)).model
                images = [requests[i][1] for i in rows]
                # The forward runs on the replica's one compute thread, so the event loop keeps
                # admitting requests (and answering cache hits) while it runs: the next batch forms
                # during this one's forward instead of waiting in the actor's queue.
                forward = time.perf_counter()
                results, cpu = await loop.run_in_executor(
                    self.compute,
                    self.forward,
                    model_id,
                    model,
                    images,
                    requests[rows[0]][2],
                    [requests[i][2] for i in rows],
                )
                done = time.perf_counter()
                for i, result in zip(rows, results):
                    answers[i] = result
                errors = 0
            except PoolError as err:
                done = time.perf_counter()
                for i in rows:
                    answers[i] = _error(err)
                errors = len(rows)
            for i in rows:
                stamp = {"forward": forward, "forwarded": done, "cpu": cpu}
                requests[i][4].update(stamp, batch=started, batch_size=len(rows))
            records.append((model_id, len(rows), wait, time.perf_counter() - t0, errors))
        self.stats_actor.record.remote(records, [], None, (self.replica, self.adapt_batch_wait(records)))
        return answers

    def forward(self, model_id: str, model, images: list, args: dict | None, refs: list) -> tuple[list[dict], float]:
        """One group's answers and the CPU seconds spent on them, on the compute thread (torch's
        intra-op threads are set per thread, so they are set here)."""
        import torch

        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        cpu = time.process_time()  # all threads: torch's intra-op workers too
        if model_id.startswith("tool:"):
            step = self.forward_batch or len(images)
            outs = [
                out for k in range(0, len(images), step) for out in run_tool_batch(model, images[k : k + step], args)
            ]
            results = [{"image": out} for out in outs]
        elif model_id.startswith("perception:"):
            results = [{"perception": p} for p in perceive_batch(model, images, **(args or {}))]
        else:
            values = score_batch(model, images, refs if all(r is not None for r in refs) else None)
            results = [{"score": value} for value in values]
        return results, time.process_time() - cpu

    def adapt_batch_wait(self, records: list[tuple]) -> dict:
        """Scale the next batches' wait to the forward time; what this replica runs with now."""
        import torch

        forward = sum(run_s for _, _, _, run_s, _ in records)
        self.forward_s = forward if self.forward_s is None else 0.8 * self.forward_s + 0.2 * forward
        wait = scaled_batch_wait(self.forward_s, self.wait_scale, self.wait_cap)
        setter = getattr(self.batched, "set_batch_wait_timeout_s", None)  # set on the @serve.batch wrapper
        if setter is not None:
            setter(wait)
        return {
            "torch_threads": torch.get_num_threads(),
            "batch_wait_s": wait,
            "forward_s": self.forward_s,
            "forward_batch": self.forward_batch,
        }


def _timing(arrived: tuple, queued: float, stamps: dict) -> dict:
    """Where one request's time went in the replica (seconds): ``admit`` (checks, cache key),
    ``queue`` (until its batch started), ``form`` (grouping, model lookup, earlier groups of the
    batch), ``forward`` (the tool on the batch: stacking, forward, unstacking; ``forward_cpu``: the
    CPU seconds this process spent in it, all threads), ``back`` (until
    the answer left this method); ``arrived``/``replied`` are wall-clock times for the client.
    A request answered from the cache (or by an identical one in flight) has only admit and back."""
    now = time.perf_counter()
    timing = {"arrived": arrived[0], "replied": time.time(), "admit": queued - arrived[1]}
    if stamps:
        timing.update(
            queue=stamps["batch"] - queued,
            form=stamps["forward"] - stamps["batch"],
            forward=stamps["forwarded"] - stamps["forward"],
            back=now - stamps["forwarded"],
            forward_cpu=stamps["cpu"],
            batch_size=stamps["batch_size"],
        )
    else:
        timing["back"] = now - queued
    return timing


def build_app(pool_cfg) -> serve.Application:
    """The Serve application for a ``pool`` recipe section (tir.config.PoolConfig)."""
    cls = type("ToolPool", (ToolPoolDeployment,), {})
    cls.get_model = serve.multiplexed(max_num_models_per_replica=pool_cfg.max_models_per_replica)(
        ToolPoolDeployment.get_model
    )
    cls.batched = serve.batch(
        max_batch_size=pool_cfg.max_batch_size, batch_wait_timeout_s=pool_cfg.batch_wait_timeout_s
    )(ToolPoolDeployment.batched)
    deployment = serve.deployment(
        cls,
        name="ToolPool",
        num_replicas=pool_cfg.num_replicas,
        ray_actor_options=replica_options(pool_cfg),
        max_ongoing_requests=max(64, 4 * pool_cfg.max_batch_size),
    )
    return deployment.bind(
        pool_cfg.name + STATS_ACTOR_SUFFIX,
        list(pool_cfg.tools),
        str(manifest_path(pool_cfg.manifest)) if pool_cfg.manifest else None,
        int(pool_cfg.cache_bytes),
        torch_threads(pool_cfg.torch_threads, pool_cfg.num_cpus_per_replica),
        (pool_cfg.batch_wait_timeout_s, pool_cfg.batch_wait_scale),
        forward_batch(pool_cfg.forward_batch, pool_cfg.num_gpus_per_replica),
    )


def replica_options(pool_cfg) -> dict:
    """Each replica's Ray actor options: CPUs, GPUs, and the custom resources (``pool.resources``)
    that pin it to nodes."""
    from tir.config import custom_resources

    options = {"num_cpus": pool_cfg.num_cpus_per_replica, "num_gpus": pool_cfg.num_gpus_per_replica}
    resources = custom_resources(pool_cfg)
    return {**options, "resources": resources} if resources else options


def start_pool(pool_cfg):
    """Start the pool application (and its stats actor) on the connected Ray cluster and return
    a client. Idempotent per name: a second call connects to the running pool."""
    from tool_pool.client import ServePool

    stats_name = pool_cfg.name + STATS_ACTOR_SUFFIX
    PoolStatsActor.options(name=stats_name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached").remote()
    serve.start(proxy_location="Disabled")  # handles only: no HTTP proxy to pay for
    if pool_cfg.name not in serve.status().applications:
        serve.run(build_app(pool_cfg), name=pool_cfg.name, route_prefix=None)
    return ServePool(pool_cfg.name, timeout_s=pool_cfg.call_timeout_s, max_retries=pool_cfg.max_retries)


def replica_nodes(name: str, timeout_s: int = 10) -> list[str]:
    """The Ray node id of each live replica of the pool ``name`` (the state API: the cluster's
    dashboard must be up, as it is for every job)."""
    from ray.util.state import list_actors

    replicas = list_actors(
        filters=[("class_name", "=", f"ServeReplica:{name}:ToolPool"), ("state", "=", "ALIVE")], timeout=timeout_s
    )
    return sorted(actor.node_id for actor in replicas)


def stop_pool(name: str) -> None:
    serve.delete(name)
    try:
        ray.kill(ray.get_actor(name + STATS_ACTOR_SUFFIX, namespace=NAMESPACE))
    except ValueError:
        pass
