"""The pool client interface: ``await pool.run(tool, image, **args)`` and
``await pool.score(metrics, image, reference)``, with two backends behind it.

- ``ServePool``: the cluster-wide Ray Serve application (tool_pool/serve_app.py), found by name
  from any process; calls are batched and multiplexed there.
- ``LocalPool``: tools and scorers loaded in the calling process (the no-pool ablation, and
  unit tests of tools).

Both raise ``PoolError`` with a machine ``kind`` for every failure a caller should handle, so
that the agent loop can turn a bad call into an observation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from functools import partial

import numpy as np

from tool_pool.cache import DEFAULT_CACHE_BYTES, ResultCache, Timed, is_deterministic, request_key
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

STAGES = ("send", "admit", "queue", "form", "forward", "back", "receive")


class CallProfile:
    """Where the time of a pool's computed calls went, summed per stage (seconds): ``send``
    (serialising, routing and the replica's actor queue, until the replica method starts),
    the replica's own stages (``serve_app._timing``), and ``receive`` (serialising the answer
    back until the caller has it). Calls answered from a cache count apart (``cached``)."""

    def __init__(self):
        self.calls = 0
        self.cached = 0
        self.images = 0  # summed batch sizes of the computed calls
        self.cpu_per_image = 0.0  # summed over calls: the replica's CPU seconds per image of the call's batch
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.total = 0.0

    def add(self, timing: dict, sent: float, received: float, total: float) -> None:
        if "forward" not in timing:
            self.cached += 1
            return
        self.calls += 1
        self.images += timing["batch_size"]
        self.cpu_per_image += timing["forward_cpu"] / timing["batch_size"]
        self.total += total
        self.seconds["send"] += timing["arrived"] - sent
        self.seconds["receive"] += received - timing["replied"]
        for stage in STAGES[1:-1]:
            self.seconds[stage] += timing[stage]

    def means(self) -> dict[str, float]:
        """Mean seconds per computed call, per stage and ``total`` (the caller's latency)."""
        n = max(self.calls, 1)
        return {
            **{stage: s / n for stage, s in self.seconds.items()},
            "total": self.total / n,
            "cpu_per_image": self.cpu_per_image / n,
        }


# ------------------------------------------------------------------ the local backend
class LocalPool:
    """Tools and scorers in the calling process: same interface, no batching across callers.
    Results of deterministic models are cached (``tool_pool.cache``; ``cache_bytes`` 0: off)."""

    def __init__(self, tools: Sequence[str] | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.allowed = list(tools or [])
        self.stats_ = PoolStats()
        self.cache = ResultCache(cache_bytes)
        self._loaded: set[str] = set()

    async def run(self, tool: str, image: np.ndarray, **args) -> np.ndarray:
        tool_obj = resolve_tool(tool, self.allowed)
        check_image(image)
        args = validated_arguments(tool_obj, args)
        model = f"tool:{tool}"
        key = request_key(model, args, image) if is_deterministic(tool_obj) else None
        out = await self.cache.get_or_compute(
            model, key, partial(self._compute, model, run_tool_batch, tool_obj, [image], args)
        )
        return out[0]

    async def score(
        self, metrics: Sequence[str], image: np.ndarray, reference: np.ndarray | None = None
    ) -> dict[str, float]:
        check_image(image)
        if reference is not None:
            check_image(reference, "reference")
        result = {}
        for name in metrics:
            scorer = get_scorer_or_error(name)
            model = f"metric:{name}"
            refs = [reference] if reference is not None else None
            read = reference if scorer.full_reference else None  # a no-reference metric ignores it
            key = request_key(model, None, image, read) if is_deterministic(scorer) else None
            values = await self.cache.get_or_compute(
                model, key, partial(self._compute, model, score_batch, scorer, [image], refs)
            )
            result[name] = values[0]
        return result

    async def perceive(self, image: np.ndarray, checkpoint: str = "default", after_call: bool = False) -> dict:
        """The learned recogniser's view of ``image`` (``tir.data.recognizer``):
        ``{"probabilities": {degradation: p}, "degradations": [...]}``; ``after_call``: ``image``
        is a tool's output, not the photo as given."""
        check_image(image)
        recognizer = get_recognizer_or_error(checkpoint)
        model = f"perception:{checkpoint}"
        args = {"after_call": bool(after_call) and recognizer.after_call_input}  # one answer when it is ignored
        key = request_key(model, args, image) if is_deterministic(recognizer) else None
        out = await self.cache.get_or_compute(
            model, key, partial(self._compute, model, perceive_batch, recognizer, [image], args["after_call"])
        )
        return out[0]

    async def _compute(self, model: str, fn, *args) -> Timed:
        """``fn(*args)`` in a worker thread, counted in the stats as one call of ``model``: its
        run time in the thread, and the wait for a thread as queue wait."""

        def timed():
            start = time.perf_counter()
            return fn(*args), time.perf_counter() - start

        self._count_load(model)
        start = time.perf_counter()
        out, run_s = await asyncio.to_thread(timed)
        self.stats_.record_batch(model, 1, max(time.perf_counter() - start - run_s, 0.0), run_s)
        return Timed(out, run_s)

    async def available_tools(self) -> list[str]:
        from tool_pool.tools import TOOLS

        return [name for name in TOOLS.names() if not self.allowed or name in self.allowed]

    async def stats(self) -> dict[str, dict[str, float]]:
        return self.stats_.snapshot(self.cache.snapshot())

    def _count_load(self, model: str) -> None:
        if model not in self._loaded:
            self._loaded.add(model)
            self.stats_.record_load(model)


# ------------------------------------------------------------------ the Ray Serve backend
class ServePool:
    """Client of the cluster-wide pool, found by its application name from any process.

    Calls time out after ``timeout_s``; a call that fails because its replica died (Serve does
    not retry in-flight calls) is retried up to ``max_retries`` times with backoff; a bad
    request is raised at once as a PoolError of a BAD_REQUEST kind."""

    def __init__(self, name: str = "tir_tool_pool", timeout_s: float = 60.0, max_retries: int = 3):
        self.name, self.timeout_s, self.max_retries = name, timeout_s, max_retries
        self.retries = 0  # calls re-sent after their replica died (for logs and tests)
        self.profile = CallProfile()  # where the time of this client's calls went
        self._handle = None

    @property
    def handle(self):
        if self._handle is None:
            from ray import serve

            try:
                self._handle = serve.get_app_handle(self.name)
            except Exception as err:  # noqa: BLE001 - Serve raises several kinds here
                raise PoolError(
                    "unavailable", f"no tool pool named {self.name!r} is running on this Ray cluster: {err}"
                ) from err
        return self._handle

    async def _call(self, method: str, model_id: str, *args) -> dict:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        last_error: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
            try:
                sent, start = time.time(), time.perf_counter()
                response = getattr(self.handle.options(multiplexed_model_id=model_id), method).remote(*args)
                answer = await asyncio.wait_for(response, self.timeout_s)
                if "timing" in answer:
                    self.profile.add(answer["timing"], sent, time.time(), time.perf_counter() - start)
            except asyncio.TimeoutError:
                raise PoolError("timeout", f"{model_id} did not answer within {self.timeout_s}s") from None
            except (ActorDiedError, ActorUnavailableError, RayActorError) as err:
                last_error = err  # the replica died mid-call: Serve routes the retry elsewhere
                self.retries += 1
                continue
            if "error" in answer:
                raise PoolError(answer["error"], answer["message"])
            return answer
        raise PoolError("replica_failed", f"{model_id}: {self.max_retries + 1} attempts failed; last: {last_error}")

    async def run(self, tool: str, image: np.ndarray, **args) -> np.ndarray:
        check_image(image)  # fail fast, before shipping a bad array across the cluster
        return (await self._call("run", f"tool:{tool}", image, args))["image"]

    async def score(
        self, metrics: Sequence[str], image: np.ndarray, reference: np.ndarray | None = None
    ) -> dict[str, float]:
        check_image(image)
        if reference is not None:
            check_image(reference, "reference")
        answers = await asyncio.gather(*(self._call("score", f"metric:{m}", image, reference) for m in metrics))
        return {m: a["score"] for m, a in zip(metrics, answers)}

    async def perceive(self, image: np.ndarray, checkpoint: str = "default", after_call: bool = False) -> dict:
        """The learned recogniser's view of ``image``, served (batched) by the pool: as LocalPool's."""
        check_image(image)
        return (await self._call("perceive", f"perception:{checkpoint}", image, bool(after_call)))["perception"]

    async def available_tools(self) -> list[str]:
        return await self.handle.available_tools.remote()

    async def stats(self) -> dict[str, dict[str, float]]:
        import ray

        return await ray.get_actor(self.name + STATS_ACTOR_SUFFIX, namespace=NAMESPACE).snapshot.remote()


def at_reference_size(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``image`` at the reference's size: the protocol upscales an output at 1/4 size (no
    super-resolution yet) before scoring it against HQ, the no-reference metrics included."""
    import cv2

    if image.shape[:2] == reference.shape[:2]:
        return image
    return cv2.resize(image, (reference.shape[1], reference.shape[0]), interpolation=cv2.INTER_CUBIC)


async def score_against(pool, metrics: Sequence[str], image: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Each metric of ``image`` (at the reference's size) against ``reference``, one pool request
    per metric; a metric that cannot score this image (NIQE on a flat one) is left out."""
    image = at_reference_size(image, reference)
    values = await asyncio.gather(*(pool.score([m], image, reference) for m in metrics), return_exceptions=True)
    for value in values:
        if isinstance(value, BaseException) and not isinstance(value, PoolError):
            raise value
    return {m: float(v[m]) for m, v in zip(metrics, values) if not isinstance(v, BaseException) and np.isfinite(v[m])}
