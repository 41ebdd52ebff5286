"""`tir eval`: agents on a small synthetic test set through LocalPool, real pyiqa PSNR/SSIM.

One module-scoped evaluation (identity, random, fixed_order, exhaustive, the expert oracle and a
tiny random policy on 5 crops of 64 px) feeds most tests; a second run checks determinism.
"""

import json
import statistics
from pathlib import Path

import cv2
import numpy as np
import pytest

import tir  # noqa: F401  - shims before transformers
from tir.agent.loop import LoopSettings
from tir.data.expert import ExpertSettings
from tir.data.synth import synthesize
from tir.eval import agents as evaluation
from tir.eval import cli as eval_cli
from tir.eval.agent_specs import EvalError, parse_agents
from tir.eval.agents import EvalSettings, evaluate_agents
from tir.eval.report import aggregate, render_markdown
from tir.protocol import Batch
from tool_pool.client import LocalPool
from tool_pool.tools import tool_schemas

TOOLS = [
    "denoise_tv",
    "deblur_motion_rl",
    "deblur_defocus_wiener",
    "jpeg_deblock_dct",
    "dehaze_dcp",
    "derain_opening",
    "brighten_shift",
    "sr_backprojection",
]
METRICS = ("psnr", "ssim")
AGENTS = "identity,random,fixed_order,exhaustive,expert"


def small_test_set() -> Batch:
    """5 rows over groups A, B, C and single; two of them at 1/4 size (lowres)."""
    rows = synthesize(
        "builtin",
        "noise+jpeg,motion_blur+lowres,haze+noise,rain+noise+lowres,dark",
        per_image=1,
        seed=0,
        crop=64,
        progress=False,
    )
    keep = [i for i, image_id in enumerate(rows.column("image_id")) if image_id == "astronaut"]
    groups = {
        "noise+jpeg": "groupA",
        "motion_blur+lowres": "groupA",
        "haze+noise": "groupB",
        "rain+noise+lowres": "groupC",
        "dark": "single",
    }
    test = rows.take(keep)
    return test.with_column("group", [groups[c] for c in test.column("combo")])


def settings(**overrides) -> EvalSettings:
    values = {
        "metrics": METRICS,
        "seed": 0,
        "max_turns": 3,
        "tools": tuple(TOOLS),
        "loop": LoopSettings(max_new_tokens=24),
        "progress": False,
        "expert": ExpertSettings(metrics=METRICS, perturb=False),
    }
    return EvalSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def test_set():
    return small_test_set()


@pytest.fixture(scope="module")
def policy(tiny_policy_dir):
    return str(tiny_policy_dir(tool_schemas(TOOLS)))


@pytest.fixture(scope="module")
def report(test_set, policy, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    agents = parse_agents(f"{AGENTS},tiny={policy}")
    return evaluate_agents(agents, test_set, LocalPool(TOOLS), settings=settings(), out_dir=out)


# ---------------------------------------------------------------- aggregation


def test_per_group_aggregates_match_hand_computed_values():
    rows = [
        {
            "agent": "a",
            "group": "A",
            "scores": {"psnr": 20.0, "ssim": 0.5},
            "tool_calls": 1,
            "turns": 2,
            "wall_s": 0.1,
            "format_errors": 0,
        },
        {
            "agent": "a",
            "group": "A",
            "scores": {"psnr": 24.0, "ssim": 0.7},
            "tool_calls": 3,
            "turns": 4,
            "wall_s": 0.3,
            "format_errors": 1,
        },
        {
            "agent": "a",
            "group": "B",
            "scores": {"psnr": 18.0, "ssim": None},
            "tool_calls": 2,
            "turns": 3,
            "wall_s": 0.2,
            "format_errors": 0,
        },
        {
            "agent": "a",
            "group": "ood",
            "scores": {"psnr": 30.0, "ssim": 0.9},
            "tool_calls": 0,
            "turns": 1,
            "wall_s": 0.0,
            "format_errors": 0,
        },
        {
            "agent": "b",
            "group": "A",
            "scores": {"psnr": 10.0, "ssim": 0.1},
            "tool_calls": 0,
            "turns": 1,
            "wall_s": 0.0,
            "format_errors": 2,
            "error": "boom",
        },
    ]
    out = aggregate(rows, METRICS)
    a = out["a"]
    assert list(a) == ["A", "B", "A-C", "ood", "overall"]
    assert a["A"]["psnr"] == {"mean": 22.0, "std": pytest.approx(statistics.stdev([20, 24])), "n": 2, "missing": 0}
    assert a["A"]["tool_calls"]["mean"] == 2.0 and a["A"]["format_errors"]["mean"] == 0.5
    assert a["B"]["psnr"] == {"mean": 18.0, "std": 0.0, "n": 1, "missing": 0}
    assert a["B"]["ssim"] == {"mean": None, "std": None, "n": 0, "missing": 1}  # a metric that could not score
    assert a["A-C"]["psnr"]["mean"] == pytest.approx((20 + 24 + 18) / 3)
    assert a["A-C"]["ssim"]["mean"] == pytest.approx(0.6) and a["A-C"]["ssim"]["n"] == 2
    assert a["overall"]["psnr"]["mean"] == pytest.approx(23.0) and a["overall"]["psnr"]["std"] == pytest.approx(
        statistics.stdev([20, 24, 18, 30])
    )
    assert (
        a["overall"]["wall_s"]["mean"] == pytest.approx(0.15)
        and a["overall"]["images"] == 4
        and a["overall"]["errors"] == 0
    )
    assert list(out["b"]) == ["A", "overall"] and out["b"]["overall"]["errors"] == 1
    assert aggregate(rows[:2], METRICS)["a"].keys() == {"A", "overall"}  # no A-C that would repeat overall


def test_report_aggregates_are_the_per_image_rows(report, test_set):
    rows = [r for r in report["rows"] if r["agent"] == "exhaustive"]
    assert [r["group"] for r in rows] == ["A", "A", "B", "C", "single"]
    for group in ("A", "B", "C", "single"):
        psnr = [r["scores"]["psnr"] for r in rows if r["group"] == group]
        calls = [r["tool_calls"] for r in rows if r["group"] == group]
        cell = report["aggregates"]["exhaustive"][group]
        assert cell["psnr"]["mean"] == pytest.approx(np.mean(psnr)) and cell["psnr"]["n"] == len(psnr)
        assert cell["tool_calls"]["mean"] == pytest.approx(np.mean(calls))
    assert report["aggregates"]["exhaustive"]["A-C"]["psnr"]["n"] == 4
    assert report["aggregates"]["exhaustive"]["overall"]["psnr"]["std"] == pytest.approx(
        statistics.stdev([r["scores"]["psnr"] for r in rows])
    )


# ---------------------------------------------------------------- scoring


def test_an_output_at_quarter_size_is_upscaled_x4_cubic_before_scoring(test_set):
    row = test_set.rows()[test_set.column("combo").index("motion_blur+lowres")]
    lq, hq = row["lq"], row["hq"]
    assert lq.shape[0] * 4 == hq.shape[0] and lq.shape[1] * 4 == hq.shape[1]
    upscaled = evaluation.comparable(lq, hq)
    assert upscaled.shape == hq.shape
    assert np.array_equal(upscaled, cv2.resize(lq, (hq.shape[1], hq.shape[0]), interpolation=cv2.INTER_CUBIC))
    assert evaluation.comparable(hq, hq) is hq  # an image at the HQ size is scored as it is
    import asyncio

    pool = LocalPool(TOOLS)
    scores = asyncio.run(evaluation.score_against_hq(pool, lq, hq, METRICS))
    direct = asyncio.run(pool.score(list(METRICS), upscaled, hq))
    assert scores == pytest.approx(direct)


def test_identity_makes_no_tool_call_and_scores_the_degraded_input(report):
    rows = [r for r in report["rows"] if r["agent"] == "identity"]
    assert len(rows) == 5 and all(r["tool_calls"] == 0 and r["tools"] == [] for r in rows)
    for r in rows:
        assert r["scores"] == r["input_scores"]  # the degraded input's PSNR/SSIM (x4-upscaled where it is 1/4 size)
    assert report["aggregates"]["identity"]["overall"]["tool_calls"] == {"mean": 0.0, "std": 0.0, "n": 5, "missing": 0}
    others = [r for r in report["rows"] if r["agent"] in ("exhaustive", "expert")]
    assert all(r["tool_calls"] > 0 for r in others)


def test_every_agent_ran_on_every_image(report, policy):
    assert list(report["aggregates"]) == ["identity", "random", "fixed_order", "exhaustive", "expert", "tiny"]
    described = report["meta"]["agents"]["tiny"]
    assert described.endswith("(greedy, transformers engine)") and policy in described
    assert {r["engine"] for r in report["rows"] if r["agent"] == "tiny"} == {"hf"}
    tiny = [r for r in report["rows"] if r["agent"] == "tiny"]
    assert len(tiny) == 5 and all(r["error"] == "" for r in tiny)
    # the expert oracle knows HQ: on average it beats the degraded input
    overall = report["aggregates"]
    assert overall["expert"]["overall"]["psnr"]["mean"] > overall["identity"]["overall"]["psnr"]["mean"]


# ---------------------------------------------------------------- determinism and outputs


def test_the_same_seed_and_checkpoint_give_the_same_table(report, test_set, policy):
    again = evaluate_agents(parse_agents(f"{AGENTS},tiny={policy}"), test_set, LocalPool(TOOLS), settings=settings())
    assert render_markdown(again, timing=False) == render_markdown(report, timing=False)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]

    assert json.dumps(strip(again["rows"]), default=str) == json.dumps(strip(report["rows"]), default=str)
    other = evaluate_agents("random", test_set, LocalPool(TOOLS), settings=settings(seed=1))
    assert [r["tools"] for r in other["rows"]] != [r["tools"] for r in report["rows"] if r["agent"] == "random"]


def test_outputs_are_a_table_a_json_file_and_a_png(report):
    files = report["files"]
    markdown = Path(files["markdown"]).read_text()
    assert (
        markdown == report["markdown"]
        and "| expert |" in markdown
        and "## A (2 images)" in markdown
        and "PSNR ↑" in markdown
    )
    body = json.loads(Path(files["json"]).read_text())
    assert set(body) == {"meta", "aggregates", "rows"} and len(body["rows"]) == 6 * 5
    assert "final_image" not in body["rows"][0] and "ended_at" not in body["rows"][0]
    # each agent's time for the whole set covers every one of its episodes (identity: none, 0)
    assert set(body["meta"]["episodes_s"]) == set(body["aggregates"]) and body["meta"]["episodes_s"]["identity"] == 0
    for agent, seconds in body["meta"]["episodes_s"].items():
        assert seconds >= max(r["wall_s"] for r in body["rows"] if r["agent"] == agent) - 1e-6
    assert "The whole set's time per image" in markdown
    with open(files["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert cv2.imread(files["plot"]) is not None


def test_the_set_time_runs_from_the_first_start_to_the_last_end():
    from tir.eval.episodes import episodes_span

    episodes = [{"wall_s": 2.0, "ended_at": 12.0}, {"wall_s": 1.0, "ended_at": 11.5}, {"wall_s": 3.0, "ended_at": 14.0}]
    assert episodes_span(episodes) == pytest.approx(14.0 - 10.0)  # overlapping episodes count once
    assert all("ended_at" not in e for e in episodes)  # a process-local clock never reaches a report
    assert episodes_span([{"wall_s": 0.0}, {"wall_s": 0.5}]) == 0.5  # no stamps (identity): the walls' sum


# ---------------------------------------------------------------- errors


def test_auto_picks_vllm_only_for_a_local_checkpoint_on_a_gpu_when_installed(policy):
    from tir.eval.policy import resolve_engine, vllm_available

    assert resolve_engine("hf", policy) == ("hf", "asked for")
    assert resolve_engine("auto", "Qwen/Qwen2.5-VL-3B-Instruct") == ("hf", "auto: not a local checkpoint folder")
    import torch

    assert resolve_engine("auto", policy)[0] == ("vllm" if vllm_available() and torch.cuda.is_available() else "hf")
    with pytest.raises(EvalError, match="not a local checkpoint folder" if vllm_available() else "not installed"):
        resolve_engine("vllm", "Qwen/Qwen2.5-VL-3B-Instruct")
    with pytest.raises(EvalError, match="engine must be hf, vllm or auto"):
        settings(engine="sglang")


def test_an_unknown_agent_gets_a_did_you_mean():
    with pytest.raises(EvalError, match="unknown agent 'exhaustve'; did you mean 'exhaustive'"):
        parse_agents("identity,exhaustve")
    with pytest.raises(EvalError, match="two agents are labelled 'random'"):
        parse_agents("random,random")


def test_a_folder_that_is_no_policy_and_a_missing_path_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(EvalError, match="lacks config.json.*is .* a policy checkpoint"):
        parse_agents(f"sft={tmp_path}")
    with pytest.raises(EvalError, match="does not exist"):
        parse_agents("runs/nowhere/sft/hf")


def test_a_checkpoint_folder_without_weights_fails_before_any_agent_runs(tmp_path, policy):
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for file in Path(policy).iterdir():
        if file.is_file() and not file.name.endswith((".safetensors", ".bin")):
            (no_weights / file.name).write_bytes(file.read_bytes())
    with pytest.raises(EvalError, match=r"no_weights' lacks the model weights"):
        parse_agents(f"identity,broken={no_weights}")


def test_a_mistyped_hub_name_fails_fast_offline(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(EvalError, match=r"'foo/bar' is not a local folder and not in the hub cache"):
        parse_agents("identity,foo/bar")
    assert time.perf_counter() - started < 5


def test_the_finished_agents_results_are_written_when_one_fails(test_set, tmp_path):
    from tir.eval.agent_specs import AgentSpec

    agents = {
        "identity": AgentSpec("identity", "identity", name="identity"),
        "broken": AgentSpec("broken", "policy", path=str(tmp_path / "gone")),  # vanished after the check
    }
    out = tmp_path / "out"
    with pytest.raises(EvalError, match=r"agent 'broken' failed: .*the results of identity are in .*eval.json"):
        evaluate_agents(agents, test_set.slice(0, 2), LocalPool(TOOLS), settings=settings(), out_dir=out)
    written = json.loads((out / "eval.json").read_text())
    assert list(written["aggregates"]) == ["identity"] and len(written["rows"]) == 2
    assert "broken" in written["meta"]["failed"] and "identity" in (out / "report.md").read_text()


def test_the_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    parser = eval_cli.add_eval_arguments(__import__("argparse").ArgumentParser())
    code = eval_cli.eval_main(
        parser.parse_args(
            ["--test", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "out"), "--pool", "local"]
        )
    )
    assert code == 2 and "test set" in capsys.readouterr().err
    small_test_set().to_parquet(tmp_path / "test.parquet")
    code = eval_cli.eval_main(
        parser.parse_args(
            ["--test", str(tmp_path / "test.parquet"), "--agents", "identty", "--out", str(tmp_path / "out")]
        )
    )
    assert code == 2 and "did you mean 'identity'" in capsys.readouterr().err
    (tmp_path / "text.parquet").write_text("not parquet")
    code = eval_cli.eval_main(
        parser.parse_args(["--test", str(tmp_path / "text.parquet"), "--agents", "identity", "--out", str(tmp_path)])
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "text.parquet' is not a readable Parquet file" in err, err
    for out, expected in [
        (tmp_path / "text.parquet", "is a file; expected a folder"),
        (tmp_path / "text.parquet" / "x", "is not a folder"),
    ]:
        code = eval_cli.eval_main(
            parser.parse_args(["--test", str(tmp_path / "test.parquet"), "--agents", "identity", "--out", str(out)])
        )
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and expected in err, err  # before any agent runs
