"""The multi-turn restoration environment: a photo, a pool of tools, and a policy's replies.

State: the current image, the chat so far (HF messages with image placeholders; the images
travel beside them in ``images_shown``) and the record of every tool call. ``step`` takes the
policy's reply text (or an already parsed action): a tool call runs through the pool and the new
image becomes the current one; a malformed reply or a failing tool becomes an error observation
(text only, the image unchanged) and is counted, never raised. The answer tag, the turn limit
and the format-error limit end the episode; the final image is the current one.

Training-free baselines use the same object: ``try_tool`` runs a call on the current image
without taking a turn (exploration, still recorded and timed), ``commit`` makes one of those
outputs the next turn, ``undo`` rolls the last turn back.

Size limits (``max_side``, ``max_pixels``; a recipe's ``env`` section): a call whose output would
exceed them (the input's sides times the tool's ``scale``, 4 for super-resolution) is refused
before it runs, as a tool-error observation (``error_kind`` "too_large"); an output that exceeds
them anyway is refused the same way. So repeated super-resolution cannot grow the image without
bound.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tir.agent import prompts
from tir.agent.perceive import Perception
from tir.imaging import check_image
from tool_pool.execution import PoolError

# Why an episode ended (the agent loop adds "max_length").
STOP_REASONS = ("answer", "max_turns", "parse_error_limit", "max_length")

# A perception-cue function: image -> {cue: value} or a rendered line, shown beside the image; or
# an async one, (image, pool) -> line, for perceptions the pool serves (tir.agent.perceive).
Cues = Callable[..., "Mapping[str, float] | str"]

# The largest image a tool call may produce: sides and pixels (4096 x 4096, 16.8 Mpx).
MAX_SIDE = 4096
MAX_PIXELS = 4096 * 4096


@dataclass
class Observation:
    """What the policy sees next: one chat message and the image it shows (None: text only)."""

    message: dict
    image: np.ndarray | None = None


@dataclass
class StepResult:
    observation: Observation | None  # None once the episode is over: nothing more is shown
    done: bool
    stop_reason: str | None = None
    action: prompts.Action | None = None
    call: dict | None = None  # the tool-call record, when the step called a tool


def perception_cues(
    names: Sequence[str] | None = None, style: str = "full", perception: Perception | None = None
) -> Cues:
    """The measured cues of ``tir.data.perception`` and the degradations ``perception`` guesses
    (default: the cue thresholds), one line per image (``style``: see ``tir.data.perception.observe``)."""
    from tir.data.perception import CUE_STYLES, observe

    if style not in CUE_STYLES:
        raise ValueError(f"cue style {style!r} unknown; expected one of {CUE_STYLES}")
    if perception is None or perception.kind == "thresholds":
        if style == "confidence":
            raise ValueError(
                "cue style 'confidence' needs the learned perception (the cue thresholds have no confidence)"
            )
        return lambda image: observe(image, names, style)

    async def learned(image: np.ndarray, pool, after_call: bool = False) -> str:
        return await perception.observe(image, pool, names, style, after_call)

    return learned


def recipe_cues(model_cfg) -> Cues | None:
    """The cues a recipe's ``model`` section asks for (``perception_cues``, ``cue_style``,
    ``perception``), or None."""
    if not model_cfg.perception_cues:
        return None
    return perception_cues(style=model_cfg.cue_style, perception=Perception.from_recipe(model_cfg))


def recipe_limits(cfg) -> dict:
    """``{"max_side", "max_pixels"}`` from a recipe's ``env`` section (the defaults where absent)."""
    section = cfg.get("env") if cfg is not None else None
    section = section if section is not None else {}
    return {
        "max_side": int(section.get("max_side") or MAX_SIDE),
        "max_pixels": int(section.get("max_pixels") or MAX_PIXELS),
    }


def tool_scale(name: str) -> int:
    """Output side / input side of the registered tool ``name`` (1 when it is not registered here)."""
    from tool_pool.tools import get_tool

    try:
        return int(getattr(get_tool(name), "scale", 1) or 1)
    except KeyError:
        return 1


class RestorationEnv:
    """One episode at a time: ``await reset(lq)``, then ``await step(reply)`` until ``done``."""

    def __init__(
        self,
        pool,
        tool_schemas: Sequence[Mapping],
        max_turns: int = 4,
        max_format_errors: int = 3,
        cues: Cues | None = None,
        max_side: int = MAX_SIDE,
        max_pixels: int = MAX_PIXELS,
        tool_scales: Mapping[str, int] | None = None,
    ):
        if max_turns < 1 or max_format_errors < 1:
            raise ValueError(f"max_turns and max_format_errors must be >= 1, got {max_turns} and {max_format_errors}")
        if max_side < 1 or max_pixels < 1:
            raise ValueError(f"max_side and max_pixels must be >= 1, got {max_side} and {max_pixels}")
        self.max_side, self.max_pixels = int(max_side), int(max_pixels)
        self.tool_scales = dict(tool_scales or {})  # name -> scale; others: the registered tool's
        if not tool_schemas:
            raise ValueError("RestorationEnv needs at least one tool schema")
        self.pool, self.tool_schemas = pool, list(tool_schemas)
        self.max_turns, self.max_format_errors, self.cues = max_turns, max_format_errors, cues
        self.image: np.ndarray | None = None

    # ------------------------------------------------------------ the policy's path

    async def reset(self, image: np.ndarray) -> Observation:
        """Start an episode on ``image`` (uint8 HxWx3): the system prompt and the user turn."""
        self.image = check_image(image, "the episode's image")
        self.messages = [prompts.system_message(self.tool_schemas)]
        self.images_shown: list[np.ndarray] = []
        self.tool_calls: list[dict] = []  # every execution, committed or explored
        self.format_error_kinds: list[str] = []
        self.log: list[dict] = []  # one entry per turn: what happened, and the image it produced
        self.turns, self.done, self.stop_reason = 0, False, None
        self._undo: list[tuple[np.ndarray, int, int]] = []  # (image, messages, images shown) before each turn
        message = prompts.user_message(prompts.image_size(self.image), await self._cues(self.image))
        return self._show(Observation(message, self.image))

    async def step(self, reply: str | prompts.Action) -> StepResult:
        """One policy turn: parse (if text), act, and say what the policy sees next."""
        if self.image is None or self.done:
            raise RuntimeError("step() after the episode ended (or before reset())")
        action = prompts.parse_action(reply, self.tool_schemas) if isinstance(reply, str) else reply
        text = reply if isinstance(reply, str) else _action_text(action)
        self._undo.append((self.image, len(self.messages), len(self.images_shown)))
        self.messages.append(prompts.assistant_message(text))
        self.turns += 1
        if isinstance(action, prompts.Stop):
            self._log("answer", answer=action.answer)
            return self._end("answer", action)
        if isinstance(action, prompts.ParseError):
            self.format_error_kinds.append(action.kind)
            self._log("format_error", error_kind=action.kind, message=action.message)
            if len(self.format_error_kinds) >= self.max_format_errors:
                return self._end("parse_error_limit", action)
            if self.turns >= self.max_turns:
                return self._end("max_turns", action)
            return self._continue(Observation(prompts.error_message(action)), action)
        output, record = await self._execute(action)
        if output is not None:
            self.image = output
        self._log("tool" if output is not None else "tool_error", call=record, image=output)
        if self.turns >= self.max_turns:
            return self._end("max_turns", action, record)
        if output is None:
            return self._continue(
                Observation(prompts.error_message(f"tool {action.name!r} failed: {record['error']}")), action, record
            )
        message = prompts.tool_message(
            action.name, prompts.image_size(output), await self._cues(output, after_call=True)
        )
        return self._continue(Observation(message, output), action, record)

    # ------------------------------------------------------------ the baselines' path

    async def try_tool(self, call: prompts.ToolCall, image: np.ndarray | None = None) -> np.ndarray | None:
        """Run ``call`` on ``image`` (default: the current one) without taking a turn; the output,
        or None when the tool failed. Recorded in ``tool_calls`` (``committed`` False)."""
        output, _ = await self._execute(call, image, committed=False)
        return output

    async def commit(self, call: prompts.ToolCall, output: np.ndarray) -> StepResult:
        """Take a turn whose tool output was already computed by ``try_tool``."""
        if self.image is None or self.done:
            raise RuntimeError("commit() after the episode ended (or before reset())")
        explored = [
            r
            for r in self.tool_calls
            if r["name"] == call.name and r["arguments"] == call.arguments and r["ok"] and not r["committed"]
        ]
        if not explored:
            raise ValueError(f"commit(): no successful try_tool of {call.name!r} with {call.arguments} to commit")
        explored[-1]["committed"] = True  # the exploration that produced it now counts as the turn
        self._undo.append((self.image, len(self.messages), len(self.images_shown)))
        self.messages.append(prompts.assistant_message(prompts.format_call(call)))
        self.turns += 1
        self.image = check_image(output, f"the output of {call.name!r} to commit")
        self._log("tool", call=explored[-1], image=self.image)
        if self.turns >= self.max_turns:
            return self._end("max_turns", call)
        message = prompts.tool_message(call.name, prompts.image_size(output), await self._cues(output, after_call=True))
        return self._continue(Observation(message, output), call)

    def undo(self) -> None:
        """Roll the last turn back: its image, messages, log entry and turn count (tool calls and
        format errors stay counted: they were paid for)."""
        if not self._undo:
            raise RuntimeError("undo(): no turn to roll back")
        self.image, n_messages, n_images = self._undo.pop()
        del self.messages[n_messages:]
        del self.images_shown[n_images:]
        self.log.pop()
        self.turns -= 1
        self.done, self.stop_reason = False, None

    async def finish(self) -> StepResult:
        """End the episode with the answer tag (baselines that decide they are done)."""
        return await self.step(prompts.Stop())

    # ------------------------------------------------------------ summaries

    @property
    def format_errors(self) -> int:
        return len(self.format_error_kinds)

    def summary(self) -> dict:
        """What an episode reports, beside the trajectory itself."""
        return {
            "final_image": self.image,
            "tool_calls": list(self.tool_calls),
            "num_turns": self.turns,
            "num_tool_calls": len(self.tool_calls),
            "format_errors": self.format_errors,
            "tool_errors": sum(1 for call in self.tool_calls if not call["ok"]),
            "stop_reason": self.stop_reason,
        }

    # ------------------------------------------------------------ internals

    async def _execute(self, call: prompts.ToolCall, image: np.ndarray | None = None, committed: bool = True):
        """Run one tool call through the pool; a PoolError becomes a failed record."""
        started = time.perf_counter()
        record = {
            "name": call.name,
            "arguments": dict(call.arguments),
            "ok": True,
            "error_kind": None,
            "error": None,
            "committed": committed,
        }
        source = self.image if image is None else image
        try:
            scale = self.tool_scales.get(call.name) or tool_scale(call.name)
            refusal = self._too_large(call.name, source.shape[0] * scale, source.shape[1] * scale)
            if refusal:
                raise _TooLarge(refusal)
            output = check_image(
                await self.pool.run(call.name, source, **call.arguments), f"the output of {call.name!r}"
            )
            refusal = self._too_large(call.name, *output.shape[:2])
            if refusal:
                raise _TooLarge(refusal)
        except PoolError as err:
            output, record["ok"], record["error_kind"], record["error"] = (
                None,
                False,
                err.kind,
                str(err).split("] ", 1)[-1],
            )
        except _TooLarge as err:  # refused by the size limits: never run, or its output dropped
            output, record["ok"], record["error_kind"], record["error"] = None, False, "too_large", str(err)
        except ValueError as err:  # the tool returned something that is not an image
            output, record["ok"], record["error_kind"], record["error"] = None, False, "tool_failed", str(err)
        record["seconds"] = time.perf_counter() - started
        self.tool_calls.append(record)
        return output, record

    def _too_large(self, name: str, height: int, width: int) -> str | None:
        """Why an output of ``height`` x ``width`` is refused, or None when it fits the limits."""
        if max(height, width) <= self.max_side and height * width <= self.max_pixels:
            return None
        return (
            f"refused: {name!r} would make the image {width}x{height}, over the limit of "
            f"{self.max_side} px a side and {self.max_pixels} pixels; the image is unchanged"
        )

    async def _cues(self, image: np.ndarray, after_call: bool = False):
        if self.cues is None:
            return None
        if inspect.iscoroutinefunction(self.cues):  # a perception the pool serves; it reads tool outputs apart
            return await self.cues(image, self.pool, after_call=after_call)
        # a few ms of numpy/OpenCV: off the event loop, so other trajectories keep moving
        return await asyncio.to_thread(self.cues, image)

    def _log(self, kind: str, call: dict | None = None, image: np.ndarray | None = None, **details) -> None:
        entry = {"turn": self.turns, "kind": kind, "image": image, **details}
        if call is not None:
            entry.update(
                name=call["name"],
                arguments=call["arguments"],
                seconds=call["seconds"],
                error_kind=call["error_kind"],
                message=call["error"],
            )
        self.log.append(entry)

    def _show(self, observation: Observation) -> Observation:
        self.messages.append(observation.message)
        if observation.image is not None:
            self.images_shown.append(observation.image)
        return observation

    def _continue(self, observation: Observation, action, record: dict | None = None) -> StepResult:
        return StepResult(self._show(observation), False, None, action, record)

    def _end(self, reason: str, action, record: dict | None = None) -> StepResult:
        self.done, self.stop_reason = True, reason
        return StepResult(None, True, reason, action, record)


class _TooLarge(Exception):
    """A tool call refused by the size limits."""


def _action_text(action: prompts.Action) -> str:
    if isinstance(action, prompts.ToolCall):
        return prompts.format_call(action)
    if isinstance(action, prompts.Stop):
        return prompts.format_stop(action)
    return action.message
