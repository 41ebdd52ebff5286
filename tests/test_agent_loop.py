"""The transformers rollout engine and the async agent loop, on the real tiny policy and real tools.

The tiny policy is random: free sampling gives malformed replies (good for the error paths);
``choices`` constrains its replies to well-formed calls, so that episodes call tools and show
many images (the model still picks among them with its own probabilities).
"""

import asyncio
import copy

import numpy as np
import pytest

import tir  # noqa: F401  - shims before transformers
from tir.agent import models, prompts
from tir.agent.loop import LoopSettings, Transcript, rollout, run_rollout, sequential, tokenize
from tir.data.synth import synthesize
from tir.protocol import Batch
from tool_pool.client import LocalPool
from tool_pool.tools import tool_schemas
from workers.rollout import make_rollout_engine, register_rollout_engine, rollout_engine_class
from workers.rollout.hf_engine import HFEngine

torch = pytest.importorskip("torch")

TOOLS = ["brighten_shift", "dehaze_dcp", "denoise_tv", "derain_median", "sharpen_unsharp"]
SCHEMAS = tool_schemas(TOOLS)
CALLS = tuple(prompts.format_call(prompts.ToolCall(name, {})) for name in TOOLS)
CALLS_OR_ANSWER = CALLS + (prompts.format_stop(),)


@pytest.fixture(scope="module")
def policy(tiny_policy_dir):
    path = tiny_policy_dir(SCHEMAS)
    model, processor = models.load_policy(path)
    return path, model, processor


@pytest.fixture(scope="module")
def engine(policy):
    return HFEngine(model=policy[1], processor=policy[2], max_batch_size=8, seed=0)


@pytest.fixture(scope="module")
def samples():
    return synthesize("builtin", "noise", per_image=1, seed=0, crop=96, progress=False)


def pool():
    return LocalPool(TOOLS)


def first_prompt(processor, image):
    text = prompts.render(processor, prompts.initial_messages(SCHEMAS, prompts.image_size(image)))
    return tokenize(processor, text, [image])


def replay_logprobs(model, processor, ids, images, temperature=1.0):
    """What a training forward pass gives: log_softmax(logits / T) of each next token."""
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
    return torch.cat([torch.zeros(1), logprobs])  # position i: log-prob of token i given the ones before


# ---------------------------------------------------------------- the engine


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_engine_logprobs_are_what_a_forward_pass_gives(engine, policy, samples, temperature):
    _, model, processor = policy
    image = samples.column("lq")[0]
    request = {
        "messages": prompts.initial_messages(SCHEMAS, prompts.image_size(image)),
        "images": [image],
        "sampling": {"temperature": temperature, "max_tokens": 12, "seed": 3},
    }
    [result] = asyncio.run(engine.generate([request]))
    assert result["prompt_token_ids"] == first_prompt(processor, image)
    ids = result["prompt_token_ids"] + result["token_ids"]
    expected = replay_logprobs(model, processor, ids, [image], temperature or 1.0)[len(result["prompt_token_ids"]) :]
    assert len(result["logprobs"]) == len(result["token_ids"]) > 0
    assert torch.allclose(torch.tensor(result["logprobs"]), expected, atol=1e-4)
    assert result["finish_reason"] in ("stop", "length")
    assert (result["finish_reason"] == "stop") == (result["token_ids"][-1] in engine.stop_ids)


def test_engine_sampling_is_seeded_and_never_emits_vision_tokens(engine, samples):
    image = samples.column("lq")[1]

    def request(seed):
        return {
            "messages": prompts.initial_messages(SCHEMAS, (96, 96)),
            "images": [image],
            "sampling": {"temperature": 1.0, "max_tokens": 48, "seed": seed},
        }

    async def sample_all():
        return await asyncio.gather(*(engine.generate([request(seed)]) for seed in (1, 1, 2, 3, 4)))

    results = [r for (r,) in asyncio.run(sample_all())]
    assert results[0]["token_ids"] == results[1]["token_ids"]
    assert len({tuple(r["token_ids"]) for r in results}) >= 3
    forbidden = set(models.forbidden_token_ids(engine.processor))
    assert not forbidden & {t for r in results for t in r["token_ids"]}


def test_concurrent_requests_are_batched_and_match_single_ones(policy, samples):
    engine = HFEngine(model=policy[1], processor=policy[2], max_batch_size=4)
    images = samples.column("lq")[:3]
    requests = [
        {
            "prompt_token_ids": first_prompt(policy[2], im),
            "images": [im],
            "sampling": {"temperature": 0, "max_tokens": 10},
        }
        for im in images
    ]
    alone = [asyncio.run(engine.generate([r]))[0] for r in requests]
    assert engine.stats["batches"] == 3

    async def together():
        return await asyncio.gather(*(engine.generate([r]) for r in requests))

    batched = [r for (r,) in asyncio.run(together())]
    assert engine.stats["batches"] == 4 and engine.stats["requests"] == 6  # the three went in one batch
    for a, b in zip(alone, batched):
        assert a["token_ids"] == b["token_ids"]
        assert np.allclose(a["logprobs"], b["logprobs"], atol=1e-4)


def test_choices_constrain_replies(engine, samples):
    image = samples.column("lq")[2]
    requests = [
        {
            "messages": prompts.initial_messages(SCHEMAS, (96, 96)),
            "images": [image],
            "sampling": {"temperature": 1.0, "max_tokens": 40, "choices": list(CALLS_OR_ANSWER), "seed": seed},
        }
        for seed in range(6)
    ]
    results = asyncio.run(engine.generate(requests))
    assert all(r["text"] in CALLS_OR_ANSWER and r["finish_reason"] == "stop" for r in results)
    assert len({r["text"] for r in results}) >= 2


def test_a_bad_request_fails_alone(engine, policy, samples):
    image = samples.column("lq")[0]
    good = {"prompt_token_ids": first_prompt(policy[2], image), "images": [image], "sampling": {"max_tokens": 4}}
    no_image = {**good, "images": []}
    bad_key = {**good, "sampling": {"temprature": 1.0}}

    async def send():
        return await asyncio.gather(*(engine.generate([r]) for r in (good, no_image, bad_key)), return_exceptions=True)

    ok, mismatch, misspelled = asyncio.run(send())
    assert len(ok[0]["token_ids"]) >= 1
    assert isinstance(mismatch, ValueError) and "holds 16 image tokens but its 0 image(s) need 0" in str(mismatch)
    assert isinstance(misspelled, ValueError) and "did you mean 'temperature'" in str(misspelled)


def test_update_weights_changes_the_policy(policy, samples):
    model = copy.deepcopy(policy[1])
    engine = HFEngine(model=model, processor=policy[2])
    image = samples.column("lq")[0]
    request = {
        "prompt_token_ids": first_prompt(policy[2], image),
        "images": [image],
        "sampling": {"temperature": 0, "max_tokens": 6},
    }
    before = asyncio.run(engine.generate([request]))[0]
    name = next(n for n in model.state_dict() if n.endswith("lm_head.weight"))
    new = torch.randn_like(model.state_dict()[name])
    engine.update_weights([(name, new)])
    assert torch.equal(model.state_dict()[name], new)
    after = asyncio.run(engine.generate([request]))[0]
    assert after["logprobs"] != before["logprobs"]
    with pytest.raises(ValueError, match="unknown parameter name"):
        engine.update_weights([("no.such.weight", new)])
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights([(name, new[:3])])


def test_engines_are_found_by_name(policy):
    assert rollout_engine_class("hf") is HFEngine
    with pytest.raises(KeyError, match="did you mean 'hf'"):
        rollout_engine_class("hff")
    with pytest.raises(ValueError, match="module:ClassName"):
        register_rollout_engine("x", "no_colon")
    assert isinstance(make_rollout_engine("hf", str(policy[0]), max_batch_size=2), HFEngine)


# ---------------------------------------------------------------- the loop


def test_rollout_rows_follow_the_trajectory_contract(engine, policy, samples):
    processor = policy[2]
    settings = LoopSettings(max_turns=3, max_new_tokens=32, choices=CALLS_OR_ANSWER, seed=1)
    batch = run_rollout(engine, processor, pool(), samples.slice(0, 4), settings, tool_schemas=SCHEMAS)
    assert len(batch) == 4 and {"image_id", "combo", "degradations", "hq", "lq"} <= set(batch.columns)
    eos, image_pad = processor.tokenizer.eos_token_id, engine.image_token_id
    merge = processor.image_processor.merge_size**2
    for row in batch.rows():
        ids, mask, logprobs = row["input_ids"], row["loss_mask"], row["rollout_logprobs"]
        assert len(ids) == len(mask) == len(logprobs) and ids[-1] == eos and row["error"] == ""
        assert all(lp == 0.0 for lp, m in zip(logprobs, mask) if m == 0)
        assert all(lp < 0.0 for lp, m in zip(logprobs, mask) if m == 1)
        assert not any(mask[: row["prompt_length"]])
        replies = _runs(mask)
        assert len(replies) == row["num_turns"] == sum(m["role"] == "assistant" for m in row["messages"])
        assert all(ids[end - 1] == eos for _, end in replies)  # each reply's closing token is trained on
        vision = processor.image_processor(images=row["images"], return_tensors="pt")
        assert ids.count(image_pad) == int(vision["image_grid_thw"].prod(-1).sum()) // merge
        assert len(row["images"]) == 1 + sum(c["ok"] for c in row["tool_calls"]) - (row["stop_reason"] == "max_turns")
        assert row["stop_reason"] in ("answer", "max_turns") and row["num_turns"] <= 3
        assert all({"name", "arguments", "ok", "error_kind", "seconds"} <= set(c) for c in row["tool_calls"])
        assert {"wall_s", "generate_s", "env_s", "tool_s", "spans"} <= set(row["timings"])
        assert row["final_image"].dtype == np.uint8 and row["num_tool_calls"] == len(row["tool_calls"])


def test_input_ids_are_the_processor_tokenization_of_the_whole_chat(engine, policy, samples):
    """With choices, replies are canonical token sequences: the stored ids must equal what the
    processor gives for the rendered chat (up to the newline after the last turn)."""
    processor = policy[2]
    settings = LoopSettings(max_turns=3, choices=CALLS_OR_ANSWER, seed=2)
    batch = run_rollout(engine, processor, pool(), samples.slice(4, 7), settings, tool_schemas=SCHEMAS)
    for row in batch.rows():
        chat = [
            {
                "role": m["role"],
                "content": ([{"type": "image"}] if m["image"] else []) + [{"type": "text", "text": m["text"]}],
            }
            for m in row["messages"]
        ]
        expected = tokenize(processor, prompts.render(processor, chat, add_generation_prompt=False), row["images"])
        assert expected[: len(row["input_ids"])] == row["input_ids"]
        assert processor.tokenizer.decode(expected[len(row["input_ids"]) :]) == "\n"


def test_long_multi_image_episodes_end_at_a_turn_boundary_and_replay(engine, policy, samples, tmp_path):
    """Every call succeeds and shows a new image until the context is full; each stored row,
    read back from Parquet, runs through the model with its images and gives the same log-probs."""
    _, model, processor = policy
    images = samples.column("lq")
    max_length = len(first_prompt(processor, images[0])) + 200  # room for about three turns
    settings = LoopSettings(max_turns=10, max_length=max_length, choices=CALLS, seed=3)
    path = run_rollout(engine, processor, pool(), samples.slice(0, 3), settings, tool_schemas=SCHEMAS).to_parquet(
        tmp_path / "rollout.parquet"
    )
    batch = Batch.from_parquet(path)
    for row in batch.rows():
        ids, mask = row["input_ids"], row["loss_mask"]
        assert row["stop_reason"] == "max_length" and len(ids) <= max_length
        assert len(row["images"]) >= 3 and row["num_turns"] >= 3
        assert ids[-1] == processor.tokenizer.eos_token_id and mask[-1] == 1  # ends after a reply
        replayed = replay_logprobs(model, processor, ids, row["images"])  # raises on a token/feature mismatch
        policy_tokens = torch.tensor(mask, dtype=torch.bool)
        assert torch.allclose(replayed[policy_tokens], torch.tensor(row["rollout_logprobs"])[policy_tokens], atol=1e-4)
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        replay_logprobs(model, processor, ids, row["images"][:-1])  # the check above is not vacuous


def test_greedy_trajectories_do_not_depend_on_concurrency(engine, policy, samples):
    settings = LoopSettings(max_turns=3, temperature=0.0, choices=CALLS_OR_ANSWER)
    rows = samples.slice(0, 3)
    together = run_rollout(engine, policy[2], pool(), rows, settings, tool_schemas=SCHEMAS)
    one_by_one = run_rollout(engine, policy[2], pool(), rows, sequential(settings), tool_schemas=SCHEMAS)
    assert together.column("input_ids") == one_by_one.column("input_ids")
    assert together.meta["concurrency"] == settings.concurrency and one_by_one.meta["concurrency"] == 1


def test_free_sampling_errors_and_cut_replies_stay_out_of_the_loss(engine, policy, samples):
    settings = LoopSettings(max_turns=5, max_new_tokens=4, min_reply_tokens=4, max_format_errors=2, temperature=0.0)
    batch = run_rollout(engine, policy[2], pool(), samples.slice(0, 2), settings, tool_schemas=SCHEMAS)
    eos, cut = policy[2].tokenizer.eos_token_id, 0
    for row in batch.rows():
        assert row["stop_reason"] == "parse_error_limit" and row["format_errors"] == 2 and row["num_tool_calls"] == 0
        for start, end in _runs(row["loss_mask"]):
            assert end - start <= 4
            if row["input_ids"][end - 1] != eos:  # cut by the token limit: the closing token is ours
                assert row["input_ids"][end] == eos and row["loss_mask"][end] == 0
                cut += 1
        assert "Error: no tool call found" in row["messages"][3]["text"]
    assert cut > 0


def test_a_broken_episode_is_reported_and_a_broken_batch_raises(engine, policy, samples):
    calls = []

    def flaky_cues(image):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("cue measurement broke")
        return "ok"

    settings = LoopSettings(max_turns=1, choices=CALLS_OR_ANSWER, seed=4)
    batch = run_rollout(engine, policy[2], pool(), samples.slice(0, 2), settings, tool_schemas=SCHEMAS, cues=flaky_cues)
    errors = batch.column("error")
    assert sorted(bool(e) for e in errors) == [False, True] and "cue measurement broke" in "".join(errors)
    assert batch.column("stop_reason")[[bool(e) for e in errors].index(True)] == "error"

    def broken(image):
        raise RuntimeError("always broken")

    with pytest.raises(RuntimeError, match="every episode failed.*always broken"):
        run_rollout(engine, policy[2], pool(), samples.slice(0, 2), settings, tool_schemas=SCHEMAS, cues=broken)
    with pytest.raises(KeyError, match="no column 'photo'"):
        run_rollout(engine, policy[2], pool(), samples, LoopSettings(image_column="photo"), tool_schemas=SCHEMAS)


def test_tool_schemas_come_from_the_pool(engine, policy, samples):
    settings = LoopSettings(max_turns=1, choices=CALLS_OR_ANSWER, seed=5)
    batch = asyncio.run(rollout(engine, policy[2], pool(), samples.slice(0, 1), settings))
    system = batch.column("messages")[0][0]["text"]
    assert all(name in system for name in TOOLS) and "sr_bicubic" not in system


def test_rollout_through_the_serve_pool(engine, policy, samples, serve_pool):
    """The same loop against the cluster-wide pool (its calls batched with other callers')."""
    settings = LoopSettings(max_turns=2, choices=CALLS, seed=6)
    batch = run_rollout(engine, policy[2], serve_pool, samples.slice(0, 3), settings, tool_schemas=SCHEMAS)
    calls = [c for row in batch.column("tool_calls") for c in row]
    assert len(calls) == 6 and all(c["ok"] and c["name"] in TOOLS for c in calls)
    assert all(len(images) == 2 for images in batch.column("images"))


def test_transcript_closes_cut_replies():
    transcript = Transcript(eos_id=2)
    transcript.add_observation([5, 6, 7])
    transcript.add_reply([8, 9], [-0.5, -0.25])
    transcript.add_reply([10, 2], [-1.0, -0.125])
    assert transcript.ids == [5, 6, 7, 8, 9, 2, 10, 2]
    assert transcript.mask == [0, 0, 0, 1, 1, 0, 1, 1]
    assert transcript.logprobs == [0, 0, 0, -0.5, -0.25, 0, -1.0, -0.125]
    with pytest.raises(ValueError, match="log-probs"):
        transcript.add_reply([1, 2], [-1.0])


def _runs(mask):
    """(start, end) of each run of ones."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_loop_settings_come_from_a_recipe():
    from tir.config import load_recipe

    cfg = load_recipe("tiny_cpu", ["rollout.max_turns=6", "rollout.temperature=0.5"])
    settings = LoopSettings.from_recipe(cfg.rollout, concurrency=8)
    assert (settings.max_turns, settings.temperature, settings.max_new_tokens, settings.concurrency) == (6, 0.5, 48, 8)
    with pytest.raises(ValueError, match="concurrency"):
        LoopSettings(concurrency=0)


def test_tokenize_expands_placeholders_from_image_sizes_as_the_processor_does(policy):
    from tir.agent import loop

    processor = policy[2]
    rng = np.random.default_rng(0)
    sizes = [(128, 128), (32, 32), (100, 77), (512, 384), (8, 8), (40, 900)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    text = prompts.render(processor, prompts.initial_messages(SCHEMAS, prompts.image_size(images[0])))
    loop._SHORTCUT_CHECKED.pop(processor, None)
    first = tokenize(processor, text, images[:1])  # checked against the full processor
    assert loop._SHORTCUT_CHECKED[processor] is True
    assert first == list(processor(text=[text], images=images[:1])["input_ids"][0])
    for image in images:  # each size's token count, several images in one piece
        for piece, shown in ((text, [image]), (text + text, [image, images[0]])):
            assert tokenize(processor, piece, shown) == list(processor(text=[piece], images=shown)["input_ids"][0])


def test_tokenize_keeps_the_full_processor_when_the_shortcut_disagrees(policy, monkeypatch):
    from tir.agent import loop

    processor = policy[2]
    image = np.zeros((64, 64, 3), np.uint8)
    text = prompts.render(processor, prompts.initial_messages(SCHEMAS, prompts.image_size(image)))
    loop._SHORTCUT_CHECKED.pop(processor, None)
    monkeypatch.setattr(loop, "_expanded_ids", lambda *a: [1, 2, 3])  # a shortcut that gets it wrong
    full = list(processor(text=[text], images=[image])["input_ids"][0])
    assert tokenize(processor, text, [image]) == full and tokenize(processor, text, [image]) == full
    assert loop._SHORTCUT_CHECKED[processor] is False
    loop._SHORTCUT_CHECKED.pop(processor, None)
