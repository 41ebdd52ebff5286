"""Runs that survive: a training run's state on disk (RL and SFT alike), and the data order that a
resume repeats.

A checkpoint after step ``k`` (steps count from 1) holds everything the next step depends on:

    <out>/checkpoints/step_00000k/
        actor/       the training engine's checkpoint: model and optimizer (sharded where the
                     engine shards), LR schedule, optimizer step
        state.json   the driver's state: for RL a ``TrainState`` (steps done, data position, the
                     adaptive reward's weight state, fingerprints of the data and recipe); for
                     SFT its ``Progress`` (epoch, step in epoch, held-out evaluations)
        rng.pt       the driver's RNG states (python, numpy, torch)
    <out>/checkpoints/latest.json   {"path": "step_00000k", "step": k}, rewritten last

It is written into ``step_00000k.tmp`` and renamed into place, then ``latest.json`` is
replaced: a kill at any moment leaves ``latest.json`` naming a complete checkpoint.
``trainer.resume=auto`` loads it and continues at step ``k + 1``. What else a step depends on
is a pure function of the recipe and the step: sampling is seeded from (seed, step, row, turn)
(``tir.trainer.rl``) and the data order from (seed, epoch) (``DataStream``), so a resumed run
repeats the uninterrupted one exactly. The rollout engines are not saved: after a resume the
driver pushes the restored actor weights to them.

Every rank of the actor group writes its own shards: on several nodes ``run.output_dir`` must
be storage that every node sees.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

RESUME_MODES = ("auto", "never")  # or a checkpoint folder


@dataclass
class TrainState:
    step: int = 0  # steps finished: the next step is step + 1
    data_position: int = 0  # samples drawn from the DataStream so far
    reward: dict | None = None  # MultiMetricReward.state_dict(): the adaptive weights' EMAs
    data_fingerprint: str = ""  # what the data was (DataStream.fingerprint)
    config_hash: str = ""  # the recipe the run started with (informational: recipes may change on resume)


# ------------------------------------------------------------------------------ data order
class DataStream:
    """An endless stream of row indices of a dataset of ``size`` rows, in an order fixed by the
    seed: epoch ``e`` visits every row once, in ``permutation(seed, e)``; position ``p`` is row
    ``perm_e[p % size]`` with ``e = p // size``. The position alone says what comes next, so a
    checkpoint stores one integer and a resumed run draws exactly the same samples."""

    def __init__(self, size: int, seed: int, fingerprint: str = ""):
        if size < 1:
            raise ValueError("the training data is empty")
        self.size, self.seed, self.fingerprint = size, seed, fingerprint
        self._epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return self._order

    def indices(self, position: int, count: int) -> list[int]:
        """Rows at positions ``position .. position + count - 1`` (epochs roll over as needed)."""
        return [int(self.order(p // self.size)[p % self.size]) for p in range(position, position + count)]


def data_fingerprint(image_ids, combos, seeds) -> str:
    """A short digest of what the rows are (not their pixels): a different dataset under the
    same path is caught on resume."""
    import hashlib

    text = json.dumps([list(map(str, image_ids)), list(map(str, combos)), [int(s) for s in seeds]])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------ RNG states
def rng_states() -> dict:
    import torch

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict) -> None:
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ------------------------------------------------------------------------------ save and load
def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def write_json(path: Path, value) -> None:
    """``value`` as JSON at ``path``, atomically (a temp file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=float))
    os.replace(tmp, path)


def save_checkpoint(out_dir: str | Path, actors, state, keep: int = 2, extra=None) -> Path:
    """Write the checkpoint of ``state.step`` (see the module docstring); keep the ``keep``
    newest checkpoints (0: keep all). ``state``: a dataclass with a ``step`` (``TrainState``, SFT's
    ``Progress``). ``actors``: the actor WorkerGroup (or anything with its ``save_checkpoint(path)``).
    ``extra``: called with the folder being written, to add files before it becomes the checkpoint."""
    import torch

    folder = checkpoint_dir(out_dir)
    final = folder / f"step_{state.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a save a kill interrupted
    tmp.mkdir(parents=True)
    actors.save_checkpoint(str(tmp / "actor"))
    torch.save(rng_states(), tmp / "rng.pt")
    write_json(tmp / "state.json", asdict(state))
    if extra is not None:
        extra(tmp)
    if final.exists():  # the same step saved again (a run resumed from an older checkpoint)
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json(folder / "latest.json", {"path": final.name, "step": state.step})
    if keep:
        older = sorted(p for p in folder.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp") and p != final)
        for old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    pointer = checkpoint_dir(out_dir) / "latest.json"
    if not pointer.is_file():
        return None
    path = checkpoint_dir(out_dir) / json.loads(pointer.read_text())["path"]
    return path if path.is_dir() else None


def checkpoint_to_resume(out_dir: str | Path, how: str) -> Path | None:
    """``trainer.resume``: "auto" (the latest checkpoint, None if there is none), "never"
    (None), or a checkpoint folder (which must be one)."""
    if how == "never":
        return None
    if how == "auto":
        return latest_checkpoint(out_dir)
    path = Path(how)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(
            f"trainer.resume={how!r}: not a checkpoint (no state.json); expected 'auto', 'never' or a checkpoint folder"
        )
    return path


def load_checkpoint(path: str | Path, actors, state_type: type = TrainState):
    """Restore the actors (model, optimizer, schedule) and the driver's RNG; the driver's state
    (a ``state_type``)."""
    import torch

    path = Path(path)
    state = state_type(**json.loads((path / "state.json").read_text()))
    actors.load_checkpoint(str(path / "actor"))
    restore_rng(torch.load(path / "rng.pt", weights_only=False))
    return state


def check_resumable(state: TrainState, data: DataStream, path: Path) -> None:
    """A checkpoint continues only the data it was trained on (else the order means nothing)."""
    if state.data_fingerprint and data.fingerprint and state.data_fingerprint != data.fingerprint:
        raise ValueError(
            f"checkpoint {path} was trained on other data (fingerprint {state.data_fingerprint}, this run's data "
            f"{data.fingerprint}); use trainer.resume=never to start over"
        )
