"""SFT rows built by the agent loop, the SFT loss, and `tir train sft` end to end: FSDP2 over two
Ray workers, held-out evaluation, checkpoints resumed mid-epoch, and an HF checkpoint that
`tir restore` runs. Tiny data: 3 photos x 2 combinations of 64 px crops, a 10-tool prompt.
"""

import asyncio
import json

import cv2
import numpy as np
import pytest

import tir  # noqa: F401  - shims before transformers
from tir.agent import models, prompts, tiny_policy
from tir.agent.env import perception_cues
from tir.agent.loop import LoopSettings, tokenize
from tir.agent.multimodal import assistant_mask
from tir.data import expert
from tir.data.sft_rows import TRAIN_COLUMNS, sft_rows, split_by_image
from tir.data.synth import synthesize
from tir.eval.tool_choice import tool_choice
from tir.protocol import Batch
from tir.rl.algos import sft_loss
from tir.trainer.sft import epoch_batches, sft_main
from tool_pool.client import LocalPool
from tool_pool.tools import tool_schemas

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
SCHEMAS = tool_schemas(TOOLS)
PHOTOS = ("astronaut", "coffee", "chelsea")  # chelsea: held out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny policy and expert data (perturbed, real tools) in a run folder."""
    root = tmp_path_factory.mktemp("sft")
    tiny_policy.build_tiny_policy(root / "tiny_policy", SCHEMAS, seed=0)
    samples = synthesize("builtin", "noise+jpeg,dark+noise", per_image=1, seed=0, crop=64, progress=False)
    samples = samples.take([i for i, image_id in enumerate(samples.column("image_id")) if image_id in PHOTOS])
    settings = expert.ExpertSettings(metrics=("psnr", "ssim"), reorder_prob=0.5, swap_tool_prob=0.5, seed=1)
    asyncio.run(expert.expert_batch(LocalPool(TOOLS), samples, settings)).to_parquet(root / "data" / "sft.parquet")
    return root


@pytest.fixture(scope="module")
def processor(root):
    return models.load_policy(root / "tiny_policy")[1]


@pytest.fixture(scope="module")
def expert_rows(root):
    return Batch.from_parquet(root / "data" / "sft.parquet")


def settings():
    return LoopSettings(max_turns=4, max_new_tokens=48)


# ---------------------------------------------------------------- rows


def test_rows_are_the_whole_chat_with_loss_on_the_experts_replies_only(processor, expert_rows):
    rows = sft_rows(processor, expert_rows, SCHEMAS, settings(), perception_cues())
    assert len(rows) == len(expert_rows) and any(rows.column("perturbed"))
    eos = processor.tokenizer.eos_token
    for row, source in zip(rows.rows(), expert_rows.rows()):
        # what the policy writes: one call per step of the trajectory (perturbed or not), then the answer
        replies = [prompts.format_call(prompts.ToolCall(name, {})) + eos for name in source["tools"]] + [
            prompts.format_stop() + eos
        ]
        trained = processor.tokenizer.decode([i for i, m in zip(row["input_ids"], row["loss_mask"]) if m])
        assert trained == "".join(replies)
        assert row["loss_mask"] == assistant_mask(processor, row["input_ids"])
        # the pieces the loop tokenized are the whole chat tokenized at once (less the template's
        # newline after the last turn, which no one writes): nothing shifts at turn boundaries
        images = [source["lq"], *source["step_images"]]
        assert all(np.array_equal(a, b) for a, b in zip(row["images"], images)) and len(row["images"]) == len(images)
        assert row["input_ids"] == tokenize(processor, whole_chat(processor, source).removesuffix("\n"), images)


def whole_chat(processor, source):
    from tir.data.perception import observe

    def cues(image):
        return observe(image)  # what perception_cues() shows: the numbers, then the guess

    messages = prompts.initial_messages(SCHEMAS, prompts.image_size(source["lq"]), cues(source["lq"]))
    for name, image in zip(source["tools"], source["step_images"]):
        messages.append(prompts.assistant_message(prompts.format_call(prompts.ToolCall(name, {}))))
        messages.append(prompts.tool_message(name, prompts.image_size(image), cues(image)))
    messages.append(prompts.assistant_message(prompts.format_stop()))
    return prompts.render(processor, messages, add_generation_prompt=False)


def test_cues_appear_only_when_the_recipe_shows_them(processor, expert_rows):
    one = expert_rows.slice(0, 1)
    with_cues = processor.tokenizer.decode(
        sft_rows(processor, one, SCHEMAS, settings(), perception_cues()).column("input_ids")[0]
    )
    without = processor.tokenizer.decode(sft_rows(processor, one, SCHEMAS, settings(), None).column("input_ids")[0])
    assert (
        with_cues.count("Measured cues: noise_sigma=") == 1 + len(one.column("tools")[0])
        and "Measured cues" not in without
    )


def test_held_out_photos_are_split_off(expert_rows):
    train, heldout = split_by_image(expert_rows, ["chelsea"])
    assert set(heldout.column("image_id")) == {"chelsea"} and "chelsea" not in train.column("image_id")
    assert len(train) + len(heldout) == len(expert_rows)


@pytest.mark.slow  # 1-5 s on a quiet 2-core machine, 10-30 s beside other work: not in `make test-fast`
def test_the_sft_loss_falls_on_the_expert_rows(root, processor, expert_rows):
    from workers.engines import make_training_engine

    batch = sft_rows(processor, expert_rows, SCHEMAS, settings()).select(TRAIN_COLUMNS)
    engine = make_training_engine("plain", root / "tiny_policy", {"lr": 3e-3, "micro_batch_size": 8})
    losses = [engine.train_step(batch, sft_loss)["nll"] for _ in range(4)]
    assert losses[-1] < losses[0] - 0.5


def test_epoch_batches_cover_every_row_once_and_feed_every_worker():
    for rows, size in ((33, 16), (17, 16), (5, 2), (4, 4)):
        batches = epoch_batches(rows, size, 2, seed=0, epoch=3)
        assert sorted(i for b in batches for i in b) == list(range(rows)) and min(map(len, batches)) >= 2
    assert epoch_batches(10, 4, 2, 0, 1) == epoch_batches(10, 4, 2, 0, 1) != epoch_batches(10, 4, 2, 0, 2)


def test_tool_choice_scores_first_call_subtask_tie_and_sequence():
    def episode(expert_tools, replies, called, format_errors=0):
        messages = [{"role": "assistant", "text": reply} for reply in replies]
        calls = [{"name": name, "committed": True} for name in called]
        # what the search scored: the expert's schedule, a near tie, and a clearly worse one
        candidates = [
            {"tools": expert_tools, "quality": 1.0, "scores": {"psnr": 25.0}},
            {"tools": ["denoise_dct", "jpeg_reapply"], "quality": 0.8, "scores": {"psnr": 24.8}},
            {"tools": ["dehaze_dcp"], "quality": 0.1, "scores": {"psnr": 24.0}},
        ]
        return {
            "expert_tools": expert_tools,
            "messages": messages,
            "tool_calls": calls,
            "format_errors": format_errors,
            "search_candidates": candidates,
        }

    call = lambda name: prompts.format_call(prompts.ToolCall(name, {}))  # noqa: E731
    episodes = Batch.from_rows(
        [
            episode(
                ["denoise_tv", "jpeg_reapply"],
                [call("denoise_tv"), call("jpeg_reapply"), "<answer>done</answer>"],
                ["denoise_tv", "jpeg_reapply"],
            ),
            episode(["denoise_tv", "jpeg_reapply"], [call("denoise_dct"), "<answer>done</answer>"], ["denoise_dct"]),
            episode(
                ["jpeg_reapply", "denoise_tv"],
                ["nonsense", call("jpeg_reapply"), call("denoise_tv")],
                ["jpeg_reapply", "denoise_tv"],
                1,
            ),
            episode(["jpeg_reapply", "denoise_tv"], [call("dehaze_dcp")], ["dehaze_dcp"]),
        ],
        kinds={"messages": "json", "tool_calls": "json", "search_candidates": "json"},
    )
    scores = tool_choice(episodes, SCHEMAS, tie_margin=1.0)  # within 0.3 dB
    assert scores == {
        "first_call": 0.25,
        "first_subtask": 0.5,
        "first_call_tie": 0.5,
        "sequence": 0.25,
        "format_ok": 0.75,
        "samples": 4,
    }
    assert tool_choice(episodes, SCHEMAS, tie_margin=4.0)["first_call_tie"] == 0.75  # within 1.2 dB dehaze_dcp ties too
    assert "first_call_tie" not in tool_choice(episodes.drop(["search_candidates"]), SCHEMAS)
    # an expert that calls nothing (partial schedules): answering at once is its first move
    answer = "<answer>done</answer>"
    no_call = Batch.from_rows(
        [episode([], [answer], []), episode([], [call("denoise_tv"), answer], ["denoise_tv"])],
        kinds={"messages": "json", "tool_calls": "json", "search_candidates": "json"},
    )
    scores = tool_choice(no_call, SCHEMAS, tie_margin=1.0)
    assert (scores["first_call"], scores["first_subtask"], scores["sequence"], scores["format_ok"]) == (
        0.5,
        0.5,
        0.5,
        1,
    )
    assert scores["first_call_tie"] == 0.5  # the empty schedule and jpeg-first's near tie: denoise_tv ties neither


# ---------------------------------------------------------------- the driver


def run_sft(root, *overrides):
    return sft_main(
        [
            "recipe=sft_tiny_cpu",
            f"run.output_dir={root}",
            f"model.path={root / 'tiny_policy'}",
            "pool.backend=local",
            f"pool.tools=[{','.join(TOOLS)}]",
            "actor.num_workers=2",
            "actor.engine=fsdp2",
            "actor.lr_schedule=constant",
            "actor.warmup_steps=0",
            "trainer.batch_size=2",
            "trainer.save_every=1",
            "sft.epochs=1",
            *overrides,
        ]
    )


def records(root, kind):
    lines = (root / "sft" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_sft_trains_evaluates_resumes_and_writes_a_restorable_checkpoint(ray_cluster, root, tmp_path, capsys):
    assert run_sft(root) == 0
    out = root / "sft"
    trained = records(root, "train")
    assert [r["global_step"] for r in trained] == [1, 2]  # 4 training rows (chelsea held out) in batches of 2
    assert [r["epoch"] for r in records(root, "eval")] == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_rows"] == 4 and summary["cues"] and summary["after"]["samples"] == 2
    assert (out / "config.yaml").is_file() and "perception_cues: true" in (out / "config.yaml").read_text()
    assert "tool_prompt: names" in (out / "config.yaml").read_text()

    # resume from the mid-epoch checkpoint: only the second step runs again, and identically
    assert run_sft(root, f"trainer.resume={out / 'checkpoints' / 'step_000001'}") == 0
    # the log drops the step it repeats: each step is logged once, the repeat identical
    again = records(root, "train")
    assert [r["global_step"] for r in again] == [1, 2] and again[0] == trained[0]
    assert again[1]["nll"] == pytest.approx(trained[1]["nll"], rel=1e-5)
    assert "resumed from" in capsys.readouterr().out

    # everything done: a rerun trains nothing and says so
    assert run_sft(root) == 0
    assert len(records(root, "train")) == 2 and "already trained" in capsys.readouterr().out

    model, _ = models.load_policy(out / "hf")
    assert model.config.text_config.hidden_size == 128
    from tir.agent.restore import main as restore

    photo = Batch.from_parquet(root / "data" / "sft.parquet").column("lq")[0]
    cv2.imwrite(str(tmp_path / "in.png"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    assert (
        restore(
            [
                str(tmp_path / "in.png"),
                "--agent",
                str(out / "hf"),
                "--out",
                str(tmp_path / "out.png"),
                "--cues",
                "--cue-style",
                "guess",
                "--tool-prompt",
                "names",
                "--max-turns",
                "2",
            ]
        )
        == 0
    )  # as the recipe trained it
    assert (tmp_path / "out.png").is_file()
