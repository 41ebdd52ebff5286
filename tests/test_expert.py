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
from pathlib import Path

import numpy as np
import pytest

import tir  # noqa: F401  - shims before pyiqa
from tir import expert
from tir.data import synthesize
from tir.protocol import Batch
from tool_pool.client import LocalPool
from tool_pool.tools import get_tool

REPO = Path(__file__).resolve().parent.parent
TOOLS = ["denoise_tv", "denoise_dct", "jpeg_deblock_dct", "jpeg_reapply", "brighten_shift", "brighten_gamma",
         "dehaze_dcp", "dehaze_global", "sr_bicubic", "sr_lanczos"]  # fmt: skip
BY_SUBTASK = {s: sorted(t for t in TOOLS if get_tool(t).subtask == s) for s in {get_tool(t).subtask for t in TOOLS}}
SETTINGS = expert.ExpertSettings(metrics=("psnr", "ssim"), tie_margin=0.0, perturb=False, beam_width=2)


@pytest.fixture(scope="module")
def samples():
    return synthesize("builtin", "noise+jpeg,dark+noise,haze+dark+noise", per_image=1, seed=0, crop=64, progress=False).slice(0, 6)


def row(samples, combo):
    return next(r for r in samples.rows() if r["combo"] == combo)


def search(pool, sample, settings=SETTINGS):
    cost = expert.Cost()
    inputs = asyncio.run(expert.score(pool, sample["lq"], sample["hq"], settings.metrics, cost))
    best, candidates, mode = asyncio.run(expert.search_expert(pool, sample["lq"], sample["hq"], sample["degradations"], BY_SUBTASK, settings, cost, inputs))
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
    schedules = [order for first, second in (("denoising", "jpeg_artifact_removal"), ("jpeg_artifact_removal", "denoising"))
                 for order in itertools.product(BY_SUBTASK[first], BY_SUBTASK[second])]  # fmt: skip
    finals = [run_tools(sample["lq"], tools) for tools in schedules]
    scores = [asyncio.run(pool.score(["psnr", "ssim"], image, sample["hq"])) for image in finals]
    quality = expert.quality(scores, inputs, SETTINGS)
    assert best.tools == schedules[int(np.argmax(quality))] == candidates[0].tools
    assert best.quality == pytest.approx(quality.max())
    assert sorted(c.tools for c in candidates) == sorted(schedules)


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

    ranked = [schedule(["denoise_dct", "jpeg_deblock_dct"], 1.0, 25.0, 5.0), schedule(["jpeg_deblock_dct", "denoise_tv"], 0.9, 24.8, 5.2),
              schedule(["jpeg_reapply", "denoise_tv"], 0.2, 22.0, 5.0)]  # fmt: skip
    assert expert.pick_expert(ranked, BY_SUBTASK, margin=0.0).tools == ("denoise_dct", "jpeg_deblock_dct")
    # within one tolerance (0.3 dB, 0.3 NIQE): the order prior (undo jpeg first) and the usual tools win
    assert expert.pick_expert(ranked, BY_SUBTASK, margin=1.0).tools == ("jpeg_deblock_dct", "denoise_tv")
    # 0.2 dB apart but NIQE 0.2 worse: a tie only once the margin covers NIQE's difference too
    assert expert.pick_expert(ranked, BY_SUBTASK, margin=0.5).tools == ("denoise_dct", "jpeg_deblock_dct")


def test_ties_are_judged_in_each_metrics_own_units_and_direction():
    best = {"psnr": 25.0, "niqe": 5.0, "unlisted": 1.0}
    assert expert.ties({"psnr": 24.8, "niqe": 5.2, "unlisted": -9.0}, best, 1.0)  # unlisted metrics never break a tie
    assert not expert.ties({"psnr": 24.6, "niqe": 5.0}, best, 1.0)  # 0.4 dB worse
    assert expert.ties({"psnr": 30.0, "niqe": 2.0}, best, 0.0)  # better on both: never "worse than a tie"
    assert not expert.ties({"psnr": 25.0, "niqe": 5.4}, best, 1.0)  # NIQE: lower is better


def test_a_metric_that_cannot_score_a_candidate_counts_as_its_worst():
    inputs = {"psnr": 20.0, "niqe": 8.0}
    scores = [{"psnr": 25.0, "niqe": 5.0}, {"psnr": 25.5}, {"psnr": 22.0, "niqe": 6.0}]
    quality = expert.quality(scores, inputs, expert.ExpertSettings(metrics=("psnr", "niqe")))
    assert np.argmax(quality) == 0  # the second is better on PSNR but broke NIQE
    assert quality[1] < quality[0]


# ---------------------------------------------------------------- perturbation


def test_perturbation_reorders_and_swaps_within_subtasks():
    tools = ["jpeg_deblock_dct", "denoise_tv", "dehaze_dcp"]
    same, info = expert.perturb_tools(tools, BY_SUBTASK, np.random.default_rng(0), 0.0, 0.0)
    assert same == tools and info == {"reordered": False, "swapped": []}
    for seed in range(20):
        out, info = expert.perturb_tools(tools, BY_SUBTASK, np.random.default_rng(seed), 1.0, 0.0)
        assert out != tools and sorted(out) == sorted(tools) and info["reordered"]
        out, info = expert.perturb_tools(tools, BY_SUBTASK, np.random.default_rng(seed), 0.0, 1.0)
        [step] = info["swapped"]
        assert [i for i, (new, old) in enumerate(zip(out, tools)) if new != old] == [step]
        assert get_tool(out[step]).subtask == get_tool(tools[step]).subtask


def test_perturbation_rates_follow_the_probabilities():
    tools = ["jpeg_deblock_dct", "denoise_tv"]
    outcomes = [expert.perturb_tools(tools, BY_SUBTASK, np.random.default_rng(seed), 0.3, 0.5)[1] for seed in range(2000)]
    assert np.mean([o["reordered"] for o in outcomes]) == pytest.approx(0.3, abs=0.04)
    assert np.mean([bool(o["swapped"]) for o in outcomes]) == pytest.approx(0.5, abs=0.04)
    single = [expert.perturb_tools(["dehaze_dcp"], {"dehazing": ["dehaze_dcp"]}, np.random.default_rng(s), 1.0, 1.0)[0] for s in range(5)]
    assert single == [["dehaze_dcp"]] * 5  # nothing to reorder, nothing to swap to


def test_perturbed_rows_are_executed_for_real_and_marked(samples):
    settings = expert.ExpertSettings(metrics=("psnr", "ssim"), perturb=True, reorder_prob=1.0, swap_tool_prob=0.0)
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
    return [sys.executable, "-m", "tir.expert", "--in", str(inp), "--out", str(out), "--shard-size", "1",
            "--concurrency", "1", "--no-progress", *overrides]  # fmt: skip


def test_a_killed_run_resumes_without_redoing_finished_samples(tmp_path):
    inp, out = tmp_path / "train.parquet", tmp_path / "sft.parquet"
    synthesize("builtin", "noise+jpeg,dark+noise", per_image=2, seed=0, crop=64, progress=False).slice(0, 8).to_parquet(inp)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(expert_command(inp, out), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    parts = expert.parts_dir(out)
    deadline = time.monotonic() + 300
    while len(list(parts.glob("part-*.parquet"))) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.parquet")}
    assert 2 <= len(done) < 8 and not out.exists(), "the kill should land mid-run"

    second = subprocess.run(expert_command(inp, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"resuming: {len(done)} of 8 samples already done" in second.stderr + second.stdout
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.parquet") if p.name in done} == done  # not redone
    batch = Batch.from_parquet(out)
    source = Batch.from_parquet(inp)
    assert batch.column("seed") == source.column("seed") and batch.column("combo") == source.column("combo")
    assert Counter(batch.column("search_mode")) == {"exhaustive": 8}
    assert all(np.array_equal(a, run_tools(lq, tools)) for a, lq, tools in zip(batch.column("final_image"), batch.column("lq"), batch.column("tools")))
