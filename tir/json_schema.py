"""Tool-call arguments checked against a tool's JSON schema: the one checker that the policy's
parser (``tir.agent.prompts``) and the tools themselves (``tool_pool.tool_base``) share, so that a
call the parser accepts is a call the tool accepts, refused with the same words otherwise.

Supported: ``properties``, ``required``, ``additionalProperties`` and, for each property,
``type`` (number, integer, boolean, string, array, object, null), ``enum``, ``minimum``,
``maximum`` and ``default``. Any other keyword is ignored.

Unknown arguments are refused unless the schema says ``"additionalProperties": true``. That is
stricter than JSON Schema (whose default allows them), on purpose: a misspelt argument must not
be silently dropped, and the policy's ``names`` tool prompt, whose schemas have no parameters at
all, relies on every argument being refused.

Values are shown as JSON (``true``, ``"high"``), the way the policy writes them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# What ``check_arguments`` can find wrong (a subset of the parser's ParseError kinds).
PROBLEM_KINDS = ("unknown_argument", "missing_argument", "wrong_type", "out_of_range", "not_in_enum")


@dataclass(frozen=True)
class ArgumentProblem:
    kind: str  # one of PROBLEM_KINDS
    message: str  # names the tool, the argument, what was expected and what was got


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _is_integer(value: Any) -> bool:
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return True
    return isinstance(value, (float, np.floating)) and float(value).is_integer()


A_TYPE = {
    "number": "a number",
    "integer": "an integer",
    "boolean": "a boolean (true or false)",
    "string": "a string",
    "array": "an array",
    "object": "an object",
    "null": "null",
}
TYPE_CHECKS = {
    "number": is_number,
    "integer": _is_integer,
    "boolean": lambda v: isinstance(v, (bool, np.bool_)),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def check_arguments(tool_name: str, parameters: Mapping, arguments: Mapping) -> ArgumentProblem | None:
    """The first thing wrong with ``arguments`` against the tool's ``parameters`` schema, or None.

    A schema that is itself broken (a ``minimum`` that is no number) raises TypeError."""
    properties = parameters.get("properties") or {}
    if parameters.get("additionalProperties", False) is not True:
        unknown = [arg for arg in arguments if arg not in properties]
        if unknown:
            names = clip(", ".join(repr(clip(str(arg))) for arg in sorted(unknown, key=str)), 200)
            accepted = ", ".join(sorted(properties)) or "none"
            return ArgumentProblem(
                "unknown_argument",
                f"tool {tool_name!r} has no argument{'s' if len(unknown) > 1 else ''} {names} (accepted: {accepted})",
            )
    missing = [arg for arg in parameters.get("required", []) if arg not in arguments]
    if missing:
        names = ", ".join(map(repr, missing))
        return ArgumentProblem(
            "missing_argument", f"tool {tool_name!r} needs argument{'s' if len(missing) > 1 else ''} {names}"
        )
    for arg, value in arguments.items():
        if arg in properties:
            problem = _check_value(f"argument {arg!r} of {tool_name!r}", properties[arg], value)
            if problem:
                return problem
    return None


def _check_value(where: str, spec: Mapping, value: Any) -> ArgumentProblem | None:
    kind = spec.get("type")
    if kind is not None and not TYPE_CHECKS.get(kind, lambda v: True)(value):
        return ArgumentProblem("wrong_type", f"{where} must be {A_TYPE.get(kind, kind)}, got {show(value)}")
    if is_number(value) and not math.isfinite(value):
        return ArgumentProblem("out_of_range", f"{where} must be a finite number, got {value}")
    if "enum" in spec and value not in spec["enum"]:
        return ArgumentProblem("not_in_enum", f"{where} must be one of {show(spec['enum'], 200)}, got {show(value)}")
    if is_number(value):
        if "minimum" in spec and value < spec["minimum"]:
            return ArgumentProblem("out_of_range", f"{where} must be >= {spec['minimum']}, got {show(value)}")
        if "maximum" in spec and value > spec["maximum"]:
            return ArgumentProblem("out_of_range", f"{where} must be <= {spec['maximum']}, got {show(value)}")
    return None


def with_defaults(parameters: Mapping, arguments: Mapping) -> dict:
    """Checked ``arguments`` as plain python values of their declared type (an integer 2 given
    for a number is 2.0), with the defaults of the ones left out filled in; arguments the schema
    does not declare (``additionalProperties: true``) pass unchanged."""
    properties = parameters.get("properties") or {}
    out = {}
    for arg, spec in properties.items():
        if arg in arguments:
            convert = {"number": float, "integer": int, "boolean": bool}.get(spec.get("type"))
            out[arg] = convert(arguments[arg]) if convert else arguments[arg]
        elif "default" in spec:
            out[arg] = spec["default"]
    out.update({arg: value for arg, value in arguments.items() if arg not in properties})
    return out


# ---------------------------------------------------------------- showing values


def json_type(value: Any) -> str:
    """The JSON name of a value's type ("array", "number"...)."""
    names = {
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
        dict: "object",
    }
    return names.get(type(value), type(value).__name__)


def show(value: Any, limit: int = 60) -> str:
    """A value as JSON (as the policy wrote it), clipped; safe for any value."""
    if isinstance(value, np.generic):
        value = value.item()
    try:
        return clip(json.dumps(value, ensure_ascii=True), limit)
    except (ValueError, TypeError, RecursionError):
        return json_type(value)


def clip(text: str, limit: int = 60) -> str:
    """At most ``limit`` characters of ``text`` (echoing the policy's text back to it), with lone
    surrogates escaped (``utf8_safe``)."""
    return utf8_safe(text if len(text) <= limit else text[:limit] + "...")


def utf8_safe(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (lone surrogates) written as ``\\udXXX``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text
