"""Soak: a real RL run whose policy is forced to call x4 super-resolution every turn, with every
tool offered, and the peak memory of the whole run (driver, Ray, pool, actor and rollout workers)
sampled the whole time.

    .venv/bin/python benchmarks/soak.py [--steps 6] [--max-turns 6] [--mode adversarial|sampled]

``adversarial``: ``rollout.choices`` leaves the policy one reply, an ``sr_bicubic`` call, so every
episode grows its image to the limit (``env.max_side``) and then meets refused calls.
``sampled``: the tiny policy samples freely at temperature 1 (a random-ish policy over all tools).
Prints the peak RSS of the process tree for the first and the second half of the steps: a leak
shows as a second half well above the first. The stated bound is the README's.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import psutil


class TreeMemory:
    """Samples the summed RSS of this process and all its descendants (Ray's servers and
    workers are children of the driver that started the local cluster)."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.samples, self._stop = every_s, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    continue
            self.samples.append((time.perf_counter(), total))
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def peak(self, start: float, stop: float) -> float:
        inside = [rss for t, rss in self.samples if start <= t <= stop]
        return max(inside, default=0) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--max-turns", type=int, default=6)
    parser.add_argument("--mode", choices=("adversarial", "sampled"), default="adversarial")
    parser.add_argument("--crop", type=int, default=128)
    args = parser.parse_args()

    import tir  # noqa: F401 - shims first
    from tir.agent import prompts, tiny_policy
    from tir.cluster import ray_session
    from tir.config import load_recipe
    from tir.data.synth import synthesize
    from tir.trainer import rl
    from tir.trainer.run_log import read_records
    from tool_pool.tools import TOOLS, tool_schemas

    tools = sorted(TOOLS.names())
    root = Path(tempfile.mkdtemp(prefix="tir_soak_"))
    policy = tiny_policy.build_tiny_policy(root / "policy", tool_schemas(tools), seed=0)
    synthesize("builtin", "noise,dark,haze,jpeg", per_image=1, seed=0, crop=args.crop, progress=False).to_parquet(
        root / "train.parquet"
    )
    overrides = [
        f"run.output_dir={root / 'run'}",
        f"model.path={policy}",
        f"data.train_path={root / 'train.parquet'}",
        "pool.backend=local",
        f"pool.tools=[{','.join(tools)}]",
        "model.tool_prompt=names",
        "rollout.engine=hf",
        "rollout.n=2",
        f"rollout.max_turns={args.max_turns}",
        "trainer.batch_size=2",
        f"trainer.total_steps={args.steps}",
        "trainer.save_every=1000",
    ]
    if args.mode == "adversarial":
        sr = prompts.format_call(prompts.ToolCall("sr_bicubic", {}))
        overrides.append(f"rollout.choices=['{sr}']")
    else:
        overrides.append("rollout.temperature=1.0")
    cfg = load_recipe("tiny_cpu", overrides)
    print(
        f"soak: {args.mode} policy, {len(tools)} tools offered, {args.steps} steps x 2 episodes x {args.max_turns} turns"
    )

    with ray_session(cfg.ray), TreeMemory() as memory:
        started = time.perf_counter()
        rl.train_rl(cfg)
        finished = time.perf_counter()
    records = [r for r in read_records(root / "run" / "rl" / "metrics.jsonl") if "step" in r]
    # step boundaries on the sampler's clock: the log's cumulative step times, from the run's end backwards
    durations = [r.get("time/step", 0.0) for r in records]
    boundaries = [finished - sum(durations[i:]) for i in range(len(durations))] + [finished]
    half = len(durations) // 2
    first = memory.peak(boundaries[0], boundaries[half]) if half else 0.0
    second = memory.peak(boundaries[half], finished)
    whole = memory.peak(started, finished)
    calls = [round(r.get("episode/tool_calls", 0.0), 2) for r in records]
    print(f"steps {len(records)}  tool calls per episode {calls}")
    print(
        f"peak RSS of the run's processes: {whole:.0f} MB (steps 1-{half}: {first:.0f} MB, steps {half + 1}-{len(records)}: {second:.0f} MB)"
    )
    print(f"second half / first half: {second / max(first, 1):.2f}x  ({finished - started:.0f} s)")


if __name__ == "__main__":
    main()
