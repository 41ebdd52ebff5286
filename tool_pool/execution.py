"""What both sides of the model-call pool share: the errors a call can end in, input checks,
running a tool or a scorer on a batch, and the pool's statistics.

The clients (``tool_pool.client``: ``LocalPool`` in the caller's process, ``ServePool`` for the
Serve application) and the server (``tool_pool.serve_app``) both import from here, so neither
imports the other's internals and the same request fails the same way in both.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from tir import imaging
from tool_pool.cache import FIELDS as CACHE_FIELDS

STATS_ACTOR_SUFFIX = "_stats"
NAMESPACE = "tir"  # the stats actor's namespace, so that every job of the cluster finds it


# kinds of PoolError: the first four are the caller's fault and are never retried
BAD_REQUEST_KINDS = ("unknown_tool", "unknown_metric", "bad_arguments", "bad_image")


ERROR_KINDS = BAD_REQUEST_KINDS + ("unavailable", "tool_failed", "timeout", "replica_failed")


class PoolError(RuntimeError):
    def __init__(self, kind: str, message: str):
        assert kind in ERROR_KINDS, kind
        self.kind = kind
        super().__init__(f"[{kind}] {message}")


def check_image(image: Any, what: str = "image") -> np.ndarray:
    """The pool's contract for images (``tir.imaging.check_image``), failing as a "bad_image" PoolError."""
    return imaging.check_image(image, what, error=_bad_image)


def _bad_image(message: str) -> PoolError:
    return PoolError("bad_image", message)


def resolve_tool(name: str, allowed: Sequence[str] | None = None):
    """The tool object for a request, or a PoolError naming what is wrong."""
    from tool_pool.tools import TOOLS

    if allowed and name not in allowed:
        from tir.registry import unknown_name

        raise PoolError("unknown_tool", unknown_name("tool", name, allowed, extra="only these are served by this pool"))
    try:
        return TOOLS.get(name)
    except KeyError as err:
        raise PoolError("unknown_tool", str(err.args[0])) from None


def validated_arguments(tool, args: dict) -> dict:
    from tool_pool.tools import validate_arguments

    try:
        return validate_arguments(tool.name, tool.parameters, dict(args))
    except ValueError as err:
        raise PoolError("bad_arguments", str(err)) from None


def run_tool_batch(tool, images: list[np.ndarray], args: dict) -> list[np.ndarray]:
    """Run one tool on images that share arguments; failures become PoolErrors."""
    from tool_pool.tools import ToolArgumentError, ToolInputError, ToolUnavailableError

    try:
        return tool(images, **args)
    except ToolArgumentError as err:
        raise PoolError("bad_arguments", str(err)) from None
    except ToolInputError as err:
        raise PoolError("bad_image", str(err)) from None
    except ToolUnavailableError as err:
        raise PoolError("unavailable", str(err)) from None
    except Exception as err:  # noqa: BLE001 - a tool bug must not take the caller down
        raise PoolError("tool_failed", f"tool {tool.name!r} failed: {type(err).__name__}: {err}") from None


def get_scorer_or_error(name: str):
    from tool_pool.scorers import MetricUnavailable, get_scorer

    try:
        return get_scorer(name)
    except KeyError as err:
        raise PoolError("unknown_metric", str(err.args[0])) from None
    except MetricUnavailable as err:
        raise PoolError("unavailable", str(err)) from None


_RECOGNIZERS: dict[str, object] = {}


def get_recognizer_or_error(checkpoint: str):
    """The degradation recogniser at ``checkpoint`` ("default": the shipped one), loaded once per
    process; PoolError "unavailable" naming the file when it cannot be loaded."""
    from tir.data.recognizer import RecognizerError, load_recognizer

    if checkpoint not in _RECOGNIZERS:
        try:
            _RECOGNIZERS[checkpoint] = load_recognizer(None if checkpoint == "default" else checkpoint)
        except RecognizerError as err:
            raise PoolError("unavailable", str(err)) from None
    return _RECOGNIZERS[checkpoint]


def perceive_batch(recognizer, images: list[np.ndarray], after_call: bool = False) -> list[dict]:
    """Per image, ``{"probabilities": {degradation: p}, "degradations": [the ones it decides on],
    "maybe": [the ones it is unsure of]}`` (one batched forward pass; the decision thresholds
    travel in the recogniser's checkpoint). ``after_call``: the images are tool outputs."""
    try:
        probabilities = recognizer.probabilities(images, after_call)
    except ValueError as err:
        raise PoolError("bad_image", str(err)) from None
    return [
        {"probabilities": p, "degradations": recognizer.decide(p), "maybe": recognizer.unsure(p)} for p in probabilities
    ]


def score_batch(scorer, images: list[np.ndarray], references: list[np.ndarray] | None) -> list[float]:
    if scorer.full_reference and (references is None or any(r is None for r in references)):
        raise PoolError("bad_arguments", f"metric {scorer.name!r} is full-reference: pass a reference image")
    try:
        return [float(v) for v in scorer.score(images, references if scorer.full_reference else None)]
    except ValueError as err:
        raise PoolError("bad_image", str(err)) from None
    except Exception as err:  # noqa: BLE001
        raise PoolError("tool_failed", f"metric {scorer.name!r} failed: {type(err).__name__}: {err}") from None


class PoolStats:
    """Per tool (or metric): calls computed, batches and their sizes, queue wait, model loads,
    errors, and the result cache's columns (``tool_pool.cache``: hits, misses, seconds saved,
    bytes and entries held); a request served from the cache is a hit, not a call."""

    def __init__(self):
        self.by_model: dict[str, dict[str, float]] = defaultdict(
            lambda: {
                "calls": 0,
                "batches": 0,
                "max_batch": 0,
                "queue_wait_s": 0.0,
                "run_s": 0.0,
                "loads": 0,
                "errors": 0,
                **dict.fromkeys(CACHE_FIELDS, 0),
            }
        )

    def record_batch(self, model: str, size: int, queue_wait_s: float, run_s: float, errors: int = 0) -> None:
        row = self.by_model[model]
        row["calls"] += size
        row["batches"] += 1
        row["max_batch"] = max(row["max_batch"], size)
        row["queue_wait_s"] += queue_wait_s
        row["run_s"] += run_s
        row["errors"] += errors

    def record_load(self, model: str) -> None:
        self.by_model[model]["loads"] += 1

    def merge(self, other: dict[str, dict[str, float]]) -> None:
        for model, row in other.items():
            mine = self.by_model[model]
            for key, value in row.items():
                if key.startswith("mean_"):  # derived in snapshot()
                    continue
                mine[key] = max(mine[key], value) if key == "max_batch" else mine[key] + value

    def snapshot(self, *caches: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        """Per model, with the cache columns of ``caches`` (``ResultCache.snapshot()``s) added."""
        merged = PoolStats()
        merged.merge(self.by_model)
        for cache in caches:
            merged.merge(cache)
        out = {}
        for model, row in merged.by_model.items():
            out[model] = dict(row)
            out[model]["mean_batch"] = row["calls"] / row["batches"] if row["batches"] else 0.0
            out[model]["mean_queue_wait_s"] = row["queue_wait_s"] / row["calls"] if row["calls"] else 0.0
        return out
