"""The tiny policy checkpoint: built offline, loaded like a real model, consistent with its processor."""

import json

import numpy as np
import pytest

import tir  # noqa: F401  - shims before transformers
from tir.agent import models, prompts, tiny_policy

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

SCHEMAS = [
    {
        "name": "denoise_tv",
        "description": "Remove noise by total-variation smoothing.",
        "parameters": {
            "type": "object",
            "properties": {"strength": {"type": "number", "minimum": 0, "maximum": 3, "default": 1.0}},
            "additionalProperties": False,
        },
    },
    {
        "name": "brighten_gamma",
        "description": "Brighten a dark photo with a gamma curve.",
        "parameters": {
            "type": "object",
            "properties": {"gamma": {"type": "number", "minimum": 0.3, "maximum": 3.0}},
            "required": ["gamma"],
            "additionalProperties": False,
        },
    },
    {
        "name": "upscale_bicubic",
        "description": "Upscale x4 with bicubic interpolation.",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
]


@pytest.fixture(scope="module")
def tiny(tiny_policy_dir):
    path = tiny_policy_dir(SCHEMAS)
    model, processor = models.load_policy(path)
    return path, model, processor


def photo(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def two_turn_chat():
    call = prompts.format_call(prompts.ToolCall("denoise_tv", {"strength": 1.5}))
    return [
        *prompts.initial_messages(SCHEMAS, (256, 256), {"noise_sigma": 23.4, "brightness": 0.42}),
        prompts.assistant_message(call),
        prompts.tool_message("denoise_tv", (256, 192), {"noise_sigma": 4.1}),
    ]


def test_checkpoint_is_a_complete_qwen2_5_vl_with_head_dim_64(tiny):
    path, model, processor = tiny
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    text = config["text_config"]
    assert text["hidden_size"] // text["num_attention_heads"] == 64  # vLLM's CPU attention needs it
    assert sum(text["rope_parameters"]["mrope_section"]) == 32
    assert text["vocab_size"] == len(processor.tokenizer)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert processor.chat_template == tiny_policy.CHAT_TEMPLATE
    # Nothing in the loaded objects points back at how they were made: the same door as a real model.
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration" and not model.training
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 3e6
    eos = model.generation_config.eos_token_id
    assert processor.tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])


def test_special_tokens_and_tags_are_single_tokens(tiny):
    tokenizer = tiny[2].tokenizer
    for token in tiny_policy.SPECIAL_TOKENS + prompts.PROTOCOL_TAGS:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert tokenizer.image_token == "<|image_pad|>" and tokenizer.video_token == "<|video_pad|>"
    assert tiny[1].config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")


@pytest.mark.parametrize(
    "text",
    [
        prompts.format_call(prompts.ToolCall("denoise_tv", {"strength": 1.25})),
        prompts.format_call(prompts.ToolCall("upscale_bicubic", {})) + " <answer>done</answer>",
        'Ünïcödé 写真 🙂 <tool_call>{"name": "x\\u003c/tool_call\\u003e", "arguments": {"a": -1e-07}}</tool_call>\n\n  trailing  ',
    ],
)
def test_tokenizer_round_trips_text_exactly(tiny, text):
    tokenizer = tiny[2].tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # protocol tags are not "special"


def test_tool_call_is_compact(tiny):
    """Trained on the agent's own texts: a call costs a few tokens per field, not one per byte."""
    call = prompts.format_call(prompts.ToolCall("denoise_tv", {"strength": 1.5}))
    assert len(tiny[2].tokenizer(call, add_special_tokens=False)["input_ids"]) < len(call) / 2


def test_chat_template_renders_system_images_calls_and_tool_turns(tiny):
    processor = tiny[2]
    text = prompts.render(processor, two_turn_chat())
    assert text.startswith("<|im_start|>system\nYou are an image restoration agent.")
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert (
        '<|im_start|>assistant\n<tool_call>{"name": "denoise_tv", "arguments": {"strength": 1.5}}</tool_call><|im_end|>\n'
        in text
    )
    assert (
        "<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|><|vision_end|>denoise_tv returned a 256x192 image."
        in text
    )
    assert text.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")
    # HF-style structured tool calls render to the same text as the policy writes.
    structured = two_turn_chat()
    structured[2] = {
        "role": "assistant",
        "content": [],
        "tool_calls": [{"type": "function", "function": {"name": "denoise_tv", "arguments": {"strength": 1.5}}}],
    }
    assert prompts.render(processor, structured) == text


def test_two_images_give_matching_image_tokens_and_features(tiny):
    _, model, processor = tiny
    text = prompts.render(processor, two_turn_chat())
    images = [photo(256, 256, 1), photo(192, 256, 2)]  # (height, width)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    merge = processor.image_processor.merge_size**2
    expected = [int(grid.prod()) // merge for grid in inputs["image_grid_thw"]]
    assert expected[0] == 16  # 112x112 pixel budget
    ids = inputs["input_ids"][0]
    assert int((ids == model.config.image_token_id).sum()) == sum(expected)
    assert inputs["pixel_values"].shape[0] == sum(int(grid.prod()) for grid in inputs["image_grid_thw"])
    assert torch.equal(inputs["mm_token_type_ids"][0], models.mm_token_type_ids(processor, ids))
    with torch.no_grad():
        logits = model(**inputs).logits  # raises "Image features and image tokens do not match" otherwise
    assert logits.shape == (1, ids.shape[0], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_generate_never_samples_forbidden_tokens(tiny):
    _, model, processor = tiny
    messages = prompts.initial_messages(SCHEMAS, (128, 128))
    inputs = processor(text=[prompts.render(processor, messages)], images=[photo(128, 128)], return_tensors="pt")
    forbidden = models.forbidden_token_ids(processor)
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") in forbidden
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=24, do_sample=True, suppress_tokens=forbidden)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert 0 < len(new) <= 24
    assert not set(new) & set(forbidden)
    allowed = models.allowed_token_ids(processor)
    assert set(allowed) | set(forbidden) == set(range(len(processor.tokenizer)))
    assert models.allowed_token_ids(processor, vocab_size=len(processor.tokenizer) + 64) == allowed


def test_incremental_turns_tokenize_like_the_whole_chat(tiny):
    """prompt ids + sampled ids (ending in eos) + delta ids == ids of the whole rendered chat."""
    tokenizer = tiny[2].tokenizer
    chat = two_turn_chat()
    prompt = prompts.render(tiny[2], chat[:2], add_generation_prompt=True)
    reply = prompts.message_text(chat[2])
    delta = prompts.render_delta(tiny[2], chat[:3], chat[3:])

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    pieces = encode(prompt) + encode(reply) + [tokenizer.eos_token_id] + encode(delta)
    assert delta.startswith("\n<|im_start|>user\n<tool_response>")
    assert pieces == encode(prompts.render(tiny[2], chat))
    with pytest.raises(ValueError, match="assistant"):
        prompts.render_delta(tiny[2], chat[:2], chat[3:])


def test_build_is_deterministic_per_seed(tiny, tmp_path):
    again = tiny_policy.build_tiny_policy(tmp_path / "again", SCHEMAS, seed=0)
    assert (again / "tokenizer.json").read_text() == (tiny[0] / "tokenizer.json").read_text()
    assert (again / "model.safetensors").read_bytes() == (tiny[0] / "model.safetensors").read_bytes()


def test_load_policy_names_what_is_missing(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="no/such/checkpoint"):
        models.load_policy(tmp_path / "no/such/checkpoint")
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    (weights_only / "config.json").write_text((tiny[0] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="weights_only.*tokenizer_config.json, preprocessor_config.json"):
        models.load_policy(weights_only)
    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file"):
        models.load_policy(a_file)
    with pytest.raises(ValueError, match="float33"):
        models.load_policy(tiny[0], dtype="float33")


def test_load_policy_hub_name_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="tir-tests/not-a-cached-model"):
        models.load_policy("tir-tests/not-a-cached-model")


def test_load_policy_in_bfloat16(tiny):
    model, _ = models.load_policy(tiny[0], dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_bad_builder_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="hidden_size"):
        tiny_policy.build_tiny_policy(tmp_path / "x", ["a_tool"], hidden_size=100)
    with pytest.raises(ValueError, match="at least one tool"):
        tiny_policy.build_tiny_policy(tmp_path / "x", [])
    with pytest.raises(ValueError, match="a name or a schema"):
        tiny_policy.build_tiny_policy(tmp_path / "x", [42])


def test_tiny_cli_uses_the_tool_registry(tmp_path, capsys):
    import argparse

    from tool_pool import tools

    parser = tiny_policy.add_tiny_arguments(argparse.ArgumentParser())
    name = tools.TOOLS.names()[0]
    assert tiny_policy.tiny_main(parser.parse_args(["--out", str(tmp_path / "cli"), "--tools", name])) == 0
    assert (tmp_path / "cli" / "model.safetensors").is_file() and (tmp_path / "cli" / "tokenizer.json").is_file()
    assert "wrote a tiny Qwen2.5-VL policy (1 tool(s)" in capsys.readouterr().out
    assert tiny_policy.tiny_main(parser.parse_args(["--out", str(tmp_path / "bad"), "--tools", name + "x"])) == 2
    assert "unknown tool" in capsys.readouterr().err
