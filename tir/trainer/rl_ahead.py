"""``trainer.rollout_mode``: when a step's rollouts are generated.

- ``sync``: step k rolls out with the weights of step k-1, then trains on what it rolled out.
- ``one_step_off``: the rollouts of step k+1 are generated (on a driver thread, through the same
  engines and pool) while the actor trains on step k, as verl's one-step-off recipe does. Step k
  then trains on trajectories of the weights of step k-2: the importance ratio is taken against the
  rollout log-probs (staleness 1, clipped as in the synchronous path). With weights that do not
  change (a learning rate too small to move a float32 weight) both modes compute the same batches
  and the same loss. At a rollout temperature other than 1 the actor recomputes the old log-probs
  (``tir.trainer.rl``), as verl does: the ratio then starts at 1 and the staleness is not corrected.

The order inside a one-step-off step (``tir.trainer.rl.rl_step``):

    take the batch prefetched for this step -> its reward (the adaptive weights move) ->
    push the actor's weights to the engines (they are idle now) -> start the next step's rollouts
    -> reference log-probs and the actor update, while those rollouts run

The next step's draw starts after this step's reward, as in the synchronous path, so dynamic
sampling's probe sees the same adaptive weights in both modes and the data position is known.

Exact resume: a checkpoint waits for the batch in flight and stores it (``prefetched.pkl``); the
resumed run trains on that batch, not on a new one drawn with newer weights.
"""

from __future__ import annotations

import pickle
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ROLLOUT_MODES = ("sync", "one_step_off")
PREFETCHED = "prefetched.pkl"


class RolloutSchedule:
    """Hands each step its collected batch (``tir.trainer.rl_collect.Collected``) and the phase
    times spent collecting it; in ``one_step_off`` mode, the batch of the next step is collected
    on a background thread."""

    def __init__(self, run, mode: str = "sync"):
        if mode not in ROLLOUT_MODES:
            raise ValueError(f"trainer.rollout_mode={mode!r}: expected one of {', '.join(ROLLOUT_MODES)}")
        self.run, self.mode = run, mode
        self.ahead = mode == "one_step_off"
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ahead") if self.ahead else None
        # (step, its collection): in flight, or done (read from a checkpoint, or waited for by save)
        self.pending: tuple[int, Future] | None = None

    def take(self, step: int, data_position: int, timer) -> object:
        """Step ``step``'s batch: collected now (sync, or the first step of a run), or the one
        collected ahead (its phase times go into ``timer``; ``time/rollout_wait`` is how long the
        driver waited for it)."""
        from tir.trainer.rl_collect import collect

        if self.pending is None or self.pending[0] != step:
            self.drop()
            return collect(self.run, data_position, step, timer)
        started = time.perf_counter()
        got, seconds = self.pending[1].result()
        self.pending = None
        timer.seconds["rollout_wait"] = time.perf_counter() - started
        _merge(timer, seconds)
        return got

    def start_next(self, step: int, data_position: int) -> None:
        """One-step-off: begin collecting step ``step`` (with the weights the engines hold now)."""
        if not self.ahead:
            return
        from tir.trainer.rl_collect import collect
        from tir.trainer.run_log import StepTimer

        def work():
            timer = StepTimer()
            return collect(self.run, data_position, step, timer), timer.seconds

        self.pending = (step, self.thread.submit(work))

    def save(self, folder: Path) -> None:
        """Into a checkpoint being written: the batch in flight (waited for), so that a resumed
        run trains on it."""
        if self.pending is None:
            return
        step, future = self.pending
        got, seconds = future.result()
        self.pending = (step, _done(got, seconds))
        tmp = folder / (PREFETCHED + ".tmp")
        with open(tmp, "wb") as f:
            pickle.dump({"step": step, "collected": got, "seconds": seconds}, f, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.rename(folder / PREFETCHED)

    def restore(self, folder: Path | None, next_step: int) -> bool:
        """From the checkpoint a run resumes: the batch collected ahead for ``next_step``, if it
        stored one; whether it did."""
        path = None if folder is None else Path(folder) / PREFETCHED
        if path is None or not path.is_file():
            return False
        with open(path, "rb") as f:
            saved = pickle.load(f)
        if saved["step"] != next_step:
            return False
        self.pending = (next_step, _done(saved["collected"], saved["seconds"]))
        return True

    def drop(self) -> None:
        """Forget the batch in flight (waiting for it: engines and pool are shared)."""
        if self.pending is not None:
            self.pending[1].result()
            self.pending = None

    def close(self) -> None:
        try:
            self.drop()
        finally:
            if self.thread is not None:
                self.thread.shutdown(wait=True)


def _merge(timer, seconds: dict[str, float]) -> None:
    for phase, s in seconds.items():
        timer.seconds[phase] = timer.seconds.get(phase, 0.0) + s


def _done(*value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future
