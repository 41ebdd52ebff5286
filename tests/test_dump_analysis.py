"""``tir dumps summary|view`` on real dumps: the agent loop with the tiny policy and real tools,
scored by real metrics, rewarded by the real reward, written by ``tir.dumps.writer``; the viewer is
loaded in a real headless Chromium (skipped, saying why, when none is installed:
scripts/install_browser.sh installs one)."""

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import textwrap
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tir  # noqa: F401  - shims before transformers
from tir.agent import models, prompts
from tir.agent.loop import LoopSettings, run_rollout
from tir.data.synth import synthesize
from tir.dumps import reader
from tir.dumps import summary as dump_analysis
from tir.dumps.cli import add_dumps_arguments, dumps_main
from tir.dumps.reader import DumpError, list_dumps, load_episodes
from tir.dumps.summary import summarize
from tir.dumps.viewer import pick_rows
from tir.dumps.writer import DumpWriter, step_dump
from tir.rl.reward import MultiMetricReward
from tool_pool.client import LocalPool
from tool_pool.tools import TOOLS, tool_schemas

torch = pytest.importorskip("torch")

TOOL_NAMES = ["brighten_shift", "dehaze_dcp", "denoise_tv", "derain_median", "sharpen_unsharp"]
SCHEMAS = tool_schemas(TOOL_NAMES)
# well-formed calls, the answer, and a malformed call (a format error the env turns into an observation)
REPLIES = tuple(prompts.format_call(prompts.ToolCall(n, {})) for n in TOOL_NAMES) + (
    prompts.format_stop(),
    "<tool_call>{oops</tool_call>",
)
METRICS = ["psnr", "ssim"]
GROUP = 2
STEPS = (1, 2)


@pytest.fixture(scope="module")
def dumps(tmp_path_factory, tiny_policy_dir):
    """Two RL steps' dumps: 2 photos (noise, noise+jpeg) x a group of 2, up to 3 turns each."""
    from tir.rl.algos import group_advantages
    from workers.rollout.hf_engine import HFEngine

    root = tmp_path_factory.mktemp("dumps")
    path = tiny_policy_dir(SCHEMAS)
    model, processor = models.load_policy(path)
    engine = HFEngine(model=model, processor=processor, max_batch_size=8, seed=0)
    samples = synthesize("builtin", "noise,noise+jpeg", per_image=1, seed=0, crop=64, progress=False).slice(0, 2)
    pool, reward_fn = LocalPool(TOOL_NAMES), MultiMetricReward(METRICS, mode="adaptive")

    async def scores(images, hqs):
        return [await pool.score(METRICS, im, hq) for im, hq in zip(images, hqs)]

    folder = root / "rl" / "dumps"
    with DumpWriter(folder) as writer:
        for step in STEPS:
            trajectories = run_rollout(
                engine,
                processor,
                pool,
                samples.repeat(GROUP),
                LoopSettings(max_turns=3, choices=REPLIES, seed=step),
                tool_schemas=SCHEMAS,
            )
            hqs = trajectories.column("hq")
            finals = asyncio.run(scores(trajectories.column("final_image"), hqs))
            inputs = asyncio.run(scores(trajectories.column("lq"), hqs))
            reward = reward_fn(
                finals,
                inputs,
                trajectories.column("num_tool_calls"),
                trajectories.column("format_errors"),
                group_size=GROUP,
            )
            advantages = group_advantages(torch.tensor(reward.rewards), GROUP, 1e-6, True)
            writer.write(
                step,
                step_dump(trajectories, trajectories, reward, advantages.tolist(), finals, inputs).with_meta(
                    step=step, config_hash="test"
                ),
            )
    assert sorted(list_dumps(folder)) == list(STEPS)
    return folder


def raw_rows(folder):
    """Every dumped row read with plain pyarrow + json (the module docstring's recipe): the
    independent side of the hand counts."""
    rows = []
    for step, path in list_dumps(folder).items():
        table = pq.read_table(
            path,
            columns=[
                "combo",
                "tool_calls",
                "format_errors",
                "stop_reason",
                "reward",
                "final_scores",
                "reward_weights",
                "input_ids",
                "images",
            ],
        )
        meta = json.loads(table.schema.metadata[b"tir.meta"])
        assert meta["step"] == step
        for row in table.to_pylist():
            row["tool_calls"] = json.loads(row["tool_calls"])
            row["final_scores"] = json.loads(row["final_scores"])
            row["reward_weights"] = json.loads(row["reward_weights"])
            rows.append({**row, "step": step, "meta_weights": meta["reward_weights"]})
    return rows


def parse(*argv):
    return add_dumps_arguments(argparse.ArgumentParser(prog="tir dumps")).parse_args(list(argv))


# ---------------------------------------------------------------- the numbers


def test_summary_matches_hand_counts(dumps):
    rows = raw_rows(dumps)
    summary = summarize(load_episodes(dumps))
    assert len(rows) == 2 * 2 * GROUP and summary["all"]["lengths"]["episodes"] == len(rows)
    names = [c["name"] for r in rows for c in r["tool_calls"]]
    assert names, "the replies offered should make some episodes call tools"
    assert summary["all"]["subtasks"] == dict(Counter(TOOLS.get(n).subtask for n in names))
    for step in STEPS:
        mine = [r for r in rows if r["step"] == step]
        stats = summary["steps"][step]
        assert stats["lengths"]["episodes"] == len(mine)
        assert stats["subtasks"] == dict(Counter(TOOLS.get(c["name"]).subtask for r in mine for c in r["tool_calls"]))
        assert stats["format"]["format_errors"] == sum(r["format_errors"] for r in mine)
        assert stats["format"]["episodes_with_errors"] == pytest.approx(
            sum(r["format_errors"] > 0 for r in mine) / len(mine)
        )
        assert stats["lengths"]["stop_reasons"] == dict(Counter(r["stop_reason"] for r in mine))
        assert stats["lengths"]["tokens_mean"] == pytest.approx(np.mean([len(r["input_ids"]) for r in mine]))
        assert stats["reward"]["reward_mean"] == pytest.approx(np.mean([r["reward"] for r in mine]))
        for m in METRICS:
            assert stats["reward"]["metrics"][m]["final"] == pytest.approx(
                np.mean([r["final_scores"][m] for r in mine])
            )
        assert summary["weights"][step] == pytest.approx(mine[0]["meta_weights"])
        assert summary["weights"][step] == pytest.approx(mine[-1]["reward_weights"])
    positions = Counter((i + 1, c["name"]) for r in rows for i, c in enumerate(r["tool_calls"]))
    assert {(p, n): k for p, counts in summary["positions"].items() for n, k in counts.items()} == dict(positions)
    for combo, ranked in summary["sequences"].items():
        sequences = Counter(tuple(c["name"] for c in r["tool_calls"]) for r in rows if r["combo"] == combo)
        assert [r["count"] for r in ranked] == sorted(sequences.values(), reverse=True)[:5]
        assert all(sequences[tuple(r["sequence"])] == r["count"] for r in ranked)
    assert set(summary["sequences"]) == {"noise", "noise+jpeg"}


def test_statistics_of_hand_made_episodes():
    def ep(step, combo, calls, reward, fe=0, stop="answer", ok=None, gains=None):
        return reader.episode_record(
            step,
            0,
            {
                "combo": combo,
                "tool_calls": [
                    {"name": n, "ok": o, "committed": True} for n, o in zip(calls, ok or [True] * len(calls))
                ],
                "num_turns": len(calls) + 1 + fe,
                "format_errors": fe,
                "stop_reason": stop,
                "reward": reward,
                "reward_terms": {"gain": gains or {}, "contribution": {}},
                "reward_weights": {"psnr": 0.5 + step / 10},
            },
        )

    episodes = [
        ep(1, "noise", ["denoise_tv", "sr_swinir"], 1.0, gains={"psnr": 2.0}),
        ep(1, "noise", ["denoise_tv", "sr_swinir"], 3.0, gains={"psnr": -1.0}),
        ep(1, "noise", ["dehaze_dcp"], 5.0, fe=2, stop="parse_error_limit", ok=[False]),
        ep(2, "blur", [], -1.0, fe=1),
        ep(2, "noise", ["mystery_tool"], 0.0),
    ]
    assert dump_analysis.tool_usage_by_subtask(episodes) == {
        "denoising": 2,
        "super_resolution": 2,
        "dehazing": 1,
        "other": 1,
    }
    assert dump_analysis.tool_usage_by_position(episodes) == {
        1: {"denoise_tv": 2, "dehaze_dcp": 1, "mystery_tool": 1},
        2: {"sr_swinir": 2},
    }
    assert dump_analysis.format_error_stats(episodes) == {
        "format_errors": 3,
        "per_episode": 0.6,
        "episodes_with_errors": 0.4,
        "parse_error_limit": 1,
        "tool_errors": 1,
        "crashed": 0,
    }
    assert dump_analysis.weights_over_time(episodes) == {1: {"psnr": 0.6}, 2: {"psnr": 0.7}}
    top = dump_analysis.top_sequences(episodes, k=2)
    assert top["noise"] == [
        {"sequence": ["denoise_tv", "sr_swinir"], "count": 2, "share": 0.5, "reward_mean": 2.0},
        {"sequence": ["dehaze_dcp"], "count": 1, "share": 0.25, "reward_mean": 5.0},
    ]
    assert top["blur"] == [{"sequence": [], "count": 1, "share": 1.0, "reward_mean": -1.0}]
    reward = dump_analysis.reward_by_metric(episodes)
    assert (
        reward["reward_mean"] == pytest.approx(1.6)
        and reward["metrics"]["psnr"]["gain"] == 0.5
        and reward["metrics"]["psnr"]["improved"] == 0.5
    )
    lengths = dump_analysis.episode_lengths(episodes)
    assert lengths["turns_mean"] == pytest.approx((3 + 3 + 4 + 2 + 2) / 5) and lengths["turns_histogram"] == {
        2: 2,
        3: 2,
        4: 1,
    }
    assert pick_rows({1: 4, 2: 4}, 3) == {1: [0], 2: [0, 3]} and pick_rows({1: 2}, 10) == {1: [0, 1]}
    assert reader.parse_steps("1,3-5, 9") == [1, 3, 4, 5, 9]
    with pytest.raises(DumpError, match="step numbers"):
        reader.parse_steps("a-b")


def test_the_markdown_summary_escapes_html_from_trajectories():
    evil = "</script><img src=x onerror=alert(1)>"
    episodes = [
        reader.episode_record(
            1,
            0,
            {
                "combo": "<!--<script>",
                "tool_calls": [{"name": evil, "ok": True, "committed": True}],
                "num_turns": 2,
                "format_errors": 0,
                "stop_reason": "<b>answer</b>",
                "reward": 1.0,
                "reward_terms": {"gain": {"<i>psnr": 1.0}, "contribution": {}},
                "reward_weights": {"<i>psnr": 1.0},
            },
        )
    ]
    text = dump_analysis.markdown_report(dump_analysis.summarize(episodes))
    assert "<" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "&lt;!--&lt;script&gt;" in text and "&lt;b&gt;answer&lt;/b&gt;" in text


# ---------------------------------------------------------------- the commands


def test_summary_command_writes_tables_and_plots(dumps, tmp_path, capsys):
    out = tmp_path / "summary"
    assert dumps_main(parse("summary", str(dumps), "--out", str(out))) == 0
    printed = capsys.readouterr().out
    for title in (
        "## Episodes",
        "## Reward per metric",
        "## Reward weights over steps",
        "## Tool calls by subtask",
        "## Tool calls by position",
        "## Most common tool sequences",
    ):
        assert title in printed
    assert (out / "summary.md").read_text() in printed
    assert json.loads((out / "summary.json").read_text())["all"]["lengths"]["episodes"] == 8
    for name in ("reward.png", "weights.png", "lengths_errors.png", "tools.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert dumps_main(parse("summary", str(dumps), "--steps", "2", "--out", str(tmp_path / "two"), "--no-plots")) == 0
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["all"]["lengths"]["episodes"] == 4
    assert not list((tmp_path / "two").glob("*.png"))


def test_clear_errors_for_missing_empty_and_corrupt_dumps(dumps, tmp_path, capsys):
    def error(*argv):
        assert dumps_main(parse(*argv)) == 2
        return capsys.readouterr().err

    assert "no such folder" in error("summary", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    assert "no rollout dumps" in error("view", str(tmp_path / "empty"))
    assert "no dump of step(s) [7]" in error("summary", str(dumps), "--steps", "7")
    broken = tmp_path / "broken"
    shutil.copytree(dumps, broken)
    (broken / "step_000003.parquet").write_bytes(b"PAR1 not really parquet")
    for command in ("summary", "view"):
        message = error(command, str(broken))
        assert "step_000003.parquet" in message and "corrupt" in message
    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(
        pq.read_table(next(iter(list_dumps(dumps).values())), columns=["reward"]), other / "step_000001.parquet"
    )
    assert re.search(
        r"step_000001\.parquet: not a rollout dump, it has no column\(s\) combo, tool_calls",
        error("summary", str(other)),
    )


def test_documented_pandas_recipe_reads_a_dump(dumps):
    recipe = textwrap.dedent(reader.__doc__.split("Reading a dump without tir::")[1].split("or with tir")[0]).strip()
    recipe = recipe.replace("runs/x/rl/dumps/step_000012.parquet", str(list_dumps(dumps)[2]))
    scope = {}
    exec(recipe, scope)  # noqa: S102 - the docstring's own code, on a real dump
    assert scope["meta"]["step"] == 2 and len(scope["df"]) == 4 and isinstance(scope["df"]["tool_calls"][0], list)
    assert scope["photo"].shape == (64, 64, 3)


# ---------------------------------------------------------------- the viewer in a real browser


def browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no headless browser: chromium is not on PATH (install it with scripts/install_browser.sh)")


def load_page(url, profile, *extra):
    command = [
        browser(),
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        *extra,
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def sections(dom):
    """(hidden, step, combo) of every trajectory element in the dumped DOM."""
    tags = re.findall(r'<section class="trajectory"[^>]*>', dom)
    return [
        (
            " hidden" in tag,
            int(re.search(r'data-step="(\d+)"', tag).group(1)),
            re.search(r'data-combo="([^"]*)"', tag).group(1),
        )
        for tag in tags
    ]


def poisoned_copy(folder, out):
    """A copy of the dumps whose first policy message holds HTML that could break the page."""
    shutil.copytree(folder, out)
    path = list_dumps(out)[STEPS[0]]
    table = pq.read_table(path)
    messages = table.column("messages").to_pylist()
    chat = json.loads(messages[0])
    reply = next(m for m in chat if m["role"] == "assistant")
    reply["text"] = "<!--<script> " + reply["text"] + " </script><img src=x onerror=alert(1)>"
    messages[0] = json.dumps(chat)
    index = table.schema.get_field_index("messages")
    table = table.set_column(index, table.schema.field(index), pa.array(messages, table.schema.field(index).type))
    pq.write_table(table, path)
    return out


@pytest.mark.browser
def test_viewer_renders_every_trajectory_in_headless_chromium(dumps, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert dumps_main(parse("view", str(dumps), "--out", str(out))) == 0
    assert "8 trajectories" in capsys.readouterr().out
    page = out.read_text()
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script src" not in page  # self-contained
    data = json.loads(
        re.search(r'<script type="application/json" id="tir-data">(.*?)</script>', page, re.DOTALL)
        .group(1)
        .replace("<\\/", "</")
    )
    assert all(uri.startswith("data:image/jpeg;base64,") for uri in data["images"].values())
    rows = raw_rows(dumps)
    for episode, row in zip(data["episodes"], rows):
        assert episode["calls"] == [c["name"] for c in row["tool_calls"]]
        shown = [m for m in episode["chat"] if m["img"] is not None and m["role"] != "result"]
        assert len(shown) == len(row["images"]) and shown[0]["role"] == "user"  # the LQ, then each tool output shown

    profile = tmp_path / "chrome-profile"
    dom = load_page(out.as_uri(), profile, "--dump-dom")
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-ready="1"' in body and "data-error" not in body, body
    assert sections(dom) == [(False, r["step"], r["combo"]) for r in rows]
    assert 'data-shown="8"' in body and dom.count("<img ") >= 3 * 8

    # the filters, set from the address's fragment as a shared link would
    dom = load_page(out.as_uri() + "#step=2&combo=noise", profile, "--dump-dom")
    expected = sum(r["step"] == 2 and r["combo"] == "noise" for r in rows)
    shown = [(s, c) for hidden, s, c in sections(dom) if not hidden]
    assert shown == [(2, "noise")] * expected and f'data-shown="{expected}"' in dom
    low = sorted(r["reward"] for r in rows)[4]
    dom = load_page(out.as_uri() + f"#rmin={low}", profile, "--dump-dom")
    assert len([1 for hidden, *_ in sections(dom) if not hidden]) == sum(r["reward"] >= low for r in rows)

    # a policy message that would end or stall the embedded JSON: every trajectory is still shown
    poisoned = poisoned_copy(dumps, tmp_path / "poisoned")
    evil = tmp_path / "evil.html"
    assert dumps_main(parse("view", str(poisoned), "--out", str(evil))) == 0
    dom = load_page(evil.as_uri(), profile, "--dump-dom")
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-ready="1"' in body and "data-error" not in body and 'data-shown="8"' in body, body
    page = evil.read_text()
    assert "<!--<script>" not in page and "<img src=x" not in page
    assert "onerror=alert(1)" in dom and '<img src="x"' not in dom  # shown as text, never as markup

    shot = tmp_path / "report.png"
    load_page(out.as_uri(), profile, "--window-size=1400,1800", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(f"viewer screenshot: {shot}")
