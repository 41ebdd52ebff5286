"""Restoration tools: the registry, the ``Tool`` base class, lookups and argument checking.

A tool is one registered object found by name: it has a subtask (one of ``SUBTASKS``), a
one-sentence description and a JSON schema of its arguments (both go into the policy's system
prompt), and a batched call ``tool(images, **args) -> images`` on lists of uint8 HxWx3 arrays.

Every call checks its inputs before any work: a bad argument raises ``ToolArgumentError``, a bad
image ``ToolInputError``. Both are ``ValueError`` subclasses whose message names the tool and what
was expected, so the agent loop can turn them into an observation instead of crashing.

This module only defines the machinery; ``tool_pool.tools`` is the public entry point and
importing it registers the built-in weight-free tools (``tool_pool/classical_*.py``, which import
from here, so there is no import cycle). Neural tools come from a manifest (``tool_pool/neural.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from tir import json_schema
from tir.imaging import check_image
from tir.registry import Registry, unknown_name

# The project's vocabulary of restoration subtasks (AgenticIR's eight).
SUBTASKS = (
    "denoising",
    "motion_deblurring",
    "defocus_deblurring",
    "dehazing",
    "deraining",
    "brightening",
    "jpeg_artifact_removal",
    "super_resolution",
)

MIN_SIDE = 8  # smaller images make most filters meaningless (and JPEG blocks span the image)
ARGUMENT_TYPES = ("number", "integer", "boolean", "string")  # tools take scalar arguments only

TOOLS = Registry("tool")


class ToolArgumentError(ValueError):
    """A tool was called with an unknown, mistyped or out-of-range argument."""


class ToolInputError(ValueError):
    """A tool was given something that is not a list of uint8 HxWx3 images."""


class ToolUnavailableError(RuntimeError):
    """A tool cannot run here (e.g. its checkpoint file is missing)."""


class Tool:
    """Base class: subclasses set the attributes and implement ``run``.

    ``parameters`` is a JSON schema of type "object" whose properties are scalars (number,
    integer, boolean, string) with optional minimum, maximum, enum and default.
    """

    name: str = ""
    subtask: str = ""
    description: str = ""
    parameters: ClassVar[dict] = {"type": "object", "properties": {}}
    scale: int = 1  # output side / input side (4 for super-resolution)
    available: bool = True  # False when it cannot run here (neural tools without their checkpoint)
    unavailable_reason: str | None = None
    # the same image and arguments give the same output (no unseeded randomness, no state): the
    # pool may cache its results (tool_pool.cache; on CUDA only in torch's deterministic mode)
    deterministic: bool = True

    def run(self, images: list[np.ndarray], **args) -> list[np.ndarray]:
        """Restore a batch of valid images with validated arguments (defaults filled in)."""
        raise NotImplementedError

    def __call__(self, images: Sequence[np.ndarray], **args) -> list[np.ndarray]:
        if not self.available:
            raise ToolUnavailableError(self.unavailable_reason or f"tool {self.name!r} is unavailable")
        images = check_images(self.name, images)
        args = validate_arguments(self.name, self.parameters, args)
        outputs = self.run(images, **args)
        if len(outputs) != len(images):
            raise RuntimeError(f"tool {self.name!r} returned {len(outputs)} images for {len(images)} inputs")
        return outputs

    def schema(self) -> dict:
        """The function description given to the policy (OpenAI / Qwen tool-calling format)."""
        return {"name": self.name, "description": self.description, "parameters": copy.deepcopy(self.parameters)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, subtask={self.subtask!r})"


class FunctionTool(Tool):
    """A weight-free tool made from a function ``fn(image uint8 HxWx3, **args) -> image``."""

    def __init__(self, name: str, subtask: str, description: str, fn: Callable, parameters: dict, scale: int = 1):
        check_definition(name, subtask, description, parameters)
        self.name, self.subtask, self.description = name, subtask, description
        self.parameters, self.scale, self.fn = parameters, scale, fn

    def run(self, images: list[np.ndarray], **args) -> list[np.ndarray]:
        return [as_uint8(self.fn(image, **args)) for image in images]


def register_tool(tool: Tool) -> Tool:
    """Add a tool instance to ``TOOLS`` under its name."""
    check_definition(tool.name, tool.subtask, tool.description, tool.parameters)
    return TOOLS.register(tool.name)(tool)


def tool(name: str, subtask: str, description: str, parameters: dict | None = None, scale: int = 1):
    """Decorator: register ``fn(image, **args) -> image`` as the weight-free tool ``name``."""

    def wrap(fn: Callable) -> Callable:
        register_tool(FunctionTool(name, subtask, description, fn, parameters or no_arguments(), scale))
        return fn

    return wrap


def strength_argument(default: float = 1.0, low: float = 0.0, high: float = 3.0, what: str = "") -> dict:
    """The schema most tools share: one optional multiplier of their self-estimated strength."""
    text = what or "multiplier of the automatically estimated strength (1 = as estimated)"
    return {
        "type": "object",
        "properties": {
            "strength": {"type": "number", "minimum": low, "maximum": high, "default": default, "description": text}
        },
        "additionalProperties": False,
    }


def no_arguments() -> dict:
    return {"type": "object", "properties": {}, "additionalProperties": False}


# ---------------------------------------------------------------- lookups


def get_tool(name: str) -> Tool:
    """The tool called ``name`` (KeyError with a did-you-mean hint otherwise)."""
    return TOOLS.get(name)


def available_tools() -> list[str]:
    """Names of the registered tools that can run here, sorted."""
    return [name for name in TOOLS.names() if TOOLS.get(name).available]


def unavailable_tools() -> dict[str, str]:
    """{name: reason} for registered tools that cannot run here (e.g. a missing checkpoint)."""
    return {
        name: TOOLS.get(name).unavailable_reason or "unavailable"
        for name in TOOLS.names()
        if not TOOLS.get(name).available
    }


def tools_for_subtask(subtask: str, include_unavailable: bool = False) -> list[Tool]:
    """The registered tools of one subtask, sorted by name (only those that can run, by default)."""
    check_subtask(subtask)
    names = TOOLS.names() if include_unavailable else available_tools()
    return [TOOLS.get(name) for name in names if TOOLS.get(name).subtask == subtask]


def tool_schemas(names: Sequence[str] | None = None) -> list[dict]:
    """Function descriptions ({"name", "description", "parameters"}) for the policy's prompt:
    of the named tools, or of every tool that can run here."""
    return [get_tool(name).schema() for name in (available_tools() if names is None else names)]


# ---------------------------------------------------------------- checks


def check_subtask(subtask: str) -> None:
    if subtask not in SUBTASKS:
        raise KeyError(unknown_name("subtask", subtask, SUBTASKS))


def check_definition(name: str, subtask: str, description: str, parameters: dict) -> None:
    """Catch a malformed tool when it is defined, not when the policy first calls it."""
    if not name or not name.replace("_", "").isalnum() or name.lower() != name:
        raise ValueError(f"tool name {name!r} must be short snake_case")
    check_subtask(subtask)
    if not description:
        raise ValueError(f"tool {name!r} needs a description")
    if parameters.get("type") != "object" or not isinstance(parameters.get("properties"), dict):
        raise ValueError(f"tool {name!r}: parameters must be a JSON schema of type 'object' with 'properties'")
    for arg, spec in parameters["properties"].items():
        if spec.get("type") not in ARGUMENT_TYPES:
            raise ValueError(f"tool {name!r}: argument {arg!r} has unsupported type {spec.get('type')!r}")


def check_images(tool_name: str, images: Any) -> list[np.ndarray]:
    """Return ``images`` as a list, or raise ``ToolInputError`` saying what is wrong with which
    (each image: ``tir.imaging.check_image``, at least ``MIN_SIDE`` px a side)."""
    if isinstance(images, np.ndarray) or not isinstance(images, (list, tuple)):
        raise ToolInputError(
            f"tool {tool_name!r} expects a list of images, got {type(images).__name__}"
            + (" (wrap a single image in a list)" if isinstance(images, np.ndarray) else "")
        )
    for index, image in enumerate(images):
        check_image(image, f"tool {tool_name!r}, image {index}", min_side=MIN_SIDE, error=ToolInputError)
    return list(images)


def validate_arguments(tool_name: str, schema: dict, args: dict) -> dict:
    """Check ``args`` against a tool's schema (``tir.json_schema``, the policy's parser's checker
    too); return them as python values with defaults filled in."""
    problem = json_schema.check_arguments(tool_name, schema, args)
    if problem:
        raise ToolArgumentError(problem.message)
    return json_schema.with_defaults(schema, args)


def as_uint8(image: np.ndarray) -> np.ndarray:
    """Round and clip a float image in [0, 255] to uint8 (uint8 input passes through)."""
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
