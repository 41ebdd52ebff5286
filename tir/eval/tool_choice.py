"""Tool-choice accuracy: does the policy call what the expert called, on photos it never saw?

The policy plays each held-out sample greedily through the agent loop, with real tools from the
pool (so its later turns see the images its own earlier calls produced), and is compared with
the expert's schedule (``expert_tools``, never perturbed):

- ``first_call``: the first reply is a well-formed call of the expert's first tool (or the answer,
  where the expert calls nothing);
- ``first_subtask``: ... of a tool of the same subtask (the right kind of fix, any tool);
- ``first_call_tie``: ... of the first tool of a schedule the expert search scored as a tie of
  the sample's own best (``tir.data.expert_rules.ties`` within ``tie_margin``, on ``search_candidates``): a
  choice as good as that sample's best, up to the noise ties are broken over (needs that column;
  else not reported). Under the ``combination`` expert rule the expert itself is not always such
  a tie, so this can be lower than ``first_call``;
- ``sequence``: the tools called, in order, are exactly the expert's, with no malformed reply;
- ``format_ok``: the first reply is a well-formed tool call or answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from tir.agent import prompts
from tir.agent.loop import LoopSettings, rollout
from tir.protocol import Batch

SAMPLE_COLUMNS = ("lq", "expert_tools", "search_candidates", "image_id", "combo")


def first_action(messages: Sequence[Mapping], schemas: Sequence[Mapping]) -> prompts.Action | None:
    """The action of the episode's first policy reply (None if it never replied)."""
    for message in messages:
        if message["role"] == "assistant":
            return prompts.parse_action(message["text"], schemas)
    return None


def tool_choice(episodes: Batch, schemas: Sequence[Mapping], tie_margin: float = 1.0) -> dict[str, float]:
    """Accuracies (fractions) over the episodes, each holding ``expert_tools``, ``messages``,
    ``tool_calls`` and ``format_errors`` (a rollout of expert rows)."""
    from tool_pool.tools import get_tool

    def subtask(name: str | None) -> str | None:
        if name is None:  # answering without a call
            return "answer"
        try:
            return get_tool(name).subtask
        except KeyError:
            return None

    counts = {"first_call": 0, "first_subtask": 0, "sequence": 0, "format_ok": 0}
    ties = episodes.column("search_candidates") if "search_candidates" in episodes.columns else None
    if ties is not None:
        counts["first_call_tie"] = 0
    rows = zip(
        episodes.column("expert_tools"),
        episodes.column("messages"),
        episodes.column("tool_calls"),
        episodes.column("format_errors"),
    )
    for index, (expert, messages, calls, format_errors) in enumerate(rows):
        action = first_action(messages, schemas)
        called = [call["name"] for call in calls if call["committed"]]
        well_formed = isinstance(action, (prompts.ToolCall, prompts.Stop))
        # the first move: a tool's name, or None for answering at once (an expert with no call)
        move = action.name if isinstance(action, prompts.ToolCall) else None
        expert_move = expert[0] if len(expert) else None
        counts["format_ok"] += well_formed
        counts["first_call"] += well_formed and move == expert_move
        counts["first_subtask"] += well_formed and subtask(move) == subtask(expert_move)
        counts["sequence"] += called == list(expert) and format_errors == 0
        if ties is not None:
            counts["first_call_tie"] += well_formed and move in tied_first_tools(ties[index], tie_margin)
    total = max(1, len(episodes))
    return {name: value / total for name, value in counts.items()} | {"samples": len(episodes)}


def tied_first_tools(candidates: Sequence[Mapping], tie_margin: float) -> set[str]:
    """First tools of the scored schedules that tie the best one (``tir.data.expert_rules.ties``);
    None for the schedule with no call."""
    from tir.data.expert_rules import ties

    best = max(candidates, key=lambda c: c["quality"])
    return {c["tools"][0] if c["tools"] else None for c in candidates if ties(c["scores"], best["scores"], tie_margin)}


async def evaluate_tool_choice(
    engine,
    processor,
    pool,
    heldout: Batch,
    schemas: Sequence[Mapping],
    settings: LoopSettings,
    cues=None,
    tie_margin: float = 1.0,
) -> tuple[dict[str, float], Batch]:
    """Greedy episodes of the held-out expert rows; (accuracies, the episodes)."""
    samples = heldout.select([c for c in SAMPLE_COLUMNS if c in heldout.columns])
    episodes = await rollout(engine, processor, pool, samples, greedy(settings), schemas, cues)
    return tool_choice(episodes, schemas, tie_margin), episodes


def greedy(settings: LoopSettings) -> LoopSettings:
    return replace(settings, temperature=0.0, top_p=1.0, top_k=0, seed=None, choices=None)
