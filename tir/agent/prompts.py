"""What the policy reads and writes: the system prompt, the chat messages, and the tool-call parser.

A conversation is a list of HF chat messages (``{"role": ..., "content": [{"type": "image"},
{"type": "text", "text": ...}]}``): the system prompt lists the tools as JSON schemas, the user
turn shows the degraded photo, each assistant turn holds exactly one

    <tool_call>{"name": "denoise_tv", "arguments": {"strength": 1.0}}</tool_call>

or the final answer ``<answer>done</answer>``, and each tool turn shows the new image with a short
text. Images are placeholders in the messages; the pixels travel beside them, in order.

``parse_action`` turns the policy's text into a ``ToolCall``, a ``Stop`` or a ``ParseError``. It
never raises: a malformed reply is an observation for the policy (the error's message) and a
format penalty for the trainer (counted by the error's ``kind``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tir import json_schema
from tir.registry import unknown_name

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"  # used by the chat template
PROTOCOL_TAGS = (CALL_OPEN, CALL_CLOSE, ANSWER_OPEN, ANSWER_CLOSE, RESPONSE_OPEN, RESPONSE_CLOSE)
DEFAULT_ANSWER = "done"

# ParseError kinds, for counting format errors by cause.
ERROR_KINDS = (
    "no_action",  # neither a tool call nor an answer
    "multiple_tags",  # two tool calls, two answers, or nested tags
    "unclosed_tag",  # an opening tag without its closing tag (or the reverse)
    "call_and_stop",  # a tool call and an answer in one reply
    "bad_json",  # the text inside <tool_call> is not JSON
    "not_an_object",  # JSON, but not {"name": ..., "arguments": {...}}
    "missing_name",
    "unknown_tool",
    "bad_arguments",  # "arguments" is not an object
    "unknown_argument",
    "missing_argument",
    "wrong_type",
    "out_of_range",
    "not_in_enum",
    "unreadable",  # anything else (a safety net: the loop must survive every reply)
)

SYSTEM_TEMPLATE = """You are an image restoration agent. You see a degraded photo and restore it step by step with restoration tools. After each tool call you see the new image, then you decide the next step.

# Tools
These are the tools you may call, as JSON schemas:
<tools>
{tools}
</tools>

# How to reply
Each reply holds exactly one of:
- one tool call: {call_open}{{"name": <tool name>, "arguments": {{<argument name>: <value>, ...}}}}{call_close}
- the final answer, when the photo is restored: {answer_open}{default_answer}{answer_close}
Call one tool per reply. Arguments that you leave out take their default values. A malformed call is not executed: you see an error message instead."""


# ---------------------------------------------------------------- outcomes of parsing


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Stop:
    answer: str = DEFAULT_ANSWER


@dataclass(frozen=True)
class ParseError:
    kind: str  # one of ERROR_KINDS
    message: str  # shown to the policy as the observation

    def __post_init__(self) -> None:
        # The message echoes the policy's text, which may hold lone surrogates: escape them so the
        # observation always encodes to UTF-8 (the tokenizer would raise on them).
        object.__setattr__(self, "message", json_schema.utf8_safe(self.message))


Action = ToolCall | Stop | ParseError


# ---------------------------------------------------------------- messages


TOOL_PROMPTS = ("full", "names")


def policy_schemas(tool_schemas: Sequence[Mapping], style: str = "full") -> list[dict]:
    """The tools as the policy is told about them. ``full``: the pool's JSON schemas (names,
    descriptions, arguments). ``names``: the names alone, so every call takes the tools' default
    arguments (any argument is refused as unknown): for tiny policies trained from scratch, which
    never read the descriptions (the quickstart's SFT rows: 2.4x fewer tokens)."""
    if style not in TOOL_PROMPTS:
        raise ValueError(f"tool prompt {style!r} unknown; expected one of {TOOL_PROMPTS}")
    schemas = [dict(_check_schema(s)) for s in tool_schemas]
    if style == "full":
        return schemas
    needy = [s["name"] for s in schemas if (s.get("parameters") or {}).get("required")]
    if needy:
        raise ValueError(
            f"tool prompt 'names': tool(s) {needy} have required arguments, so they cannot be called with defaults alone"
        )
    return [{"name": s["name"]} for s in schemas]


def system_prompt(tool_schemas: Sequence[Mapping]) -> str:
    """The system prompt: the tools (one JSON schema a line) and the reply protocol."""
    tools = "\n".join(json.dumps(_check_schema(schema), ensure_ascii=False) for schema in tool_schemas)
    return SYSTEM_TEMPLATE.format(
        tools=tools,
        call_open=CALL_OPEN,
        call_close=CALL_CLOSE,
        answer_open=ANSWER_OPEN,
        answer_close=ANSWER_CLOSE,
        default_answer=DEFAULT_ANSWER,
    )


def system_message(tool_schemas: Sequence[Mapping]) -> dict:
    return {"role": "system", "content": [_text(system_prompt(tool_schemas))]}


def user_message(image_size: tuple[int, int], cues: Mapping[str, float] | str | None = None, image: Any = None) -> dict:
    """The task: the degraded photo (``image_size`` = (width, height)) and optional perception cues."""
    text = f"Restore this degraded photo ({_size(image_size)})."
    return {"role": "user", "content": [_image(image), _text(_with_cues(text, cues))]}


def assistant_message(text: str) -> dict:
    """A policy turn, holding the policy's text exactly as generated."""
    return {"role": "assistant", "content": [_text(text)]}


def tool_message(
    tool_name: str, image_size: tuple[int, int], cues: Mapping[str, float] | str | None = None, image: Any = None
) -> dict:
    """The observation after a successful call: the new image and what produced it."""
    text = f"{tool_name} returned a {_size(image_size)} image."
    return {"role": "tool", "content": [_image(image), _text(_with_cues(text, cues))]}


def error_message(error: ParseError | str) -> dict:
    """The observation after a malformed call or a failing tool: text only, the image is unchanged."""
    text = error.message if isinstance(error, ParseError) else str(error)
    return {"role": "tool", "content": [_text(f"Error: {text} The image is unchanged.")]}


def initial_messages(
    tool_schemas: Sequence[Mapping],
    image_size: tuple[int, int],
    cues: Mapping[str, float] | str | None = None,
    image: Any = None,
) -> list[dict]:
    return [system_message(tool_schemas), user_message(image_size, cues, image)]


def image_size(image: Any) -> tuple[int, int]:
    """(width, height) of a PIL image or an HxW(xC) array: the order the messages use."""
    if hasattr(image, "shape"):
        return int(image.shape[1]), int(image.shape[0])
    width, height = image.size
    return int(width), int(height)


def count_images(messages: Sequence[Mapping]) -> int:
    """Number of image placeholders in ``messages`` (= images the processor must be given)."""
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if part.get("type") == "image"
    )


def format_cues(cues: Mapping[str, float]) -> str:
    """Measured degradation cues as one short line, e.g. ``noise_sigma=23.1, brightness=0.42``."""
    return ", ".join(f"{name}={_number(value)}" for name, value in cues.items())


# ---------------------------------------------------------------- rendering with a processor


def render(processor, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> str:
    """The chat text of ``messages`` under the processor's (the checkpoint's) chat template."""
    return processor.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def render_delta(processor, history: Sequence[Mapping], new_messages: Sequence[Mapping]) -> str:
    """The text that ``new_messages`` (and the next generation prompt) add after ``history``.

    ``history`` ends with an assistant turn holding the policy's text; the delta starts right
    after that turn's end-of-turn token (the tokenizer's eos token, where the policy stopped).
    The multi-turn loop tokenizes only the delta, so the ids of earlier turns stay exactly the
    sampled ones: prompt ids + sampled ids (with eos) + delta ids = ids of the whole chat.
    """
    if not history or history[-1].get("role") != "assistant":
        raise ValueError("render_delta: history must end with an assistant turn")
    before = render(processor, history, add_generation_prompt=False)
    after = render(processor, list(history) + list(new_messages), add_generation_prompt=True)
    if not after.startswith(before):
        raise ValueError(
            "the chat template does not render a chat as a prefix of its continuations; turns cannot be appended incrementally"
        )
    reply_end = message_text(history[-1]) + processor.tokenizer.eos_token
    cut = before.rfind(reply_end)
    if cut < 0:
        raise ValueError(
            f"the chat template does not end an assistant turn with the eos token {processor.tokenizer.eos_token!r}"
        )
    return after[cut + len(reply_end) :]


def message_text(message: Mapping) -> str:
    """The text parts of a message, joined (images left out)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if part.get("type") == "text")


# ---------------------------------------------------------------- the parser


def format_call(call: ToolCall) -> str:
    """The canonical text of a call. ``<`` and ``>`` inside strings are JSON-escaped so that an
    argument can never contain a tag."""
    body = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
    return CALL_OPEN + body.replace("<", "\\u003c").replace(">", "\\u003e") + CALL_CLOSE


def format_stop(stop: Stop = Stop()) -> str:
    return ANSWER_OPEN + stop.answer + ANSWER_CLOSE


def parse_action(text: str, tool_schemas: Sequence[Mapping]) -> Action:
    """The action in a policy reply; never raises (a bad reply gives a ``ParseError``)."""
    try:
        return _parse(text, tool_schemas)
    except Exception as err:  # noqa: BLE001 - the loop must survive any reply; report, never crash
        return ParseError("unreadable", f"could not read the reply ({type(err).__name__}: {_short(err)}).")


def _parse(text: str, tool_schemas: Sequence[Mapping]) -> Action:
    if not isinstance(text, str):
        return ParseError("no_action", f"expected the reply as text, got {type(text).__name__}.")
    call = _tagged(text, CALL_OPEN, CALL_CLOSE, "tool call")
    answer = _tagged(text, ANSWER_OPEN, ANSWER_CLOSE, "answer")
    for found in (call, answer):
        if isinstance(found, ParseError):
            return found
    if call is not None and answer is not None:
        return ParseError(
            "call_and_stop",
            f"the reply holds both a tool call and an answer; write either one {CALL_OPEN}...{CALL_CLOSE} or {ANSWER_OPEN}...{ANSWER_CLOSE}.",
        )
    if answer is not None:
        return Stop(answer.strip())
    if call is None:
        return ParseError(
            "no_action",
            f'no tool call found; write {CALL_OPEN}{{"name": ..., "arguments": {{...}}}}{CALL_CLOSE} or {ANSWER_OPEN}{DEFAULT_ANSWER}{ANSWER_CLOSE}.',
        )
    return _parse_call(call, {schema["name"]: schema for schema in tool_schemas})


def _tagged(text: str, open_tag: str, close_tag: str, what: str) -> str | ParseError | None:
    """The text between the one pair of tags, None without tags, or what is wrong with them."""
    opens, closes = text.count(open_tag), text.count(close_tag)
    if opens == 0 and closes == 0:
        return None
    if opens > 1 or closes > 1:
        return ParseError(
            "multiple_tags", f"found {max(opens, closes)} {open_tag} tags; write exactly one {what} per reply."
        )
    if closes == 0:
        return ParseError("unclosed_tag", f"{open_tag} is not closed by {close_tag}.")
    start, end = text.find(open_tag), text.find(close_tag)
    if opens == 0 or end < start:
        return ParseError("unclosed_tag", f"{close_tag} without a {open_tag} before it.")
    return text[start + len(open_tag) : end]


def _parse_call(body: str, schemas: dict[str, Mapping]) -> ToolCall | ParseError:
    try:
        data = json.loads(body, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except (ValueError, RecursionError) as err:
        return ParseError("bad_json", f"the tool call is not valid JSON ({_short(err)}).")
    if not isinstance(data, dict):
        return ParseError(
            "not_an_object",
            f'the tool call must be a JSON object {{"name": ..., "arguments": {{...}}}}, got a JSON {json_schema.json_type(data)}.',
        )
    extra = sorted(set(data) - {"name", "arguments"})
    if extra:
        return ParseError(
            "not_an_object",
            f'unexpected key(s) {", ".join(map(repr, extra))} in the tool call; only "name" and "arguments" are allowed.',
        )
    name = data.get("name")
    if not isinstance(name, str) or not name:
        return ParseError("missing_name", 'the tool call has no "name" (a string naming a tool).')
    if name not in schemas:
        return ParseError("unknown_tool", unknown_name("tool", json_schema.clip(name), sorted(schemas)) + ".")
    arguments = data.get("arguments", {})
    if not isinstance(arguments, dict):
        return ParseError(
            "bad_arguments",
            f'"arguments" of {name!r} must be a JSON object, got a JSON {json_schema.json_type(arguments)}.',
        )
    problem = check_arguments(name, schemas[name].get("parameters") or {}, arguments)
    return problem or ToolCall(name, arguments)


def check_arguments(tool_name: str, parameters: Mapping, arguments: Mapping) -> ParseError | None:
    """What is wrong with ``arguments`` against a tool's JSON schema, or None (``tir.json_schema``:
    unknown arguments are refused unless the schema says ``"additionalProperties": true``)."""
    problem = json_schema.check_arguments(tool_name, parameters, arguments)
    return ParseError(problem.kind, problem.message + ".") if problem else None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)  # linear: a duplicate shows as fewer keys than pairs
    if len(out) != len(pairs):
        seen: set[str] = set()
        duplicates = sorted({key for key, _ in pairs if key in seen or seen.add(key)})
        raise ValueError(f"duplicate key {json_schema.clip(duplicates[0])!r}")
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# ---------------------------------------------------------------- small helpers


def _check_schema(schema: Mapping) -> Mapping:
    if not isinstance(schema, Mapping) or not isinstance(schema.get("name"), str):
        raise ValueError(f'a tool schema must be a dict with "name", "description" and "parameters", got {schema!r}')
    return schema


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _image(image: Any) -> dict:
    return {"type": "image"} if image is None else {"type": "image", "image": image}


def _size(image_size: tuple[int, int]) -> str:
    width, height = image_size
    return f"{int(width)}x{int(height)}"


def _with_cues(text: str, cues: Mapping[str, float] | str | None) -> str:
    if not cues:
        return text
    return f"{text} Measured cues: {cues if isinstance(cues, str) else format_cues(cues)}."


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if float(value).is_integer() or abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _short(err: Exception) -> str:
    return json_schema.clip(str(err), 120)
