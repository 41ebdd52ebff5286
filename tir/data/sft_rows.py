"""Expert trajectories (``tir data expert``) -> tokenized SFT rows, built by the rollout's own code.

Each expert row is replayed through the same ``RestorationEnv`` and ``agent_loop.run_episode``
that rollouts use: a ``ScriptedEngine`` "generates" the expert's replies (one canonical tool
call per step, then the answer) and a ``ReplayPool`` answers each call with the true image the
expert's run recorded. So the prompt, the perception cues (when the recipe shows them), every
observation and every image token are exactly what the policy reads at rollout time, and the
loss mask is the loop's own: 1 on the policy's replies (with their end-of-turn), 0 elsewhere.
It is checked against ``tir.agent.multimodal.assistant_mask`` on every row.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import numpy as np

from tir.agent import prompts
from tir.agent.env import Cues, RestorationEnv
from tir.agent.loop import LoopSettings, run_episode
from tir.agent.multimodal import assistant_mask
from tir.protocol import Batch

# What the actors train on, and what evaluation and splitting need beside it.
TRAIN_COLUMNS = ("input_ids", "loss_mask", "images")
KEEP_COLUMNS = ("image_id", "combo", "degradations", "expert_tools", "tools", "perturbed")


class ScriptedEngine:
    """A rollout engine that replies with the given texts, in order (one episode)."""

    def __init__(self, processor, replies: Sequence[str]):
        self.tokenizer, self.replies = processor.tokenizer, list(replies)

    async def generate(self, requests: Sequence[Mapping]) -> list[dict]:
        results = []
        for request in requests:
            if not self.replies:
                raise RuntimeError("the episode asked for more replies than the trajectory has")
            text = self.replies.pop(0)
            ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
            limit = request["sampling"]["max_tokens"]
            if len(ids) > limit:  # the policy could never write it: SFT on it would teach nothing usable
                raise ValueError(
                    f"the reply {text!r} takes {len(ids)} tokens, more than rollout.max_new_tokens={limit}"
                )
            results.append({"token_ids": ids, "logprobs": [0.0] * len(ids), "text": text, "finish_reason": "stop"})
        return results


class ReplayPool:
    """A pool that answers the trajectory's calls, in order, with the images recorded for them."""

    def __init__(self, tools: Sequence[str], images: Sequence[np.ndarray]):
        if len(tools) != len(images):
            raise ValueError(f"a trajectory has {len(tools)} tool calls but {len(images)} step images")
        self.steps = list(zip(tools, images))

    async def run(self, tool: str, image: np.ndarray, **arguments) -> np.ndarray:
        expected, output = self.steps.pop(0)
        if tool != expected:
            raise RuntimeError(
                f"replay out of step: the trajectory called {expected!r}, the episode asked for {tool!r}"
            )
        return output

    async def perceive(self, image: np.ndarray, checkpoint: str = "default", after_call: bool = False) -> dict:
        """The learned perception, computed here (a cue line shows what the policy will see)."""
        from tool_pool.execution import get_recognizer_or_error, perceive_batch

        recognizer = get_recognizer_or_error(checkpoint)
        return (await asyncio.to_thread(perceive_batch, recognizer, [image], after_call))[0]


def expert_replies(tools: Sequence[str]) -> list[str]:
    """The expert's turns: each tool with its default arguments, then the final answer."""
    return [prompts.format_call(prompts.ToolCall(name, {})) for name in tools] + [prompts.format_stop()]


async def replay(
    processor, row: Mapping, schemas: Sequence[Mapping], settings: LoopSettings, cues: Cues | None
) -> dict:
    """The trajectory row (agent-loop columns) of one expert row."""
    engine = ScriptedEngine(processor, expert_replies(row["tools"]))
    env = RestorationEnv(
        ReplayPool(row["tools"], row["step_images"]), schemas, settings.max_turns, settings.max_format_errors, cues
    )
    out = await run_episode(engine, processor, env, row["lq"], settings)
    if out["error"]:
        raise RuntimeError(f"replaying {row.get('image_id')}/{row.get('combo')} failed: {out['error']}")
    if out["loss_mask"] != assistant_mask(processor, out["input_ids"]):
        raise RuntimeError("the agent loop's loss mask differs from the chat template's assistant turns")
    return out


def sft_rows(
    processor,
    expert: Batch,
    schemas: Sequence[Mapping],
    settings: LoopSettings,
    cues: Cues | None = None,
    concurrency: int = 16,
) -> Batch:
    """One tokenized SFT row per expert row: ``TRAIN_COLUMNS`` plus ``KEEP_COLUMNS`` (those the
    expert batch has) and ``num_tokens``."""
    rows = expert.rows()

    async def all_rows():
        slots = asyncio.Semaphore(concurrency)  # cues run in threads; keep a bounded number in flight

        async def one(row):
            async with slots:
                return await replay(processor, row, schemas, settings, cues)

        return await asyncio.gather(*(one(row) for row in rows))

    episodes = asyncio.run(all_rows())
    columns = {
        "input_ids": [e["input_ids"] for e in episodes],
        "loss_mask": [e["loss_mask"] for e in episodes],
        "images": [e["images"] for e in episodes],
        "num_tokens": [len(e["input_ids"]) for e in episodes],
    }
    for name in KEEP_COLUMNS:
        if name in expert.columns:
            columns[name] = expert.column(name)
    return Batch.from_pydict(columns, meta={"kind": "sft"}, kinds={"images": "images"})


def split_by_image(batch: Batch, heldout_images: Sequence[str]) -> tuple[Batch, Batch]:
    """(rows of the other photos, rows of ``heldout_images``): held-out photos are never trained on."""
    ids = batch.column("image_id")
    heldout = set(heldout_images)
    train = [i for i, image_id in enumerate(ids) if image_id not in heldout]
    test = [i for i, image_id in enumerate(ids) if image_id in heldout]
    return batch.take(train), batch.take(test)
