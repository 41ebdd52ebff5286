"""Code that runs inside vLLM's worker processes (imported there by name, never by the driver's
hot path): the worker extension for live weight updates and the sampler and logits processor
that make vLLM follow tir's log-prob convention (see ``workers.rollout.base``).

- ``WeightSyncExtension`` is mixed into vLLM's worker class (``worker_extension_cls``); the engine
  calls its ``tir_*`` methods by ``collective_rpc``. A weight update is one layerwise reload
  (vLLM's ``initialize_layerwise_reload`` ... ``finalize_layerwise_reload``) fed bucket by bucket,
  so a layer is rebuilt once all of its tensors arrived (vLLM fuses q/k/v, gate/up: a partial
  layer would be rebuilt from garbage) and no second full copy of the model is ever held.
  Buckets come from a safetensors file (``/dev/shm``: ``collective_rpc`` turns tensor arguments
  into lists) or from a broadcast group with the trainer (``workers.rollout.weight_sync``).
- ``TemperedLogprobsSampler``: vLLM's "raw_logprobs" are ``log_softmax(logits)``; tir reports
  ``log_softmax(logits / T)`` per request (T = 1 when greedy), before any masking.
- ``ReplyConstraints``: forbidden token ids and ``choices``, applied after the log-probs are taken
  (vLLM's ``allowed_token_ids`` would also do, but costs a vocabulary-long list per request).
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor
from vllm.v1.sample.sampler import Sampler

from workers.rollout.weight_sync import open_weight_group, receive_bucket

GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: requests below this temperature are greedy


class TemperedLogprobsSampler(Sampler):
    """vLLM's sampler, but raw log-probs are ``log_softmax(logits / T)`` with each request's T.

    Installed by swapping the class of the model runner's sampler instance (its state is kept).
    vLLM computes raw log-probs first thing in ``forward``, before temperature, penalties,
    allowed/bad tokens, logits processors and top-k/top-p, which is the convention's "before
    masking"; only the temperature is missing, and ``forward`` knows each row's.
    """

    _temperature: torch.Tensor | None = None

    def forward(self, logits, sampling_metadata, *args, **kwargs):
        self._temperature = sampling_metadata.temperature  # None when every request is greedy
        try:
            return super().forward(logits, sampling_metadata, *args, **kwargs)
        finally:
            self._temperature = None

    def compute_logprobs(self, logits: torch.Tensor) -> torch.Tensor:  # a staticmethod in Sampler
        logits = logits.to(torch.float32)
        if self._temperature is not None:
            temperature = self._temperature.to(torch.float32)
            logits = logits / torch.where(temperature < GREEDY_EPS, 1.0, temperature).unsqueeze(1)
        return logits.log_softmax(dim=-1)


class ReplyConstraints(AdapterLogitsProcessor):
    """Per request, from ``SamplingParams.extra_args``: ``tir_forbidden`` (token ids a reply may
    never hold) and ``tir_choices`` (token-id sequences; the reply must follow one of them)."""

    def is_argmax_invariant(self) -> bool:
        return False  # it changes what greedy decoding picks

    def new_req_logits_processor(self, params):
        extra = params.extra_args or {}
        forbidden, choices = extra.get("tir_forbidden"), extra.get("tir_choices")
        if not forbidden and not choices:
            return None
        forbidden_ids = torch.tensor(forbidden or [], dtype=torch.long)

        def constrain(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            if choices:
                done = len(output_ids)
                allowed = sorted({seq[done] for seq in choices if len(seq) > done and seq[:done] == output_ids})
                if allowed:  # vLLM ends the reply at the choice's final end-of-turn token
                    keep = logits[allowed].clone()
                    logits.fill_(float("-inf"))
                    logits[allowed] = keep
            if len(forbidden_ids):
                logits.index_fill_(0, forbidden_ids.to(logits.device), float("-inf"))
            return logits

        return constrain


class WeightSyncExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``): ``self`` is the worker, with
    ``self.model_runner``. Method names carry a ``tir_`` prefix: vLLM's worker already has
    ``update_weights`` and friends, and the mixin must not clash with them."""

    def tir_install_tempered_logprobs(self) -> str:
        sampler = self.model_runner.sampler
        if not isinstance(sampler, TemperedLogprobsSampler):
            sampler.__class__ = TemperedLogprobsSampler
        return type(sampler).__name__

    # ------------------------------------------------------------ one update, bucket by bucket

    def tir_begin_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.get_model())

    def tir_load_weights_file(self, path: str) -> int:
        """Load one bucket from a safetensors file (memory-mapped: read once, not copied twice)."""
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as handle:
            names = list(handle.keys())
            self.model_runner.get_model().load_weights((name, handle.get_tensor(name)) for name in names)
        return len(names)

    def tir_finish_weight_update(self) -> None:
        """Rebuild the layers, then drop everything computed with the old weights on this side
        (the engine resets the scheduler's encoder and prefix caches)."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        runner = self.model_runner
        finalize_layerwise_reload(runner.get_model(), runner.model_config)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            if hasattr(runner, reset):
                getattr(runner, reset)()

    # ------------------------------------------------------------ a broadcast group with the trainer

    def tir_join_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str) -> int:
        """Join the trainer's weight broadcast group as rank ``rank_offset + this worker's rank``
        (tensor-parallel workers each hold a rank: each receives every tensor)."""
        rank = rank_offset + self.rank
        self._tir_weight_group = open_weight_group(host, port, rank, world_size, backend)
        self._tir_weight_backend = backend
        return rank

    def tir_receive_bucket(self, specs: list) -> int:
        """Receive one bucket from the group's rank 0 and load it (within a begun update)."""
        tensors = receive_bucket(self._tir_weight_group, specs, self._tir_weight_backend)
        self.model_runner.get_model().load_weights(iter(tensors))
        return len(tensors)
