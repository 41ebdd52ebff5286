"""How an agent perceives which degradations a photo shows, chosen by a recipe (``model.perception``).

- ``thresholds``: one hand-set threshold per measured cue (``tir.data.perception.likely_degradations``);
  cheap and dependency-free, tuned on six photos.
- ``learned``: the degradation recogniser (``tir.data.recognizer``), served by the model-call pool
  like a tool (``pool.perceive``: one batched copy for every rollout worker of the cluster).

The policy reads the guess in its cue line (``likely=...``); the training-free baselines act on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PERCEPTIONS = ("thresholds", "learned")


@dataclass(frozen=True)
class Perception:
    kind: str = "thresholds"
    checkpoint: str = "default"  # the recogniser's checkpoint folder ("default": the one tir ships)

    def __post_init__(self):
        if self.kind not in PERCEPTIONS:
            raise ValueError(f"perception {self.kind!r} unknown; expected one of {', '.join(PERCEPTIONS)}")

    @classmethod
    def from_recipe(cls, model_cfg) -> Perception:
        checkpoint = getattr(model_cfg, "perception_model", None)
        return cls(str(getattr(model_cfg, "perception", "thresholds")), str(checkpoint) if checkpoint else "default")

    async def degradations(self, image: np.ndarray, pool, after_call: bool = False) -> list[str]:
        """The degradations ``image`` shows, in ``tir.data.degradations.NAMES`` order;
        ``after_call``: ``image`` is a tool's output (the learned recogniser reads it)."""
        if self.kind == "learned":
            return list((await pool.perceive(image, self.checkpoint, after_call))["degradations"])
        return await asyncio.to_thread(_thresholds, image)

    async def observe(
        self,
        image: np.ndarray,
        pool,
        names: Sequence[str] | None = None,
        style: str = "full",
        after_call: bool = False,
    ) -> str:
        """The cue line the policy reads beside ``image`` (``tir.data.perception.observe``), its
        guess made by this perception; ``after_call``: ``image`` is a tool's output."""
        from tir.data.perception import observe

        if self.kind != "learned":
            return await asyncio.to_thread(observe, image, names, style)
        seen = await pool.perceive(image, self.checkpoint, after_call)
        return await asyncio.to_thread(observe, image, names, style, seen["degradations"], seen["maybe"])


def _thresholds(image: np.ndarray) -> list[str]:
    from tir.data.perception import likely_degradations, measure_cues

    return likely_degradations(measure_cues(image))
