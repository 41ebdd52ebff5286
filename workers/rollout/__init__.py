"""Rollout engines: inference backends behind one interface (``base.RolloutEngine``)."""

from workers.rollout.base import ENGINES, RolloutEngine, engine_class, make_engine, register_engine

__all__ = ["ENGINES", "RolloutEngine", "engine_class", "make_engine", "register_engine"]
