"""Training engines, found by name (``actor.engine`` in a recipe): "fsdp2", "deepspeed", "plain".

Importing this package registers all three; each imports its heavy framework only when built.
"""

from workers.engines import deepspeed_engine, fsdp2, plain  # noqa: F401  - register
from workers.engines.base import TRAINING_ENGINES, EngineOptions, TrainingEngine, make_training_engine, token_logprobs

__all__ = ["TRAINING_ENGINES", "EngineOptions", "TrainingEngine", "make_training_engine", "token_logprobs"]
