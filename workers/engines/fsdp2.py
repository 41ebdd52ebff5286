"""FSDP2 (``torch.distributed.fsdp.fully_shard``): each transformer block and the root module are
sharded over the data-parallel ranks; parameters are DTensors, gathered per block for compute.

Checkpoints are torch.distributed.checkpoint (DCP) folders: each rank writes its own shards, and
a checkpoint loads on any number of ranks. Gloo on CPU, NCCL on GPU (the WorkerGroup's backend).
"""

from __future__ import annotations

from pathlib import Path

import torch

from workers.engines.base import TRAINING_ENGINES, TrainingEngine, make_optimizer, make_scheduler


@TRAINING_ENGINES.register("fsdp2")
class FSDP2Engine(TrainingEngine):
    name = "fsdp2"

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        compute = getattr(torch, self.options.dtype)
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        # HF names the blocks that must stay whole (decoder layers, vision blocks): one shard unit each.
        blocks = set(getattr(model, "_no_split_modules", None) or ())
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        if self.trainable:
            self.optimizer = make_optimizer(model.parameters(), self.options)
            self.scheduler = make_scheduler(self.optimizer, self.options)
        return model

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        # Reduce-scatter gradients once, on the last micro-batch; earlier ones accumulate locally.
        self.model.set_requires_gradient_sync(last)
        loss.backward()

    def _optimizer_step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.options.grad_clip or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor over the shards
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.item()

    def _full_state_dict(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.model, options=options)
        return weights if self.rank == 0 else None

    def _sharded_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def _save_state(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._sharded_state(), checkpoint_id=str(path / "dcp"))

    def _load_state(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        state = self._sharded_state()
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"])
        else:
            set_state_dict(
                self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
            )
