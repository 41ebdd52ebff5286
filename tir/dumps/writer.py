"""Rollout dumps: every RL step's trajectories as one Parquet file, written in the background.

    with DumpWriter("runs/x/rl/dumps") as dumps:
        dumps.write(step, batch)        # returns at once; a thread writes step_000012.parquet
    batch = tir.dumps.reader.read_dump("runs/x/rl/dumps", 12)

A dump is the step's trajectory ``Batch`` as the driver holds it: the degraded and HQ photos,
every image the policy saw, the tool calls, the chat as text, token ids, loss mask and log-probs,
plus the reward's pieces (per-metric scores and gains, the weights, the advantage). Each file is
written atomically (``Batch.to_parquet``: temp file + rename), so a run killed mid-write leaves
whole files only; a resumed run rewrites the steps it repeats.

Writing happens in one background thread so the next step's rollout does not wait on zstd and
disk; the queue is short (``max_pending``) so a slow disk slows the run rather than filling
memory. An error in the thread is raised by the next ``write`` or by ``close``.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

from tir.dumps.reader import dump_path
from tir.protocol import Batch


class DumpWriter:
    """Writes ``(step, Batch)`` pairs to ``folder/step_NNNNNN.parquet`` in a background thread."""

    def __init__(self, folder: str | Path, max_pending: int = 2):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.written: list[Path] = []
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rollout-dumps", daemon=True)
        self._thread.start()

    def write(self, step: int, batch: Batch) -> Path:
        """Queue one step's batch; the file's path (it exists once the thread gets to it)."""
        self._raise_error()
        if not self._thread.is_alive():
            raise RuntimeError("DumpWriter is closed")
        path = dump_path(self.folder, step)
        self._queue.put((path, batch))  # blocks while max_pending dumps wait: backpressure
        return path

    def flush(self) -> None:
        """Wait until everything queued is on disk."""
        self._queue.join()
        self._raise_error()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_error()

    def __enter__(self) -> DumpWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:  # after a failure, drain the queue without writing
                    path, batch = item
                    batch.to_parquet(path)
                    self.written.append(path)
            except BaseException as err:  # noqa: BLE001 - handed to the driver's thread
                self._error = err
            finally:
                self._queue.task_done()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing a rollout dump in {self.folder} failed: {error}") from error


def step_dump(
    trajectories: Batch, batch: Batch, reward, advantages: list[float], finals: list[dict], inputs: list[dict]
) -> Batch:
    """What an RL step dumps: its trajectories (``tir.agent.loop.rollout``) with the reward's
    pieces (``tir.rl.reward.RewardOutput``: per-metric scores, gains and contributions, the
    weights), each row's advantage, and the per-token log-probs ``batch`` (what the actor
    trained on) holds beside the rollout's."""
    metrics = list(reward.weights)
    terms = [
        {
            "quality": float(reward.quality[i]),
            "format": float(reward.format_term[i]),
            "tool": float(reward.tool_term[i]),
            "gain": {m: float(reward.gains[m][i]) for m in metrics},
            "normalized": {m: float(reward.normalized[m][i]) for m in metrics},
            "contribution": {m: float(reward.contributions[m][i]) for m in metrics},
        }
        for i in range(len(trajectories))
    ]
    out = (
        trajectories.with_column("final_scores", finals, kind="json")
        .with_column("input_scores", inputs, kind="json")
        .with_column("reward", reward.rewards.tolist())
        .with_column("reward_terms", terms, kind="json")
        .with_column("reward_weights", [reward.weights] * len(trajectories), kind="json")
        .with_column("advantage", advantages)
    )
    for column in ("ref_logprobs", "old_logprobs"):
        if column in batch.columns:
            out = out.with_column(column, batch.table.column(column))
    return out.with_meta(reward_weights=reward.weights)
