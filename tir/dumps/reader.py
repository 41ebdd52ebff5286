"""Reading rollout dumps back: the files of a run, one step's ``Batch``, light per-trajectory records.

Everything that reads dumps (``tir dumps summary``, ``tir dumps view``, tests) goes through here.

The dump schema
---------------
One Parquet file per RL step, ``DIR/step_NNNNNN.parquet`` (``tir.dumps.writer``), one row per trajectory
(a GRPO group is ``rollout.n`` adjacent rows). Image columns are ``struct<height, width, pixels:
large_binary>`` (uint8 RGB, row-major); ``json`` columns are JSON strings (the field metadata
``tir.kind`` says which kind a column is). The sample's columns:

- ``image_id``: the HQ photo's name; ``combo``: the degradation combination ("noise+jpeg");
  ``group``: its group in the recipe; ``degradations``: list of names; ``params`` (json): each
  degradation's sampled parameters; ``depth_source``, ``seed``, ``crop_box``: how it was made;
- ``lq`` (image): the degraded photo the episode started from; ``hq`` (image): the clean reference.

The trajectory (``tir.agent.loop.rollout``):

- ``input_ids``: every token of the chat (prompt, replies, observations); ``loss_mask``: 1 on the
  policy's own tokens; ``rollout_logprobs``: the sampler's log-prob of each policy token (0 elsewhere);
  ``prompt_length``: tokens before the first reply;
- ``images`` (list of images): every image the policy saw, in order (the LQ first, then each
  successful tool call's output that was shown); ``final_image`` (image): the episode's result;
- ``tool_calls`` (json): one record per executed call: name, arguments, ok, error_kind, error,
  seconds, committed (False: explored by a baseline, not a turn);
- ``num_turns``, ``num_tool_calls``, ``format_errors``, ``tool_errors``: counts; ``stop_reason``:
  answer | max_turns | parse_error_limit | max_length | error; ``error``: "" unless the episode crashed;
- ``messages`` (json): the chat as ``{role, text, image}`` records (image: the turn showed one; the
  shown images are ``images`` in order); ``timings`` (json): wall_s, generate_s, env_s, tool_s, spans.

The reward (``tir.dumps.writer.step_dump``):

- ``final_scores`` / ``input_scores`` (json): ``{metric: value}`` of the final image and of the LQ,
  each against the HQ;
- ``reward``: the scalar reward; ``reward_terms`` (json): quality, format and tool terms, and per
  metric its raw ``gain``, group-``normalized`` gain and ``contribution`` (weight x normalized);
- ``reward_weights`` (json): the metric weights of this step (adaptive: they move step to step);
- ``advantage``: the GRPO advantage; ``ref_logprobs`` / ``old_logprobs``: per-token log-probs of
  the reference and of the policy before the update, when the run computed them.

The file's schema metadata ``tir.meta`` (json) holds ``step``, ``config_hash``, ``reward_weights``,
``wall_s`` and the sample set's settings. Reading a dump without tir::

    import json, numpy as np, pyarrow.parquet as pq
    table = pq.read_table("runs/x/rl/dumps/step_000012.parquet", columns=["combo", "reward", "tool_calls", "lq"])
    meta = json.loads(table.schema.metadata[b"tir.meta"])          # {"step": 12, ...}
    df = table.drop(["lq"]).to_pandas()
    df["tool_calls"] = df["tool_calls"].map(json.loads)              # json columns are strings
    lq = table.column("lq")[0].as_py()                               # one image: a dict
    photo = np.frombuffer(lq["pixels"], np.uint8).reshape(lq["height"], lq["width"], 3)

or with tir: ``tir.dumps.reader.read_dump(folder, step).column("tool_calls")`` (decoded).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from tir.protocol import Batch

_NAME = "step_{:06d}.parquet"
_PATTERN = re.compile(r"step_(\d+)\.parquet$")


def dump_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / _NAME.format(step)


def list_dumps(folder: str | Path) -> dict[int, Path]:
    """Step -> file, for every dump in ``folder``, in step order."""
    found = {}
    for path in Path(folder).glob("step_*.parquet"):
        match = _PATTERN.search(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def read_dump(folder: str | Path, step: int, columns: list[str] | None = None) -> Batch:
    path = dump_path(folder, step)
    if not path.is_file():
        steps = list(list_dumps(folder))
        raise FileNotFoundError(
            f"no dump of step {step} in {folder} (dumped steps: {steps[:5]}{'...' if len(steps) > 5 else ''})"
        )
    return Batch.from_parquet(path, columns=columns)


# Columns the summary reads (never the images); those absent from a dump are skipped.
SUMMARY_COLUMNS = (
    "image_id",
    "combo",
    "tool_calls",
    "num_turns",
    "num_tool_calls",
    "format_errors",
    "tool_errors",
    "stop_reason",
    "error",
    "final_scores",
    "input_scores",
    "reward",
    "reward_terms",
    "reward_weights",
    "advantage",
)


REQUIRED_COLUMNS = ("combo", "tool_calls", "num_turns", "stop_reason")


class DumpError(ValueError):
    """A dump folder or file that cannot be analysed; the message names it."""


def dump_files(folder: str | Path, steps: Sequence[int] | None = None) -> dict[int, Path]:
    """Step -> file of the dumps in ``folder`` (only ``steps``, when given); a clear error when none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DumpError(f"{folder}: no such folder (expected a run's dumps folder, e.g. runs/NAME/rl/dumps)")
    found = list_dumps(folder)
    if not found:
        raise DumpError(
            f"{folder}: no rollout dumps in it (expected step_NNNNNN.parquet files, written when trainer.dump_rollouts is on)"
        )
    if steps is not None:
        missing = [s for s in steps if s not in found]
        if missing:
            raise DumpError(f"{folder}: no dump of step(s) {missing[:10]} (dumped steps: {range_text(list(found))})")
        found = {s: found[s] for s in steps}
    return found


def read_batch(path: Path, columns: Sequence[str] | None = None, required: Sequence[str] = ()):
    """``Batch`` of one dump file (only ``columns`` that it has); ``DumpError`` naming the file
    when it is not a readable Parquet dump or lacks a ``required`` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        missing = [c for c in required if c not in names]
        if missing:
            raise DumpError(f"{path}: not a rollout dump, it has no column(s) {', '.join(missing)}")
        return Batch.from_parquet(path, columns=[c for c in columns if c in names] if columns is not None else None)
    except (pa.ArrowException, OSError, ValueError) as err:
        if isinstance(err, DumpError):
            raise
        raise DumpError(f"{path}: cannot read this dump (corrupt or not Parquet): {first_line(err)}") from err


def load_episodes(folder: str | Path, steps: Sequence[int] | None = None) -> list[dict]:
    """One light record per trajectory of every dump (no images): what the summary works on."""
    import pyarrow.compute as pc

    episodes = []
    for step, path in dump_files(folder, steps).items():
        batch = read_batch(path, [*SUMMARY_COLUMNS, "input_ids"], REQUIRED_COLUMNS)
        try:
            columns = {name: batch.column(name) for name in SUMMARY_COLUMNS if name in batch.columns}
            tokens = (
                pc.list_value_length(batch.table.column("input_ids")).to_pylist()
                if "input_ids" in batch.columns
                else None
            )
        except ValueError as err:  # a json column that does not parse
            raise DumpError(f"{path}: a column cannot be decoded: {first_line(err)}") from err
        step = int(batch.meta.get("step", step))
        for i in range(len(batch)):
            episodes.append(
                episode_record(
                    step, i, {name: values[i] for name, values in columns.items()}, tokens[i] if tokens else None
                )
            )
    return episodes


def episode_record(step: int, row: int, values: Mapping, tokens: int | None = None) -> dict:
    """The summary's view of one dumped row (missing reward columns: None / empty)."""
    calls = [c for c in (values.get("tool_calls") or []) if c.get("committed", True)]
    terms = values.get("reward_terms") or {}
    return {
        "step": step,
        "row": row,
        "image_id": values.get("image_id"),
        "combo": values.get("combo") or "?",
        "calls": [c["name"] for c in calls],
        "calls_ok": [bool(c.get("ok", True)) for c in calls],
        "num_turns": int(values.get("num_turns") or 0),
        "format_errors": int(values.get("format_errors") or 0),
        "tool_errors": int(values.get("tool_errors") or sum(not c.get("ok", True) for c in calls)),
        "stop_reason": values.get("stop_reason") or "?",
        "crashed": bool(values.get("error")),
        "tokens": tokens,
        "reward": values.get("reward"),
        "advantage": values.get("advantage"),
        "input_scores": values.get("input_scores") or {},
        "final_scores": values.get("final_scores") or {},
        "gains": terms.get("gain") or {},
        "contributions": terms.get("contribution") or {},
        "weights": values.get("reward_weights") or {},
    }


def range_text(steps: Sequence[int]) -> str:
    return f"{steps[0]}..{steps[-1]} ({len(steps)} files)" if len(steps) > 5 else str(list(steps))


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def parse_steps(text: str | None) -> list[int] | None:
    """'3', '1,5,9', '10-20' or '10-20,40' -> step numbers; None: every step."""
    if not text:
        return None
    steps = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                steps += range(low, high + 1)
            elif part:
                steps.append(int(part))
        except ValueError:
            raise DumpError(f"--steps {text!r}: expected step numbers and ranges such as 3 / 1,5,9 / 10-20") from None
    return sorted(set(steps))
