"""The plain engine: one process, no sharding. The reference the sharded engines must match,
and the simplest way to train a tiny policy in a test or a notebook."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.engines.base import TRAINING_ENGINES, TrainingEngine, make_optimizer, make_scheduler


@TRAINING_ENGINES.register("plain")
class PlainEngine(TrainingEngine):
    name = "plain"

    def _load_dtype(self) -> str:
        return self.options.dtype  # no master copy: weights live in the compute dtype

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world_size > 1:
            raise ValueError(
                f"the plain engine runs in one process; use fsdp2 or deepspeed for {self.world_size} ranks"
            )
        if self.trainable:
            self.optimizer = make_optimizer(model.parameters(), self.options)
            self.scheduler = make_scheduler(self.optimizer, self.options)
        return model

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def _optimizer_step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.options.grad_clip or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.item()

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in self.model.state_dict().items()}

    def _save_state(self, path: Path) -> None:
        torch.save(
            {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict() if self.optimizer else None},
            path / "state.pt",
        )

    def _load_state(self, path: Path) -> None:
        state = torch.load(path / "state.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
