"""``tir restore IN.png --agent CHECKPOINT_OR_BASELINE --out OUT.png``: restore one photo.

The agent is a policy checkpoint (a folder written by ``save_pretrained``, e.g. by ``tir model
tiny``; or a hub name) run greedily on the vLLM or the transformers engine (``--engine``, see
``tir.eval.policy``), or a training-free baseline
(``random``, ``fixed_order``, ``exhaustive``). The trajectory is printed turn by turn (tool, time,
no-reference score of the image it produced); ``--trace DIR`` also saves every intermediate
image and a ``trace.json``. Bad input gets one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

from tir.data.perception import CUE_STYLES
from tir.paths import check_output_file, check_writable_folder


class InputError(ValueError):
    """Bad command-line input: reported in one line, exit code 2."""


def add_restore_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from tir.agent.baselines import BASELINES

    parser.add_argument("input", metavar="IN", help="the degraded photo (PNG, JPEG, ...)")
    parser.add_argument(
        "--agent",
        required=True,
        help=f"a policy checkpoint folder (or hub name), or a baseline: {', '.join(BASELINES)}",
    )
    parser.add_argument("--out", required=True, help="where to write the restored photo")
    parser.add_argument(
        "--trace", default=None, metavar="DIR", help="also save every intermediate image and trace.json here"
    )
    parser.add_argument("--max-turns", type=int, default=4, help="turn limit of the episode (default 4)")
    parser.add_argument(
        "--pool",
        choices=("local", "serve"),
        default="local",
        help="tools in this process, or the Ray Serve pool (default local)",
    )
    parser.add_argument(
        "--pool-name", default="tir_tool_pool", help="the Serve pool to use (started if it is not running)"
    )
    parser.add_argument(
        "--metric", default="niqe", help="no-reference metric printed per step (and used by the exhaustive baseline)"
    )
    parser.add_argument(
        "--degradations",
        default=None,
        help="comma-separated degradations for the baselines (default: perceived from cues)",
    )
    parser.add_argument(
        "--cues", action="store_true", help="show the policy measured perception cues (as it was trained with)"
    )
    parser.add_argument(
        "--cue-style",
        choices=CUE_STYLES,
        default="full",
        help="the cue text the policy was trained with (model.cue_style)",
    )
    parser.add_argument(
        "--perception",
        choices=("thresholds", "learned"),
        default="thresholds",
        help="who guesses the degradations (cue line, baselines): the cue thresholds or the learned recogniser",
    )
    parser.add_argument(
        "--perception-model", default=None, help="the recogniser's checkpoint folder (default: the one tir ships)"
    )
    parser.add_argument(
        "--tool-prompt",
        choices=("full", "names"),
        default="full",
        help="how the policy was told about the tools (model.tool_prompt)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="per policy reply")
    parser.add_argument(
        "--engine",
        choices=("hf", "vllm", "auto"),
        default="auto",
        help="what runs a policy: vLLM, transformers (hf), or auto: vLLM when installed and the checkpoint is a local folder",
    )
    parser.add_argument("--seed", type=int, default=0, help="the random baseline's seed")
    return parser


def restore_main(args: argparse.Namespace) -> int:
    try:
        image = read_photo(args.input)
        check_output_path(args.out)
        if args.trace:
            if Path(args.trace).exists() and not Path(args.trace).is_dir():
                raise InputError(f"--trace {args.trace!r} is a file; expected a folder")
            try:
                check_writable_folder(Path(args.trace), f"--trace {args.trace!r}")
            except ValueError as err:
                raise InputError(str(err)) from None
        if args.max_turns < 1:
            raise InputError(f"--max-turns must be >= 1, got {args.max_turns}")
        if args.cue_style == "confidence" and args.perception != "learned":
            raise InputError(
                "--cue-style confidence needs --perception learned (the cue thresholds have no confidence)"
            )
        agent = resolve_agent(args)
        degradations = parse_degradations(args.degradations)
    except InputError as err:
        print(f"tir restore: error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    pool, cleanup = open_pool(args.pool, args.pool_name)
    try:
        env, final_scores = asyncio.run(restore(agent, pool, image, args, degradations))
    finally:
        if hasattr(agent, "shutdown"):  # an engine (vLLM holds processes)
            asyncio.run(agent.shutdown())
        cleanup()
    write_photo(args.out, env.image)
    if args.trace:
        save_trace(Path(args.trace), env, final_scores)
    summary = env.summary()
    print(
        f"saved {args.out} ({env.image.shape[1]}x{env.image.shape[0]}) in {time.perf_counter() - started:.2f}s: "
        f"{summary['num_tool_calls']} tool call(s), {summary['num_turns']} turn(s), stop: {summary['stop_reason']}"
    )
    return 0


# ---------------------------------------------------------------- input checks


def read_photo(path: str) -> np.ndarray:
    """An RGB uint8 photo, or InputError naming the file and what is wrong."""
    import cv2

    file = Path(path)
    if not file.exists():
        raise InputError(f"input {path!r} does not exist")
    if not file.is_file():
        raise InputError(f"input {path!r} is not a file (expected a photo such as a PNG or JPEG)")
    data = np.fromfile(file, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise InputError(
            f"input {path!r} is not an image OpenCV can read (expected a PNG, JPEG, BMP, TIFF or WebP photo)"
        )
    if min(image.shape[:2]) < 8:
        raise InputError(f"input {path!r} is {image.shape[1]}x{image.shape[0]}: too small to restore (at least 8x8)")
    return np.ascontiguousarray(image[:, :, ::-1])


def check_output_path(path: str) -> None:
    out = Path(path)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"):
        raise InputError(f"--out {path!r} needs an image extension (.png, .jpg, ...)")
    if out.is_dir():
        raise InputError(f"--out {path!r} is a folder; expected a file name such as restored.png")
    try:
        check_output_file(out, f"--out {path!r}")
    except ValueError as err:
        raise InputError(str(err)) from None


def resolve_agent(args: argparse.Namespace):
    """A baseline object, or an ``(engine, processor)`` pair for a checkpoint."""
    from tir.agent.baselines import BASELINES, make_baseline

    name = args.agent.replace("-", "_")
    if name in BASELINES and not Path(args.agent).exists():
        options = {"seed": args.seed} if name == "random" else {"metric": args.metric} if name == "exhaustive" else {}
        return make_baseline(name, **options)
    from tir.agent.loop import LoopSettings
    from tir.agent.models import resolve_policy
    from tir.registry import closest, unknown_name

    if closest(name, BASELINES) and not Path(args.agent).exists() and "/" not in args.agent:
        raise InputError(unknown_name("agent", args.agent, BASELINES, extra="or a policy checkpoint folder"))
    from tir.eval.agent_specs import EvalError
    from tir.eval.policy import engine_label, open_policy_engine, resolve_engine

    try:
        path = resolve_policy(args.agent)  # fast checks of the folder before loading anything
        name, why = resolve_engine(args.engine, path)
        engine = open_policy_engine(name, path, max_images=args.max_turns + 1, max_length=LoopSettings().max_length)
    except FileNotFoundError as err:
        raise InputError(f"{err} (or name a baseline: {', '.join(BASELINES)})") from None
    except EvalError as err:  # an engine that cannot run it, a folder with broken files
        raise InputError(str(err)) from None
    print(f"policy {args.agent} on the {engine_label(name)} ({why})", file=sys.stderr)
    return engine


def parse_degradations(spec: str | None) -> list[str] | None:
    from tir.data.degradations import SUBTASK_FOR_DEGRADATION

    if spec is None:
        return None
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in SUBTASK_FOR_DEGRADATION]
    if unknown:
        raise InputError(
            f"--degradations: unknown degradation {unknown[0]!r} (known: {', '.join(SUBTASK_FOR_DEGRADATION)})"
        )
    return names


# ---------------------------------------------------------------- running


def open_pool(kind: str, name: str = "tir_tool_pool"):
    """The pool and a function that releases it (Ray is shut down only if we started it)."""
    from tool_pool.client import LocalPool

    if kind == "local":
        return LocalPool(), lambda: None
    import ray

    from tir.cluster import init_ray
    from tir.config import load_recipe
    from tool_pool.serve_app import start_pool, stop_pool

    cfg = load_recipe(None, ["pool.backend=serve", f"pool.name={name}"])
    was_running = ray.is_initialized()
    init_ray(cfg.ray)
    try:
        from ray import serve

        existed = cfg.pool.name in serve.status().applications
    except Exception:  # noqa: BLE001 - no Serve instance on this cluster yet
        existed = False
    pool = start_pool(cfg.pool)

    def cleanup():
        if not existed:
            stop_pool(cfg.pool.name)
        if not was_running:
            ray.shutdown()

    return pool, cleanup


async def restore(agent, pool, image: np.ndarray, args: argparse.Namespace, degradations):
    """Run the episode and print it: ``(env, {metric, input, final})``."""
    env = await run_agent(agent, pool, image, args, degradations)
    return env, await print_trajectory(env, pool, args)


async def run_agent(agent, pool, image: np.ndarray, args: argparse.Namespace, degradations):
    """Play one episode with ``agent``; the env, whose log holds every turn."""
    from tir.agent.baselines import run_baseline_episode
    from tir.agent.env import RestorationEnv, perception_cues
    from tir.agent.loop import LoopSettings, pool_tool_schemas, run_episode
    from tir.agent.perceive import Perception
    from tir.agent.prompts import policy_schemas

    schemas = await pool_tool_schemas(pool)
    perception = Perception(args.perception, args.perception_model or "default")
    cues = perception_cues(style=args.cue_style, perception=perception) if args.cues else None
    if hasattr(agent, "act"):
        env, _ = await run_baseline_episode(
            agent, pool, image, schemas, degradations, args.max_turns, cues=cues, perception=perception
        )
        return env
    engine = agent
    env = RestorationEnv(pool, policy_schemas(schemas, args.tool_prompt), max_turns=args.max_turns, cues=cues)
    settings = LoopSettings(
        max_turns=args.max_turns, max_new_tokens=args.max_new_tokens, temperature=0.0, concurrency=1
    )
    row = await run_episode(engine, engine.processor, env, image, settings)
    if row["error"]:
        raise RuntimeError(f"the policy's episode failed: {row['error']}")
    return env


async def print_trajectory(env, pool, args: argparse.Namespace) -> dict:
    """One line per turn; returns the scores of the input and of the final image."""
    from tir.agent.baselines import nr_score

    first = await nr_score(pool, env.images_shown[0], args.metric)
    print(f"input  {args.input}  {_size(env.images_shown[0])}  {args.metric} {_score(first)}")
    for entry in env.log:
        turn = f"turn {entry['turn']}"
        if entry["kind"] == "tool":
            score = await nr_score(pool, entry["image"], args.metric)
            entry["score"] = score
            print(
                f"{turn}  {entry['name']} {json.dumps(entry['arguments'])}  {entry['seconds']:.3f}s  {_size(entry['image'])}  {args.metric} {_score(score)}"
            )
        elif entry["kind"] == "tool_error":
            print(
                f"{turn}  {entry['name']} failed ({entry['error_kind']}): {entry['message']}  {entry['seconds']:.3f}s"
            )
        elif entry["kind"] == "format_error":
            print(f"{turn}  malformed reply ({entry['error_kind']}): {entry['message']}")
        else:
            print(f"{turn}  answer: {entry['answer']}")
    explored = sum(1 for call in env.tool_calls if not call["committed"])
    if explored:
        print(f"explored {explored} tool call(s) that were not kept")
    final = await nr_score(pool, env.image, args.metric)
    return {"metric": args.metric, "input": first, "final": final}


def save_trace(folder: Path, env, scores: dict) -> None:
    """Every image of the episode (input, each turn's output) and trace.json."""
    folder.mkdir(parents=True, exist_ok=True)
    write_photo(folder / "00_input.png", env.images_shown[0])
    turns = []
    for entry in env.log:
        record = {key: value for key, value in entry.items() if key != "image"}
        if entry.get("image") is not None:
            record["file"] = f"{entry['turn']:02d}_{entry['name']}.png"
            write_photo(folder / record["file"], entry["image"])
        turns.append(record)
    trace = {"scores": scores, "turns": turns, "tool_calls": env.tool_calls, "stop_reason": env.stop_reason}
    (folder / "trace.json").write_text(json.dumps(trace, indent=2, default=str))


def write_photo(path, image: np.ndarray) -> None:
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(path.suffix or ".png", np.ascontiguousarray(image[:, :, ::-1]))
    if not ok:
        raise OSError(f"could not encode {path}")
    path.write_bytes(data.tobytes())


def _size(image: np.ndarray) -> str:
    return f"{image.shape[1]}x{image.shape[0]}"


def _score(value) -> str:
    return "n/a (image too small for the metric)" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    """``python -m tir.agent.restore ...`` (the same as ``tir restore ...``)."""
    parser = add_restore_arguments(argparse.ArgumentParser(prog="tir restore", description=__doc__.splitlines()[0]))
    return restore_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
