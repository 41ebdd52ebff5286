"""A tiny Qwen2.5-VL policy built offline (``tir model tiny``): random weights, a byte-level BPE
tokenizer trained on the agent's own protocol, image/video processors and the chat template.

It is a complete checkpoint, loaded by ``tir.agent.models.load_policy`` like a real model, so
every stage runs on it unchanged, only faster. vLLM's CPU attention needs head_dim 64: the
default sizes (hidden 128, 2 heads) respect that.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tir.agent import prompts

# The Qwen2.5-VL special tokens (ids differ from Qwen's; the names are what the code relies on).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


# Qwen2's pre-tokenizer: digits one by one, words with their leading space.
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


# Example perception-cue names, so that cue text tokenizes compactly (any text still works).
CUE_NAMES = (
    "noise_sigma",
    "sharpness",
    "brightness",
    "contrast",
    "haze",
    "blockiness",
    "rain",
    "resolution",
    "colorfulness",
)


# A Qwen-style chat template: images as <|vision_start|><|image_pad|><|vision_end|>, tool turns as
# a user turn wrapping <tool_response> blocks (as Qwen2.5 does), tool calls from assistant text or
# from a ``tool_calls`` field. One line per piece; the pieces are joined without separators.
CHAT_TEMPLATE = "".join(
    [
        "{%- macro render_content(content) -%}",
        "{%- if content is string -%}{{- content -}}",
        "{%- else -%}{%- for part in content -%}",
        "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}<|vision_start|><|image_pad|><|vision_end|>",
        "{%- elif part['type'] == 'video' or 'video' in part -%}<|vision_start|><|video_pad|><|vision_end|>",
        "{%- elif 'text' in part -%}{{- part['text'] -}}",
        "{%- endif -%}{%- endfor -%}{%- endif -%}",
        "{%- endmacro -%}",
        "{%- for message in messages -%}",
        "{%- if message['role'] == 'tool' -%}",
        "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user\\n' -}}{%- else -%}{{- '\\n' -}}{%- endif -%}",
        "{{- '<tool_response>\\n' -}}{{- render_content(message['content']) -}}{{- '\\n</tool_response>' -}}",
        "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}",
        "{%- else -%}",
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}",
        "{%- if message['content'] is not none -%}{{- render_content(message['content']) -}}{%- endif -%}",
        "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}{%- for call in message['tool_calls'] -%}",
        "{%- set function = call['function'] if call['function'] is defined else call -%}",
        "{{- '<tool_call>{\"name\": ' + (function['name'] | tojson) + ', \"arguments\": ' -}}",
        "{%- if function['arguments'] is string -%}{{- function['arguments'] -}}{%- else -%}{{- function['arguments'] | tojson -}}{%- endif -%}",
        "{{- '}</tool_call>' -}}",
        "{%- endfor -%}{%- endif -%}",
        "{{- '<|im_end|>\\n' -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
    ]
)


def build_tiny_policy(
    out_dir: str | os.PathLike,
    tools: Sequence[str | Mapping],
    seed: int = 0,
    vocab_size: int = 2048,
    image_side: int = 112,
    hidden_size: int = 128,
    num_layers: int = 2,
    vision_depth: int = 2,
    extra_corpus: Sequence[str] = (),
) -> Path:
    """Write a random tiny Qwen2.5-VL checkpoint to ``out_dir`` and return its path.

    ``tools`` are tool names or schemas ({"name", "description", "parameters"}); the tokenizer is
    trained on this agent's own texts for them (system prompt, calls, answers, observations,
    perception cues, numbers) plus ``extra_corpus``; ``vocab_size`` is an upper bound (a small
    toolbox gives a few hundred tokens, which any text still fits: byte-level). Images are resized to about
    ``image_side``² pixels (112 -> 16 image tokens). Text and vision are ``hidden_size`` wide with
    head_dim 64 (what vLLM's CPU attention accepts).
    """
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    schemas = [_as_schema(tool) for tool in tools]
    if not schemas:
        raise ValueError("build_tiny_policy needs at least one tool (a name or a schema)")
    if hidden_size % 64 or image_side % 28 or image_side < 28:
        raise ValueError(
            f"hidden_size must be a multiple of 64 (got {hidden_size}) and image_side a multiple of 28 (got {image_side})"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = build_tiny_processor(
        schemas, seed=seed, vocab_size=vocab_size, image_side=image_side, extra_corpus=extra_corpus
    )
    tokenizer = processor.tokenizer
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}

    heads = hidden_size // 64
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(64)},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": vision_depth,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_heads": heads,
        "out_hidden_size": hidden_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": image_side,
        "fullatt_block_indexes": [vision_depth - 1],
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    # Stop tokens only: sampling settings belong to the rollout engine's recipe (vLLM would
    # otherwise take them from here as defaults).
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_tiny_processor(
    schemas: Sequence[Mapping],
    seed: int = 0,
    vocab_size: int = 2048,
    image_side: int = 112,
    extra_corpus: Sequence[str] = (),
):
    """A ``Qwen2_5_VLProcessor`` with a tokenizer trained on this agent's texts (no download)."""
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    corpus = agent_corpus(schemas, seed=seed) + list(extra_corpus)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(corpus, vocab_size),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )
    pixels = image_side * image_side  # min = max: every photo gets (about) the same token budget
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(min_pixels=pixels, max_pixels=pixels * 4),
        chat_template=CHAT_TEMPLATE,
    )


def train_tokenizer(corpus: Sequence[str], vocab_size: int = 2048):
    """A byte-level BPE (Qwen2's pre-tokenizer) with the Qwen special tokens and the protocol tags.

    Byte-level: any text, including text the policy was never shown, encodes and decodes back
    exactly. The protocol tags are added (non-special) tokens, so a tool call costs few tokens
    and survives ``skip_special_tokens=True``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must hold the 256 bytes and {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(prompts.PROTOCOL_TAGS),
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in prompts.PROTOCOL_TAGS])
    return tokenizer


def agent_corpus(schemas: Sequence[Mapping], seed: int = 0, calls_per_tool: int = 40) -> list[str]:
    """Texts the agent reads and writes, for training its tokenizer."""
    rng = random.Random(seed)
    texts = [prompts.system_prompt(schemas)] * 10
    for _ in range(calls_per_tool):
        for schema in schemas:
            texts.append(prompts.format_call(prompts.ToolCall(schema["name"], _random_arguments(schema, rng))))
    texts += [prompts.format_stop()] * 50
    for _ in range(200):
        size = (rng.choice([64, 128, 256, 384, 512, 1024]), rng.choice([64, 128, 256, 384, 512, 1024]))
        cues = {name: _random_number(rng) for name in rng.sample(CUE_NAMES, rng.randint(1, len(CUE_NAMES)))}
        texts.append(prompts.message_text(prompts.user_message(size, cues)))
        texts.append(prompts.message_text(prompts.tool_message(rng.choice(schemas)["name"], size, cues)))
    for reply in (
        "",
        "<tool_call>",
        "<tool_call>{</tool_call>",
        '<tool_call>{"name": "x"}</tool_call>',
        "<answer>done</answer><tool_call>{}</tool_call>",
    ):
        texts.append(prompts.message_text(prompts.error_message(prompts.parse_action(reply, schemas))))
    texts += [" ".join(_random_number(rng) for _ in range(20)) for _ in range(50)]
    return texts


def _as_schema(tool: str | Mapping) -> dict:
    if isinstance(tool, str):
        return {
            "name": tool,
            "description": f"restoration tool {tool}",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        }
    if isinstance(tool, Mapping) and isinstance(tool.get("name"), str):
        return dict(tool)
    raise ValueError(f'a tool must be a name or a schema with "name", "description", "parameters"; got {tool!r}')


def _random_arguments(schema: Mapping, rng: random.Random) -> dict:
    args = {}
    for name, spec in (schema.get("parameters") or {}).get("properties", {}).items():
        low, high = spec.get("minimum", 0), spec.get("maximum", 10)
        kind = spec.get("type")
        if "enum" in spec:
            args[name] = rng.choice(spec["enum"])
        elif kind == "integer":
            args[name] = rng.randint(int(low), int(high))
        elif kind == "number":
            args[name] = round(rng.uniform(low, high), rng.choice([1, 2]))
        elif kind == "boolean":
            args[name] = rng.random() < 0.5
        elif kind == "string":
            args[name] = rng.choice(["auto", "low", "high"])
    return args


def _random_number(rng: random.Random) -> str:
    return rng.choice(
        [
            str(rng.randint(0, 1000)),
            f"{rng.uniform(0, 100):.1f}",
            f"{rng.uniform(0, 1):.2f}",
            f"{rng.uniform(0, 10):.3g}",
        ]
    )


def _mrope_section(head_dim: int) -> list[int]:
    """Temporal/height/width rotary sections summing to head_dim / 2 (Qwen2.5-VL: 16, 24, 24)."""
    half = head_dim // 2
    height = width = (half * 3) // 8
    return [half - height - width, height, width]


def add_tiny_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``tir model tiny``."""
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--tools", default=None, help="comma-separated tool names (default: every registered tool)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument(
        "--image-side", type=int, default=112, help="images are resized to about this squared (112 -> 16 image tokens)"
    )
    return parser


def tiny_main(args: argparse.Namespace) -> int:
    try:
        from tool_pool.tools import tool_schemas  # the registry decides which tools exist

        names = [name.strip() for name in args.tools.split(",") if name.strip()] if args.tools else None
        schemas = tool_schemas(names)
        out = build_tiny_policy(
            args.out, schemas, seed=args.seed, vocab_size=args.vocab_size, image_side=args.image_side
        )
    except (KeyError, ValueError, OSError) as err:
        print(f"tir model tiny: error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    config = json.loads((out / "config.json").read_text())
    print(
        f"wrote a tiny Qwen2.5-VL policy ({len(schemas)} tool(s), vocab {config['text_config']['vocab_size']}) to {out}"
    )
    return 0
