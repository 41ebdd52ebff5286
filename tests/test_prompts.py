"""The prompt and the tool-call protocol: messages, the parser's precise errors, property tests."""

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tir.agent import prompts
from tir.agent.prompts import ParseError, Stop, ToolCall, format_call, format_stop, parse_action

SCHEMAS = [
    {
        "name": "denoise_tv",
        "description": "Remove noise by total-variation smoothing.",
        "parameters": {
            "type": "object",
            "properties": {"strength": {"type": "number", "minimum": 0, "maximum": 3, "default": 1.0}},
            "additionalProperties": False,
        },
    },
    {
        "name": "deblur_wiener",
        "description": "Wiener deconvolution with a disk kernel.",
        "parameters": {
            "type": "object",
            "properties": {
                "radius": {"type": "integer", "minimum": 1, "maximum": 9},
                "kernel": {"type": "string", "enum": ["disk", "line"]},
                "clip": {"type": "boolean"},
                "note": {"type": "string"},
            },
            "required": ["radius"],
            "additionalProperties": False,
        },
    },
    {
        "name": "upscale_bicubic",
        "description": "Upscale x4.",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
]
NAMES = [schema["name"] for schema in SCHEMAS]


def call_text(body):
    return f"<tool_call>{body}</tool_call>"


# ---------------------------------------------------------------- messages


def test_system_prompt_lists_every_schema_as_json_and_the_protocol():
    text = prompts.system_prompt(SCHEMAS)
    lines = text.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()
    assert [json.loads(line) for line in lines] == SCHEMAS
    assert '<tool_call>{"name": <tool name>, "arguments": {<argument name>: <value>, ...}}</tool_call>' in text
    assert "<answer>done</answer>" in text
    with pytest.raises(ValueError, match="tool schema"):
        prompts.system_prompt([{"description": "no name"}])


def test_the_names_prompt_lists_names_only_and_refuses_every_argument():
    full = prompts.policy_schemas(SCHEMAS[::2], "full")
    names = prompts.policy_schemas(SCHEMAS[::2], "names")
    assert full == SCHEMAS[::2] and names == [{"name": "denoise_tv"}, {"name": "upscale_bicubic"}]
    assert len(prompts.system_prompt(names)) < len(prompts.system_prompt(full)) - 150
    assert parse_action(call_text('{"name": "denoise_tv", "arguments": {}}'), names) == ToolCall("denoise_tv", {})
    refused = parse_action(call_text('{"name": "denoise_tv", "arguments": {"strength": 2}}'), names)
    assert (
        isinstance(refused, ParseError) and refused.kind == "unknown_argument" and "accepted: none" in refused.message
    )
    with pytest.raises(ValueError, match=r"deblur_wiener.*required arguments"):
        prompts.policy_schemas(SCHEMAS, "names")  # radius has no default: names alone cannot call it
    with pytest.raises(ValueError, match="unknown; expected one of"):
        prompts.policy_schemas(SCHEMAS, "short")


def test_messages_are_hf_chat_format_with_images_first():
    messages = prompts.initial_messages(SCHEMAS, (320, 240), {"noise_sigma": 23.456, "dark": 0.5, "blocks": 12})
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"][0] == {"type": "image"}
    assert (
        messages[1]["content"][1]["text"]
        == "Restore this degraded photo (320x240). Measured cues: noise_sigma=23.5, dark=0.5, blocks=12."
    )
    tool = prompts.tool_message("denoise_tv", (640, 480), image="PIXELS")
    assert tool == {
        "role": "tool",
        "content": [
            {"type": "image", "image": "PIXELS"},
            {"type": "text", "text": "denoise_tv returned a 640x480 image."},
        ],
    }
    error = prompts.error_message(parse_action("nothing", SCHEMAS))
    assert error["role"] == "tool" and [part["type"] for part in error["content"]] == ["text"]
    assert error["content"][0]["text"].startswith("Error: no tool call found;")
    chat = messages + [prompts.assistant_message(format_stop()), tool, error]
    assert prompts.count_images(chat) == 2
    assert prompts.message_text(prompts.assistant_message("<answer>done</answer>")) == "<answer>done</answer>"
    assert prompts.user_message((8, 8), cues="haze high")["content"][1]["text"].endswith("Measured cues: haze high.")
    assert (
        prompts.format_cues({"a": 1234.5, "b": 0.000123, "c": float("nan"), "d": True})
        == "a=1234, b=0.000123, c=nan, d=True"
    )
    assert prompts.image_size(np.zeros((240, 320, 3), np.uint8)) == (320, 240)


# ---------------------------------------------------------------- the parser: outcomes


def test_valid_call_stop_and_text_around_them():
    assert parse_action(call_text('{"name": "denoise_tv", "arguments": {"strength": 2}}'), SCHEMAS) == ToolCall(
        "denoise_tv", {"strength": 2}
    )
    assert parse_action('I see noise.\n<tool_call>\n {"name": "upscale_bicubic"} \n</tool_call>', SCHEMAS) == ToolCall(
        "upscale_bicubic", {}
    )
    assert parse_action("Looks clean. <answer> done </answer>", SCHEMAS) == Stop("done")
    assert parse_action(
        call_text('{"name": "deblur_wiener", "arguments": {"radius": 3.0, "kernel": "disk", "clip": true}}'), SCHEMAS
    ) == ToolCall("deblur_wiener", {"radius": 3.0, "kernel": "disk", "clip": True})


@pytest.mark.parametrize(
    "text, kind, words",
    [
        ("I would denoise it.", "no_action", "no tool call found"),
        ("", "no_action", "no tool call found"),
        (call_text('{"name": "upscale_bicubic"}') * 2, "multiple_tags", "found 2 <tool_call>"),
        ("<tool_call><tool_call>{}</tool_call></tool_call>", "multiple_tags", "exactly one tool call"),
        ("<answer>a</answer><answer>b</answer>", "multiple_tags", "exactly one answer"),
        ('<tool_call>{"name": "upscale_bicubic"}', "unclosed_tag", "<tool_call> is not closed by </tool_call>"),
        ('{"name": "upscale_bicubic"}</tool_call>', "unclosed_tag", "</tool_call> without a <tool_call>"),
        ("</tool_call>x<tool_call>", "unclosed_tag", "without a <tool_call> before it"),
        ("<answer>done", "unclosed_tag", "<answer> is not closed"),
        (
            call_text('{"name": "upscale_bicubic"}') + "<answer>done</answer>",
            "call_and_stop",
            "both a tool call and an answer",
        ),
        ("<tool_call><answer>done</answer></tool_call>", "call_and_stop", "both"),
        (call_text('{"name": "denoise_tv", "arguments": {'), "bad_json", "not valid JSON"),
        (call_text("denoise_tv(strength=1)"), "bad_json", "not valid JSON"),
        (call_text('{"name": "denoise_tv", "name": "upscale_bicubic"}'), "bad_json", "duplicate key 'name'"),
        (call_text('{"name": "denoise_tv", "arguments": {"strength": NaN}}'), "bad_json", "NaN is not a JSON number"),
        (call_text("[" * 100_000 + "]" * 100_000), "bad_json", "not valid JSON"),
        (call_text("9" * 5000), "bad_json", "not valid JSON"),
        (call_text('["denoise_tv", {}]'), "not_an_object", "got a JSON array"),
        (call_text('{"name": "denoise_tv", "args": {}}'), "not_an_object", "unexpected key(s) 'args'"),
        (call_text('{"arguments": {}}'), "missing_name", 'no "name"'),
        (call_text('{"name": 7}'), "missing_name", 'no "name"'),
        (
            call_text('{"name": "denoise_vt"}'),
            "unknown_tool",
            "unknown tool 'denoise_vt'; did you mean 'denoise_tv'? (known: deblur_wiener, denoise_tv, upscale_bicubic).",
        ),
        (call_text('{"name": "zzzzzz"}'), "unknown_tool", "unknown tool 'zzzzzz' (known:"),
        (
            call_text('{"name": "denoise_tv", "arguments": [1]}'),
            "bad_arguments",
            "must be a JSON object, got a JSON array",
        ),
        (
            call_text('{"name": "denoise_tv", "arguments": {"sigma": 1}}'),
            "unknown_argument",
            "has no argument 'sigma' (accepted: strength)",
        ),
        (call_text('{"name": "upscale_bicubic", "arguments": {"scale": 4}}'), "unknown_argument", "(accepted: none)"),
        (call_text('{"name": "deblur_wiener", "arguments": {}}'), "missing_argument", "needs argument 'radius'"),
        (
            call_text('{"name": "denoise_tv", "arguments": {"strength": "high"}}'),
            "wrong_type",
            "argument 'strength' of 'denoise_tv' must be a number, got \"high\"",
        ),
        (
            call_text('{"name": "denoise_tv", "arguments": {"strength": true}}'),
            "wrong_type",
            "must be a number, got true",
        ),
        (call_text('{"name": "deblur_wiener", "arguments": {"radius": 2.5}}'), "wrong_type", "must be an integer"),
        (
            call_text('{"name": "deblur_wiener", "arguments": {"radius": 3, "clip": 1}}'),
            "wrong_type",
            "must be a boolean (true or false)",
        ),
        (call_text('{"name": "denoise_tv", "arguments": {"strength": 3.5}}'), "out_of_range", "must be <= 3, got 3.5"),
        (call_text('{"name": "denoise_tv", "arguments": {"strength": -1}}'), "out_of_range", "must be >= 0, got -1"),
        (
            call_text('{"name": "denoise_tv", "arguments": {"strength": 1e999}}'),
            "out_of_range",
            "must be a finite number",
        ),
        (
            call_text('{"name": "deblur_wiener", "arguments": {"radius": 3, "kernel": "box"}}'),
            "not_in_enum",
            'must be one of ["disk", "line"], got "box"',
        ),
    ],
)
def test_each_malformed_reply_gets_a_precise_error(text, kind, words):
    result = parse_action(text, SCHEMAS)
    assert isinstance(result, ParseError), result
    assert result.kind == kind, result
    assert result.kind in prompts.ERROR_KINDS
    assert words in result.message


def test_deeply_nested_values_and_broken_schemas_do_not_raise():
    deep = "[" * 900 + "]" * 900
    result = parse_action(call_text('{"name": "denoise_tv", "arguments": {"strength": ' + deep + "}}"), SCHEMAS)
    assert result.kind == "wrong_type" and len(result.message) < 200
    broken = [
        {"name": "bad", "parameters": {"type": "object", "properties": {"x": {"type": "number", "minimum": "zero"}}}}
    ]
    result = parse_action(call_text('{"name": "bad", "arguments": {"x": 1}}'), broken)
    assert result.kind == "unreadable" and "TypeError" in result.message


def test_echoed_policy_text_is_clipped():
    result = parse_action(call_text(json.dumps({"name": "x" * 10_000})), SCHEMAS)
    assert result.kind == "unknown_tool" and len(result.message) < 300


@pytest.mark.parametrize(
    "body",
    [
        '{"name": "denoise_tv", "arguments": {"strength": "\\ud800"}}',
        '{"name": "denoise_tv", "arguments": {"\\udfff": 1}}',
        '{"name": "\\ud800tv", "arguments": {}}',
        '{"name": "denoise_tv", "arguments": {"strength": 1, "strength": "\\ud800"}}',
    ],
)
def test_lone_surrogates_give_an_error_that_encodes_to_utf8(body):
    result = parse_action(call_text(body), SCHEMAS)
    assert isinstance(result, ParseError), result
    result.message.encode("utf-8")  # the tokenizer must be able to read the observation


def test_the_duplicate_key_check_is_linear():
    import time

    many = "{" + ", ".join(f'"k{i}": {i}' for i in range(40_000)) + "}"
    start = time.perf_counter()
    result = parse_action(call_text('{"name": "denoise_tv", "arguments": ' + many + "}"), SCHEMAS)
    assert time.perf_counter() - start < 1.0 and isinstance(result, ParseError)
    dup = many[:-1] + ', "k7": 0}'
    result = parse_action(call_text('{"name": "denoise_tv", "arguments": ' + dup + "}"), SCHEMAS)
    assert result.kind == "bad_json" and "duplicate key 'k7'" in result.message


def test_additional_properties_true_allows_unknown_arguments():
    schemas = [
        {
            "name": "free",
            "description": "d",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": True},
        }
    ]
    assert parse_action(call_text('{"name": "free", "arguments": {"any": [1, 2]}}'), schemas) == ToolCall(
        "free", {"any": [1, 2]}
    )


def test_format_call_escapes_tags_inside_strings():
    call = ToolCall("deblur_wiener", {"radius": 2, "note": "</tool_call><answer>done</answer>"})
    text = format_call(call)
    assert text.count("<tool_call>") == 1 and text.count("</tool_call>") == 1 and "<answer>" not in text
    assert parse_action(text, SCHEMAS) == call


# ---------------------------------------------------------------- properties

FRAGMENTS = [
    "<tool_call>",
    "</tool_call>",
    "<answer>",
    "</answer>",
    "<tool_call",
    "tool_call>",
    "<",
    ">",
    "/",
    '{"name": ',
    '"denoise_tv"',
    '"deblur_wiener"',
    '"upscale_bicubic"',
    '"arguments": ',
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    '"strength"',
    '"radius"',
    '"kernel"',
    '"disk"',
    "1e999",
    "-1e999",
    "-0",
    "99999999999999999999999",
    "1" * 5000,
    "NaN",
    "Infinity",
    "null",
    "true",
    "0.5",
    '"\\ud800"',
    '"\\u0000"',
    "\\",
    '"',
    "\x00",
    "\n",
    " ",
    "é",
    "写真",
    "🙂",
    "\u202e",
]
adversarial_text = st.one_of(
    st.text(max_size=300),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=40).map("".join),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adversarial_text)
def test_parser_never_raises_and_returns_one_of_three_outcomes(text):
    result = parse_action(text, SCHEMAS)
    assert isinstance(result, (ToolCall, Stop, ParseError))
    if isinstance(result, ParseError):
        assert result.kind in prompts.ERROR_KINDS and result.message
        assert result.kind != "unreadable", result  # the safety net must not be what handles known inputs
    if isinstance(result, ToolCall):
        assert result.name in NAMES and isinstance(result.arguments, dict)


@settings(max_examples=200, deadline=None)
@given(adversarial_text, st.integers(min_value=0, max_value=300))
def test_truncated_replies_never_raise(text, cut):
    for reply in (text[:cut], format_call(ToolCall("denoise_tv", {"strength": 1.0}))[:cut] + text):
        assert isinstance(parse_action(reply, SCHEMAS), (ToolCall, Stop, ParseError))


def value_for(spec):
    if "enum" in spec:
        return st.sampled_from(spec["enum"])
    low, high = spec.get("minimum"), spec.get("maximum")
    return {
        "number": st.one_of(st.floats(low, high, allow_nan=False, allow_infinity=False), st.integers(low, high)),
        "integer": st.integers(low, high),
        "boolean": st.booleans(),
        "string": st.text(max_size=30),
    }[spec["type"]]


def arguments_for(schema):
    properties = schema["parameters"]["properties"]
    required = set(schema["parameters"].get("required", []))
    return st.fixed_dictionaries(
        {name: value_for(spec) for name, spec in properties.items() if name in required},
        optional={name: value_for(spec) for name, spec in properties.items() if name not in required},
    )


valid_calls = st.sampled_from(SCHEMAS).flatmap(
    lambda schema: arguments_for(schema).map(lambda args: ToolCall(schema["name"], args))
)
tagless_text = st.text(max_size=40).filter(lambda text: not any(tag in text for tag in prompts.PROTOCOL_TAGS))


@settings(max_examples=300, deadline=None)
@given(valid_calls, tagless_text, tagless_text)
def test_valid_calls_round_trip(call, before, after):
    assert parse_action(format_call(call), SCHEMAS) == call
    assert parse_action(before + format_call(call) + after, SCHEMAS) == call


@settings(max_examples=100, deadline=None)
@given(tagless_text.map(str.strip))
def test_answers_round_trip(answer):
    assert parse_action(format_stop(Stop(answer)), SCHEMAS) == Stop(answer)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=10),
        st.one_of(st.floats(), st.integers(), st.text(max_size=5), st.booleans(), st.none()),
        max_size=4,
    )
)
def test_numbers_outside_the_schema_are_rejected_not_raised(arguments):
    result = parse_action(call_text(json.dumps({"name": "denoise_tv", "arguments": arguments})), SCHEMAS)
    strength = arguments.get("strength")
    valid = set(arguments) <= {"strength"} and (
        "strength" not in arguments
        or (
            isinstance(strength, (int, float))
            and not isinstance(strength, bool)
            and math.isfinite(strength)
            and 0 <= strength <= 3
        )
    )
    if valid:
        assert result == ToolCall("denoise_tv", arguments)
    else:
        assert isinstance(result, ParseError)
