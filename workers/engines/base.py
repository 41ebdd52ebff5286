"""The training engine interface, and what every engine shares.

An engine owns one policy replica's share of the work in a data-parallel group: it computes
token log-probs of trajectory rows, takes optimizer steps with a given loss function, and saves
and loads its state. Subclasses only say how the model is wrapped (none, FSDP2, DeepSpeed ZeRO),
how a backward and an optimizer step run, and how full and sharded states are written.

Rows are trajectories (see ``tir.agent.multimodal``): ``input_ids``, ``images``, and any per-token
columns aligned with ``input_ids`` (``loss_mask``, ``rollout_logprobs``, ``ref_logprobs``...) and
per-row numbers (``advantages``...). A loss function sees them as tensors:

    def loss_fn(logprobs, tensors):  # logprobs [B, T]; tensors["loss_mask"] [B, T] ...
        return loss, {"name": float}   # loss: a mean over this micro-batch's tokens (or rows)

It must be a plain picklable function (module level): it travels to Ray workers. The engine
weighs each micro-batch's mean by its share of the whole (all ranks') batch, so that N ranks x
B/N rows give the same loss and gradient as 1 rank x B rows.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyarrow as pa
import torch
import torch.distributed as dist

import tir  # noqa: F401  - environment shims before transformers imports torchvision
from tir.agent.multimodal import model_inputs
from tir.protocol import Batch
from tir.registry import Registry

TRAINING_ENGINES = Registry("training engine")
LR_SCHEDULES = ("constant", "cosine")
LOSS_WEIGHTS = ("tokens", "rows")
LossFn = Callable[[torch.Tensor, dict], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class EngineOptions:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps to lr
    lr_schedule: str = "constant"  # after warmup: "constant", or "cosine" down to min_lr_ratio * lr
    total_steps: int = 0  # the cosine's length (warmup included); needed by "cosine" only
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off (the norm is still reported)
    micro_batch_size: int = 4  # rows per forward/backward; gradients accumulate over micro-batches
    zero_stage: int = 2  # DeepSpeed only
    dtype: str = "float32"  # compute dtype; sharded engines keep float32 master weights
    seed: int = 0

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} unknown; expected one of {LR_SCHEDULES}")
        if self.lr_schedule == "cosine" and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"a cosine schedule needs total_steps > warmup_steps, got {self.total_steps} and {self.warmup_steps}"
            )
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")

    @classmethod
    def from_recipe(cls, recipe, **overrides) -> EngineOptions:
        """Options from a recipe's ``actor`` section (plus ``trainer.total_steps``, ``model.dtype``
        and ``run.seed``); keyword overrides win (e.g. ``lr=recipe.sft.lr``)."""
        actor = recipe.actor
        values = {f.name: getattr(actor, f.name) for f in fields(cls) if hasattr(actor, f.name)}
        values.setdefault("total_steps", recipe.trainer.total_steps)
        values.setdefault("dtype", recipe.model.dtype)
        values.setdefault("seed", recipe.run.seed)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def coerce(cls, options: EngineOptions | dict | None) -> EngineOptions:
        if isinstance(options, cls):
            return options
        return cls(**dict(options or {}))


class WarmupSchedule:
    """LR factor per optimizer step: linear warmup, then constant or cosine decay (a class, not
    a lambda, so that schedulers pickle and checkpoint)."""

    def __init__(self, warmup_steps: int, kind: str = "constant", total_steps: int = 0, min_ratio: float = 0.0):
        self.warmup_steps, self.kind, self.total_steps, self.min_ratio = warmup_steps, kind, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, options: EngineOptions) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = WarmupSchedule(options.warmup_steps, options.lr_schedule, options.total_steps, options.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def make_optimizer(parameters, options: EngineOptions) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameters, lr=options.lr, betas=tuple(options.betas), weight_decay=options.weight_decay)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t | tokens < t) for every position [B, T]; position 0 (nothing before it) is 0.
    logsumexp instead of log_softmax: no second [B, T, vocab] tensor."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    picked = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.nn.functional.pad(picked, (1, 0))


def make_training_engine(
    name: str, model_path: str | os.PathLike, options: EngineOptions | dict | None = None, trainable: bool = True
) -> TrainingEngine:
    """The engine registered as ``name`` ("fsdp2", "deepspeed", "plain"), built on ``model_path``."""
    import workers.engines  # noqa: F401  - registers every engine

    return TRAINING_ENGINES.get(name)(model_path, EngineOptions.coerce(options), trainable=trainable)


class TrainingEngine(ABC):
    """One data-parallel rank's policy: log-probs, train steps, full and sharded states.

    Every method is collective when the group has more than one rank: all ranks call it
    together, each with its own rows. Ranks may hold different numbers of rows; micro-batch
    counts are matched across ranks (a rank with fewer repeats its last micro-batch with zero
    weight), because sharded forwards and backwards all-gather parameters in lockstep.
    """

    name = "base"

    def __init__(self, model_path: str | os.PathLike, options: EngineOptions, trainable: bool = True):
        from tir.agent.models import load_policy

        self.options, self.trainable = options, trainable
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        torch.manual_seed(options.seed)
        model, self.processor = load_policy(model_path, dtype=self._load_dtype())
        self.hf_config, self.generation_config = model.config, model.generation_config
        self.pad_token_id = self.processor.tokenizer.pad_token_id
        self.step = 0  # optimizer steps taken
        self.optimizer = self.scheduler = None
        if not trainable:
            model.requires_grad_(False)
        self.model = self._wrap(model.to(self.device))

    # what each engine says ------------------------------------------------------------------
    def _load_dtype(self) -> str:
        """The dtype weights are loaded in (sharded engines keep float32 master weights)."""
        return "float32"

    @abstractmethod
    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Shard/wrap the model and, when trainable, set ``self.optimizer`` and ``self.scheduler``."""

    def _forward(self, inputs: dict) -> torch.Tensor:
        return self.model(**inputs, use_cache=False).logits

    @abstractmethod
    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate gradients; ``last``: the step's final micro-batch (sync gradients now)."""

    @abstractmethod
    def _optimizer_step(self) -> float:
        """Clip, step the optimizer and the LR schedule, zero the gradients; the global grad norm
        before clipping."""

    @abstractmethod
    def _full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every weight, unsharded, on CPU, with HF names, on rank 0 (None on other ranks)."""

    @abstractmethod
    def _save_state(self, path: Path) -> None:
        """Write model and optimizer state (sharded where the engine shards) into ``path``."""

    @abstractmethod
    def _load_state(self, path: Path) -> None:
        """Read back what ``_save_state`` wrote."""

    # the API --------------------------------------------------------------------------------
    def forward_logprobs(self, batch: Batch, column: str = "logprobs") -> Batch:
        """A Batch with one column: the log-prob of each token given the previous ones, aligned
        with ``input_ids`` (0 at position 0)."""
        self.model.eval()
        pieces = []
        with torch.no_grad():
            for micro, real in self._micro_batches(batch):
                inputs = self._inputs(micro)
                logprobs = token_logprobs(self._forward(inputs), inputs["input_ids"])
                if real:
                    pieces.append(
                        micro.select(["input_ids"]).with_padded(column, logprobs.cpu(), inputs["attention_mask"].cpu())
                    )
        return Batch.concat(pieces).select([column])

    def train_step(self, batch: Batch, loss_fn: LossFn, loss_weight: str = "tokens") -> dict[str, float]:
        """One optimizer step over ``batch`` (this rank's rows); metrics of the whole step.

        ``loss_weight``: "tokens" weighs each micro-batch's loss by its ``loss_mask`` tokens over
        all ranks' tokens (exact for a token-mean loss), "rows" by its rows (exact for a mean
        over sequences). Metrics: ``loss`` and the loss function's metrics (weighted like the
        loss), ``grad_norm`` (before clipping), ``lr`` (of this step), ``step``.
        """
        if not self.trainable:
            raise RuntimeError(f"{self.name} engine was built frozen (trainable=False): it cannot train")
        if loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"loss_weight {loss_weight!r} unknown; expected one of {LOSS_WEIGHTS}")
        micros = self._micro_batches(batch)
        sizes = [self._weight_of(micro, loss_weight) if real else 0.0 for micro, real in micros]
        total = max(self._all_reduce(torch.tensor([sum(sizes)], dtype=torch.float64))[0].item(), 1e-12)
        lr = self.optimizer.param_groups[0]["lr"]
        self.model.train()
        sums: dict[str, float] = defaultdict(float)
        for index, ((micro, real), size) in enumerate(zip(micros, sizes)):
            tensors = self._tensors(micro)
            logprobs = token_logprobs(self._forward(self._inputs(micro)), tensors["input_ids"])
            last = index == len(micros) - 1
            if not real or size == 0:  # keeps the collectives in lockstep; adds nothing
                self._backward(logprobs.sum() * 0.0, last)
                continue
            loss, metrics = loss_fn(logprobs, tensors)
            weight = size / total
            # Data-parallel reductions average over ranks: scale by world_size to make it a sum.
            self._backward(loss * (weight * self.world_size), last)
            sums["loss"] += loss.item() * weight
            for key, value in metrics.items():
                sums[key] += float(value) * weight
        names = sorted(sums)
        reduced = self._all_reduce(torch.tensor([sums[n] for n in names], dtype=torch.float64))
        grad_norm = self._optimizer_step()
        self.step += 1
        return {**dict(zip(names, reduced.tolist())), "grad_norm": float(grad_norm), "lr": lr, "step": self.step}

    def state_dict_for_rollout(self) -> dict[str, torch.Tensor] | None:
        """Full weights with HF names on CPU, on rank 0 (None elsewhere); collective."""
        return self._full_state_dict()

    def save_checkpoint(self, path: str | os.PathLike) -> str:
        """Model, optimizer, LR schedule and step, written atomically (a temp dir renamed into
        place). Every rank writes its shards: on several nodes ``path`` must be shared storage."""
        final = Path(path)

        def write(tmp: Path) -> None:
            self._save_state(tmp)
            if self.rank == 0:
                scheduler = self.scheduler.state_dict() if self.scheduler is not None else None
                torch.save({"step": self.step, "scheduler": scheduler}, tmp / "trainer_state.pt")
                (tmp / "engine.json").write_text(
                    json.dumps(
                        {
                            "engine": self.name,
                            "world_size": self.world_size,
                            "step": self.step,
                            "options": asdict(self.options),
                        }
                    )
                )

        return str(self._atomically(final, write))

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        path = Path(path)
        meta_file = path / "engine.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} is not an engine checkpoint (no engine.json)")
        meta = json.loads(meta_file.read_text())
        if meta["engine"] != self.name:
            raise ValueError(f"checkpoint {path} was written by the {meta['engine']!r} engine, not {self.name!r}")
        self._load_state(path)
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        self.step = state["step"]
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def save_hf(self, path: str | os.PathLike) -> str:
        """An HF checkpoint (model + processor) that ``tir.agent.models.load_policy`` loads; collective."""
        weights = self._full_state_dict()

        def write(tmp: Path) -> None:
            if self.rank == 0:
                save_hf_checkpoint(tmp, self.hf_config, self.generation_config, weights, self.processor)

        return str(self._atomically(Path(path), write))

    # shared pieces ----------------------------------------------------------------------------
    def _micro_batches(self, batch: Batch) -> list[tuple[Batch, bool]]:
        """(micro-batch, is_real) pairs, as many on every rank."""
        if len(batch) == 0:
            raise ValueError(f"{self.name} engine: an empty batch (rank {self.rank} got no rows)")
        micros = batch.split(self.options.micro_batch_size)
        count = int(self._all_reduce(torch.tensor([len(micros)]), dist.ReduceOp.MAX)[0])
        return [(m, True) for m in micros] + [(micros[-1], False)] * (count - len(micros))

    def _inputs(self, micro: Batch) -> dict:
        inputs = model_inputs(micro, self.processor, self.pad_token_id)
        return {k: v.to(self.device) for k, v in inputs.items()}

    def _tensors(self, micro: Batch) -> dict[str, torch.Tensor]:
        """What the loss function sees: ``input_ids``, ``attention_mask``, every numeric per-token
        column padded to [B, T] (float32) and every numeric per-row column as [B]."""
        input_ids, attention_mask = micro.to_padded("input_ids", pad_value=self.pad_token_id, dtype=torch.long)
        tensors = {"input_ids": input_ids, "attention_mask": attention_mask}
        for field in micro.table.schema:
            kind = field.type
            if field.name in tensors or micro.kind(field.name) != "auto":
                continue
            if pa.types.is_list(kind) and (
                pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type)
            ):
                values, mask = micro.to_padded(field.name, dtype=torch.float32)
                if values.shape != input_ids.shape or not torch.equal(mask, attention_mask):
                    raise ValueError(
                        f"column {field.name!r} is not aligned with input_ids (one value per token in every row)"
                    )
                tensors[field.name] = values
            elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
                tensors[field.name] = torch.as_tensor(micro.numpy(field.name).astype("float32"))
        return {k: v.to(self.device) for k, v in tensors.items()}

    @staticmethod
    def _weight_of(micro: Batch, loss_weight: str) -> float:
        if loss_weight == "rows":
            return float(len(micro))
        return float(micro.to_padded("loss_mask")[0].sum())

    def _all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world_size > 1:
            tensor = tensor.to(self.device)
            dist.all_reduce(tensor, op=op)
        return tensor.cpu()

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _atomically(self, final: Path, write: Callable[[Path], None]) -> Path:
        """Every rank writes into ``final``.tmp; rank 0 then renames it to ``final``."""
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        write(tmp)
        self._barrier()
        if self.rank == 0:
            old = final.with_name(final.name + ".old")
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final


def save_hf_checkpoint(path: Path, config, generation_config, weights: dict, processor) -> None:
    """Weights into a model skeleton built on the meta device (no second random init), then
    ``save_pretrained`` for model and processor."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    model.load_state_dict(weights, assign=True, strict=False)
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"save_hf: the state dict lacks {len(missing)} weight(s), e.g. {missing[:3]}")
    model.generation_config = generation_config
    model.save_pretrained(path)
    processor.save_pretrained(path)
