"""``tir restore``: a photo degraded by the synthesis, restored by each baseline and by the tiny
policy; bad input gets one line and exit code 2."""

import argparse
import json
import shutil
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

import tir  # noqa: F401  - shims first
from tir.agent.restore import add_restore_arguments, restore_main
from tir.data.synth import synthesize
from tool_pool.tools import tool_schemas


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A noise+jpeg crop as ``tir data synth`` makes them, written as a PNG."""
    lq = synthesize("builtin", "noise+jpeg", per_image=1, seed=0, crop=96, progress=False).column("lq")[0]
    path = tmp_path_factory.mktemp("photos") / "degraded.png"
    cv2.imwrite(str(path), lq[:, :, ::-1])
    return path, lq


@pytest.fixture(scope="module")
def checkpoint(tiny_policy_dir):
    return tiny_policy_dir(tool_schemas())


def restore(*argv):
    return restore_main(add_restore_arguments(argparse.ArgumentParser()).parse_args([str(a) for a in argv]))


def read(path):
    return cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1]


def test_fixed_order_restores_prints_and_traces(photo, tmp_path, capsys):
    path, lq = photo
    out, trace = tmp_path / "out.png", tmp_path / "trace"
    assert restore(path, "--agent", "fixed_order", "--out", out, "--trace", trace, "--degradations", "noise,jpeg") == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"input  {path}  96x96  niqe ")
    assert printed[1].startswith("turn 1  jpeg_deblock_dct {}") and "s  96x96  niqe " in printed[1]
    assert printed[2].startswith("turn 2  denoise_tv {}") and printed[3] == "turn 3  answer: done"
    assert printed[-1].startswith(f"saved {out} (96x96)") and "2 tool call(s), 3 turn(s), stop: answer" in printed[-1]
    restored = read(out)
    assert restored.shape == lq.shape and not np.array_equal(restored, lq)
    assert sorted(p.name for p in trace.iterdir()) == [
        "00_input.png",
        "01_jpeg_deblock_dct.png",
        "02_denoise_tv.png",
        "trace.json",
    ]
    assert np.array_equal(read(trace / "02_denoise_tv.png"), restored)
    record = json.loads((trace / "trace.json").read_text())
    assert [t["kind"] for t in record["turns"]] == ["tool", "tool", "answer"] and record["stop_reason"] == "answer"
    assert record["scores"]["metric"] == "niqe" and record["scores"]["final"] < record["scores"]["input"]


@pytest.mark.parametrize("agent", ["random", "exhaustive"])
def test_every_baseline_restores(photo, tmp_path, capsys, agent):
    out = tmp_path / "out.png"
    assert restore(photo[0], "--agent", agent, "--out", out, "--max-turns", "3") == 0
    printed = capsys.readouterr().out
    assert "turn 1  " in printed and out.is_file() and read(out).dtype == np.uint8


def test_the_tiny_policy_restores_through_the_same_door(photo, checkpoint, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert (
        restore(
            photo[0],
            *("--agent", checkpoint, "--out", out, "--max-turns", "2", "--max-new-tokens", "16", "--cues"),
            *("--engine", "hf"),  # the reference engine (tests/test_vllm_eval.py runs vLLM)
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "on the transformers engine (asked for)" in captured.err
    printed = captured.out.splitlines()
    assert printed[0].startswith("input  ") and printed[-1].startswith(f"saved {out}")
    assert [line.split()[1] for line in printed[1:-1] if line.startswith("turn")] == ["1", "2"]
    assert read(out).shape[2] == 3


def test_bad_input_gets_one_line_and_exit_code_2(photo, checkpoint, tmp_path, capsys):
    text_file = tmp_path / "notes.png"
    text_file.write_text("not a photo")
    no_processor = tmp_path / "weights_only"
    no_processor.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json"):
        shutil.copy(checkpoint / name, no_processor / name)
    cases = [
        ([tmp_path / "missing.png", "--agent", "random"], "does not exist"),
        ([text_file, "--agent", "random"], "is not an image"),
        ([tmp_path, "--agent", "random"], "is not a file"),
        ([photo[0], "--agent", no_processor], "lacks preprocessor_config.json"),
        ([photo[0], "--agent", "exhaustiv"], "did you mean 'exhaustive'"),
        ([photo[0], "--agent", tmp_path / "no_such_checkpoint"], "does not exist"),
        ([photo[0], "--agent", "fixed_order", "--degradations", "fog"], "unknown degradation 'fog'"),
        ([photo[0], "--agent", "random", "--max-turns", "0"], "--max-turns"),
    ]
    for argv, expected in cases:
        assert restore(*argv, "--out", tmp_path / "out.png") == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("tir restore: error: ") and expected in err, err
    assert restore(photo[0], "--agent", "random", "--out", tmp_path / "out.txt") == 2
    assert "image extension" in capsys.readouterr().err
    # --out and --trace are checked before any work (else the restoration is lost at the end)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for extra, expected in [
        (["--out", a_file / "out.png"], "is not a folder"),
        (["--out", a_file / "deeper" / "out.png"], "is not a folder"),
        (["--out", tmp_path / "folder.png"], "is a folder"),
        (["--out", tmp_path / "out.png", "--trace", a_file], "is a file"),
        (["--out", tmp_path / "out.png", "--trace", a_file / "trace"], "is not a folder"),
    ]:
        if extra[1] == tmp_path / "folder.png":
            extra[1].mkdir()
        assert restore(photo[0], "--agent", "random", *extra) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "out.png").exists()


def test_runs_as_a_program_with_exit_code_2_on_bad_input(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tir.agent.restore",
            str(tmp_path / "none.png"),
            "--agent",
            "random",
            "--out",
            str(tmp_path / "o.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and done.stderr.strip().endswith("does not exist")


def test_restore_through_the_serve_pool(photo, tmp_path, serve_pool, capsys):
    out = tmp_path / "out.png"
    assert (
        restore(
            photo[0],
            "--agent",
            "fixed_order",
            "--degradations",
            "noise",
            "--out",
            out,
            "--pool",
            "serve",
            "--pool-name",
            serve_pool.name,
        )
        == 0
    )
    assert "turn 1  denoise_tv" in capsys.readouterr().out and out.is_file()


def test_a_mistyped_hub_name_fails_at_once_offline(photo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    assert restore(photo[0], "--agent", "foo/bar", "--out", tmp_path / "out.png") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'foo/bar' is not a local folder and not in the hub cache" in err, err
    assert time.perf_counter() - started < 5 and not (tmp_path / "out.png").exists()
