"""The async agent loop: many restoration episodes at once against a rollout engine and the pool.

One episode, top to bottom (``run_episode``):

    reset the env on the degraded photo; tokenize the system prompt + user turn (with the image)
    repeat:
        ask the engine for one reply to the whole chat so far        (await: other episodes run)
        append the sampled ids (loss mask 1) and their log-probs
        let the env act on the reply: parse, call the tool, observe  (await: other episodes run)
        stop on the answer, the turn limit, the format-error limit, or a full context
        append the observation's ids (loss mask 0) and its image

The ids of a trajectory are built piece by piece, never re-tokenized: the prompt and each
observation are tokenized by the processor (``prompts.render_delta``, images expanded to their
image tokens), each reply is kept as sampled. So ``input_ids`` is exactly what the policy saw and
wrote, and the image tokens always match ``images``: a trajectory that would outgrow
``max_length`` ends before the next observation (a turn boundary), never inside one.

``rollout`` runs one episode per sample row (at most ``concurrency`` at a time) and returns the
trajectories as a ``Batch``: the sample's columns plus the trajectory contract (see ``rollout``).
A sequential loop is the same code with ``concurrency=1``.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np

from tir.agent import prompts
from tir.agent.env import MAX_PIXELS, MAX_SIDE, Cues, RestorationEnv
from tir.protocol import Batch

# Columns every trajectory row has (beside the sample's own), and their Batch kinds.
TRAJECTORY_KINDS = {
    "input_ids": "auto",
    "loss_mask": "auto",
    "rollout_logprobs": "auto",
    "prompt_length": "auto",
    "images": "images",
    "final_image": "image",
    "tool_calls": "json",
    "num_turns": "auto",
    "num_tool_calls": "auto",
    "format_errors": "auto",
    "tool_errors": "auto",
    "stop_reason": "auto",
    "messages": "json",
    "timings": "json",
    "error": "auto",
}


@dataclass(frozen=True)
class LoopSettings:
    max_turns: int = 4  # policy replies per episode
    max_length: int = 4096  # tokens of the whole chat: prompt, replies, observations
    max_new_tokens: int = 64  # per reply
    min_reply_tokens: int = 16  # a turn starts only with room for a reply this long
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # per-request seeds (reproducible per trajectory; engines may batch less)
    choices: tuple[str, ...] | None = None  # replies constrained to these texts (smoke runs, benchmarks)
    max_format_errors: int = 3
    concurrency: int = 64  # episodes in flight
    image_column: str = "lq"
    max_side: int = MAX_SIDE  # the env's size limits (a recipe's env section): larger outputs are refused
    max_pixels: int = MAX_PIXELS

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.min_reply_tokens < 1 or self.concurrency < 1 or self.max_turns < 1:
            raise ValueError(f"max_turns, max_new_tokens, min_reply_tokens and concurrency must be >= 1: {self}")

    def new_env(self, pool, schemas, cues=None) -> RestorationEnv:
        """A fresh environment for one episode with these settings' turn, format-error and size limits."""
        return RestorationEnv(
            pool,
            schemas,
            self.max_turns,
            self.max_format_errors,
            cues,
            max_side=self.max_side,
            max_pixels=self.max_pixels,
        )

    @classmethod
    def from_recipe(cls, rollout_cfg, env_cfg=None, **overrides) -> LoopSettings:
        """The settings a recipe's ``rollout`` section names (keys this class does not know, such
        as ``engine`` or ``n``, belong to others and are skipped), and its ``env`` section's limits."""
        known = {f.name for f in fields(cls)}
        values = {key: rollout_cfg[key] for key in rollout_cfg if key in known}
        values.update({key: env_cfg[key] for key in env_cfg or {} if key in ("max_side", "max_pixels")})
        if values.get("choices") is not None:  # a recipe's list (rollout.choices): a tuple, as the field says
            values["choices"] = tuple(values["choices"])
        return cls(**{**values, **overrides})

    def sampling(self, max_tokens: int, seed: int | None) -> dict:
        out = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "max_tokens": max_tokens}
        if seed is not None:
            out["seed"] = seed
        if self.choices:
            out["choices"] = list(self.choices)
        return out


@dataclass
class Transcript:
    """A trajectory's token ids, loss mask, sampled log-probs and images, grown turn by turn."""

    eos_id: int
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def add_observation(self, ids: Sequence[int], images: Sequence[np.ndarray] = ()) -> None:
        """Tokens the policy reads (system, user, tool turns): not trained on."""
        self.ids += list(ids)
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.images += list(images)

    def add_reply(self, ids: Sequence[int], logprobs: Sequence[float]) -> None:
        """Tokens the policy wrote. A reply cut by the token limit gets its end-of-turn token
        appended (not trained on: the policy did not write it), so the chat stays well formed."""
        if len(ids) != len(logprobs):
            raise ValueError(f"a reply has {len(ids)} token ids but {len(logprobs)} log-probs")
        self.ids += list(ids)
        self.mask += [1] * len(ids)
        self.logprobs += [float(v) for v in logprobs]
        if not ids or ids[-1] != self.eos_id:
            self.add_observation([self.eos_id])


def tokenize(processor, text: str, images: Sequence[np.ndarray] = ()) -> list[int]:
    """Ids of a piece of chat text, each image placeholder expanded to the image's token count.

    The count depends on the image's size only, so it is computed from the size (the processor's
    own ``_get_num_multimodal_tokens``, which vLLM uses for the same purpose) instead of running
    the processor on the pixels: the engine preprocesses them anyway, and doing it here too cost
    the agent loop ~15 ms per image on the driver's event loop. The first call for a processor
    checks the shortcut against the full processor and keeps the full one if they ever differ."""
    if not images:
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids.tolist() if hasattr(ids, "tolist") else list(ids)
    checked = _SHORTCUT_CHECKED.get(processor)  # None: not yet; True: the shortcut matched; False: it did not
    fast = None if checked is False else _expanded_ids(processor, text, images)
    if fast is not None and checked:
        return fast
    # read-only arrays (Batch views, Ray objects) make torch warn; the processor only reads
    images = [im.copy() if isinstance(im, np.ndarray) and not im.flags.writeable else im for im in images]
    ids = processor(text=[text], images=images)["input_ids"][0]
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if checked is None and fast is not None:
        _SHORTCUT_CHECKED[processor] = fast == ids
    return ids


_SHORTCUT_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _expanded_ids(processor, text: str, images: Sequence[np.ndarray]) -> list[int] | None:
    """``tokenize``'s shortcut, or None where this processor does not offer it."""
    token = getattr(processor, "image_token", None)
    count = getattr(processor, "_get_num_multimodal_tokens", None)
    if token is None or count is None or text.count(token) != len(images):
        return None
    try:
        counts = count(image_sizes=[tuple(np.shape(im)[:2]) for im in images]).num_image_tokens
    except (AttributeError, TypeError, ValueError, KeyError):
        return None
    pieces = text.split(token)
    expanded = pieces[0] + "".join(token * int(n) + piece for n, piece in zip(counts, pieces[1:]))
    return list(processor.tokenizer(expanded)["input_ids"])


class Spans:
    """(kind, start, end) of every engine and env await, in seconds since ``origin``."""

    def __init__(self, origin: float):
        self.origin, self.items = origin, []

    async def timed(self, kind: str, awaitable):
        start = time.perf_counter()
        try:
            return await awaitable
        finally:
            self.items.append((kind, start - self.origin, time.perf_counter() - self.origin))

    def total(self, kind: str) -> float:
        return sum(end - start for k, start, end in self.items if k == kind)


# ---------------------------------------------------------------- one episode


async def run_episode(
    engine,
    processor,
    env: RestorationEnv,
    image: np.ndarray,
    settings: LoopSettings,
    origin: float | None = None,
    seed: int | None = None,
) -> dict:
    """Play one episode; return its trajectory row (the columns of ``TRAJECTORY_KINDS``)."""
    started = time.perf_counter()
    spans = Spans(started if origin is None else origin)
    transcript = Transcript(processor.tokenizer.eos_token_id)
    stop_reason, error, prompt_length, seen = None, "", 0, 0  # seen: messages of env.messages the ids hold
    try:
        first = await spans.timed("env", env.reset(image))
        transcript.add_observation(
            tokenize(processor, prompts.render(processor, env.messages), [first.image]), [first.image]
        )
        prompt_length, seen = len(transcript), len(env.messages)
        for turn in range(settings.max_turns + 1):  # the env ends the episode by max_turns
            room = settings.max_length - len(transcript) - 1  # -1: an appended end-of-turn must fit
            if room < settings.min_reply_tokens:
                stop_reason = "max_length"
                break
            sampling = settings.sampling(
                min(settings.max_new_tokens, room), None if seed is None else seed * 1000 + turn
            )
            request = {
                "prompt_token_ids": list(transcript.ids),
                "images": list(transcript.images),
                "sampling": sampling,
            }
            reply = (await spans.timed("generate", engine.generate([request])))[0]
            transcript.add_reply(reply["token_ids"], reply["logprobs"])
            step = await spans.timed("env", env.step(reply["text"]))
            seen = len(env.messages) - (0 if step.done else 1)  # the observation is not in yet
            if step.done:
                stop_reason = step.stop_reason
                break
            shown = [step.observation.image] if step.observation.image is not None else []
            delta = prompts.render_delta(processor, env.messages[:-1], env.messages[-1:])
            delta_ids = tokenize(processor, delta, shown)
            if len(transcript) + len(delta_ids) + settings.min_reply_tokens + 1 > settings.max_length:
                stop_reason = "max_length"  # end at the turn boundary, before the observation
                break
            transcript.add_observation(delta_ids, shown)
            seen = len(env.messages)
    except Exception as err:  # noqa: BLE001 - one broken episode must not take the batch down
        stop_reason, error = "error", f"{type(err).__name__}: {err}"
    summary = (
        env.summary()
        if env.image is not None
        else {
            "final_image": image,
            "tool_calls": [],
            "num_turns": 0,
            "num_tool_calls": 0,
            "format_errors": 0,
            "tool_errors": 0,
        }
    )
    timings = {
        "wall_s": time.perf_counter() - started,
        "generate_s": spans.total("generate"),
        "env_s": spans.total("env"),
        "tool_s": sum(call["seconds"] for call in summary["tool_calls"]),
        "spans": spans.items,
    }
    return {
        "input_ids": transcript.ids,
        "loss_mask": transcript.mask,
        "rollout_logprobs": transcript.logprobs,
        "prompt_length": prompt_length,
        "images": transcript.images,
        **summary,
        "stop_reason": stop_reason or "error",
        "messages": chat_text(getattr(env, "messages", [])[:seen]),
        "timings": timings,
        "error": error,
    }


def chat_text(messages: Sequence[Mapping]) -> list[dict]:
    """The chat as {role, text, image} records (image: whether the turn showed one), for dumps."""
    return [
        {"role": m["role"], "text": prompts.message_text(m), "image": prompts.count_images([m]) > 0} for m in messages
    ]


# ---------------------------------------------------------------- many episodes


async def pool_tool_schemas(pool, names: Sequence[str] | None = None) -> list[dict]:
    """Schemas of the tools the pool serves (restricted to ``names``), in registry order."""
    from tool_pool.tools import tool_schemas

    served = set(await pool.available_tools())
    wanted = served if names is None else set(names)
    missing = sorted(wanted - served)
    if missing:
        raise ValueError(
            f"tool(s) {', '.join(missing)} are not served by the pool (served: {', '.join(sorted(served))})"
        )
    return [schema for schema in tool_schemas() if schema["name"] in wanted]


async def rollout(
    engine,
    processor,
    pool,
    samples: Batch,
    settings: LoopSettings = LoopSettings(),
    tool_schemas: Sequence[Mapping] | None = None,
    cues: Cues | None = None,
) -> Batch:
    """One trajectory per row of ``samples`` (which must hold ``settings.image_column``).

    Returns ``samples`` with the trajectory columns added: ``input_ids``, ``loss_mask`` (1 on the
    policy's tokens, each reply's closing end-of-turn included), ``rollout_logprobs`` (0 where
    the mask is 0), ``prompt_length``, ``images`` (every image shown, in order), ``final_image``,
    ``tool_calls`` (json: name, arguments, ok, error_kind, error, seconds, committed),
    ``num_turns``, ``num_tool_calls``, ``format_errors``, ``tool_errors``, ``stop_reason``,
    ``messages`` (json, the chat as text), ``timings`` (json: wall_s, generate_s, env_s, tool_s,
    spans) and ``error`` ("" unless the episode crashed). ``meta["wall_s"]``: the whole batch.
    """
    if settings.image_column not in samples.columns:
        raise KeyError(f"rollout: samples have no column {settings.image_column!r} (columns: {samples.columns})")
    schemas = list(tool_schemas) if tool_schemas is not None else await pool_tool_schemas(pool)
    images = samples.column(settings.image_column)
    slots = asyncio.Semaphore(settings.concurrency)
    origin = time.perf_counter()

    async def one(row: int) -> dict:
        async with slots:
            env = settings.new_env(pool, schemas, cues)
            seed = None if settings.seed is None else settings.seed * 1_000_003 + row
            return await run_episode(engine, processor, env, images[row], settings, origin, seed)

    rows = await asyncio.gather(*(one(row) for row in range(len(samples))))
    wall = time.perf_counter() - origin
    if rows and all(row["error"] for row in rows):
        raise RuntimeError(f"every episode failed; the first: {rows[0]['error']}")
    batch = samples
    for name, kind in TRAJECTORY_KINDS.items():
        batch = batch.with_column(name, [row[name] for row in rows], kind=kind)
    return batch.with_meta(wall_s=wall, concurrency=settings.concurrency)


def run_rollout(engine, processor, pool, samples: Batch, settings: LoopSettings = LoopSettings(), **kwargs) -> Batch:
    """``rollout`` from synchronous code."""
    return asyncio.run(rollout(engine, processor, pool, samples, settings, **kwargs))


def sequential(settings: LoopSettings) -> LoopSettings:
    """The same settings, one episode at a time (the baseline of the overlap benchmark)."""
    return replace(settings, concurrency=1)
