"""Policy checkpoints at inference (``tir eval``, ``tir restore``): which engine runs them, and
the greedy episodes of ``tir eval``.

Engines (``--engine``):
- ``vllm``: vLLM's ``AsyncLLM`` in this process (``workers.rollout.vllm_engine``, no Ray), one
  engine per policy; every test image's episode is in flight at once (up to the concurrency,
  ``VLLM_CONCURRENCY`` by default) and vLLM batches their turns.
- ``hf``: the transformers engine (``workers.rollout.hf_engine``): the reference and the fallback.
- ``auto``: vllm on a machine with a CUDA GPU, vLLM installed and a local checkpoint folder; else
  hf. On CPU, transformers wins for the small policies this machine trains: the quickstart policy
  on 16 images took 10.9 s with hf and 33.3 s with vLLM (18.7 s of it engine start-up; episodes
  3.5 vs 7.9 s), so vLLM on CPU is for when it is asked for.

Deterministic: decoding is greedy (temperature 0) on both engines, float32 by default. On
transformers each request carries its own seed, so the engine never batches it with others: the
same command gives the same table (wall times aside). On vLLM a re-run has given the same table
every time we ran it (tests/test_vllm_eval.py runs it twice; the quickstart policy on 32 test
images twice), and the same tool calls and scores as transformers, but this is not guaranteed bit
for bit: vLLM batches whatever turns are in flight, which depends on tool timings, a batch of
another size may round a logit differently (vLLM's and transformers' logits differ by ~1e-6), and
a near-tie between two tokens could then flip. ``--concurrency 1`` removes that batching. Wall
times differ: on vLLM an image's time is its latency among all those in flight.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from tir.eval.agent_specs import EvalError

ENGINES = ("hf", "vllm", "auto")
VLLM_CONCURRENCY = 16  # episodes in flight per policy on vLLM unless a concurrency is given


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_engine(requested: str, path: str) -> tuple[str, str]:
    """``(engine, why)`` for a policy checkpoint ``path``: "hf" or "vllm", and a few words on
    why (``auto``'s choice). EvalError for an unknown name or a vLLM that cannot run it."""
    if requested not in ENGINES:
        raise EvalError(f"engine must be one of {', '.join(ENGINES)}, got {requested!r}")
    local = Path(path).expanduser().is_dir()
    if requested == "hf":
        return "hf", "asked for"
    if requested == "vllm":
        if not vllm_available():
            raise EvalError("--engine vllm: vLLM is not installed (see ENVIRONMENT.md), use --engine hf")
        if not local:
            raise EvalError(f"--engine vllm: {path!r} is not a local checkpoint folder, use --engine hf")
        return "vllm", "asked for"
    if not vllm_available():
        return "hf", "auto: vLLM is not installed"
    if not local:
        return "hf", "auto: not a local checkpoint folder"
    if not cuda_available():
        return "hf", "auto: no GPU (on CPU transformers is faster for small policies)"
    return "vllm", "auto: a GPU, vLLM installed and a local checkpoint folder"


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def engine_label(engine: str) -> str:
    return {"hf": "transformers engine", "vllm": "vLLM engine"}[engine]


def open_policy_engine(
    engine: str,
    path: str,
    *,
    dtype: str = "float32",
    seed: int = 0,
    max_batch_size: int = 1,
    max_images: int = 8,
    max_length: int = 4096,
):
    """A ``RolloutEngine`` (with ``.processor``) for a checkpoint: ``engine`` is "hf" or "vllm"
    (``resolve_engine``'s). Bad checkpoints raise EvalError."""
    try:
        if engine == "vllm":
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # before vLLM's import: its INFO lines go to stdout
            from workers.rollout.vllm_engine import VLLMEngine

            return VLLMEngine(path, dtype=dtype, seed=seed, max_images=max_images, max_model_len=max_length)
        from tir.agent.models import load_policy
        from workers.rollout.hf_engine import HFEngine

        model, processor = load_policy(path, dtype=dtype)
        return HFEngine(model=model, processor=processor, max_batch_size=max(1, max_batch_size), seed=seed)
    except (FileNotFoundError, OSError, ValueError) as err:
        raise EvalError(
            f"cannot load the policy checkpoint {path!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None


def policy_concurrency(settings, engine: str) -> int:
    """Episodes in flight for a policy: ``settings.policy_concurrency``, else ``concurrency`` on
    transformers and at least ``VLLM_CONCURRENCY`` on vLLM."""
    if settings.policy_concurrency is not None:
        return settings.policy_concurrency
    return max(settings.concurrency, VLLM_CONCURRENCY) if engine == "vllm" else settings.concurrency


async def policy_episodes(path: str, test, pool, schemas, settings, bar, engine=None) -> list[dict]:
    """One greedy episode per test row on the engine ``settings.engine`` resolves to, or on
    ``engine`` (one already open, e.g. shared by several evaluations; its owner shuts it down);
    each episode dict also names its engine ("hf" or "vllm")."""
    from tir.agent import prompts
    from tir.agent.env import perception_cues
    from tir.agent.loop import LoopSettings, run_episode
    from tir.eval.episodes import episode_summary, gather_limited, tick
    from tir.eval.tool_choice import greedy

    owned = engine is None
    engine_name = resolve_engine(settings.engine, path)[0] if owned else _engine_name(engine)
    concurrency = policy_concurrency(settings, engine_name)
    loop = replace(
        greedy(settings.loop or LoopSettings()),
        max_turns=settings.max_turns,
        concurrency=concurrency,
        seed=settings.seed,
    )
    started = time.perf_counter()
    engine = engine or open_policy_engine(
        engine_name,
        path,
        dtype=settings.policy_dtype,
        seed=settings.seed,
        max_batch_size=concurrency,
        max_images=loop.max_turns + 1,
        max_length=loop.max_length,
    )
    opened = time.perf_counter()
    cues = perception_cues(style=settings.cue_style, perception=settings.perception) if settings.cues else None
    schemas = prompts.policy_schemas(schemas, settings.tool_prompt)

    async def one(row: int, lq) -> dict:
        env = loop.new_env(pool, schemas, cues)
        out = await run_episode(engine, engine.processor, env, lq, loop, seed=loop.seed * 1_000_003 + row)
        summary = episode_summary(out, out["timings"]["wall_s"], error=out["error"], engine=engine_name)
        return tick(bar, summary)

    try:
        episodes = await gather_limited([one(row, lq) for row, lq in enumerate(test.column("lq"))], concurrency)
    finally:
        if owned:
            await engine.shutdown()
    if settings.progress:
        print(
            f"policy {path}: {engine_label(engine_name)} ready in {opened - started:.1f}s, {len(episodes)} episodes "
            f"({concurrency} in flight) in {time.perf_counter() - opened:.1f}s",
            file=sys.stderr,
        )
    if episodes and all(e["error"] for e in episodes):
        raise RuntimeError(f"every episode of policy {path} failed; the first: {episodes[0]['error']}")
    return episodes


def _engine_name(engine) -> str:
    return "vllm" if type(engine).__name__ == "VLLMEngine" else "hf"
