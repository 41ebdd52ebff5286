"""Expert search, perturbation and the resumable `tir data expert` run, on real tools and metrics.

A small toolbox (two tools per subtask where it matters) and 64 px crops keep every search to a
few dozen tool calls of milliseconds; PSNR and SSIM (no NIQE model to load) rank the schedules.
"""

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import tir  # noqa: F401  - shims before pyiqa
from tir.data import expert, expert_rules, expert_run
from tir.data.synth import synthesize
from tir.protocol import Batch
from tool_pool.client import LocalPool
from tool_pool.tools import get_tool

REPO = Path(__file__).resolve().parent.parent
TOOLS = [
    "denoise_tv",
    "denoise_dct",
    "jpeg_deblock_dct",
    "jpeg_reapply",
    "brighten_shift",
    "brighten_gamma",
    "dehaze_dcp",
    "dehaze_global",
    "sr_bicubic",
    "sr_lanczos",
]
BY_SUBTASK = {s: sorted(t for t in TOOLS if get_tool(t).subtask == s) for s in {get_tool(t).subtask for t in TOOLS}}
SETTINGS = expert.ExpertSettings(metrics=("psnr", "ssim"), tie_margin=0.0, perturb=False, beam_width=2, partial=False)


@pytest.fixture(scope="module")
def samples():
    return synthesize(
        "builtin", "noise+jpeg,dark+noise,haze+dark+noise", per_image=1, seed=0, crop=64, progress=False
    ).slice(0, 6)


def row(samples, combo):
    return next(r for r in samples.rows() if r["combo"] == combo)


def search(pool, sample, settings=SETTINGS):
    cost = expert.Cost()
    inputs = asyncio.run(expert.score(pool, sample["lq"], sample["hq"], settings.metrics, cost))
    best, candidates, mode = asyncio.run(
        expert.search_expert(
            pool, sample["lq"], sample["hq"], sample["degradations"], BY_SUBTASK, settings, cost, inputs
        )
    )
    return best, mode, candidates, cost, inputs


def run_tools(image, tools):
    for name in tools:
        image = get_tool(name)([image])[0]
    return image


# ---------------------------------------------------------------- search


def test_two_degradations_are_searched_exhaustively_and_the_best_schedule_wins(samples):
    pool, sample = LocalPool(TOOLS), row(samples, "noise+jpeg")
    best, mode, candidates, cost, inputs = search(pool, sample)
    assert (mode, len(candidates)) == ("exhaustive", 8)  # 2 orders x 2 denoisers x 2 deblockers
    assert cost.tool_calls == 4 + 8  # first steps, then every first step extended: prefixes are shared
    # brute force: every schedule executed and ranked with the same metrics
    schedules = [
        order
        for first, second in (("denoising", "jpeg_artifact_removal"), ("jpeg_artifact_removal", "denoising"))
        for order in itertools.product(BY_SUBTASK[first], BY_SUBTASK[second])
    ]
    finals = [run_tools(sample["lq"], tools) for tools in schedules]
    scores = [asyncio.run(pool.score(["psnr", "ssim"], image, sample["hq"])) for image in finals]
    quality = expert.quality(scores, inputs, SETTINGS)
    assert best.tools == schedules[int(np.argmax(quality))] == candidates[0].tools
    assert best.quality == pytest.approx(quality.max())
    assert sorted(c.tools for c in candidates) == sorted(schedules)


def test_partial_schedules_are_candidates_scored_with_the_complete_ones(samples):
    pool, sample = LocalPool(TOOLS), row(samples, "noise+jpeg")
    settings = replace(SETTINGS, partial=True)
    best, mode, candidates, cost, inputs = search(pool, sample, settings)
    # the 8 complete schedules, the 4 one-call prefixes and no call at all; no tool call more
    assert (mode, len(candidates), cost.tool_calls) == ("exhaustive", 8 + 4 + 1, 4 + 8)
    by_tools = {c.tools: c for c in candidates}
    assert by_tools[()].scores == inputs  # doing nothing scores as the input
    for tools in [("denoise_tv",), ("jpeg_deblock_dct",)]:
        truth = asyncio.run(pool.score(["psnr", "ssim"], run_tools(sample["lq"], tools), sample["hq"]))
        assert by_tools[tools].scores == pytest.approx(truth)
    scores = [c.scores for c in candidates]
    assert [c.quality for c in candidates] == pytest.approx(list(expert.quality(scores, inputs, settings)))
    assert best.tools == candidates[0].tools
    # a three-degradation beam: its scored prefixes join, nothing is scored twice
    _, mode, candidates, cost3, _ = search(pool, row(samples, "haze+dark+noise"), settings)
    assert mode == "beam" and {len(c.tools) for c in candidates} == {0, 1, 2, 3}
    assert cost3.score_calls == 1 + 6 + 2 * 4 + 2 * 2  # input, depth 1, depth 2, complete


def test_a_near_tie_between_a_schedule_and_its_prefix_goes_to_fewer_calls():
    def schedule(tools, quality, psnr):
        return expert.Schedule(tuple(tools), (), np.zeros((1, 1, 3), np.uint8), {"psnr": psnr}, quality)

    ranked = [schedule(["jpeg_deblock_dct", "denoise_tv"], 1.0, 25.1), schedule(["jpeg_deblock_dct"], 0.9, 25.0)]
    assert expert_rules.pick_expert(ranked, BY_SUBTASK, margin=0.0).tools == ("jpeg_deblock_dct", "denoise_tv")
    assert expert_rules.pick_expert(ranked, BY_SUBTASK, margin=1.0).tools == ("jpeg_deblock_dct",)


def test_expert_images_are_the_true_outputs_of_its_calls(samples):
    best, *_ = search(LocalPool(TOOLS), row(samples, "dark+noise"))
    image = row(samples, "dark+noise")["lq"]
    for tool, shown in zip(best.tools, best.images):
        image = get_tool(tool)([image])[0]
        assert np.array_equal(image, shown)


def test_three_degradations_use_the_beam(samples):
    sample = row(samples, "haze+dark+noise")
    best, mode, candidates, cost, _ = search(LocalPool(TOOLS), sample)
    assert mode == "beam"
    assert sorted(get_tool(t).subtask for t in best.tools) == ["brightening", "dehazing", "denoising"]
    # depth 1: 6 calls; depth 2: 2 kept x 4; depth 3: 2 kept x 2 -- instead of 48 + 24 + 6 exhaustively
    assert cost.tool_calls == 6 + 2 * 4 + 2 * 2 and len(candidates) == 4


def test_near_ties_go_to_the_conventional_schedule():
    def schedule(tools, quality, psnr, niqe):
        return expert.Schedule(tuple(tools), (), np.zeros((1, 1, 3), np.uint8), {"psnr": psnr, "niqe": niqe}, quality)

    ranked = [
        schedule(["denoise_dct", "jpeg_deblock_dct"], 1.0, 25.0, 5.0),
        schedule(["jpeg_deblock_dct", "denoise_tv"], 0.9, 24.8, 5.2),
        schedule(["jpeg_reapply", "denoise_tv"], 0.2, 22.0, 5.0),
    ]
    assert expert_rules.pick_expert(ranked, BY_SUBTASK, margin=0.0).tools == ("denoise_dct", "jpeg_deblock_dct")
    # within one tolerance (0.3 dB, 0.3 NIQE): the order prior (undo jpeg first) and the usual tools win
    assert expert_rules.pick_expert(ranked, BY_SUBTASK, margin=1.0).tools == ("jpeg_deblock_dct", "denoise_tv")
    # 0.2 dB apart but NIQE 0.2 worse: a tie only once the margin covers NIQE's difference too
    assert expert_rules.pick_expert(ranked, BY_SUBTASK, margin=0.5).tools == ("denoise_dct", "jpeg_deblock_dct")


def test_ties_are_judged_in_each_metrics_own_units_and_direction():
    best = {"psnr": 25.0, "niqe": 5.0, "unlisted": 1.0}
    assert expert_rules.ties(
        {"psnr": 24.8, "niqe": 5.2, "unlisted": -9.0}, best, 1.0
    )  # unlisted metrics never break a tie
    assert not expert_rules.ties({"psnr": 24.6, "niqe": 5.0}, best, 1.0)  # 0.4 dB worse
    assert expert_rules.ties({"psnr": 30.0, "niqe": 2.0}, best, 0.0)  # better on both: never "worse than a tie"
    assert not expert_rules.ties({"psnr": 25.0, "niqe": 5.4}, best, 1.0)  # NIQE: lower is better


def test_a_metric_that_cannot_score_a_candidate_counts_as_its_worst():
    inputs = {"psnr": 20.0, "niqe": 8.0}
    scores = [{"psnr": 25.0, "niqe": 5.0}, {"psnr": 25.5}, {"psnr": 22.0, "niqe": 6.0}]
    quality = expert.quality(scores, inputs, expert.ExpertSettings(metrics=("psnr", "niqe")))
    assert np.argmax(quality) == 0  # the second is better on PSNR but broke NIQE
    assert quality[1] < quality[0]


# ---------------------------------------------------------------- one order per combination

SUBTASK_OF = {tool: get_tool(tool).subtask for tool in TOOLS}
JPEG_FIRST, NOISE_FIRST = ["jpeg_artifact_removal", "denoising"], ["denoising", "jpeg_artifact_removal"]


def candidate(tools, quality, psnr=20.0):
    return {"tools": list(tools), "quality": quality, "scores": {"psnr": psnr + quality}}


def test_each_combination_gets_the_order_that_is_best_on_average():
    narrow_jpeg_win = [
        candidate(["jpeg_deblock_dct", "denoise_tv"], 1.0),
        candidate(["denoise_tv", "jpeg_deblock_dct"], -1.0),
    ]
    big_noise_win = [
        candidate(["jpeg_deblock_dct", "denoise_tv"], -3.0),
        candidate(["denoise_tv", "jpeg_deblock_dct"], 3.0),
    ]
    rows = [{"combo": "noise+jpeg", "search_candidates": c} for c in (narrow_jpeg_win, narrow_jpeg_win, big_noise_win)]
    # a sample's quality is standardised among its own candidates, but not clipped: 3 vs 1 wins here
    assert expert_rules.combination_orders(rows, SUBTASK_OF) == {"noise+jpeg": NOISE_FIRST}
    rows.append(
        {
            "combo": "dark+noise",
            "search_candidates": [
                candidate(["denoise_tv", "brighten_shift"], 0.5),
                candidate(["brighten_shift", "denoise_tv"], 0.1),
            ],
        }
    )
    assert expert_rules.combination_orders(rows[:2] + rows[3:], SUBTASK_OF) == {
        "noise+jpeg": JPEG_FIRST,
        "dark+noise": ["denoising", "brightening"],
    }


def test_an_order_the_beam_pruned_counts_as_that_samples_worst_and_equal_means_go_to_the_prior():
    pruned = [
        candidate(["jpeg_deblock_dct", "denoise_tv"], 1.0),
        candidate(["jpeg_reapply", "denoise_tv"], -1.0),
    ]  # noise-first pruned
    close = [candidate(["denoise_tv", "jpeg_deblock_dct"], 1.0), candidate(["jpeg_deblock_dct", "denoise_tv"], 0.8)]
    rows = [{"combo": "noise+jpeg", "search_candidates": c} for c in (pruned, close)]
    # counting only where searched, noise-first (1.0) would beat jpeg-first (0.9); as the worst it is (-1 + 1) / 2 = 0
    assert expert_rules.combination_orders(rows, SUBTASK_OF) == {"noise+jpeg": JPEG_FIRST}
    mirrored = [candidate(["denoise_tv", "jpeg_deblock_dct"], 1.0), candidate(["jpeg_deblock_dct", "denoise_tv"], -1.0)]
    rows = [
        {"combo": "noise+jpeg", "search_candidates": c}
        for c in (mirrored, [candidate(c["tools"], -c["quality"]) for c in mirrored])
    ]
    assert expert_rules.combination_orders(rows, SUBTASK_OF) == {
        "noise+jpeg": JPEG_FIRST
    }  # the order prior: undo compression first


def test_the_expert_is_the_samples_best_schedule_in_its_combinations_order():
    row = {
        "sample_expert_tools": ["denoise_dct", "jpeg_deblock_dct"],
        "search_candidates": [
            candidate(["denoise_dct", "jpeg_deblock_dct"], 1.5),
            candidate(["jpeg_reapply", "denoise_dct"], 0.4, psnr=20.0),
            candidate(["jpeg_deblock_dct", "denoise_dct"], 0.3, psnr=20.0),
            candidate(["jpeg_deblock_dct", "denoise_tv"], -1.0),
        ],
    }
    assert expert_rules.choose_expert(row, JPEG_FIRST, BY_SUBTASK, margin=0.0) == (
        ["jpeg_reapply", "denoise_dct"],
        "combination",
    )
    # 0.1 dB apart is a tie at margin 1: the subtask's usual tool (jpeg_deblock_dct) wins it
    assert expert_rules.choose_expert(row, JPEG_FIRST, BY_SUBTASK, margin=1.0) == (
        ["jpeg_deblock_dct", "denoise_dct"],
        "combination",
    )
    assert expert_rules.choose_expert(row, ["denoising", "brightening"], BY_SUBTASK, margin=0.0) == (
        ["denoise_dct", "jpeg_deblock_dct"],
        "sample",
    )
    assert expert_rules.choose_expert(row, None, BY_SUBTASK, margin=0.0) == (
        ["denoise_dct", "jpeg_deblock_dct"],
        "sample",
    )


def test_the_tools_rule_fixes_each_subtasks_tool_per_combination_where_the_order_rule_lets_it_flip():
    # two samples of one combination: jpeg first wins in both, but which denoiser wins flips
    first = [
        candidate(["jpeg_deblock_dct", "denoise_tv"], 1.0),
        candidate(["jpeg_deblock_dct", "denoise_dct"], 0.8),
        candidate(["denoise_tv", "jpeg_deblock_dct"], -1.8),
    ]
    second = [
        candidate(["jpeg_deblock_dct", "denoise_dct"], 1.2),
        candidate(["jpeg_deblock_dct", "denoise_tv"], 0.2),
        candidate(["denoise_dct", "jpeg_deblock_dct"], -1.4),
    ]
    rows = [
        {"combo": "noise+jpeg", "search_candidates": c, "sample_expert_tools": c[0]["tools"]} for c in (first, second)
    ]
    assert expert_rules.combination_orders(rows, SUBTASK_OF) == {"noise+jpeg": JPEG_FIRST}
    by_order = [expert_rules.choose_expert(r, JPEG_FIRST, BY_SUBTASK, margin=0.0)[0] for r in rows]
    assert by_order == [["jpeg_deblock_dct", "denoise_tv"], ["jpeg_deblock_dct", "denoise_dct"]]
    # mean quality: denoise_dct (0.8 + 1.2) / 2 = 1.0 beats denoise_tv (1.0 + 0.2) / 2 = 0.6
    schedules = expert_rules.combination_orders(rows, SUBTASK_OF, by_tools=True)
    assert schedules == {"noise+jpeg": ["jpeg_deblock_dct", "denoise_dct"]}
    by_tools = [
        expert_rules.choose_expert(r, schedules["noise+jpeg"], BY_SUBTASK, margin=0.0, by_tools=True) for r in rows
    ]
    assert by_tools == [(["jpeg_deblock_dct", "denoise_dct"], "combination")] * 2
    # a schedule the sample never searched: its own expert
    assert expert_rules.choose_expert(rows[0], ["denoise_dct", "jpeg_reapply"], BY_SUBTASK, 0.0, by_tools=True) == (
        ["jpeg_deblock_dct", "denoise_tv"],
        "sample",
    )


@pytest.mark.slow  # 1-5 s on a quiet 2-core machine, 10-30 s beside other work: not in `make test-fast`
def test_the_combination_rule_labels_every_sample_alike_with_true_images():
    samples = synthesize("builtin", "noise+jpeg", per_image=1, seed=3, crop=64, progress=False)
    settings = expert.ExpertSettings(metrics=("psnr", "ssim"), tie_margin=0.0, perturb=False, partial=False)
    batch = asyncio.run(expert.expert_batch(LocalPool(TOOLS), samples, settings, BY_SUBTASK))
    order = batch.meta["combination_orders"]["noise+jpeg"]
    assert {tuple(SUBTASK_OF[t] for t in tools) for tools in batch.column("expert_tools")} == {tuple(order)}
    assert set(batch.column("expert_rule")) == {"combination"}
    for r in batch.rows():
        in_order = [c for c in r["search_candidates"] if [SUBTASK_OF[t] for t in c["tools"]] == order]
        quality = {tuple(c["tools"]): c["quality"] for c in in_order}
        assert quality[tuple(r["expert_tools"])] == max(
            quality.values()
        )  # (denoisers that both leave a clean crop as it is tie exactly)
        assert r["tools"] == r["expert_tools"] and np.array_equal(r["final_image"], run_tools(r["lq"], r["tools"]))
        assert r["perturb_tool_calls"] == (0 if r["expert_tools"] == r["sample_expert_tools"] else 2)
    by_sample = asyncio.run(
        expert.expert_batch(LocalPool(TOOLS), samples, replace(settings, expert_rule="sample"), BY_SUBTASK)
    )
    assert (
        by_sample.column("expert_tools")
        == by_sample.column("sample_expert_tools")
        == batch.column("sample_expert_tools")
    )
    assert set(by_sample.column("expert_rule")) == {"sample"} and by_sample.meta["combination_orders"] == {}


# ---------------------------------------------------------------- perturbation


def test_perturbation_reorders_and_swaps_within_subtasks():
    tools = ["jpeg_deblock_dct", "denoise_tv", "dehaze_dcp"]
    same, info = expert_rules.perturb_tools(tools, BY_SUBTASK, np.random.default_rng(0), 0.0, 0.0)
    assert same == tools and info == {"reordered": False, "swapped": []}
    for seed in range(20):
        out, info = expert_rules.perturb_tools(tools, BY_SUBTASK, np.random.default_rng(seed), 1.0, 0.0)
        assert out != tools and sorted(out) == sorted(tools) and info["reordered"]
        out, info = expert_rules.perturb_tools(tools, BY_SUBTASK, np.random.default_rng(seed), 0.0, 1.0)
        [step] = info["swapped"]
        assert [i for i, (new, old) in enumerate(zip(out, tools)) if new != old] == [step]
        assert get_tool(out[step]).subtask == get_tool(tools[step]).subtask


def test_perturbation_rates_follow_the_probabilities():
    tools = ["jpeg_deblock_dct", "denoise_tv"]
    outcomes = [
        expert_rules.perturb_tools(tools, BY_SUBTASK, np.random.default_rng(seed), 0.3, 0.5)[1] for seed in range(2000)
    ]
    assert np.mean([o["reordered"] for o in outcomes]) == pytest.approx(0.3, abs=0.04)
    assert np.mean([bool(o["swapped"]) for o in outcomes]) == pytest.approx(0.5, abs=0.04)
    single = [
        expert_rules.perturb_tools(["dehaze_dcp"], {"dehazing": ["dehaze_dcp"]}, np.random.default_rng(s), 1.0, 1.0)[0]
        for s in range(5)
    ]
    assert single == [["dehaze_dcp"]] * 5  # nothing to reorder, nothing to swap to


def test_perturbed_rows_are_executed_for_real_and_marked(samples):
    settings = expert.ExpertSettings(
        metrics=("psnr", "ssim"), perturb=True, reorder_prob=1.0, swap_tool_prob=0.0, partial=False
    )
    batch = asyncio.run(expert.expert_batch(LocalPool(TOOLS), samples.slice(0, 2), settings))
    for r in batch.rows():
        assert r["perturbed"] and r["perturbation"]["reordered"] and r["tools"] == r["expert_tools"][::-1]
        assert np.array_equal(r["final_image"], run_tools(r["lq"], r["tools"]))
        assert r["perturb_tool_calls"] == 2 and r["search_tool_calls"] > 2 and r["search_s"] > 0
    off = asyncio.run(expert.expert_batch(LocalPool(TOOLS), samples.slice(0, 2), SETTINGS))
    assert not any(off.column("perturbed")) and off.column("tools") == off.column("expert_tools")


def test_the_serve_pool_finds_the_same_experts(serve_pool, samples):
    local = asyncio.run(expert.expert_batch(LocalPool(TOOLS), samples.slice(0, 3), SETTINGS, BY_SUBTASK))
    served = asyncio.run(expert.expert_batch(serve_pool, samples.slice(0, 3), SETTINGS, BY_SUBTASK))
    assert served.column("expert_tools") == local.column("expert_tools")
    assert all(np.array_equal(a, b) for a, b in zip(served.column("final_image"), local.column("final_image")))


# ---------------------------------------------------------------- the CLI, killed and resumed


def expert_command(inp, out):
    overrides = ["pool.backend=local", f"pool.tools=[{','.join(TOOLS)}]", "reward.metrics=[psnr,ssim]"]
    return [
        sys.executable,
        "-m",
        "tir.data.expert_run",
        "--in",
        str(inp),
        "--out",
        str(out),
        "--shard-size",
        "1",
        "--concurrency",
        "1",
        "--no-progress",
        *overrides,
    ]


@pytest.mark.slow  # two `tir data expert` processes, one killed mid-run: ~11 s
def test_a_killed_run_resumes_without_redoing_finished_samples(tmp_path):
    inp, out = tmp_path / "train.parquet", tmp_path / "sft.parquet"
    synthesize("builtin", "noise+jpeg,dark+noise", per_image=2, seed=0, crop=64, progress=False).slice(0, 8).to_parquet(
        inp
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(
        expert_command(inp, out), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    parts = expert_run.parts_dir(out)
    deadline = time.monotonic() + 300
    while len(list(parts.glob("part-*.parquet"))) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.parquet")}
    assert 2 <= len(done) < 8 and not out.exists(), "the kill should land mid-run"

    second = subprocess.run(expert_command(inp, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"resuming: {len(done)} of 8 samples already searched" in second.stderr + second.stdout
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.parquet") if p.name in done} == done  # not redone
    batch = Batch.from_parquet(out)
    source = Batch.from_parquet(inp)
    assert batch.column("seed") == source.column("seed") and batch.column("combo") == source.column("combo")
    assert Counter(batch.column("search_mode")) == {"exhaustive": 8}
    assert all(
        np.array_equal(a, run_tools(lq, tools))
        for a, lq, tools in zip(batch.column("final_image"), batch.column("lq"), batch.column("tools"))
    )


def test_the_search_runs_a_bounded_number_of_calls_at_once():
    from tir.data.expert import SEARCH_CONCURRENCY, bounded_gather

    state = {"now": 0, "most": 0}

    async def job(i):
        state["now"] += 1
        state["most"] = max(state["most"], state["now"])
        await asyncio.sleep(0.001)
        state["now"] -= 1
        return i

    assert asyncio.run(bounded_gather(job(i) for i in range(20))) == list(range(20))
    assert state["most"] == SEARCH_CONCURRENCY == 4
    state["most"] = 0
    asyncio.run(bounded_gather((job(i) for i in range(5)), limit=2))
    assert state["most"] == 2
