"""Training engines: FSDP2 and DeepSpeed over 2 Ray workers match one plain process.

The reference is the plain engine in this process; each sharded engine runs the same tiny
Qwen2.5-VL on the same multi-image trajectories, split over 2 ranks unevenly (3 + 2 rows, 2 + 1
micro-batches), and must give the same log-probs, loss, grad norm and updated weights.
"""

import numpy as np
import pytest
import torch

import tir  # noqa: F401  - shims before transformers
from tir.agent import models, prompts
from tir.agent.multimodal import TrajectoryError, assistant_mask, model_inputs
from tir.protocol import Batch
from tir.rl import algos
from workers.engines import EngineOptions, make_training_engine, token_logprobs
from workers.engines.base import WarmupSchedule

TOOLS = ["denoise_tv", "brighten_gamma", "upscale_bicubic"]
OPTIONS = {
    "lr": 1e-3,
    "warmup_steps": 2,
    "grad_clip": 1.0,
    "micro_batch_size": 2,
    "weight_decay": 0.01,
    "zero_stage": 2,
}
LOSS_TOL = {"rtol": 1e-4, "atol": 1e-6}  # grad norm 1.48 > grad_clip: the clip is exercised
# |updated - plain's updated| / |plain's update| over all weights. Measured: FSDP2 1e-6, ZeRO-2 4e-7,
# ZeRO-3 6e-5: Adam's first step is ~lr * sign(grad), so weights whose true gradient is 0 (the
# key biases: softmax ignores them) move by float noise, differently per reduction order.
UPDATE_RTOL = 1e-3


def policy_gradient_loss(logprobs, tensors):
    """A GRPO-style loss (module level: it travels to Ray workers by pickle)."""
    return algos.policy_loss(logprobs, tensors["rollout_logprobs"], tensors["advantages"], tensors["loss_mask"])


def sft_loss(logprobs, tensors):
    """Negative log-likelihood of the assistant tokens."""
    return -algos.masked_mean(logprobs, tensors["loss_mask"]), {}


# ---------------------------------------------------------------- tiny trajectories
def photo(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def chat(processor, seed):
    """A short chat: task + image, a tool call, the tool's image, a final answer (1 or 2 images)."""
    rng = np.random.default_rng(seed)
    images = [photo(int(rng.integers(56, 140)), int(rng.integers(56, 140)), seed)]
    call = prompts.format_call(prompts.ToolCall(TOOLS[seed % 3], {}))
    messages = [
        {"role": "system", "content": "Restore photos with tools."},
        prompts.user_message(prompts.image_size(images[0])),
        prompts.assistant_message(call),
    ]
    if seed % 2 == 0:
        images.append(photo(84, 112, seed + 100))
        messages.append(prompts.tool_message(TOOLS[seed % 3], prompts.image_size(images[1])))
        messages.append(prompts.assistant_message(prompts.format_stop()))
    return prompts.render(processor, messages, add_generation_prompt=False), images


def trajectory(processor, seed):
    text, images = chat(processor, seed)
    input_ids = processor(text=[text], images=images, return_tensors="pt")["input_ids"][0].tolist()
    return {"input_ids": input_ids, "loss_mask": assistant_mask(processor, input_ids), "images": images}


def trajectories(processor, count=5):
    rows = [trajectory(processor, seed) for seed in range(count)]
    batch = Batch.from_rows(rows)
    rng = np.random.default_rng(0)
    # behaviour log-probs a little off the current policy, so the ratio and the clip matter
    noise = [list(rng.normal(0, 0.05, len(r["input_ids"])) * np.array(r["loss_mask"])) for r in rows]
    return batch.with_column("advantages", list(rng.normal(0, 1, count))).with_column("noise", noise)


@pytest.fixture(scope="module")
def policy(tiny_policy_dir):
    path = tiny_policy_dir(TOOLS)
    _, processor = models.load_policy(path)
    return path, processor


@pytest.fixture(scope="module")
def reference(policy):
    """The plain engine's results on the batch: the figures every engine must match."""
    path, processor = policy
    engine = make_training_engine("plain", path, OPTIONS)
    batch = trajectories(processor)
    logprobs = engine.forward_logprobs(batch).column("logprobs")
    old = [list(np.array(lp) + np.array(n)) for lp, n in zip(logprobs, batch.column("noise"))]
    batch = batch.with_column("rollout_logprobs", old)
    initial = engine.state_dict_for_rollout()
    metrics = engine.train_step(batch, policy_gradient_loss)
    return {
        "batch": batch,
        "initial": initial,
        "logprobs": logprobs,
        "metrics": metrics,
        "weights": engine.state_dict_for_rollout(),
        "next_loss": engine.train_step(batch, policy_gradient_loss)["loss"],
    }


# ---------------------------------------------------------------- single process
def test_logprobs_match_a_direct_forward_of_the_processor_inputs(policy, reference):
    path, processor = policy
    model, _ = models.load_policy(path)
    text, images = chat(processor, seed=0)  # two images
    inputs = processor(text=[text], images=images, return_tensors="pt")
    ids = inputs["input_ids"]
    assert ids[0].tolist() == reference["batch"].column("input_ids")[0]
    with torch.no_grad():
        logits = model(**inputs).logits
    expected = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    got = torch.tensor(reference["logprobs"][0])
    assert got.shape == ids[0].shape and got[0] == 0
    torch.testing.assert_close(got[1:], expected, rtol=1e-5, atol=1e-5)


def test_logprobs_do_not_depend_on_micro_batching_or_padding(policy, reference):
    path, _ = policy
    engine = make_training_engine("plain", path, {**OPTIONS, "micro_batch_size": 5})
    together = engine.forward_logprobs(reference["batch"]).column("logprobs")
    for a, b in zip(together, reference["logprobs"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_gradient_accumulation_equals_one_big_micro_batch(policy, reference):
    path, _ = policy
    engine = make_training_engine("plain", path, {**OPTIONS, "micro_batch_size": 5})
    metrics = engine.train_step(reference["batch"], policy_gradient_loss)
    want = reference["metrics"]
    np.testing.assert_allclose([metrics["loss"], metrics["grad_norm"]], [want["loss"], want["grad_norm"]], **LOSS_TOL)


def test_rows_without_policy_tokens_add_nothing(policy, reference):
    path, _ = policy
    batch = reference["batch"].slice(0, 3)
    silent = batch.with_column(
        "loss_mask", [[0] * len(m) if i == 1 else m for i, m in enumerate(batch.column("loss_mask"))]
    )
    options = {**OPTIONS, "micro_batch_size": 1}
    with_silent_row = make_training_engine("plain", path, options).train_step(silent, sft_loss)
    without_it = make_training_engine("plain", path, options).train_step(batch.take([0, 2]), sft_loss)
    assert np.isfinite(with_silent_row["loss"]) and with_silent_row["loss"] > 0
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(with_silent_row[key], without_it[key], **LOSS_TOL, err_msg=key)


def test_train_step_reports_the_schedule_and_the_token_mean_loss(policy, reference):
    metrics = reference["metrics"]
    assert metrics["step"] == 1 and metrics["lr"] == pytest.approx(OPTIONS["lr"] / 2)  # warmup step 1 of 2
    assert metrics["grad_norm"] > 0 and np.isfinite(metrics["loss"])
    assert {"clip_frac", "approx_kl", "ratio_mean"} <= set(metrics)
    assert reference["next_loss"] != metrics["loss"]  # the step changed the policy


def test_loss_mask_marks_assistant_turns_only(policy, reference):
    _, processor = policy
    row = reference["batch"].rows()[0]  # seed 0: two assistant turns
    marked = [t for t, m in zip(row["input_ids"], row["loss_mask"]) if m]
    text = processor.tokenizer.decode(marked)
    assert text.count("<|im_end|>") == 2 and "<tool_call>" in text and "<answer>" in text
    assert "Restore" not in text and "returned" not in text


def test_image_token_mismatch_names_the_row(policy, reference):
    _, processor = policy
    batch = reference["batch"].slice(0, 2)
    rows = batch.column("images")
    broken = batch.with_column("images", [rows[0], rows[1] + [photo(56, 56, 9)]], kind="images")
    with pytest.raises(
        TrajectoryError, match=r"row 1: input_ids hold \d+ image tokens but its 2 image\(s\) expand to \d+"
    ):
        model_inputs(broken, processor, processor.tokenizer.pad_token_id)


def test_warmup_then_cosine_schedule():
    schedule = WarmupSchedule(warmup_steps=2, kind="cosine", total_steps=6, min_ratio=0.1)
    factors = [schedule(step) for step in range(8)]
    assert factors[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert factors[4] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert factors[6] == factors[7] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="total_steps > warmup_steps"):
        EngineOptions(lr_schedule="cosine", warmup_steps=5, total_steps=5)


def test_token_logprobs_align_with_the_tokens():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 10.0  # position 0 predicts token 1
    lp = token_logprobs(logits, torch.tensor([[1, 2, 3]]))
    assert lp.shape == (1, 3) and lp[0, 0] == 0
    assert lp[0, 1] > -1e-3 and lp[0, 2] == pytest.approx(-np.log(4))


def test_plain_checkpoint_resumes_to_the_same_next_step(policy, reference, tmp_path):
    path, _ = policy
    engine = make_training_engine("plain", path, OPTIONS)
    engine.train_step(reference["batch"], policy_gradient_loss)
    engine.save_checkpoint(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt.tmp").exists()
    again = make_training_engine("plain", path, OPTIONS)
    again.load_checkpoint(tmp_path / "ckpt")
    assert again.step == 1
    np.testing.assert_allclose(
        again.train_step(reference["batch"], policy_gradient_loss)["loss"], reference["next_loss"], rtol=1e-6
    )


def test_save_hf_loads_with_load_policy(policy, reference, tmp_path):
    path, _ = policy
    engine = make_training_engine("plain", path, OPTIONS)
    engine.train_step(reference["batch"], policy_gradient_loss)
    engine.save_hf(tmp_path / "hf")
    reloaded = make_training_engine("plain", tmp_path / "hf", OPTIONS, trainable=False)
    for a, b in zip(
        reloaded.forward_logprobs(reference["batch"]).column("logprobs"),
        engine.forward_logprobs(reference["batch"]).column("logprobs"),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert reloaded.processor.tokenizer.get_vocab() == engine.processor.tokenizer.get_vocab()
    with pytest.raises(RuntimeError, match="frozen"):
        reloaded.train_step(reference["batch"], policy_gradient_loss)


# ---------------------------------------------------------------- 2 Ray workers per engine
SHARDED = [("fsdp2", {}), ("deepspeed", {"zero_stage": 2}), ("deepspeed", {"zero_stage": 3})]


@pytest.fixture(scope="module", params=SHARDED, ids=["fsdp2", "zero2", "zero3"])
def sharded(request, ray_cluster, policy, reference, tmp_path_factory):
    """A 2-rank actor group, its step-1 metrics and weights, and a checkpoint taken after step 1."""
    from workers.actor import ActorWorker
    from workers.group import WorkerGroup

    engine, extra = request.param
    group = WorkerGroup(
        ActorWorker,
        num_workers=2,
        name=f"actor_{engine}_{extra.get('zero_stage', '')}",
        resources={"CPU": 1},
        init_kwargs={"model_path": str(policy[0]), "engine": engine, "options": {**OPTIONS, **extra}},
    )
    try:
        assert group.init_model() == [engine, engine]
        batch = reference["batch"]
        result = {"group": group, "logprobs": group.forward_logprobs(batch).column("logprobs")}
        result["metrics"] = group.train_step(batch, policy_gradient_loss)
        weights = group.state_dict_for_rollout()
        result["weights"], result["rank1_weights"] = weights
        folder = tmp_path_factory.mktemp("ckpt")
        result["checkpoint"], result["hf"] = str(folder / "step_1"), str(folder / "hf")
        group.save_checkpoint(result["checkpoint"])
        group.save_hf(result["hf"])
        yield result
    finally:
        group.shutdown()


def test_sharded_logprobs_match_plain(sharded, reference):
    assert len(sharded["logprobs"]) == len(reference["logprobs"])
    for a, b in zip(sharded["logprobs"], reference["logprobs"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_sharded_loss_and_grad_norm_match_plain(sharded, reference):
    ranks = sharded["metrics"]
    assert ranks[0] == ranks[1]  # reduced over ranks: every rank reports the global step
    got, want = ranks[0], reference["metrics"]
    for key in ("loss", "grad_norm", "clip_frac", "approx_kl"):
        np.testing.assert_allclose(got[key], want[key], **LOSS_TOL, err_msg=key)
    assert got["lr"] == pytest.approx(want["lr"]) and got["step"] == 1


def test_sharded_step_updates_weights_like_plain(sharded, reference):
    got, want = sharded["weights"], reference["weights"]
    assert sharded["rank1_weights"] is None  # the full state dict lives on rank 0
    assert set(got) == set(want)
    off = sum(((got[name] - want[name]).double() ** 2).sum() for name in want).sqrt()
    update = sum(((want[name] - reference["initial"][name]).double() ** 2).sum() for name in want).sqrt()
    assert update > 0.1  # about lr / 2 on each of ~1M weights
    assert off / update < UPDATE_RTOL


def test_sharded_checkpoint_resumes_to_the_same_next_step(sharded, reference):
    group = sharded["group"]
    batch = reference["batch"]
    first = group.train_step(batch, policy_gradient_loss)[0]
    np.testing.assert_allclose(first["loss"], reference["next_loss"], **LOSS_TOL)
    group.train_step(batch, policy_gradient_loss)  # wander off
    assert group.load_checkpoint(sharded["checkpoint"]) == [1, 1]
    again = group.train_step(batch, policy_gradient_loss)[0]
    assert again["step"] == 2
    np.testing.assert_allclose(again["loss"], first["loss"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(again["grad_norm"], first["grad_norm"], rtol=1e-5)


def test_sharded_save_hf_holds_the_trained_weights(sharded):
    model, processor = models.load_policy(sharded["hf"])
    saved = model.state_dict()
    assert set(saved) == set(sharded["weights"])
    for name, tensor in sharded["weights"].items():
        assert torch.equal(saved[name], tensor), name
    assert processor.image_processor.merge_size == 2


def test_options_come_from_the_recipe():
    from tir.config import load_recipe

    recipe = load_recipe("tiny_cpu", ["actor.zero_stage=3", "actor.warmup_steps=2"])
    options = EngineOptions.from_recipe(recipe, lr=3e-4)
    assert (options.lr, options.zero_stage, options.warmup_steps) == (3e-4, 3, 2)
    assert (options.micro_batch_size, options.total_steps, options.dtype) == (8, 3, "float32")


def test_reference_group_gives_frozen_logprobs_over_zero3(ray_cluster, policy, reference):
    from tir.config import load_recipe
    from workers.actor import reference_group
    from workers.group import WorkerCallError

    recipe = load_recipe("tiny_cpu", [f"model.path={policy[0]}", "actor.engine=deepspeed", "actor.zero_stage=3"])
    group = reference_group(recipe, micro_batch_size=2)
    try:
        out = group.forward_logprobs(reference["batch"])
        assert out.columns == ["ref_logprobs"]
        for a, b in zip(out.column("ref_logprobs"), reference["logprobs"]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        with pytest.raises(WorkerCallError, match="frozen"):
            group.train_step(reference["batch"], policy_gradient_loss)
    finally:
        group.shutdown()
