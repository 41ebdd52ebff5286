"""The vLLM rollout engine and the rollout worker group, on real vLLM (CPU), real Ray and the
tiny policy; transformers is the reference.

One vLLM engine serves the whole module (a one-replica rollout group: vLLM start-up is the slow
part). Tests that change its weights put the original ones back.
"""

import asyncio
import copy

import numpy as np
import pytest
import torch

import tir  # noqa: F401  - shims before transformers
from tir.agent import models, prompts
from tir.agent.loop import LoopSettings, rollout
from tir.config import load_recipe
from tir.data.synth import synthesize
from tool_pool.client import LocalPool
from tool_pool.tools import tool_schemas
from workers.rollout import rollout_engine_class
from workers.rollout.group import RolloutGroup
from workers.rollout.hf_engine import HFEngine

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm  # every test here needs vLLM; those that start it also use Ray (conftest.py marks them)

TOOLS = ["brighten_shift", "dehaze_dcp", "denoise_tv"]
SCHEMAS = tool_schemas(TOOLS)
CALLS = tuple(prompts.format_call(prompts.ToolCall(name, {})) for name in TOOLS)
ATOL = 1e-4  # float32 on both sides; measured differences are ~5e-7


@pytest.fixture(scope="module")
def policy(tiny_policy_dir):
    path = tiny_policy_dir(SCHEMAS)
    model, processor = models.load_policy(path)
    return path, model, processor


@pytest.fixture(scope="module")
def updated(policy, tmp_path_factory):
    """The policy with every weight moved, saved as a checkpoint (for the actor group)."""
    model = copy.deepcopy(policy[1])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    path = tmp_path_factory.mktemp("policy") / "updated"
    model.save_pretrained(path)
    policy[2].save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def vllm_group(ray_cluster, policy):
    group = RolloutGroup(
        "vllm",
        policy[0],
        num_replicas=1,
        resources={"CPU": 1},
        bucket_mb=1,
        options={"max_images": 8, "max_model_len": 4096, "bucket_mb": 1},
    )  # several buckets per update
    yield group
    group.close()


def photo(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def two_image_chat(processor):
    """A fixed multimodal prompt: task + photo, a tool call, the tool's photo; as token ids."""
    images = [photo(96, 120, 0), photo(80, 80, 1)]
    messages = prompts.initial_messages(SCHEMAS, prompts.image_size(images[0]))
    messages += [prompts.assistant_message(CALLS[2]), prompts.tool_message(TOOLS[2], prompts.image_size(images[1]))]
    ids = processor(text=[prompts.render(processor, messages)], images=images)["input_ids"][0]
    return messages, [int(i) for i in ids], images


def replay_logprobs(model, processor, ids, images, temperature=1.0):
    """What a training forward pass gives: log_softmax(logits / T) of each token, position 0 = 0."""
    ids = torch.tensor([ids])
    vision = processor.image_processor(images=list(images), return_tensors="pt")
    with torch.no_grad():
        logits = (
            model(
                input_ids=ids,
                pixel_values=vision["pixel_values"],
                image_grid_thw=vision["image_grid_thw"],
                mm_token_type_ids=models.mm_token_type_ids(processor, ids),
            )
            .logits[0]
            .float()
        )
    logprobs = torch.log_softmax(logits[:-1] / temperature, dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return torch.cat([torch.zeros(1), logprobs])


def generate(engine, *requests):
    return asyncio.run(engine.generate(list(requests)))


def reply_logprobs(model, processor, prompt_ids, result, images, temperature):
    expected = replay_logprobs(model, processor, prompt_ids + result["token_ids"], images, temperature or 1.0)
    return torch.tensor(result["logprobs"]), expected[len(prompt_ids) :]


# ---------------------------------------------------------------- the engine


def test_vllm_is_a_registered_engine():
    from workers.rollout.vllm_engine import VLLMEngine

    assert rollout_engine_class("vllm") is VLLMEngine


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.7, 0.9), (1.0, 1.0)])
def test_logprobs_follow_the_convention(vllm_group, policy, temperature, top_p):
    """log_softmax(raw logits / T), before forbidden tokens and top-p: what training recomputes."""
    _, model, processor = policy
    _, ids, images = two_image_chat(processor)
    sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": 12, "seed": 5}
    [result] = generate(vllm_group, {"prompt_token_ids": ids, "images": images, "sampling": sampling})
    got, expected = reply_logprobs(model, processor, ids, result, images, temperature)
    assert len(got) == len(result["token_ids"]) > 0
    assert torch.allclose(got, expected, atol=ATOL), (got - expected).abs().max()
    assert not set(result["token_ids"]) & set(models.forbidden_token_ids(processor))


def test_greedy_continuation_matches_transformers(vllm_group, policy):
    _, model, processor = policy
    messages, ids, images = two_image_chat(processor)
    hf = HFEngine(model=model, processor=processor)
    requests = [
        {"messages": messages[:2], "images": images[:1], "sampling": {"temperature": 0, "max_tokens": 24}},
        {"prompt_token_ids": ids, "images": images, "sampling": {"temperature": 0, "max_tokens": 24}},
    ]
    ours, theirs = generate(vllm_group, *requests), generate(hf, *requests)
    for a, b in zip(ours, theirs):
        assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"] and a["finish_reason"] == b["finish_reason"]
        assert np.allclose(a["logprobs"], b["logprobs"], atol=ATOL)
    assert ours[0]["prompt_token_ids"] == theirs[0]["prompt_token_ids"]


def test_choices_constrain_replies_but_not_logprobs(vllm_group, policy):
    _, model, processor = policy
    _, ids, images = two_image_chat(processor)
    requests = [
        {
            "prompt_token_ids": ids,
            "images": images,
            "sampling": {"temperature": 1.0, "max_tokens": 40, "choices": list(CALLS), "seed": s},
        }
        for s in range(4)
    ]
    results = generate(vllm_group, *requests)
    assert all(r["text"] in CALLS and r["finish_reason"] == "stop" for r in results)
    got, expected = reply_logprobs(model, processor, ids, results[0], images, 1.0)
    assert torch.allclose(got, expected, atol=ATOL)  # unmasked: log-probs under the free policy
    assert got[0] < -1e-2  # every choice starts with <tool_call>: forced, yet not log-prob 0


def test_seeds_reproduce_and_bad_requests_fail_alone(vllm_group, policy):
    _, _, processor = policy
    _, ids, images = two_image_chat(processor)

    def request(seed, **changes):
        return {
            "prompt_token_ids": ids,
            "images": images,
            "sampling": {"temperature": 1.0, "max_tokens": 16, "seed": seed},
            **changes,
        }

    async def send():
        requests = [
            request(1),
            request(1),
            request(2),
            request(3),
            request(1, images=images[:1]),
            request(1, sampling={"temprature": 1}),
        ]
        return await asyncio.gather(*(vllm_group.generate([r]) for r in requests), return_exceptions=True)

    *good, wrong_images, misspelled = asyncio.run(send())
    tokens = [tuple(r[0]["token_ids"]) for r in good]
    assert tokens[0] == tokens[1] and len(set(tokens)) >= 3
    assert isinstance(wrong_images, ValueError) and "image tokens" in str(wrong_images)
    assert isinstance(misspelled, ValueError) and "did you mean 'temperature'" in str(misspelled)


def test_a_long_seeded_prompt_is_served(vllm_group, policy):
    """A prompt longer than vLLM's default step budget (2048 tokens) with a seed: on CPU, vLLM
    0.32 dies when such a prefill is split over steps; the engine prefills it whole."""
    ids = policy[2].tokenizer("restore the photo " * 2000, add_special_tokens=False)["input_ids"][:3000]
    [result] = generate(
        vllm_group, {"prompt_token_ids": ids, "sampling": {"temperature": 1.0, "max_tokens": 4, "seed": 1}}
    )
    assert len(result["token_ids"]) == 4 and result["finish_reason"] == "length"


# ---------------------------------------------------------------- live weight updates


def test_update_weights_then_logprobs_match_the_updated_model(vllm_group, policy, updated):
    """The acceptance test: new weights without a restart; then vLLM's log-probs of a fixed
    multimodal sequence are the updated transformers model's."""
    _, model, processor = policy
    _, ids, images = two_image_chat(processor)
    request = {"prompt_token_ids": ids, "images": images, "sampling": {"temperature": 1.0, "max_tokens": 16, "seed": 7}}
    [before] = generate(vllm_group, request)
    vllm_group.update_weights(updated[1].state_dict())
    try:
        [after] = generate(vllm_group, request)
        got, expected = reply_logprobs(updated[1], processor, ids, after, images, 1.0)
        assert torch.allclose(got, expected, atol=ATOL), (got - expected).abs().max()
        _, under_old_weights = reply_logprobs(model, processor, ids, after, images, 1.0)
        assert (got - under_old_weights).abs().max() > 1e-2
    finally:
        vllm_group.update_weights(model.state_dict())
    [restored] = generate(vllm_group, request)
    assert restored["token_ids"] == before["token_ids"] and np.allclose(
        restored["logprobs"], before["logprobs"], atol=ATOL
    )
    stats = vllm_group.stats()[0]
    assert stats["weight_updates"] >= 2 and stats["weight_bytes"] >= 2 * sum(
        t.numel() * 4 for t in model.state_dict().values()
    )


def test_bad_updates_load_nothing(vllm_group, policy):
    _, model, processor = policy
    _, ids, images = two_image_chat(processor)
    request = {"prompt_token_ids": ids, "images": images, "sampling": {"temperature": 0, "max_tokens": 8}}
    [before] = generate(vllm_group, request)
    weights = {name: torch.zeros_like(t) for name, t in model.state_dict().items()}
    with pytest.raises(ValueError, match="unknown parameter name"):
        vllm_group.update_weights({**weights, "no.such.weight": torch.zeros(2)})
    name = next(iter(weights))
    with pytest.raises(ValueError, match="shape"):
        vllm_group.update_weights({**weights, name: torch.zeros(3)})
    with pytest.raises(ValueError, match="every parameter"):
        vllm_group.update_weights({name: weights[name]})
    [after] = generate(vllm_group, request)
    assert after["token_ids"] == before["token_ids"] and np.allclose(after["logprobs"], before["logprobs"], atol=ATOL)


@pytest.fixture(scope="module")
def actors(ray_cluster, updated):
    """An actor group (one plain rank) holding the updated policy."""
    from workers.actor import actor_group

    recipe = load_recipe("tiny_cpu", ["actor.num_workers=1", "actor.engine=plain"])
    group = actor_group(recipe, name="actor_for_rollout", model_path=str(updated[0]))
    yield group
    group.shutdown()


@pytest.mark.parametrize("transport", ["object_store", "broadcast"])
def test_sync_from_the_actor_group(vllm_group, actors, policy, updated, transport):
    """Weights go from the actor group's rank 0 to vLLM (the broadcast runs over gloo on CPU)."""
    _, model, processor = policy
    _, ids, images = two_image_chat(processor)
    try:
        vllm_group.sync_from(actors, transport=transport)
        [result] = generate(
            vllm_group, {"prompt_token_ids": ids, "images": images, "sampling": {"temperature": 0.8, "max_tokens": 12}}
        )
        got, expected = reply_logprobs(updated[1], processor, ids, result, images, 0.8)
        assert torch.allclose(got, expected, atol=ATOL), (got - expected).abs().max()
    finally:
        vllm_group.update_weights(model.state_dict())


# ---------------------------------------------------------------- the group: router and agent loop


def test_agent_loop_trajectories_carry_the_policys_logprobs(vllm_group, policy):
    """Multi-turn, multi-image episodes through the group; every sampled token's log-prob is
    what a teacher-forced forward pass over the stored trajectory gives."""
    _, model, processor = policy
    samples = synthesize("builtin", "noise", per_image=1, seed=0, crop=96, progress=False).slice(0, 3)
    settings = LoopSettings(max_turns=3, max_new_tokens=32, temperature=0.8, choices=CALLS, concurrency=3)
    batch = asyncio.run(rollout(vllm_group, processor, LocalPool(TOOLS), samples, settings, tool_schemas=SCHEMAS))
    assert all(row["error"] == "" for row in batch.rows())
    assert max(len(row["images"]) for row in batch.rows()) >= 3
    for row in batch.rows():
        mask = torch.tensor(row["loss_mask"], dtype=torch.bool)
        expected = replay_logprobs(model, processor, row["input_ids"], row["images"], 0.8)
        assert torch.allclose(torch.tensor(row["rollout_logprobs"])[mask], expected[mask], atol=ATOL)


def test_router_sends_each_request_to_the_least_loaded_replica(ray_cluster, policy, updated):
    """Two transformers replicas (cheap); the same router and update path as vLLM's."""
    processor = policy[2]
    group = RolloutGroup("hf", policy[0], num_replicas=2, resources={"CPU": 0.5}, name="rollout_hf")
    try:
        group.in_flight[:] = [3, 1]
        assert group.pick_replica() == 1
        group.in_flight[:] = [0, 0]
        group.routed[:] = [5, 2]
        assert group.pick_replica() == 1
        group.routed[:] = [0, 0]
        _, ids, images = two_image_chat(processor)
        requests = [{"prompt_token_ids": ids, "images": images, "sampling": {"temperature": 1.0, "max_tokens": 8}}] * 8
        results = generate(group, *requests)
        assert len(results) == 8 and group.routed == [4, 4] and group.in_flight == [0, 0]
        assert [s["requests"] for s in group.stats()] == [4, 4]
        group.update_weights(updated[1].state_dict())
        greedy = {"prompt_token_ids": ids, "images": images, "sampling": {"temperature": 0, "max_tokens": 8}}
        expected = generate(HFEngine(model=updated[1], processor=processor), greedy)[0]
        for result in generate(group, greedy, greedy):  # one on each replica
            assert result["token_ids"] == expected["token_ids"]
    finally:
        group.close()
