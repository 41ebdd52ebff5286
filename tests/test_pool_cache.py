"""The pool's content-addressed result cache (tool_pool/cache.py), in LocalPool and in the Serve
replicas: exact hits, only deterministic models, a byte bound with LRU eviction, identical
requests in flight computed once. (A replica killed mid-burst: tests/test_pool.py.)"""

import asyncio
import threading
import time

import cv2
import numpy as np
import pytest

from tool_pool.cache import ResultCache, cache_metrics, cache_totals, is_deterministic, request_key
from tool_pool.client import LocalPool
from tool_pool.execution import PoolError
from tool_pool.tools import TOOLS, Tool, register_tool, strength_argument


class CountingBlur(Tool):
    """A real (if simple) denoiser that counts how often it computes; ``delay_s`` keeps calls in
    flight long enough to overlap."""

    subtask = "denoising"
    description = "Test probe: blends the image with its 3x3 box blur, and counts its calls."
    parameters = strength_argument()

    def __init__(self, name: str, delay_s: float = 0.0, deterministic: bool = True):
        self.name, self.delay_s, self.deterministic = name, delay_s, deterministic
        self.calls, self._lock = 0, threading.Lock()

    def run(self, images, strength: float = 1.0):
        with self._lock:
            self.calls += len(images)
        time.sleep(self.delay_s)
        weight = min(strength, 1.0)
        return [cv2.addWeighted(im, 1 - weight, cv2.blur(im, (3, 3)), weight, 0) for im in images]


class NoisyBlur(CountingBlur):
    """Adds unseeded noise: the same call gives a different image each time."""

    def run(self, images, strength: float = 1.0):
        blurred = super().run(images, strength)
        rng = np.random.default_rng()
        return [np.clip(im + rng.integers(-3, 4, im.shape), 0, 255).astype(np.uint8) for im in blurred]


@pytest.fixture
def probe(request):
    """Register a probe tool for one test (``probe(cls, **kwargs)``), unregistered afterwards."""
    names = []

    def make(cls=CountingBlur, **kwargs):
        tool = cls(f"zz_cache_probe_{len(names)}", **kwargs)
        register_tool(tool)
        names.append(tool.name)
        return tool

    yield make
    for name in names:
        TOOLS._items.pop(name, None)


def image(seed: int = 0, side: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def run(coro):
    return asyncio.run(coro)


def totals(pool) -> dict:
    return cache_totals(run(pool.stats()))


def test_a_hit_returns_exactly_what_a_fresh_call_returns(probe):
    tool, pool, im = probe(), LocalPool(), image(0, 64)
    first = run(pool.run(tool.name, im, strength=0.5))
    first[:] = 0  # the caller's copy: changing it must not reach the cache
    hit = run(pool.run(tool.name, im, strength=0.5))
    fresh = tool([im], strength=0.5)[0]
    assert hit.dtype == fresh.dtype and hit.shape == fresh.shape and hit.tobytes() == fresh.tobytes()
    assert hit.flags.writeable  # as a fresh result is
    assert tool.calls == 2  # one through the pool, one fresh
    # defaults are filled in before the key is made: an omitted default is the same call
    assert run(pool.run(tool.name, im)).tobytes() == run(pool.run(tool.name, im, strength=1.0)).tobytes()
    assert tool.calls == 3
    # a different argument or a different image is a different call
    run(pool.run(tool.name, im, strength=0.25))
    run(pool.run(tool.name, im[::-1].copy(), strength=0.5))
    assert tool.calls == 5
    # scores: a hit is the same float; a no-reference metric's key leaves the reference out
    scores = [run(pool.score(["psnr", "niqe"], image(2, 128), image(3, 128))) for _ in range(2)]
    assert scores[0] == scores[1]
    run(pool.score(["niqe"], image(2, 128), image(4, 128)))
    stats = run(pool.stats())
    assert stats[f"tool:{tool.name}"]["calls"] == 4 and stats[f"tool:{tool.name}"]["cache_hits"] == 2
    assert stats["metric:psnr"]["cache_hits"] == 1 and stats["metric:niqe"]["cache_hits"] == 2
    assert stats[f"tool:{tool.name}"]["cache_saved_s"] > 0


def test_a_tool_not_marked_deterministic_is_never_cached(probe):
    tool, pool, im = probe(NoisyBlur, deterministic=False), LocalPool(), image()
    outs = [run(pool.run(tool.name, im)) for _ in range(3)]
    assert tool.calls == 3
    assert not all(np.array_equal(outs[0], o) for o in outs[1:])  # it really is random
    row = run(pool.stats())[f"tool:{tool.name}"]
    assert row["cache_hits"] == row["cache_misses"] == row["cache_entries"] == row["cache_bytes"] == 0


def test_models_on_cuda_count_as_deterministic_only_in_torch_deterministic_mode(probe):
    import torch

    tool = probe()
    assert is_deterministic(tool)  # no device: CPU
    tool.device = "cuda:0"
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert not is_deterministic(tool)
        torch.use_deterministic_algorithms(True)
        assert is_deterministic(tool)
    finally:
        torch.use_deterministic_algorithms(was)


def test_the_byte_bound_holds_and_the_least_recently_used_go_first(probe):
    tool = probe()
    probe_pool = LocalPool()  # the size of one stored result, measured
    run(probe_pool.run(tool.name, image(0)))
    one = probe_pool.cache.nbytes
    pool = LocalPool(cache_bytes=3 * one + one // 2)  # room for three
    images = [image(seed) for seed in range(6)]
    for im in images[:3]:
        run(pool.run(tool.name, im))
    run(pool.run(tool.name, images[0]))  # 0 is now the most recently used: 1 goes first
    run(pool.run(tool.name, images[3]))
    held = totals(pool)
    assert held["cache_entries"] == 3 and held["cache_bytes"] <= pool.cache.capacity
    assert [k[2] for k in pool.cache.keys()] == [request_key("", {}, im)[2] for im in (images[2], images[0], images[3])]
    calls = tool.calls
    run(pool.run(tool.name, images[0]))  # still held
    assert tool.calls == calls
    run(pool.run(tool.name, images[1]))  # evicted: computed again
    assert tool.calls == calls + 1
    for im in images:  # many more inserts than fit: the bound holds throughout
        run(pool.run(tool.name, im, strength=0.5))
        assert pool.cache.nbytes <= pool.cache.capacity and len(pool.cache) <= 3
    # a result larger than the whole bound is not stored; 0 bytes switches the cache off
    small = LocalPool(cache_bytes=one // 2)
    run(small.run(tool.name, images[0]))
    assert len(small.cache) == 0 and small.cache.nbytes == 0
    off, calls = LocalPool(cache_bytes=0), tool.calls
    for _ in range(2):
        run(off.run(tool.name, images[0]))
    assert tool.calls == calls + 2 and totals(off)["cache_misses"] == 0


def test_identical_concurrent_requests_are_computed_once(probe):
    tool, pool, im = probe(delay_s=0.3), LocalPool(), image()
    start, outs = threading.Barrier(8), [None] * 8

    def caller(i):  # each thread its own event loop, as several drivers would be
        start.wait()
        outs[i] = run(pool.run(tool.name, im))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tool.calls == 1
    assert all(o.tobytes() == outs[0].tobytes() for o in outs)
    assert len({id(o) for o in outs}) == 8  # each caller its own copy

    async def burst():  # the same within one event loop
        return await asyncio.gather(*(pool.run(tool.name, im, strength=0.5) for _ in range(8)))

    assert len(run(burst())) == 8 and tool.calls == 2
    row = run(pool.stats())[f"tool:{tool.name}"]
    assert row["cache_misses"] == 2 and row["cache_hits"] == 14 and row["calls"] == 2


def test_a_failed_call_is_not_stored_and_waiters_get_its_error():
    cache, calls = ResultCache(1 << 20), []

    async def failing():
        calls.append(1)
        await asyncio.sleep(0.05)
        raise PoolError("tool_failed", "probe failed")

    async def burst():
        return await asyncio.gather(
            *(cache.get_or_compute("tool:x", ("k",), failing) for _ in range(3)), return_exceptions=True
        )

    results = run(burst())
    assert len(calls) == 1 and all(isinstance(r, PoolError) and r.kind == "tool_failed" for r in results)
    assert len(cache) == 0
    run(burst())
    assert len(calls) == 2  # not remembered: tried again


def test_the_rl_log_gets_the_cache_figures(probe):
    tool, pool, im = probe(), LocalPool(), image()
    for _ in range(3):
        run(pool.run(tool.name, im))
    logged = run(cache_metrics(pool))  # what tir.trainer.rl adds to every step's metrics
    assert logged["pool/cache_hits"] == 2 and logged["pool/cache_misses"] == 1
    assert logged["pool/cache_hit_rate"] == pytest.approx(2 / 3) and logged["pool/cache_entries"] == 1
    assert logged["pool/cache_mib"] > 0 and logged["pool/cache_saved_s"] > 0


# ---------------------------------------------------------------- on Ray Serve


def test_serve_replicas_cache_and_report_merged_stats(serve_pool):
    im = image(7, 96)
    before = totals(serve_pool)
    outs = [run(serve_pool.run("denoise_tv", im)) for _ in range(6)]
    fresh = TOOLS.get("denoise_tv")([im])[0]
    assert all(o.tobytes() == fresh.tobytes() for o in outs)
    after = totals(serve_pool)
    # at most one miss per replica (2), the rest hits; bytes and entries are the replicas' sum
    assert 1 <= after["cache_misses"] - before["cache_misses"] <= 2
    assert after["cache_hits"] - before["cache_hits"] >= 4
    assert after["cache_entries"] >= before["cache_entries"] + 1 and after["cache_bytes"] > before["cache_bytes"]
