"""The rollout engine interface: what the agent loop needs from an inference backend.

Two calls (verl's ``BaseRollout`` in spirit, smaller):

- ``await engine.generate(requests) -> results``: one reply per request. A request is a dict
  ``{"prompt_token_ids": [...] | "messages": [...], "images": [...], "sampling": {...}}``; a
  result is ``{"token_ids", "logprobs", "text", "finish_reason"}`` (see ``generate``). Many
  trajectories call it concurrently, one turn each: the engine may batch them; the event loop
  must stay free meanwhile, so tool calls of other trajectories run while one generates.
- ``engine.update_weights(named_tensors)``: load new policy weights (HF parameter names) before
  the next rollout.

Log-probs, one convention for every backend: the log-prob of each sampled token under
``log_softmax(logits / T)`` of the model's raw logits over the whole vocabulary, where T is the
sampling temperature (1 for greedy). Forbidden-token masking, ``choices`` constraints, top-p and
top-k shape what may be sampled but not the reported log-probs: this is exactly what a training
forward pass (logits / T, log_softmax, gather) recomputes, so importance ratios start at 1.
(vLLM: ``logprobs_mode="raw_logprobs"`` at T = 1; a processed mode, or a rescale, otherwise.)

Engines register here by name, as an import path, so that naming one in a recipe imports only
that backend (vLLM is heavy and absent on some machines).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tir.registry import unknown_name

# recipe name -> "module:Class"; a new backend adds one line (or calls register_rollout_engine).
ROLLOUT_ENGINES: dict[str, str] = {
    "hf": "workers.rollout.hf_engine:HFEngine",
    "vllm": "workers.rollout.vllm_engine:VLLMEngine",
}

# Sampling keys every engine understands; engines may accept more (and must reject unknown ones).
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_tokens", "seed", "stop_token_ids", "choices")
FINISH_REASONS = ("stop", "length")


class RolloutEngine(ABC):
    """An inference backend for multi-turn, multi-image rollouts."""

    @abstractmethod
    async def generate(self, requests: Sequence[Mapping[str, Any]]) -> list[dict]:
        """Sample one reply per request, in order.

        Request keys:
        - ``prompt_token_ids`` (list[int]): the whole chat so far, tokenized by the processor
          (each image already expanded to its image tokens); or ``messages`` (HF chat messages
          with image placeholders), which the engine renders and tokenizes itself.
        - ``images``: every image of the chat, in order (uint8 HxWx3 arrays or PIL images);
          their image-token counts must match the prompt (else ValueError).
        - ``sampling``: ``temperature`` (0 = greedy), ``top_p``, ``top_k``, ``max_tokens``,
          ``seed`` (a seeded request is reproducible on its own), ``stop_token_ids`` (besides
          the model's end-of-turn), ``choices`` (optional: the reply must be one of these
          strings; engines that cannot constrain raise ValueError).

        Result keys: ``token_ids`` (sampled ids, ending with the end-of-turn id when
        ``finish_reason`` is "stop"), ``logprobs`` (one per token id, see the module docstring),
        ``text`` (the ids decoded, special tokens kept except the final end-of-turn),
        ``finish_reason`` ("stop" or "length"), and ``prompt_token_ids`` for ``messages``
        requests.
        """

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Replace the policy's weights with ``(HF parameter name, tensor)`` pairs. Blocks until
        in-flight generation ends; the next ``generate`` uses the new weights. Unknown names
        raise ValueError (nothing is loaded)."""

    async def shutdown(self) -> None:  # noqa: B027 - optional: a backend with nothing to release keeps it
        """Release the backend's resources (processes, memory). Idempotent."""


def check_sampling(sampling: Mapping[str, Any], extra_keys: Sequence[str] = ()) -> dict:
    """``sampling`` as a dict with defaults, or ValueError naming the bad key or value."""
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS) - set(extra_keys))
    if unknown:
        raise ValueError(unknown_name("sampling key", unknown[0], SAMPLING_KEYS))
    out = {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "max_tokens": 64,
        "seed": None,
        "stop_token_ids": (),
        "choices": None,
        **sampling,
    }
    for key in ("temperature", "top_p"):
        if isinstance(out[key], bool) or not isinstance(out[key], (int, float)):
            raise ValueError(f"sampling {key} must be a number, got {out[key]!r}")
    if not (isinstance(out["top_k"], int) and out["top_k"] >= 0):
        raise ValueError(f"sampling top_k must be an integer >= 0 (0 = off), got {out['top_k']!r}")
    if out["seed"] is not None and not isinstance(out["seed"], int):
        raise ValueError(f"sampling seed must be an integer or None, got {out['seed']!r}")
    if not out["temperature"] >= 0:
        raise ValueError(f"sampling temperature must be >= 0 (0 = greedy), got {out['temperature']!r}")
    if not 0 < out["top_p"] <= 1:
        raise ValueError(f"sampling top_p must be in (0, 1], got {out['top_p']!r}")
    if not (isinstance(out["max_tokens"], int) and out["max_tokens"] >= 1):
        raise ValueError(f"sampling max_tokens must be an integer >= 1, got {out['max_tokens']!r}")
    if out["choices"] is not None and (
        isinstance(out["choices"], str) or not out["choices"] or not all(isinstance(c, str) for c in out["choices"])
    ):
        raise ValueError(f"sampling choices must be a non-empty list of strings, got {out['choices']!r}")
    return out


def register_rollout_engine(name: str, target: str) -> None:
    """Add a backend: ``target`` is ``"package.module:ClassName"``."""
    if ":" not in target:
        raise ValueError(f"engine target must look like 'package.module:ClassName', got {target!r}")
    ROLLOUT_ENGINES[name] = target


def rollout_engine_class(name: str) -> type[RolloutEngine]:
    """The engine class registered as ``name`` (imported now)."""
    if name not in ROLLOUT_ENGINES:
        raise KeyError(unknown_name("rollout engine", name, sorted(ROLLOUT_ENGINES)))
    module_name, class_name = ROLLOUT_ENGINES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def make_rollout_engine(name: str, model_path: str, **options: Any) -> RolloutEngine:
    """``ROLLOUT_ENGINES[name](model_path, **options)``: e.g. ``make_rollout_engine("hf", "runs/tiny_policy")``."""
    return rollout_engine_class(name)(model_path, **options)
