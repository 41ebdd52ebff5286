"""The model-call pool on real Ray Serve (CPU), and its in-process twin."""

import asyncio

import numpy as np
import pytest

from tool_pool.client import LocalPool, ServePool
from tool_pool.execution import PoolError
from tool_pool.scorers import get_scorer
from tool_pool.tools import TOOLS, tools_for_subtask

DENOISER = tools_for_subtask("denoising")[0].name


@pytest.fixture(scope="module")
def image():
    from skimage import data

    clean = data.astronaut()[100:228, 200:328].astype(np.float64)
    noisy = clean + np.random.default_rng(0).normal(0, 25, clean.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8), clean.astype(np.uint8)


def run(coro):
    return asyncio.run(coro)


def test_pool_runs_the_tool_as_a_local_call_would(serve_pool, image):
    noisy, clean = image
    out = run(serve_pool.run(DENOISER, noisy))
    np.testing.assert_array_equal(out, TOOLS.get(DENOISER)([noisy])[0])
    local = run(LocalPool().run(DENOISER, noisy))
    np.testing.assert_array_equal(out, local)


def test_concurrent_calls_are_batched_and_models_loaded_once_per_replica(serve_pool, image):
    noisy, _ = image

    images = [np.ascontiguousarray(np.roll(noisy, i, axis=1)) for i in range(1, 25)]  # distinct: no cache hits

    async def burst():
        return await asyncio.gather(*(serve_pool.run(DENOISER, im) for im in images))

    outs = run(burst())
    assert len(outs) == 24
    for i in (0, 23):
        np.testing.assert_array_equal(outs[i], TOOLS.get(DENOISER)([images[i]])[0])
    stats = run(serve_pool.stats())[f"tool:{DENOISER}"]
    assert stats["calls"] >= 24
    assert stats["max_batch"] > 1  # calls from different callers shared one tool invocation
    assert 1 <= stats["loads"] <= 2  # multiplexed: loaded once per replica, not per call


def test_scores_match_the_scorers(serve_pool, image):
    noisy, clean = image
    scores = run(serve_pool.score(["psnr", "ssim", "niqe"], noisy, clean))
    assert scores["psnr"] == pytest.approx(get_scorer("psnr").score([noisy], [clean])[0], rel=1e-6)
    assert scores["ssim"] == pytest.approx(get_scorer("ssim").score([noisy], [clean])[0], rel=1e-6)
    assert np.isfinite(scores["niqe"])


def test_the_pool_serves_the_shipped_recogniser_on_photos_and_on_tool_outputs(serve_pool, image):
    from tir.data.recognizer import load_recognizer

    noisy, _ = image
    model = load_recognizer()
    for after_call in (False, True, False):  # the cache keeps the two kinds of image apart
        seen = run(serve_pool.perceive(noisy, "default", after_call=after_call))
        expected = model.probabilities([noisy], after_call)[0]
        assert seen["probabilities"] == pytest.approx(expected, abs=1e-6)
        assert seen["degradations"] == model.decide(expected)


@pytest.mark.parametrize(
    "call, kind, text",
    [
        (lambda p, im: p.run(DENOISER[:-1] + "x", im), "unknown_tool", "did you mean"),
        (lambda p, im: p.run(DENOISER, im, not_an_argument=1), "bad_arguments", "not_an_argument"),
        (lambda p, im: p.run(DENOISER, im.astype(np.float32)), "bad_image", "uint8 HxWx3"),
        (lambda p, im: p.run(DENOISER, np.full((8, 8, 3), np.nan)), "bad_image", "NaN"),
        (lambda p, im: p.run(DENOISER, im[..., 0]), "bad_image", "uint8 HxWx3"),
        (lambda p, im: p.score(["psnr"], im), "bad_arguments", "full-reference"),
        (lambda p, im: p.score(["pnsr"], im), "unknown_metric", "did you mean 'psnr'"),
    ],
)
@pytest.mark.parametrize("backend", ["serve", "local"])
def test_bad_requests_get_typed_errors_and_do_not_hurt_the_pool(serve_pool, image, call, kind, text, backend):
    pool = serve_pool if backend == "serve" else LocalPool()
    with pytest.raises(PoolError, match=text) as err:
        run(call(pool, image[0]))
    assert err.value.kind == kind
    assert run(pool.run(DENOISER, image[0])).shape == image[0].shape  # still serving


def test_replica_settings_follow_the_recipe():
    from tir.config import RecipeError, load_recipe
    from tool_pool.serve_app import forward_batch, scaled_batch_wait, torch_threads

    assert [torch_threads("auto", cpus) for cpus in (0, 0.5, 1, 1.5, 4)] == [1, 1, 1, 2, 4]
    assert torch_threads("3", 1) == 3
    assert (forward_batch("auto", 0), forward_batch("auto", 0.5), forward_batch("4", 1)) == (1, 0, 4)
    assert load_recipe(None, ["pool.torch_threads=2"]).pool.torch_threads == "2"
    for bad in ("pool.torch_threads=0", "pool.torch_threads=many", "pool.forward_batch=0", "pool.batch_wait_scale=-1"):
        with pytest.raises(RecipeError, match=bad.split("=")[0]):
            load_recipe(None, [bad])
    assert scaled_batch_wait(None, 0.1, 0.01) == 0.01  # before any forward: the cap
    assert scaled_batch_wait(0.005, 0.1, 0.01) == pytest.approx(0.0005)  # a GPU-fast forward waits little
    assert scaled_batch_wait(3.0, 0.1, 0.01) == 0.01  # a CPU-slow one the cap
    assert scaled_batch_wait(0.005, 0, 0.01) == 0.01  # scale 0: the fixed wait


def test_replicas_report_their_threads_and_batch_wait_and_answers_their_profile(serve_pool, image):
    import ray

    from tool_pool.execution import NAMESPACE, STATS_ACTOR_SUFFIX

    noisy, _ = image
    images = [np.ascontiguousarray(np.roll(noisy, i, axis=0)) for i in range(1, 17)]  # distinct: all computed
    before = serve_pool.profile.calls

    async def burst():
        return await asyncio.gather(*(serve_pool.run(DENOISER, im) for im in images))

    run(burst())
    replicas = ray.get(ray.get_actor(serve_pool.name + STATS_ACTOR_SUFFIX, namespace=NAMESPACE).replicas.remote())
    assert replicas
    for settings in replicas.values():
        assert settings["torch_threads"] == 2  # the fixture's pool.torch_threads, not Ray's 1 for 0.5 CPUs
        assert settings["batch_wait_s"] == pytest.approx(min(0.05, 0.1 * settings["forward_s"]))
        assert settings["forward_batch"] == 1  # "auto" on a CPU replica: one image per forward pass
    profile = serve_pool.profile
    assert profile.calls - before == len(images)  # each computed call's answer carried its timing
    assert set(profile.means()) >= {"send", "queue", "forward", "receive", "total"}
    cached = profile.cached
    run(serve_pool.run(DENOISER, images[0]))  # the same image again: answered by a replica's cache
    run(serve_pool.run(DENOISER, images[0]))
    assert profile.cached > cached


def test_pool_is_found_by_name_from_another_process(serve_pool, image, ray_cluster):
    ray = ray_cluster

    @ray.remote(num_cpus=0)
    def restore_elsewhere(name, tool, img):
        import asyncio

        import tir  # noqa: F401
        from tool_pool.client import ServePool

        return asyncio.run(ServePool(name).run(tool, img))

    out = ray.get(restore_elsewhere.remote(serve_pool.name, DENOISER, image[0]))
    np.testing.assert_array_equal(out, run(serve_pool.run(DENOISER, image[0])))
    assert DENOISER in run(serve_pool.available_tools())


def test_no_call_is_lost_when_a_replica_is_killed_mid_burst(serve_pool, image, ray_cluster):
    """A replica restart loses its cache, never a call: 16 distinct images, each asked 4 times
    (so calls wait on the same computation in flight, and hit the cache), one replica killed."""
    from tool_pool.cache import cache_totals

    ray = ray_cluster
    big = np.tile(image[0], (2, 2, 1))  # 256 px: slow enough to be in flight
    images = [np.ascontiguousarray(np.roll(big, 3 * i, axis=0)) for i in range(16)]
    named = ray.util.list_named_actors(all_namespaces=True)
    replicas = [
        a["name"]
        for a in named
        if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{serve_pool.name}#")
    ]
    assert len(replicas) == 2, named
    before = cache_totals(run(serve_pool.stats()))

    async def burst():
        calls = [asyncio.ensure_future(serve_pool.run(DENOISER, images[i % 16])) for i in range(64)]
        await asyncio.sleep(0.5)
        in_flight = sum(not c.done() for c in calls)
        ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
        return in_flight, await asyncio.gather(*calls, return_exceptions=True)

    in_flight, results = run(burst())
    assert in_flight > 0, "the burst finished before the kill: the test did not test anything"
    expected = [TOOLS.get(DENOISER)([im])[0] for im in images]
    for i, result in enumerate(results):  # every call either succeeded (perhaps retried) or says clearly why not
        if isinstance(result, BaseException):
            assert isinstance(result, PoolError) and result.kind in ("replica_failed", "timeout"), repr(result)
        else:
            np.testing.assert_array_equal(result, expected[i % 16])
    assert sum(not isinstance(r, BaseException) for r in results) >= 32
    # Calls running on the dead replica come back as ActorDiedError and the client re-sends them
    # (serve_pool.retries counts those); calls still queued in Serve's router are re-routed by
    # Serve itself, so how many the client re-sent depends on timing and is not asserted.
    again = run(asyncio.wait_for(serve_pool.run(DENOISER, images[0]), 120))  # the pool serves again
    np.testing.assert_array_equal(again, expected[0])
    alive = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"}
    assert replicas[0] not in alive  # the kill really happened during the burst
    # the dead replica's cache is gone from the stats; the counters of what it served are kept
    after = cache_totals(run(serve_pool.stats()))
    stats_actor = ray.get_actor(serve_pool.name + "_stats", namespace="tir")
    assert replicas[0] not in ray.get(stats_actor.cache_replicas.remote())
    served = sum(not isinstance(r, BaseException) for r in results)
    assert after["cache_hits"] + after["cache_misses"] >= before["cache_hits"] + before["cache_misses"] + served


def test_unknown_pool_name_is_a_clear_error(ray_cluster, image):
    with pytest.raises(PoolError, match="no tool pool named 'nowhere'"):
        run(ServePool("nowhere").run(DENOISER, image[0]))
