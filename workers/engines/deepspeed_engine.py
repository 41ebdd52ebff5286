"""DeepSpeed ZeRO (stage 1, 2 or 3 from ``zero_stage``) over the WorkerGroup's process group.

DeepSpeed owns the wrapped optimizer, the gradient reduction, the clipping and the LR schedule's
stepping. Gradient accumulation is "unmanaged" (``managed_gradient_accumulation: false``):
``backward`` only accumulates, ``step`` finalises and updates, so a step may hold any number of
micro-batches. Checkpoints are DeepSpeed's own folders (each rank writes its partition).

The first run on a CPU machine JIT-compiles a small op (about a minute; cached under ~/.cache).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from workers.engines.base import TRAINING_ENGINES, TrainingEngine, make_optimizer, make_scheduler

_TAG = "state"  # one checkpoint per folder: the folder names the step, not DeepSpeed's tag


@TRAINING_ENGINES.register("deepspeed")
class DeepSpeedEngine(TrainingEngine):
    name = "deepspeed"

    def _config(self) -> dict:
        stage = self.options.zero_stage
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0-3, got {stage}")
        return {
            "train_micro_batch_size_per_gpu": self.options.micro_batch_size,
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,
            "gradient_clipping": self.options.grad_clip,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,  # torch's AdamW: the same optimizer as the other engines
            "bf16": {"enabled": self.options.dtype == "bfloat16"},
            "fp16": {"enabled": self.options.dtype == "float16"},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        import deepspeed

        if dist.is_initialized():  # reuse the WorkerGroup's process group
            deepspeed.init_distributed(dist_backend=dist.get_backend())
        if not self.trainable and self.options.zero_stage < 3:
            return model  # a frozen replica: nothing to shard or optimise
        config = self._config()
        if not self.trainable:
            self.engine, *_ = deepspeed.initialize(model=model, config=config)
            return self.engine
        optimizer = make_optimizer(model.parameters(), self.options)
        scheduler = make_scheduler(
            optimizer, self.options
        )  # ZeRO's optimizer wraps this one and shares its param groups
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        return self.engine

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def _optimizer_step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm.item() if isinstance(norm, torch.Tensor) else norm)

    def _full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.options.zero_stage == 3:
            weights = self.engine._zero3_consolidated_16bit_state_dict()  # collective; any dtype despite the name
        else:
            module = getattr(self.model, "module", self.model)
            weights = {name: t.detach().to("cpu", copy=True) for name, t in module.state_dict().items()}
        return weights if self.rank == 0 else None

    def _save_state(self, path: Path) -> None:
        if not hasattr(self, "engine"):  # a frozen, unsharded replica: only weights
            if self.rank == 0:
                torch.save(self.model.state_dict(), path / "model.pt")
            return
        self.engine.save_checkpoint(str(path), tag=_TAG, save_latest=False)

    def _load_state(self, path: Path) -> None:
        if not hasattr(self, "engine"):
            self.model.load_state_dict(torch.load(path / "model.pt", map_location=self.device))
            return
        loaded, _ = self.engine.load_checkpoint(
            str(path), tag=_TAG, load_optimizer_states=self.trainable, load_lr_scheduler_states=self.trainable
        )
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {path}")
