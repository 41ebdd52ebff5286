"""RestorationEnv on the real local pool and real tools: turns, errors as observations, limits."""

import asyncio

import numpy as np
import pytest

import tir  # noqa: F401  - shims first
from tir.agent import prompts
from tir.agent.env import RestorationEnv, perception_cues
from tir.data.synth import synthesize
from tool_pool.client import LocalPool
from tool_pool.tools import tool_schemas

TOOLS = ["denoise_tv", "brighten_shift", "dehaze_dcp", "sr_bicubic"]
SCHEMAS = tool_schemas(TOOLS)


@pytest.fixture(scope="module")
def noisy():
    return synthesize("builtin", "noise", per_image=1, seed=0, crop=96, progress=False).column("lq")[0]


def run(coroutine):
    return asyncio.run(coroutine)


def make_env(**options):
    return RestorationEnv(LocalPool(TOOLS), SCHEMAS, **options)


def call(name, **arguments):
    return prompts.format_call(prompts.ToolCall(name, arguments))


def test_reset_shows_the_tools_and_the_photo(noisy):
    env = make_env()
    first = run(env.reset(noisy))
    assert first.image is noisy and env.images_shown == [noisy]
    assert [m["role"] for m in env.messages] == ["system", "user"]
    system = prompts.message_text(env.messages[0])
    assert all(name in system for name in TOOLS)
    assert "96x96" in prompts.message_text(first.message) and prompts.count_images([first.message]) == 1
    assert env.turns == 0 and not env.done


def test_a_tool_call_runs_through_the_pool_and_shows_the_new_image(noisy):
    env = make_env()

    async def episode():
        await env.reset(noisy)
        return await env.step(call("denoise_tv", strength=1.0))

    step = run(episode())
    assert not step.done and step.observation.image is env.image
    assert env.image.shape == noisy.shape and not np.array_equal(env.image, noisy)
    assert step.observation.message["role"] == "tool" and "denoise_tv returned a 96x96 image" in prompts.message_text(
        step.observation.message
    )
    [record] = env.tool_calls
    assert record["name"] == "denoise_tv" and record["arguments"] == {"strength": 1.0} and record["ok"]
    assert record["error_kind"] is None and record["seconds"] > 0 and record["committed"]
    assert [m["role"] for m in env.messages] == ["system", "user", "assistant", "tool"]
    assert len(env.images_shown) == 2 and env.log[-1]["kind"] == "tool"


def test_malformed_replies_become_error_observations_up_to_the_limit(noisy):
    env = make_env(max_turns=8, max_format_errors=3)

    async def episode():
        await env.reset(noisy)
        return [await env.step(reply) for reply in ("hello", call("denoise_tvv"), '<tool_call>{"name": </tool_call>')]

    first, second, third = run(episode())
    assert (
        not first.done
        and first.observation.image is None
        and "Error: no tool call found" in prompts.message_text(first.observation.message)
    )
    assert "did you mean 'denoise_tv'" in prompts.message_text(second.observation.message)
    assert third.done and third.stop_reason == "parse_error_limit" and third.observation is None
    assert env.format_error_kinds == ["no_action", "unknown_tool", "bad_json"]
    assert env.image is noisy and env.tool_calls == [] and len(env.images_shown) == 1


def test_the_turn_limit_counts_malformed_replies(noisy):
    env = make_env(max_turns=2, max_format_errors=5)

    async def episode():
        await env.reset(noisy)
        return [await env.step("no call here") for _ in range(2)]

    first, last = run(episode())
    assert not first.done and last.done and last.stop_reason == "max_turns" and env.format_errors == 2


def test_a_failing_tool_is_an_observation_not_an_exception():
    env = make_env()
    tiny = np.zeros((6, 6, 3), np.uint8)  # below the tools' 8 px minimum

    async def episode():
        await env.reset(tiny)
        return await env.step(call("denoise_tv"))

    step = run(episode())
    assert not step.done and step.observation.image is None
    text = prompts.message_text(step.observation.message)
    assert text.startswith("Error: tool 'denoise_tv' failed:") and "The image is unchanged." in text
    [record] = env.tool_calls
    assert not record["ok"] and record["error_kind"] == "bad_image" and "8 px" in record["error"]
    assert env.image is tiny and env.summary()["tool_errors"] == 1 and env.format_errors == 0


def test_a_tool_the_pool_does_not_serve_fails_cleanly(noisy):
    env = RestorationEnv(LocalPool(["denoise_tv"]), SCHEMAS)  # the prompt lists more than is served

    async def episode():
        await env.reset(noisy)
        return await env.step(call("brighten_shift"))

    step = run(episode())
    assert not step.done and env.tool_calls[0]["error_kind"] == "unknown_tool"


def test_the_turn_limit_ends_after_running_the_last_call(noisy):
    env = make_env(max_turns=2)

    async def episode():
        await env.reset(noisy)
        return [await env.step(call(name)) for name in ("brighten_shift", "sr_bicubic")]

    first, last = run(episode())
    assert not first.done and last.done and last.stop_reason == "max_turns" and last.observation is None
    assert env.image.shape == (384, 384, 3)  # the last call ran: its output is the final image
    assert env.summary()["final_image"] is env.image and env.summary()["num_turns"] == 2
    assert len(env.images_shown) == 2  # the final image is never shown: nothing more to decide
    with pytest.raises(RuntimeError, match="ended"):
        run(env.step(call("denoise_tv")))


def test_the_answer_ends_the_episode(noisy):
    env = make_env()

    async def episode():
        await env.reset(noisy)
        return await env.step(prompts.format_stop())

    step = run(episode())
    assert step.done and step.stop_reason == "answer" and isinstance(step.action, prompts.Stop)
    assert env.image is noisy and env.turns == 1


def test_cues_are_measured_on_every_image_shown(noisy):
    seen = []

    def cues(image):
        seen.append(image.shape)
        return {"noise_sigma": float(image.std())}

    env = make_env(cues=cues)

    async def episode():
        await env.reset(noisy)
        await env.step(call("sr_bicubic"))

    run(episode())
    assert seen == [(96, 96, 3), (384, 384, 3)]
    assert "Measured cues: noise_sigma=" in prompts.message_text(env.messages[1])
    assert "Measured cues: noise_sigma=" in prompts.message_text(env.messages[3])


def test_a_pool_served_perception_is_told_which_images_are_tool_outputs(noisy):
    told = []

    async def cues(image, pool, after_call=False):  # as a learned perception served by the pool
        told.append((image.shape, after_call))
        return "likely=none"

    env = make_env(cues=cues)

    async def episode():
        await env.reset(noisy)
        await env.step(call("sr_bicubic"))
        output = await env.try_tool(prompts.ToolCall("denoise_tv", {}))
        await env.commit(prompts.ToolCall("denoise_tv", {}), output)

    run(episode())
    assert told == [((96, 96, 3), False), ((384, 384, 3), True), ((384, 384, 3), True)]


def test_perception_cues_render_one_line(noisy):
    line = perception_cues()(noisy)
    assert isinstance(line, str) and "noise_sigma=" in line and "size=96x96" in line and "\n" not in line


def test_explore_commit_and_undo(noisy):
    env = make_env(max_turns=3)

    async def episode():
        await env.reset(noisy)
        tried = {name: await env.try_tool(prompts.ToolCall(name, {})) for name in ("denoise_tv", "brighten_shift")}
        assert env.turns == 0 and env.image is noisy  # exploring takes no turn
        await env.commit(prompts.ToolCall("denoise_tv", {}), tried["denoise_tv"])
        return tried

    tried = run(episode())
    assert env.turns == 1 and env.image is tried["denoise_tv"]
    assert [(c["name"], c["committed"]) for c in env.tool_calls] == [("denoise_tv", True), ("brighten_shift", False)]
    assert [m["role"] for m in env.messages] == ["system", "user", "assistant", "tool"]
    env.undo()
    assert env.turns == 0 and env.image is noisy and len(env.messages) == 2 and len(env.images_shown) == 1
    assert len(env.tool_calls) == 2  # explorations stay paid for
    with pytest.raises(ValueError, match="no successful try_tool"):
        run(env.commit(prompts.ToolCall("dehaze_dcp", {}), noisy))


def test_bad_construction_and_images_are_named(noisy):
    with pytest.raises(ValueError, match="max_turns"):
        RestorationEnv(LocalPool(), SCHEMAS, max_turns=0)
    with pytest.raises(ValueError, match="at least one tool"):
        RestorationEnv(LocalPool(), [])
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        run(make_env().reset(noisy.astype(np.float32)))


class CountingPool(LocalPool):
    """A LocalPool that counts the tool calls that reach it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []

    async def run(self, tool, image, **args):
        self.calls.append(tool)
        return await super().run(tool, image, **args)


def test_a_call_over_the_size_limits_is_refused_as_a_tool_error_and_never_runs():
    pool = CountingPool(TOOLS)
    env = RestorationEnv(pool, SCHEMAS, max_turns=4, max_side=1000, max_pixels=10**6)
    image = np.full((300, 200, 3), 128, np.uint8)

    async def episode():
        await env.reset(image)
        return await env.step(call("sr_bicubic"))

    step = run(episode())
    assert pool.calls == [] and env.image is image and not step.done
    assert step.observation.image is None and "over the limit" in prompts.message_text(step.observation.message)
    [record] = env.tool_calls
    assert not record["ok"] and record["error_kind"] == "too_large" and "800x1200" in record["error"]
    assert env.summary()["tool_errors"] == 1 and env.log[-1]["kind"] == "tool_error"
    # within the limits the same call runs; the pixel limit counts too
    assert run(env.try_tool(prompts.ToolCall("sr_bicubic", {}), image[:250])) is not None
    assert pool.calls == ["sr_bicubic"]
    narrow = RestorationEnv(pool, SCHEMAS, max_side=1000, max_pixels=800 * 800)
    run(narrow.reset(image))
    assert run(narrow.try_tool(prompts.ToolCall("sr_bicubic", {}), image[:250])) is None
    assert narrow.tool_calls[-1]["error_kind"] == "too_large" and pool.calls == ["sr_bicubic"]
    with pytest.raises(ValueError, match="max_side"):
        RestorationEnv(pool, SCHEMAS, max_side=0)


def test_the_size_limits_come_from_the_recipe():
    from tir.agent.env import MAX_PIXELS, MAX_SIDE, recipe_limits
    from tir.agent.loop import LoopSettings
    from tir.config import load_recipe

    cfg = load_recipe(None, ["env.max_side=512", "env.max_pixels=1000"])
    assert recipe_limits(cfg) == {"max_side": 512, "max_pixels": 1000}
    settings = LoopSettings.from_recipe(cfg.rollout, cfg.env)
    assert (settings.max_side, settings.max_pixels) == (512, 1000)
    defaults = {"max_side": MAX_SIDE, "max_pixels": MAX_PIXELS}
    assert recipe_limits(load_recipe(None)) == defaults == {"max_side": 4096, "max_pixels": 4096 * 4096}


def test_soak_adversarial_super_resolution_every_turn_stays_bounded():
    """A scripted policy that asks for x4 super-resolution every turn, 200 turns from 128x128: the
    image stops at the limit, every refused call is a tool-error observation, and memory stays
    bounded (the stated bound: 400 MB of peak RSS growth, 200 MB of peak traced allocation)."""
    import resource
    import tracemalloc

    turns = 200
    pool = CountingPool(TOOLS)
    env = RestorationEnv(pool, SCHEMAS, max_turns=turns)
    image = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)

    async def episode():
        observations = [await env.reset(image)]
        while not env.done:
            step = await env.step(call("sr_bicubic"))
            observations.append(step.observation)
        return observations

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    try:
        observations = run(episode())
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024

    assert env.turns == turns and env.stop_reason == "max_turns"
    assert env.image.shape == (2048, 2048, 3)  # 128 -> 512 -> 2048; 8192 would pass 4096
    assert max(env.image.shape[:2]) <= env.max_side and env.image.shape[0] * env.image.shape[1] <= env.max_pixels
    assert pool.calls == ["sr_bicubic"] * 2  # refused calls never reach the pool
    refused = [r for r in env.tool_calls if not r["ok"]]
    assert len(refused) == turns - 2 and all(r["error_kind"] == "too_large" for r in refused)
    shown = [o for o in observations[3:] if o is not None]
    assert len(shown) == turns - 3  # the last turn ends the episode: nothing more is shown
    assert all(o.image is None and "over the limit" in prompts.message_text(o.message) for o in shown)
    assert len(env.images_shown) == 3
    assert traced_peak < 200e6, f"peak traced allocation {traced_peak / 1e6:.0f} MB"
    assert rss_growth < 400e6, f"peak RSS grew by {rss_growth / 1e6:.0f} MB"
