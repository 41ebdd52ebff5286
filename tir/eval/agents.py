"""``tir eval``: any agent on a test set, through the same env and pool, scored against HQ.

    tir eval --test data/test.parquet --agents identity,random,fixed_order,exhaustive,expert,sft=runs/x/sft/hf \
             --out runs/x/eval [--recipe tiny_cpu] [--limit N] [--seed 0] [--pool local] [key=value ...]

The story (``evaluate_agents``): for each agent, one episode per test row (a ``tir data synth``
Parquet: lq, hq, group, degradations, ...), then every final image and every degraded input is
scored through the pool against its HQ photo (``score_against_hq``: an output smaller than HQ,
a 1/4-size thumbnail no tool super-resolved, is upscaled bicubically to the HQ size first, as
the protocol scores it), then per group (A, B, C, their union "A-C", ood, single, ...) and
overall: mean, sample std and n of each metric, tool calls, turns, wall seconds and format
errors per image (``aggregate``). Outputs (``tir.eval.report``): report.md, eval.json (per-image
rows and the aggregates), quality_vs_calls.png.

Agents (``tir.eval.agent_specs.parse_agent``):
- ``identity``: the degraded input as the answer (no tool call): the "degraded input" row.
- ``random``, ``fixed_order``, ``exhaustive``: the training-free baselines of ``tir.agent.baselines``;
  by default they perceive the degradations from measured cues, as a policy must
  (``baseline_degradations="known"`` hands them the true ones).
- ``expert``: the expert search of ``tir.data.expert`` (knows the degradations and the HQ photo):
  an upper reference, not an agent; its tool calls are every execution of its search.
- a policy checkpoint folder (``name=path`` to label it; a run folder with ``hf/`` works too),
  run greedily by the agent loop on the vLLM or the transformers engine (``tir.eval.policy``).

Deterministic: the same seed and checkpoint give the same table except for wall times (the
random agent is seeded per row; the policy is greedy: on transformers every request carries its
own seed, so the engine never batches it with others and padding cannot change an argmax; on
vLLM see ``tir.eval.policy``).
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from tir.agent.perceive import Perception
from tir.eval.agent_specs import AgentSpec, EvalError, parse_agents
from tir.eval.episodes import episode_summary, episodes_span
from tir.eval.episodes import gather_limited as _gather_limited
from tir.eval.episodes import tick as _tick
from tir.eval.report import aggregate, group_name
from tir.protocol import Batch

REQUIRED_COLUMNS = ("lq", "hq")


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class EvalSettings:
    metrics: tuple[str, ...] = ("psnr", "ssim")
    seed: int = 0
    max_turns: int = 4
    concurrency: int = 1  # episodes in flight per agent; 1: clean per-image wall times
    baseline_degradations: str = "perceived"  # or "known": the test set's true degradations
    exhaustive_metric: str = "niqe"
    tools: tuple[str, ...] | None = None  # tools offered to agents (None: all the pool serves)
    cues: bool = False  # perception cues beside each image (as the policy was trained)
    cue_style: str = "full"  # tir.data.perception.observe's style (the recipe's model.cue_style)
    perception: Any = None  # tir.agent.perceive.Perception of the cues and the baselines (None: thresholds)
    tool_prompt: str = "full"  # how policies are told about the tools (the recipe's model.tool_prompt)
    loop: Any = None  # LoopSettings for policies (None: defaults with max_turns)
    expert: Any = None  # ExpertSettings for the oracle (None: its defaults, no perturbation)
    policy_dtype: str = "float32"
    engine: str = "hf"  # policies' engine: hf, vllm or auto (tir.eval.policy; the CLI's default is auto)
    policy_concurrency: int | None = None  # policy episodes in flight (None: concurrency; >= 16 on vLLM)
    progress: bool = True

    def __post_init__(self):
        if self.baseline_degradations not in ("perceived", "known"):
            raise EvalError(f"baseline_degradations must be 'perceived' or 'known', got {self.baseline_degradations!r}")
        if self.engine not in ("hf", "vllm", "auto"):
            raise EvalError(f"engine must be hf, vllm or auto, got {self.engine!r}")
        if (
            self.concurrency < 1
            or self.max_turns < 1
            or (self.policy_concurrency is not None and self.policy_concurrency < 1)
        ):
            raise EvalError(f"concurrency and max_turns must be >= 1, got {self.concurrency} and {self.max_turns}")
        if not self.metrics:
            raise EvalError("no metrics to score with")

    @classmethod
    def from_recipe(cls, cfg, **overrides) -> EvalSettings:
        """Metrics: psnr, ssim and the reward's; tools, cues, turns and loop from the recipe."""
        from tir.agent.loop import LoopSettings
        from tir.data.expert import ExpertSettings

        metrics = tuple(dict.fromkeys(["psnr", "ssim", *cfg.reward.metrics]))
        values = {
            "metrics": metrics,
            "seed": int(cfg.run.seed),
            "max_turns": int(cfg.rollout.max_turns),
            "tools": tuple(cfg.pool.tools) or None,
            "cues": bool(cfg.model.perception_cues),
            "cue_style": str(cfg.model.cue_style),
            "perception": Perception.from_recipe(cfg.model),
            "tool_prompt": str(cfg.model.tool_prompt),
            "loop": LoopSettings.from_recipe(cfg.rollout, cfg.get("env")),
            "policy_dtype": cfg.model.dtype,
            "expert": ExpertSettings.from_recipe(cfg, perturb=False),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# ---------------------------------------------------------------- running


def evaluate_agents(
    agents,
    test: Batch,
    pool,
    metrics: Sequence[str] | None = None,
    seed: int | None = None,
    out_dir=None,
    settings: EvalSettings | None = None,
    meta: Mapping | None = None,
) -> dict:
    """Run every agent on every row of ``test``, score, aggregate; write report.md, eval.json and
    quality_vs_calls.png into ``out_dir`` (when given). ``metrics``/``seed`` override ``settings``'.
    ``meta``: extra facts for the report's header (test path, recipe). Returns the report:
    {"meta", "aggregates", "markdown", "rows", "files"}."""
    settings = settings or EvalSettings()
    settings = replace(
        settings,
        **{k: v for k, v in {"metrics": tuple(metrics) if metrics else None, "seed": seed}.items() if v is not None},
    )
    return asyncio.run(evaluate_agents_async(agents, test, pool, settings, out_dir, meta))


async def evaluate_agents_async(
    agents, test: Batch, pool, settings: EvalSettings, out_dir=None, meta: Mapping | None = None
) -> dict:
    from tir.agent.loop import pool_tool_schemas
    from tir.eval.report import write_outputs

    specs = parse_agents(agents)
    check_test_set(
        test,
        needs_degradations=any(s.kind == "expert" for s in specs.values())
        or (
            settings.baseline_degradations == "known" and any(s.kind in ("baseline", "custom") for s in specs.values())
        ),
    )
    schemas = await pool_tool_schemas(pool, list(settings.tools) if settings.tools else None)
    started = time.perf_counter()
    scorer = HQScorer(pool, settings.metrics)
    hqs, lqs = test.column("hq"), test.column("lq")
    with _progress(len(test), "score inputs", settings.progress) as bar:
        input_scores = await _gather_limited(
            [scorer.score(lq, hq, bar) for lq, hq in zip(lqs, hqs)], settings.concurrency
        )
    rows, done, spans = [], [], {}
    for spec in specs.values():
        try:
            episodes = await run_agent(spec, test, pool, schemas, settings)
            spans[spec.label] = episodes_span(episodes)
            with _progress(len(test), f"score {spec.label}", settings.progress) as bar:
                finals = await _gather_limited(
                    [scorer.score(e.pop("final_image"), hq, bar) for e, hq in zip(episodes, hqs)],
                    settings.concurrency,
                )
        except Exception as err:  # noqa: BLE001 - keep the finished agents' results, then fail in one line
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            message = f"agent {spec.label!r} failed: {reason}"
            if done and out_dir is not None:
                partial = _report(specs, done, rows, test, schemas, settings, started, meta, {spec.label: reason})
                files = write_outputs(partial, out_dir)
                message += f"; the results of {', '.join(done)} are in {', '.join(files.values())}"
            raise EvalError(message) from err
        rows += [
            image_row(spec, test, index, episode, final, input_scores[index])
            for index, (episode, final) in enumerate(zip(episodes, finals))
        ]
        done.append(spec.label)
    report = _report(specs, done, rows, test, schemas, settings, started, {"episodes_s": spans, **(meta or {})})
    if out_dir is not None:
        report["files"] = write_outputs(report, out_dir)
    return report


def _report(specs, done, rows, test, schemas, settings, started, meta, failed=None) -> dict:
    from tir.eval.report import render_markdown

    report = {
        "meta": {
            "images": len(test),
            "seed": settings.seed,
            "metrics": list(settings.metrics),
            "max_turns": settings.max_turns,
            "baseline_degradations": settings.baseline_degradations,
            "tools": [s["name"] for s in schemas],
            "cues": settings.cues,
            "agents": {label: specs[label].describe(_engine_of(label, rows)) for label in done},
            **({"failed": failed, "not_run": [label for label in specs if label not in done]} if failed else {}),
            "wall_s": time.perf_counter() - started,
            **(meta or {}),
        },
        "aggregates": aggregate(rows, settings.metrics),
    }
    report["markdown"] = render_markdown(report)
    report["rows"] = rows
    return report


def _engine_of(label: str, rows: Sequence[Mapping]) -> str | None:
    """The words for the engine that ran policy ``label`` (None for agents without one)."""
    from tir.eval.policy import engine_label

    engine = next((r["engine"] for r in rows if r["agent"] == label and r.get("engine")), None)
    return engine_label(engine) if engine else None


def check_test_set(test: Batch, needs_degradations: bool) -> None:
    missing = [c for c in REQUIRED_COLUMNS + (("degradations",) if needs_degradations else ()) if c not in test.columns]
    if missing:
        raise EvalError(
            f"the test set lacks column(s) {', '.join(missing)} (has {', '.join(test.columns)}); make it with `tir data synth`"
        )
    if not len(test):
        raise EvalError("the test set has no rows")


async def run_agent(spec: AgentSpec, test: Batch, pool, schemas, settings: EvalSettings) -> list[dict]:
    """One episode per row: {final_image, tool_calls, turns, format_errors, tool_errors,
    stop_reason, wall_s, tools, error} (plus what the agent adds)."""
    with _progress(len(test), spec.label, settings.progress) as bar:
        if spec.kind == "identity":
            return [_tick(bar, identity_episode(lq)) for lq in test.column("lq")]
        if spec.kind == "expert":
            return await expert_episodes(pool, test, settings, bar)
        if spec.kind == "policy":
            from tir.eval.policy import policy_episodes

            return await policy_episodes(spec.path, test, pool, schemas, settings, bar, engine=spec.agent)
        return await baseline_episodes(_baseline(spec, settings), test, pool, schemas, settings, bar)


def identity_episode(lq: np.ndarray) -> dict:
    return {
        "final_image": lq,
        "tool_calls": 0,
        "turns": 1,
        "format_errors": 0,
        "tool_errors": 0,
        "stop_reason": "answer",
        "wall_s": 0.0,
        "tools": [],
        "error": "",
    }


def _baseline(spec: AgentSpec, settings: EvalSettings):
    from tir.agent.baselines import make_baseline

    if spec.kind == "custom":
        return spec.agent
    options = {"random": {"seed": settings.seed}, "exhaustive": {"metric": settings.exhaustive_metric}}.get(
        spec.name, {}
    )
    return make_baseline(spec.name, **options)


async def baseline_episodes(agent, test: Batch, pool, schemas, settings: EvalSettings, bar) -> list[dict]:
    from tir.agent.baselines import run_baseline_episode
    from tir.agent.env import perception_cues

    cues = perception_cues(style=settings.cue_style, perception=settings.perception) if settings.cues else None
    known = test.column("degradations") if settings.baseline_degradations == "known" else [None] * len(test)

    async def one(row: int, lq) -> dict:
        _, report = await run_baseline_episode(
            agent, pool, lq, schemas, known[row], settings.max_turns, row, cues, settings.perception
        )
        return _tick(bar, episode_summary(report, report["wall_s"], degradations_used=report["degradations_used"]))

    return await _gather_limited([one(row, lq) for row, lq in enumerate(test.column("lq"))], settings.concurrency)


async def expert_episodes(pool, test: Batch, settings: EvalSettings, bar) -> list[dict]:
    """The expert search per row; its final image is the best schedule's, its cost every
    execution and scoring of the search (which knows the degradations and the HQ photo)."""
    from tir.data import expert

    options = settings.expert or expert.ExpertSettings(perturb=False)
    tools = await expert.served_tools_by_subtask(pool)
    if settings.tools:
        tools = {s: [t for t in names if t in settings.tools] for s, names in tools.items()}

    async def one(row: Mapping) -> dict:
        started, cost = time.perf_counter(), expert.Cost()
        inputs = await expert.score(pool, row["lq"], row["hq"], options.metrics, cost)
        best, _, mode = await expert.search_expert(
            pool, row["lq"], row["hq"], row["degradations"], tools, options, cost, inputs
        )
        return _tick(
            bar,
            {
                "final_image": best.image,
                "tool_calls": cost.tool_calls,
                "turns": len(best.tools) + 1,
                "format_errors": 0,
                "tool_errors": 0,
                "stop_reason": "answer",
                "wall_s": time.perf_counter() - started,
                "ended_at": time.perf_counter(),
                "tools": list(best.tools),
                "error": "",
                "score_calls": cost.score_calls,
                "search_mode": mode,
            },
        )

    rows = test.select([c for c in ("lq", "hq", "degradations") if c in test.columns]).rows()
    return await _gather_limited([one(row) for row in rows], settings.concurrency)


# ---------------------------------------------------------------- scoring


def comparable(image: np.ndarray, hq: np.ndarray) -> np.ndarray:
    """``image`` at the HQ size: the protocol upscales a 1/4-size output x4 (bicubic) before
    full-reference scoring (an image already at the HQ size is returned as is)."""
    from tool_pool.client import at_reference_size

    return at_reference_size(image, hq)


async def score_against_hq(pool, image: np.ndarray, hq: np.ndarray, metrics: Sequence[str]) -> dict[str, float | None]:
    """Each metric of ``image`` (at the HQ size) against HQ, through the pool; None for a metric
    that cannot score this image (NIQE on a flat one): left out of its mean, counted in n."""
    from tool_pool.client import score_against

    scores = await score_against(pool, metrics, image, hq)
    return {metric: scores.get(metric) for metric in metrics}


class HQScorer:
    """``score_against_hq`` with a cache keyed by the pixels: an unchanged image (the identity
    agent, a baseline that answers at once) is scored once."""

    def __init__(self, pool, metrics: Sequence[str]):
        self.pool, self.metrics, self.cache = pool, tuple(metrics), {}

    async def score(self, image: np.ndarray, hq: np.ndarray, bar=None) -> dict[str, float | None]:
        key = (_digest(image), _digest(hq))
        if key not in self.cache:
            self.cache[key] = await score_against_hq(self.pool, image, hq, self.metrics)
        return _tick(bar, dict(self.cache[key]))


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()


def image_row(spec: AgentSpec, test: Batch, index: int, episode: dict, final: dict, inputs: dict) -> dict:
    def value(column, default=None):
        return test.column(column)[index] if column in test.columns else default

    return {
        "agent": spec.label,
        "index": index,
        "image_id": value("image_id", str(index)),
        "combo": value("combo", ""),
        "group": group_name(value("group")),
        "degradations": list(value("degradations", []) or []),
        "scores": final,
        "input_scores": inputs,
        **episode,
    }


# ---------------------------------------------------------------- helpers


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False, file=sys.stderr)
