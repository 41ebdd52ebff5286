"""Policy checkpoints: load a real Qwen2.5-VL (or the tiny one ``tir.agent.tiny_policy`` writes).

Both go through the same door: ``load_policy(path)`` = ``AutoModelForImageTextToText`` +
``AutoProcessor`` ``.from_pretrained``. The tiny checkpoint is a complete Qwen2.5-VL (config,
weights, byte-level BPE tokenizer, image/video processors, chat template, generation config), so
everything downstream (rollout engines, trainers, ``tir restore``) runs on it exactly as on a real
model, only faster.

Two traps it encodes (see ENVIRONMENT.md): vLLM's CPU attention needs head_dim 64, and a random
policy samples vision special tokens (``<|image_pad|>`` ...) that break the image-token/feature
match when the text is fed back; ``forbidden_token_ids`` lists what sampling must exclude.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import tir  # noqa: F401  - environment shims before transformers imports torchvision

# Tokens a sampled reply must never hold: vision tokens (feeding them back breaks the match of
# image tokens and image features) and the start of a turn (a reply cannot open a new turn).
FORBIDDEN_IN_REPLIES = (
    "<|im_start|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


# ---------------------------------------------------------------- loading


def load_policy(path_or_name: str | os.PathLike, dtype: str = "float32", device: str = "cpu"):
    """``(model, processor)`` from a checkpoint folder or a hub name (from the local cache when
    ``HF_HUB_OFFLINE=1``). Any Qwen2.5-VL-like size; nothing here assumes one."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    source = resolve_policy(path_or_name)
    torch_dtype = _torch_dtype(dtype)
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so that setting it later
    # (a test, a notebook) still means "no network" rather than minutes of retries.
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=offline)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch_dtype, local_files_only=offline)
    except OSError as err:  # hub names: not cached offline, no such repo, no network
        reason = "not a local folder and not in the hub cache (HF_HUB_OFFLINE is set)" if offline else _first_line(err)
        raise FileNotFoundError(f"cannot load policy {str(path_or_name)!r}: {reason}") from err
    if not hasattr(processor, "image_processor"):
        raise FileNotFoundError(
            f"policy {str(path_or_name)!r} has no image processor (expected a vision-language checkpoint)"
        )
    return model.to(device).eval(), processor


HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, e.g. Qwen/Qwen2.5-VL-3B-Instruct
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # either one


def resolve_policy(path_or_name: str | os.PathLike, *, need_processor: bool = True) -> str:
    """Where a policy checkpoint is, as ``from_pretrained`` takes it; the project's one rule:

    - a local folder holding ``config.json`` (the path, ``~`` expanded);
    - a run folder whose ``hf/`` holds one (``runs/x/sft`` -> ``runs/x/sft/hf``);
    - otherwise, when no such path exists, a hub name ``owner/name`` (one slash, not starting
      with ``runs/``, ``.``, ``/`` or ``~``), returned as given;
    - otherwise FileNotFoundError saying what was expected and how to make a checkpoint.

    A local folder must also hold the weights and the tokenizer's and the processor's files (what
    ``save_pretrained`` of a model and its processor writes), checked here so that a half-written
    folder fails fast; a hub name must be in the local hub cache when the hub cannot be reached
    (``HF_HUB_OFFLINE=1`` or no network), so that a mistyped name fails at once rather than after
    minutes of retries. ``need_processor=False`` asks for ``config.json`` alone and takes any hub
    name (a driver whose workers load the model, maybe on other nodes)."""
    text = str(path_or_name)
    path = Path(text).expanduser()
    make_one = f"make one with `tir model tiny --out {text}` or `tir train sft`"
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "hf" / "config.json").is_file():
            path = path / "hf"
        needed = ("config.json", "tokenizer_config.json") if need_processor else ("config.json",)
        missing = [name for name in needed if not (path / name).is_file()]
        if need_processor and not any((path / name).is_file() for name in PROCESSOR_FILES):
            missing.append(PROCESSOR_FILES[0])
        if need_processor and not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
            missing.append("the model weights (*.safetensors or *.bin)")
        if missing:
            raise FileNotFoundError(
                f"policy checkpoint {str(path)!r} lacks {', '.join(missing)} (expected a folder written by save_pretrained,"
                f" model and processor, or a run folder whose hf/ holds one; {make_one})"
            )
        return str(path)
    if path.exists():
        raise FileNotFoundError(f"policy checkpoint {text!r} is a file; expected a checkpoint folder ({make_one})")
    if HUB_NAME.fullmatch(text) and not text.startswith("runs/"):
        if need_processor:
            _check_hub_name(text)
        return text
    raise FileNotFoundError(
        f"policy checkpoint {text!r} does not exist (expected a checkpoint folder, a run folder whose hf/ holds"
        f" one, or a hub name like Qwen/Qwen2.5-VL-3B-Instruct); {make_one}"
    )


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def _check_hub_name(name: str) -> None:
    """Nothing when ``name`` is in the local hub cache or the hub can be reached; else
    FileNotFoundError at once (``from_pretrained`` would retry for minutes)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json", cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    except Exception:  # noqa: BLE001 - a name the hub library refuses: let from_pretrained say why
        return
    if isinstance(cached, str):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise FileNotFoundError(
            f"policy {name!r} is not a local folder and not in the hub cache, and {why}"
            f" (a mistyped name? a checkpoint folder's path? else download it first: `huggingface-cli download {name}`)"
        )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection within ``timeout`` seconds."""
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # bounds a slow DNS look-up too
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype name (expected e.g. float32, bfloat16, float16)")
    return value


# ---------------------------------------------------------------- sampling and forward helpers


def forbidden_token_ids(processor) -> list[int]:
    """Ids a sampled reply must never hold (``bad_words_ids``/``suppress_tokens`` in transformers,
    the complement of ``allowed_token_ids`` in vLLM)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    vocab = tokenizer.get_vocab()
    return sorted(vocab[token] for token in FORBIDDEN_IN_REPLIES if token in vocab)


def allowed_token_ids(processor, vocab_size: int | None = None) -> list[int]:
    """Every token id a reply may hold. ``vocab_size`` (the model's, often larger than the
    tokenizer's) defaults to the tokenizer's length; ids past the tokenizer are never allowed."""
    tokenizer = getattr(processor, "tokenizer", processor)
    forbidden = set(forbidden_token_ids(processor))
    size = len(tokenizer) if vocab_size is None else min(vocab_size, len(tokenizer))
    return [i for i in range(size) if i not in forbidden]


def mm_token_type_ids(processor, input_ids):
    """Per-token modality (0 text, 1 image, 2 video) of stored token ids, as a long tensor of
    the same shape. Qwen2.5-VL's forward needs it for the M-RoPE positions of image tokens: in
    transformers 5.19 leaving it out gives silently wrong log-probs."""
    import torch

    ids = torch.as_tensor(input_ids)
    rows = ids.unsqueeze(0) if ids.dim() == 1 else ids
    types = torch.tensor(processor.create_mm_token_type_ids(rows.tolist()), dtype=torch.long)
    return types.reshape(ids.shape)


# ---------------------------------------------------------------- the tiny checkpoint


# ---------------------------------------------------------------- CLI: tir model tiny
