"""Which agents ``tir eval`` compares: names (identity, the baselines, the expert) and policy
checkpoints, parsed from the command line into ``AgentSpec``s with clear errors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

BASELINE_AGENTS = ("random", "fixed_order", "exhaustive")


KNOWN_AGENTS = ("identity", *BASELINE_AGENTS, "expert")


class EvalError(ValueError):
    """Bad input to an evaluation (a missing file, an unknown agent, a folder that is no policy)."""


@dataclass(frozen=True)
class AgentSpec:
    """One agent to evaluate. ``kind``: "identity", "baseline" (``name`` in BASELINE_AGENTS),
    "expert", "policy" (``path``: a checkpoint folder or hub name; ``agent``: optionally the
    rollout engine already serving it, which the caller shuts down) or "custom" (``agent``: any
    object with the baselines' ``act(env, degradations, episode)``, ``name`` and
    ``needs_degradations``)."""

    label: str
    kind: str
    name: str = ""
    path: str | None = None
    agent: Any = field(default=None, compare=False)

    def describe(self, engine: str | None = None) -> str:
        """What the agent is, in a few words (``engine``: what ran a policy, e.g. "vLLM engine")."""
        return {
            "identity": "the degraded input (no tool call)",
            "baseline": f"baseline {self.name}",
            "expert": "expert search (oracle: knows the degradations and HQ)",
            "policy": f"policy checkpoint {self.path} (greedy{f', {engine}' if engine else ''})",
            "custom": f"agent {self.name or type(self.agent).__name__}",
        }[self.kind]


def parse_agent(text: str, label: str | None = None) -> AgentSpec:
    """``identity`` | ``random`` | ``fixed_order`` | ``exhaustive`` | ``expert`` | a checkpoint
    path | ``label=path``. Unknown names get a did-you-mean; a path that is no policy, why not."""
    text = text.strip()
    if "=" in text and label is None:
        label, text = (part.strip() for part in text.split("=", 1))
        if not label or not text:
            raise EvalError(f"agent {text!r}: expected NAME=CHECKPOINT, e.g. sft=runs/x/sft/hf")
    key = text.replace("-", "_")
    if key in KNOWN_AGENTS and not Path(text).exists():
        kind = key if key in ("identity", "expert") else "baseline"
        return AgentSpec(label or key, kind, name=key)
    looks_like_path = "/" in text or Path(text).exists() or text.startswith(".")
    if not looks_like_path:
        from tir.registry import unknown_name

        raise EvalError(unknown_name("agent", text, KNOWN_AGENTS, extra="or a policy checkpoint folder"))
    path = checkpoint_folder(text)
    return AgentSpec(label or checkpoint_label(path), "policy", path=path)


def checkpoint_folder(path: str) -> str:
    """The policy folder ``path`` names (a run folder's ``hf/`` too) or a hub name
    (``tir.agent.models.resolve_policy``), or EvalError saying why it is neither."""
    from tir.agent.models import resolve_policy

    try:
        return resolve_policy(path)
    except FileNotFoundError as err:
        raise EvalError(f"{err}; is {path!r} a policy checkpoint?") from None


def checkpoint_label(path: str) -> str:
    parts = Path(path).parts
    return parts[-2] if len(parts) >= 2 and parts[-1] == "hf" else parts[-1]


def parse_agents(agents: str | Sequence | Mapping) -> dict[str, AgentSpec]:
    """Agents by label, from "identity,random,sft=runs/x/sft/hf", a list of such strings or
    AgentSpecs, or a {label: spec string | AgentSpec | agent object} mapping."""
    if isinstance(agents, str):
        agents = [a for a in agents.split(",") if a.strip()]
    items = agents.items() if isinstance(agents, Mapping) else [(None, a) for a in agents]
    out: dict[str, AgentSpec] = {}
    for label, value in items:
        if isinstance(value, AgentSpec):
            spec = value if label is None else replace(value, label=label)
        elif isinstance(value, str):
            spec = parse_agent(value, label)
        elif hasattr(value, "act"):
            spec = AgentSpec(
                label or getattr(value, "name", type(value).__name__),
                "custom",
                name=getattr(value, "name", ""),
                agent=value,
            )
        else:
            raise EvalError(
                f"agent {label!r}: expected a name, a checkpoint path, an AgentSpec or an object with act(), got {type(value).__name__}"
            )
        if spec.label in out:
            raise EvalError(f"two agents are labelled {spec.label!r}; name them, e.g. a=runs/a/hf,b=runs/b/hf")
        out[spec.label] = spec
    if not out:
        raise EvalError("no agents to evaluate")
    return out
