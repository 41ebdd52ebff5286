"""The transformers rollout engine: ``model.generate`` behind the ``RolloutEngine`` interface.

For CPUs, tests and machines without vLLM. Concurrent ``generate`` calls (one turn of one
trajectory each) go into a queue; a worker task takes what is queued, up to ``max_batch_size``
requests that share sampling settings, and runs one left-padded ``model.generate`` in the
engine's own thread under a lock. So the event loop keeps serving tool calls while the model
runs, and trajectories that come back from their tools together are generated together.

Seeding: ``torch.generate`` samples from the global torch generator, one stream per batch, so a
request is reproducible on its own only when it carries ``sampling["seed"]`` (it then runs in a
batch of one, seeded with it). Other batches are seeded from the engine's ``seed`` and a batch
counter: a run is reproducible when its batches form the same way (always, at concurrency 1).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

import tir  # noqa: F401  - environment shims before transformers imports torchvision
from tir.agent import models, prompts
from workers.rollout.base import RolloutEngine, check_sampling

# Requests batch together only when these sampling settings agree (max_tokens may differ).
BATCH_KEY = ("temperature", "top_p", "top_k", "seed", "stop_token_ids")


class HFEngine(RolloutEngine):
    """``HFEngine("runs/tiny_policy")``, or ``HFEngine(model=..., processor=...)`` to share a
    loaded policy."""

    def __init__(
        self,
        model_path: str | None = None,
        *,
        model=None,
        processor=None,
        dtype: str = "float32",
        device: str = "cpu",
        max_batch_size: int = 8,
        seed: int = 0,
    ):
        if (model is None) != (processor is None):
            raise ValueError("HFEngine: pass model and processor together, or a model_path")
        if model is None:
            if model_path is None:
                raise ValueError(
                    "HFEngine needs a model_path (a checkpoint folder or hub name) or model= and processor="
                )
            model, processor = models.load_policy(model_path, dtype=dtype, device=device)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.processor = model.eval(), processor
        self.tokenizer = processor.tokenizer
        self.max_batch_size, self.seed = max_batch_size, seed
        self.forbidden = models.forbidden_token_ids(processor)
        eos = model.generation_config.eos_token_id
        self.stop_ids = sorted(
            {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos] if eos is not None else [])}
        )
        self.image_token_id = model.config.image_token_id
        self.stats = {"batches": 0, "requests": 0, "busy_s": 0.0, "generated_tokens": 0}
        self._lock = threading.Lock()  # one generate or weight update at a time
        self._queue: list[tuple[dict, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        # A thread of its own: in the event loop's default executor, generation would queue
        # behind the tool calls it is meant to overlap with (LocalPool runs tools there).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-generate")

    # ------------------------------------------------------------ the interface

    async def generate(self, requests: Sequence[Mapping[str, Any]]) -> list[dict]:
        loop = asyncio.get_running_loop()
        futures = []
        for request in requests:
            future = loop.create_future()
            self._queue.append((dict(request), future))
            futures.append(future)
        self._ensure_worker(loop)
        return list(await asyncio.gather(*futures))

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        import torch

        with self._lock:
            params = self.model.state_dict()
            updates = list(named_tensors)
            unknown = [name for name, _ in updates if name not in params]
            if unknown:
                raise ValueError(
                    f"update_weights: {len(unknown)} unknown parameter name(s), e.g. {unknown[0]!r} (expected HF names such as {next(iter(params))!r})"
                )
            for name, tensor in updates:
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise ValueError(
                        f"update_weights: {name!r} has shape {tuple(tensor.shape)}, the model's is {tuple(params[name].shape)}"
                    )
            with torch.no_grad():
                for name, tensor in updates:
                    params[name].copy_(tensor)

    async def shutdown(self) -> None:
        self._executor.shutdown(wait=True)

    # ------------------------------------------------------------ the batching queue

    def _ensure_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._worker is not None and not self._worker.done() and self._worker.get_loop() is loop:
            return
        # Requests left by an event loop that has ended can never be answered: drop them.
        self._queue = [(r, f) for r, f in self._queue if f.get_loop() is loop]
        self._worker = loop.create_task(self._serve())

    async def _serve(self) -> None:
        while self._queue:
            await asyncio.sleep(0)  # let every trajectory that is ready queue its turn first
            batch = self._take_batch()
            requests = [request for request, _ in batch]
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self._run_batch, requests)
            for (_, future), result in zip(batch, results):
                if future.done():  # its trajectory was cancelled
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _take_batch(self) -> list[tuple[dict, asyncio.Future]]:
        """The oldest request and up to ``max_batch_size - 1`` younger ones with its settings."""
        key = _batch_key(self._queue[0][0])
        size = 1 if key[3] is not None else self.max_batch_size  # seeded (or invalid) requests run alone
        batch = [item for item in self._queue if _batch_key(item[0]) == key][:size]
        taken = {id(item) for item in batch}
        self._queue = [item for item in self._queue if id(item) not in taken]
        return batch

    # ------------------------------------------------------------ one model.generate

    def _run_batch(self, requests: list[dict]) -> list[dict | Exception]:
        """Prepare each request (a bad one fails alone), then generate the good ones together."""
        prepared: list[dict | Exception] = []
        for request in requests:
            try:
                prepared.append(self._prepare(request))
            except Exception as err:  # noqa: BLE001 - returned to that request's caller
                prepared.append(err)
        good = [p for p in prepared if not isinstance(p, Exception)]
        if not good:
            return prepared
        try:
            with self._lock:
                started = time.perf_counter()
                outputs = iter(self._generate(good))
                self.stats["busy_s"] += time.perf_counter() - started
        except Exception as err:  # noqa: BLE001
            return [p if isinstance(p, Exception) else err for p in prepared]
        return [p if isinstance(p, Exception) else next(outputs) for p in prepared]

    def _prepare(self, request: dict) -> dict:
        """Token ids, pixel inputs and checked sampling settings of one request."""
        unknown = sorted(set(request) - {"prompt_token_ids", "messages", "images", "sampling"})
        if unknown:
            raise ValueError(
                f"generate: unknown request key {unknown[0]!r} (expected prompt_token_ids or messages, images, sampling)"
            )
        sampling = check_sampling(request.get("sampling") or {})
        # Read-only arrays (zero-copy views of a Batch, Ray objects) make torch warn: copy those.
        images = [
            im.copy() if isinstance(im, np.ndarray) and not im.flags.writeable else im
            for im in request.get("images") or []
        ]
        from_messages = "prompt_token_ids" not in request
        if from_messages:
            if "messages" not in request:
                raise ValueError("generate: a request needs prompt_token_ids or messages")
            text = prompts.render(self.processor, request["messages"])
            ids = self.processor(text=[text], images=images or None)["input_ids"][0]
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        else:
            ids = [int(i) for i in request["prompt_token_ids"]]
        vision = self.processor.image_processor(images=images, return_tensors="pt") if images else None
        expected = (
            0
            if vision is None
            else int(vision["image_grid_thw"].prod(-1).sum()) // self.processor.image_processor.merge_size**2
        )
        found = ids.count(self.image_token_id)
        if found != expected:
            raise ValueError(
                f"generate: the prompt holds {found} image tokens but its {len(images)} image(s) need {expected}"
            )
        choices = None
        if sampling["choices"] is not None:
            choices = [
                self.tokenizer(c, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                for c in sampling["choices"]
            ]
            bad = next((c for c, ids in zip(sampling["choices"], choices) if set(ids) & set(self.forbidden)), None)
            if bad is not None:
                raise ValueError(
                    f"sampling choices: {bad[:60]!r} holds a token replies may never hold (vision or turn tokens)"
                )
        return {"ids": ids, "vision": vision, "sampling": sampling, "choices": choices, "from_messages": from_messages}

    def _generate(self, batch: list[dict]) -> list[dict]:
        import torch
        from transformers import LogitsProcessorList

        sampling = batch[0]["sampling"]
        inputs = self._pad(batch)
        prompt_length = inputs["input_ids"].shape[1]
        greedy = sampling["temperature"] == 0
        options = (
            {"do_sample": False}
            if greedy
            else {
                "do_sample": True,
                "temperature": sampling["temperature"],
                "top_p": sampling["top_p"],
                "top_k": sampling["top_k"],
            }
        )
        stop_ids = sorted({*self.stop_ids, *sampling["stop_token_ids"]})
        processors = (
            LogitsProcessorList([Choices([p["choices"] for p in batch], prompt_length, self.tokenizer.eos_token_id)])
            if any(p["choices"] for p in batch)
            else None
        )
        seed = sampling["seed"] if sampling["seed"] is not None else self.seed * 1_000_003 + self.stats["batches"]
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed)
            out = self.model.generate(
                **inputs,
                **options,
                max_new_tokens=max(p["sampling"]["max_tokens"] for p in batch),
                suppress_tokens=self.forbidden or None,
                eos_token_id=stop_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                logits_processor=processors,
                output_logits=True,
                return_dict_in_generate=True,
            )
        # The documented convention: log_softmax(raw logits / T), T = 1 when greedy.
        logits = torch.stack(out.logits, dim=1).float() / (1.0 if greedy else sampling["temperature"])
        new_ids = out.sequences[:, prompt_length:]
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new_ids.unsqueeze(-1)).squeeze(-1)
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        return [self._result(p, new_ids[row].tolist(), logprobs[row].tolist(), stop_ids) for row, p in enumerate(batch)]

    def _pad(self, batch: list[dict]) -> dict:
        """Left-padded ids, attention mask and modality ids; pixel inputs concatenated in row order
        (the model fills image tokens row by row)."""
        import torch

        width = max(len(p["ids"]) for p in batch)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p["ids"])) + p["ids"] for p in batch])
        mask = torch.tensor([[0] * (width - len(p["ids"])) + [1] * len(p["ids"]) for p in batch])
        inputs = {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_token_type_ids": models.mm_token_type_ids(self.processor, ids) * mask,
        }
        visions = [p["vision"] for p in batch if p["vision"] is not None]
        if visions:
            inputs["pixel_values"] = torch.cat([v["pixel_values"] for v in visions]).to(self.model.dtype)
            inputs["image_grid_thw"] = torch.cat([v["image_grid_thw"] for v in visions])
        return {name: value.to(self.model.device) for name, value in inputs.items()}

    def _result(self, prepared: dict, ids: list[int], logprobs: list[float], stop_ids: list[int]) -> dict:
        limit = prepared["sampling"]["max_tokens"]
        end = next((i + 1 for i, token in enumerate(ids) if token in stop_ids), None)
        finish = "stop" if end is not None and end <= limit else "length"
        end = end if finish == "stop" else min(limit, len(ids))
        ids, logprobs = ids[:end], logprobs[:end]
        self.stats["generated_tokens"] += len(ids)
        body = ids[:-1] if ids and ids[-1] == self.tokenizer.eos_token_id else ids
        result = {
            "token_ids": ids,
            "logprobs": logprobs,
            "text": self.tokenizer.decode(body, skip_special_tokens=False),
            "finish_reason": finish,
        }
        if prepared["from_messages"]:
            result["prompt_token_ids"] = prepared["ids"]
        return result


def _batch_key(request: Mapping) -> tuple:
    try:
        sampling = check_sampling(request.get("sampling") or {})
    except (ValueError, TypeError):
        return ("invalid", id(request), None, None)  # alone in its batch: _prepare reports the error
    return tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in (sampling[k] for k in BATCH_KEY))


class Choices:
    """A logits processor: each row's reply must follow one of its token sequences (None: free).
    A row that left every sequence (finished, or padding) may only end."""

    def __init__(self, row_choices: list[list[list[int]] | None], prompt_length: int, eos_id: int):
        self.row_choices, self.prompt_length, self.eos_id = row_choices, prompt_length, eos_id

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_length :].tolist()
        for row, sequences in enumerate(self.row_choices):
            if sequences is None:
                continue
            done = generated[row]
            allowed = {s[len(done)] for s in sequences if len(s) > len(done) and s[: len(done)] == done} or {
                self.eos_id
            }
            keep = scores[row, sorted(allowed)].clone()
            scores[row] = float("-inf")
            scores[row, sorted(allowed)] = keep
        return scores
