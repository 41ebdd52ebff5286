"""Training-free baselines on the real env, pool and tools."""

import asyncio

import numpy as np
import pytest

import tir  # noqa: F401  - shims first
from tir.agent import prompts
from tir.agent.baselines import (
    FIXED_TOOLS,
    ExhaustiveAgent,
    FixedOrderAgent,
    RandomAgent,
    better,
    make_baseline,
    nr_score,
    perceive_degradations,
    restoration_order,
    run_baseline,
    run_baseline_episode,
)
from tir.data.synth import synthesize
from tool_pool.client import LocalPool
from tool_pool.tools import get_tool, tool_schemas, tools_for_subtask

# Fast tools, two for most subtasks (so that exploring has a choice).
TOOLS = [
    "denoise_tv",
    "denoise_nlm",
    "jpeg_reapply",
    "sr_bicubic",
    "sr_lanczos",
    "derain_median",
    "derain_opening",
    "brighten_shift",
    "dehaze_dcp",
]
SCHEMAS = tool_schemas(TOOLS)


@pytest.fixture(scope="module")
def data():
    return synthesize(
        "builtin", "noise,rain,jpeg,lowres,noise+jpeg,rain+noise+lowres", per_image=1, seed=0, crop=128, progress=False
    )


def pick(batch, combo, image_id="astronaut"):
    rows = [
        i
        for i, (c, name) in enumerate(zip(batch.column("combo"), batch.column("image_id")))
        if c == combo and name == image_id
    ]
    return batch.take(rows)


def episode(agent, sample, degradations="known", max_turns=4, tools=TOOLS):
    known = sample.column("degradations")[0] if degradations == "known" else degradations
    schemas = tool_schemas(tools)
    return asyncio.run(run_baseline_episode(agent, LocalPool(tools), sample.column("lq")[0], schemas, known, max_turns))


def test_order_prior_undoes_compression_then_imaging_then_scene():
    assert restoration_order(["rain", "noise", "lowres"]) == ["lowres", "noise", "rain"]
    assert restoration_order(["dark", "defocus_blur", "jpeg"]) == ["jpeg", "defocus_blur", "dark"]
    assert restoration_order(["haze", "motion_blur", "lowres", "haze"]) == ["lowres", "motion_blur", "haze"]
    with pytest.raises(KeyError, match="unknown degradation 'fog'"):
        restoration_order(["fog"])


def test_perception_finds_the_clear_cut_degradations(data):
    for combo in ("noise", "rain", "jpeg", "lowres"):
        rows = [i for i, c in enumerate(data.column("combo")) if c == combo]
        for i in rows:
            found = perceive_degradations(data.column("lq")[i])
            assert combo in found, (combo, data.column("image_id")[i], found)
            assert found == restoration_order(found)


def test_fixed_order_uses_one_tool_per_subtask_in_prior_order(data):
    env, report = episode(FixedOrderAgent(), pick(data, "rain+noise+lowres"))
    assert [c["name"] for c in report["tool_calls"]] == ["sr_bicubic", "denoise_tv", "derain_median"]
    assert report["stop_reason"] == "answer" and report["num_turns"] == 4 and report["wall_s"] > 0
    assert env.image.shape == (128, 128, 3)
    # a subtask whose fixed tool is not served falls back to a served one; an unserved subtask is skipped
    _, report = episode(FixedOrderAgent(), pick(data, "rain+noise+lowres"), tools=["sr_lanczos", "denoise_nlm"])
    assert [c["name"] for c in report["tool_calls"]] == ["sr_lanczos", "denoise_nlm"]


def test_every_fixed_tool_is_a_tool_of_its_own_subtask():
    # a tool of another subtask is never served under this one: the baseline would silently fall back
    for subtask, name in FIXED_TOOLS.items():
        assert name in [tool.name for tool in tools_for_subtask(subtask)], (subtask, name)


def test_the_chat_of_a_baseline_reads_like_a_policy_s(data):
    env, _ = episode(FixedOrderAgent(), pick(data, "noise+jpeg"))
    replies = [prompts.message_text(m) for m in env.messages if m["role"] == "assistant"]
    actions = [prompts.parse_action(text, SCHEMAS) for text in replies]
    assert [type(a).__name__ for a in actions] == ["ToolCall", "ToolCall", "Stop"]
    assert [m["role"] for m in env.messages] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "tool",
        "assistant",
    ]


def test_random_agent_is_seeded_and_calls_only_served_tools(data):
    sample, tools = pick(data, "noise"), [name for name in TOOLS if not name.startswith("sr_")]  # keep images small
    runs = [
        episode(RandomAgent(seed=seed), sample, degradations=None, max_turns=6, tools=tools)[1] for seed in (7, 7, 8)
    ]
    names = [[c["name"] for c in run["tool_calls"]] for run in runs]
    assert names[0] == names[1]
    assert all(name in tools for run in names for name in run)
    assert all(run["stop_reason"] in ("answer", "max_turns") and run["wall_s"] > 0 for run in runs)
    many = [
        episode(RandomAgent(seed=seed), sample, degradations=None, max_turns=6, tools=tools)[1] for seed in range(6)
    ]
    assert len({tuple(c["name"] for c in run["tool_calls"]) for run in many}) > 1


def test_exhaustive_tries_every_tool_and_keeps_the_best(data):
    sample = pick(data, "noise+jpeg")
    pool = LocalPool(TOOLS)
    env, report = episode(ExhaustiveAgent("niqe"), sample)
    tried = {c["name"] for c in report["tool_calls"]}
    assert {"denoise_tv", "denoise_nlm", "jpeg_reapply"} <= tried
    committed = [c["name"] for c in report["tool_calls"] if c["committed"]]
    assert 1 <= len(committed) <= 2 and report["num_tool_calls"] > len(committed)
    before = asyncio.run(nr_score(pool, sample.column("lq")[0]))
    after = asyncio.run(nr_score(pool, env.image))
    assert after < before  # NIQE: lower is better
    assert report["stop_reason"] == "answer"


def test_exhaustive_backtracks_when_no_tool_helps(data):
    """On a 32 px thumbnail NIQE cannot judge JPEG removal: that step is rolled back and retried
    after super-resolution, on an image the metric can score."""
    env, report = episode(ExhaustiveAgent("niqe"), pick(data, "lowres"), degradations=["jpeg", "lowres"])
    calls = [c["name"] for c in report["tool_calls"]]
    assert calls.count("jpeg_reapply") == 2  # tried, rolled back, tried again
    assert calls.index("sr_bicubic") < len(calls) - 1 - calls[::-1].index("jpeg_reapply")
    first_kept = next(c["name"] for c in report["tool_calls"] if c["committed"])
    assert get_tool(first_kept).subtask == "super_resolution"
    assert env.image.shape == (128, 128, 3)


def test_better_prefers_any_score_to_none():
    assert better(3.0, None, "niqe") and not better(None, 3.0, "niqe")
    assert better(3.0, 4.0, "niqe") and better(4.0, 3.0, "musiq") and not better(4.0, 4.0, "niqe")


def test_run_baseline_reports_every_episode(data):
    samples = data.take([i for i, combo in enumerate(data.column("combo")) if combo == "noise"][:3])
    batch = asyncio.run(run_baseline(FixedOrderAgent(), LocalPool(TOOLS), samples, tool_schemas=SCHEMAS))
    assert {
        "final_image",
        "tool_calls",
        "num_tool_calls",
        "wall_s",
        "stop_reason",
        "messages",
        "image_id",
        "hq",
    } <= set(batch.columns)
    assert batch.meta["agent"] == "fixed_order"
    assert all(n == len(calls) for n, calls in zip(batch.column("num_tool_calls"), batch.column("tool_calls")))
    assert batch.column("degradations_used") == batch.column("degradations")
    perceived = asyncio.run(
        run_baseline(FixedOrderAgent(), LocalPool(TOOLS), samples, tool_schemas=SCHEMAS, use_known_degradations=False)
    )
    assert all("noise" in used for used in perceived.column("degradations_used"))


def test_baselines_are_found_by_name():
    assert isinstance(make_baseline("fixed-order"), FixedOrderAgent)
    assert make_baseline("random", seed=3).seed == 3
    with pytest.raises(KeyError, match="did you mean 'exhaustive'"):
        make_baseline("exhaustiv")


class InFlightPool(LocalPool):
    """A LocalPool that records how many tool calls and scorings are in flight at most."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.in_flight = self.most = 0

    async def _counted(self, coroutine):
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            return await coroutine
        finally:
            self.in_flight -= 1

    async def run(self, tool, image, **args):
        return await self._counted(super().run(tool, image, **args))

    async def score(self, metrics, image, reference=None):
        return await self._counted(super().score(metrics, image, reference))


def test_exhaustive_runs_and_scores_a_bounded_number_of_candidates_at_once(data):
    sample = pick(data, "rain")
    tools = TOOLS  # two deraining tools: without the bound both would run at once
    pool = InFlightPool(tools)
    agent = ExhaustiveAgent("niqe", concurrency=1)
    asyncio.run(run_baseline_episode(agent, pool, sample.column("lq")[0], tool_schemas(tools), ["rain"], 4))
    assert pool.most == 1, pool.most
    with pytest.raises(ValueError, match="concurrency"):
        ExhaustiveAgent(concurrency=0)


def test_exhaustive_runs_fewer_candidates_at_once_on_large_photos():
    agent = ExhaustiveAgent()
    assert agent.slots(np.zeros((128, 128, 3), np.uint8)) == 4
    assert agent.slots(np.zeros((2048, 2048, 3), np.uint8)) == 4
    assert agent.slots(np.zeros((3000, 2000, 3), np.uint8)) == 2
    assert agent.slots(np.zeros((3000, 4000, 3), np.uint8)) == 1
