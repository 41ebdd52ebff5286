"""Rollout engines: inference backends behind one interface (``base.RolloutEngine``)."""

from workers.rollout.base import (
    ROLLOUT_ENGINES,
    RolloutEngine,
    make_rollout_engine,
    register_rollout_engine,
    rollout_engine_class,
)

__all__ = ["ROLLOUT_ENGINES", "RolloutEngine", "rollout_engine_class", "make_rollout_engine", "register_rollout_engine"]
