"""The restoration tools: import this module to get the registry with the built-in tools in it.

A tool is one registered object found by name: it has a subtask (one of ``SUBTASKS``), a
one-sentence description and a JSON schema of its arguments (both go into the policy's system
prompt), and a batched call ``tool(images, **args) -> images`` on lists of uint8 HxWx3 arrays.
Bad arguments raise ``ToolArgumentError``, bad images ``ToolInputError`` (both ``ValueError``),
a tool that cannot run here ``ToolUnavailableError``.

    from tool_pool.tools import get_tool, tools_for_subtask, tool_schemas
    restored = get_tool("denoise_dct")([image], strength=1.2)[0]

The machinery is in ``tool_pool.tool_base``; the weight-free tools in ``tool_pool/classical_*.py``;
neural tools are added from a manifest with ``tool_pool.neural.register_manifest``.
"""

from tool_pool import classical_deblur, classical_denoise, classical_enhance, classical_jpeg, classical_resize  # noqa: F401  (register)
from tool_pool.tool_base import (
    MIN_SIDE,
    SUBTASKS,
    TOOLS,
    FunctionTool,
    Tool,
    ToolArgumentError,
    ToolInputError,
    ToolUnavailableError,
    as_uint8,
    available_tools,
    check_definition,
    check_images,
    check_subtask,
    get_tool,
    no_arguments,
    register_tool,
    strength_argument,
    tool,
    tool_schemas,
    tools_for_subtask,
    unavailable_tools,
    validate_arguments,
)

__all__ = [
    "MIN_SIDE",
    "SUBTASKS",
    "TOOLS",
    "FunctionTool",
    "Tool",
    "ToolArgumentError",
    "ToolInputError",
    "ToolUnavailableError",
    "as_uint8",
    "available_tools",
    "check_definition",
    "check_images",
    "check_subtask",
    "get_tool",
    "no_arguments",
    "register_tool",
    "strength_argument",
    "tool",
    "tool_schemas",
    "tools_for_subtask",
    "unavailable_tools",
    "validate_arguments",
]
