"""Runs that survive: the data order a resume repeats, atomic checkpoints of a real training
engine (the plain engine in this process stands in for the actor group's dispatch), resume
modes, RNG states, and logs that a resumed run cuts back to its checkpoint."""

import json
import random

import numpy as np
import pytest
import torch

import tir  # noqa: F401  - shims before transformers
from tir.agent import models, prompts
from tir.agent.multimodal import assistant_mask
from tir.protocol import Batch
from tir.rl import algos
from tir.rl.reward import MultiMetricReward
from tir.trainer import checkpoint
from tir.trainer.checkpoint import (
    DataStream,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from tir.trainer.run_log import RunLogger, console_line, read_records
from workers.engines import make_training_engine

TOOLS = ["denoise_tv", "brighten_gamma"]


# ---------------------------------------------------------------- the data order


def test_each_epoch_visits_every_sample_once_in_a_seeded_order():
    stream = DataStream(5, seed=1)
    first, second = stream.indices(0, 5), stream.indices(5, 5)
    assert sorted(first) == sorted(second) == [0, 1, 2, 3, 4] and first != second
    assert stream.indices(3, 4) == first[3:] + second[:2]  # a batch across the epoch boundary
    assert DataStream(5, seed=1).indices(0, 10) == first + second
    assert DataStream(5, seed=2).indices(0, 5) != first


def test_a_resumed_stream_continues_with_the_same_samples():
    uninterrupted = DataStream(7, seed=0)
    batches = [uninterrupted.indices(position, 3) for position in range(0, 30, 3)]
    resumed = DataStream(7, seed=0)  # a new process that only knows the position
    assert [resumed.indices(position, 3) for position in range(12, 30, 3)] == batches[4:]


def test_a_checkpoint_of_other_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="other data"):
        checkpoint.check_resumable(TrainState(data_fingerprint="aaa"), DataStream(3, 0, fingerprint="bbb"), tmp_path)
    checkpoint.check_resumable(TrainState(data_fingerprint="aaa"), DataStream(3, 0, fingerprint="aaa"), tmp_path)


# ---------------------------------------------------------------- checkpoints of a real engine


class InProcessActors:
    """The actor group's checkpoint calls, on a plain engine in this process."""

    def __init__(self, engine):
        self.engine = engine

    def save_checkpoint(self, path):
        return [self.engine.save_checkpoint(path)]

    def load_checkpoint(self, path):
        self.engine.load_checkpoint(path)
        return [self.engine.step]


@pytest.fixture(scope="module")
def policy(tiny_policy_dir):
    return tiny_policy_dir(TOOLS)


@pytest.fixture(scope="module")
def batch(policy):
    processor = models.load_policy(policy)[1]
    image = np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    rows = []
    for i, tool in enumerate(TOOLS):
        messages = [
            {"role": "system", "content": "Restore photos."},
            prompts.user_message((56, 56)),
            prompts.assistant_message(prompts.format_call(prompts.ToolCall(tool, {}))),
        ]
        text = prompts.render(processor, messages, add_generation_prompt=False)
        ids = list(processor(text=[text], images=[image])["input_ids"][0])
        rows.append(
            {
                "input_ids": ids,
                "loss_mask": assistant_mask(processor, ids),
                "images": [image],
                "advantages": 1.0 - 2 * i,
            }
        )
    return Batch.from_rows(rows, kinds={"images": "images"})


def pg_loss(logprobs, tensors):
    return algos.policy_loss(logprobs, logprobs.detach(), tensors["advantages"], tensors["loss_mask"])


def engine(policy):
    return make_training_engine("plain", policy, {"lr": 1e-2, "micro_batch_size": 2})


def weights(engine):
    return {name: tensor.clone() for name, tensor in engine.model.state_dict().items()}


def test_save_then_load_continues_training_exactly(policy, batch, tmp_path):
    trained = engine(policy)
    trained.train_step(batch, pg_loss)  # Adam moments are non-zero: the optimizer state matters
    reward = MultiMetricReward(["psnr", "ssim", "niqe"])
    for seed in range(3):
        gains = np.random.default_rng(seed).normal(size=(4, 3))
        reward.adaptive.update(gains, gains)
    state = TrainState(step=1, data_position=4, reward=reward.state_dict(), data_fingerprint="abc")
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    path = save_checkpoint(tmp_path, InProcessActors(trained), state)
    expected_draws = (random.random(), np.random.rand(), torch.rand(1).item())
    expected = trained.train_step(batch, pg_loss)

    fresh = engine(policy)
    assert not all(torch.equal(a, b) for a, b in zip(weights(fresh).values(), weights(trained).values()))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    loaded = load_checkpoint(path, InProcessActors(fresh))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_draws  # the driver's RNG streams
    assert loaded == state
    restored = MultiMetricReward(["psnr", "ssim", "niqe"])
    restored.load_state_dict(loaded.reward)
    assert restored.current_weights() == reward.current_weights()
    again = fresh.train_step(batch, pg_loss)
    assert again["loss"] == expected["loss"] and again["grad_norm"] == expected["grad_norm"] and again["step"] == 2
    assert all(torch.equal(a, b) for a, b in zip(weights(fresh).values(), weights(trained).values()))


def test_checkpoints_are_kept_newest_first_and_named_by_latest_json(policy, tmp_path):
    actors = InProcessActors(engine(policy))
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, actors, TrainState(step=step), keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "step_000004", "step_000006"]
    assert latest_checkpoint(tmp_path).name == "step_000006"
    assert checkpoint.checkpoint_to_resume(tmp_path, "auto") == latest_checkpoint(tmp_path)
    assert checkpoint.checkpoint_to_resume(tmp_path, "never") is None
    assert (
        checkpoint.checkpoint_to_resume(tmp_path, str(tmp_path / "checkpoints" / "step_000004")).name == "step_000004"
    )
    assert checkpoint.checkpoint_to_resume(tmp_path / "elsewhere", "auto") is None
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        checkpoint.checkpoint_to_resume(tmp_path, str(tmp_path))


def test_a_save_that_dies_midway_leaves_the_last_complete_checkpoint(policy, tmp_path):
    actors = InProcessActors(engine(policy))
    save_checkpoint(tmp_path, actors, TrainState(step=1))

    class DiesWhileSaving(InProcessActors):
        def save_checkpoint(self, path):
            super().save_checkpoint(path)
            raise KeyboardInterrupt  # killed after the engine's shards, before the driver's state

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, DiesWhileSaving(actors.engine), TrainState(step=2))
    assert latest_checkpoint(tmp_path).name == "step_000001"
    assert not (tmp_path / "checkpoints" / "step_000002").exists()
    assert load_checkpoint(latest_checkpoint(tmp_path), actors).step == 1
    save_checkpoint(tmp_path, actors, TrainState(step=2))  # the next save clears the leftovers
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "step_000001", "step_000002"]


# ---------------------------------------------------------------- logs of a resumed run


def test_a_resumed_run_logs_each_step_once(tmp_path):
    with RunLogger(tmp_path, total_steps=5, tensorboard=False) as log:
        for step in (1, 2, 3):
            log.step(step, {"reward/mean": step / 10})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "reward/me')  # a line cut by the kill
    with RunLogger(
        tmp_path, total_steps=5, start_step=3, tensorboard=False
    ) as log:  # resumed after step 2's checkpoint
        for step in (3, 4, 5):
            log.step(step, {"reward/mean": step})
    records = read_records(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["reward/mean"]) for r in records] == [(1, 0.1), (2, 0.2), (3, 3), (4, 4), (5, 5)]
    with RunLogger(tmp_path, total_steps=5, tensorboard=False):  # a fresh run starts the log over
        pass
    assert read_records(tmp_path / "metrics.jsonl") == []


def test_tensorboard_gets_every_number(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path, total_steps=2) as log:
        log.step(1, {"reward/mean": 0.5, "time/step": 1.0, "note": "text is not a scalar"})
        log.step(2, {"reward/mean": 0.7, "time/step": 1.0})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("reward/mean")] == pytest.approx([0.5, 0.7])
    assert "note" not in events.Tags()["scalars"]


def test_the_console_line_shows_rewards_and_the_time_breakdown():
    line = console_line(
        3,
        10,
        {
            "reward/mean": 0.12,
            "reward/gain/psnr": 1.5,
            "episode/tool_calls": 2.0,
            "time/step": 12.0,
            "time/rollout": 8.0,
            "time/generate": 5.0,
            "time/tools": 4.0,
            "time/update": 2.5,
        },
    )
    assert line.startswith("step 3/10 | reward +0.120 psnr +1.50dB calls 2.00")
    assert "12.0s: rollout 8.0 (generate 5.0, tools 4.0, update 2.5)" in line
    assert json.dumps(line)  # plain text
