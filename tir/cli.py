"""The ``tir`` command.

    tir config show recipe=recipes/tiny_cpu.yaml trainer.total_steps=3
    tir data synth --combos groupA,groupB --per-image 4 --seed 0 --out data/x.parquet
    tir data expert --in data/train.parquet --out data/sft.parquet
    tir model tiny --out runs/tiny_policy
    tir perception train --hq DIR --out runs/recognizer
    tir tools train --subtask jpeg_artifact_removal --hq DIR --steps 3000 --minutes 12 --out runs/tools/jpeg
    tir train sft recipe=sft_tiny_cpu
    tir train rl recipe=tiny_cpu trainer.resume=auto
    tir eval --test data/test.parquet --agents identity,random,fixed_order,exhaustive,sft=runs/x/sft/hf --out runs/x/eval
    tir dumps summary runs/x/rl/dumps ; tir dumps view runs/x/rl/dumps --out report.html
    tir restore photo.png --agent exhaustive --out restored.png
    tir quickstart [recipe=quickstart] [key=value ...]
    tir demo [recipe=...] [key=value ...]

Subcommands import their modules lazily so that ``tir --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def _config_show(args: argparse.Namespace) -> int:
    from tir.config import load_recipe, split_cli_overrides, to_yaml

    recipe, overrides = split_cli_overrides(args.overrides)
    print(to_yaml(load_recipe(recipe, overrides)), end="")
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from tir.data.synth import synth_main

    return synth_main(args)


def _data_expert(args: argparse.Namespace) -> int:
    from tir.data.expert_run import expert_main

    return expert_main(args)


def _train(args: argparse.Namespace) -> int:
    if args.stage == "sft":
        from tir.trainer.sft import sft_main

        return sft_main(args.overrides)
    from tir.trainer.rl import rl_main

    return rl_main(args.overrides)


def _eval(args: argparse.Namespace) -> int:
    from tir.eval.cli import eval_main

    return eval_main(args)


def _dumps(args: argparse.Namespace) -> int:
    from tir.dumps.cli import dumps_main

    return dumps_main(args)


def _model_tiny(args: argparse.Namespace) -> int:
    from tir.agent.tiny_policy import tiny_main

    return tiny_main(args)


def _perception_train(args: argparse.Namespace) -> int:
    from tir.data.recognizer_train import train_main

    return train_main(args)


def _tools_train(args: argparse.Namespace) -> int:
    from tir.data.tool_train import tools_train_main

    return tools_train_main(args)


def _restore(args: argparse.Namespace) -> int:
    from tir.agent.restore import restore_main

    return restore_main(args)


def _quickstart(args: argparse.Namespace) -> int:
    from tir.quickstart import main as quickstart_main

    return quickstart_main(args.overrides)


def _demo(args: argparse.Namespace) -> int:
    from tir.eval.oracle_demo import main as demo_main

    return demo_main(args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tir", description="TIR-Agent: restore photos with a tool-calling VLM agent.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="recipes").add_subparsers(dest="action", required=True)
    show = config.add_parser("show", help="print the resolved recipe")
    show.add_argument("overrides", nargs="*", metavar="recipe=FILE|key=value")
    show.set_defaults(run=_config_show)

    data = commands.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    synth = data.add_parser("synth", help="degrade HQ photos into an LQ/HQ Parquet dataset")
    from tir.data.synth import add_synth_arguments

    add_synth_arguments(synth)
    synth.set_defaults(run=_data_synth)
    expert = data.add_parser("expert", help="search expert tool schedules (and perturb them) for SFT")
    from tir.data.expert_run import add_expert_arguments

    add_expert_arguments(expert)
    expert.set_defaults(run=_data_expert)

    train = commands.add_parser("train", help="train the policy: sft (expert trajectories) or rl (multi-turn GRPO)")
    train.add_argument("stage", choices=("sft", "rl"))
    train.add_argument("overrides", nargs="*", metavar="recipe=FILE|key=value")
    train.set_defaults(run=_train)

    model = commands.add_parser("model", help="policy checkpoints").add_subparsers(dest="action", required=True)
    tiny = model.add_parser("tiny", help="write a tiny random Qwen2.5-VL policy offline")
    from tir.agent.tiny_policy import add_tiny_arguments

    add_tiny_arguments(tiny)
    tiny.set_defaults(run=_model_tiny)

    perception = commands.add_parser("perception", help="the degradation recogniser").add_subparsers(
        dest="action", required=True
    )
    recogniser = perception.add_parser(
        "train", help="train the learned degradation recogniser on synthetic degradations"
    )
    from tir.data.recognizer_train import add_train_arguments

    add_train_arguments(recogniser)
    recogniser.set_defaults(run=_perception_train)

    tools = commands.add_parser("tools", help="restoration tools").add_subparsers(dest="action", required=True)
    tools_train = tools.add_parser("train", help="train a small restoration network for one subtask (CPU)")
    from tir.data.tool_train import add_tools_train_arguments

    add_tools_train_arguments(tools_train)
    tools_train.set_defaults(run=_tools_train)

    evaluate = commands.add_parser("eval", help="score agents (checkpoints and baselines) on a test set, per group")
    from tir.eval.cli import add_eval_arguments

    add_eval_arguments(evaluate)
    evaluate.set_defaults(run=_eval)

    dumps = commands.add_parser(
        "dumps", help="analyse rollout dumps: summary tables and plots, an HTML trajectory viewer"
    )
    from tir.dumps.cli import add_dumps_arguments

    add_dumps_arguments(dumps)
    dumps.set_defaults(run=_dumps)

    restore = commands.add_parser("restore", help="restore one photo with a policy checkpoint or a baseline")
    from tir.agent.restore import add_restore_arguments

    add_restore_arguments(restore)
    restore.set_defaults(run=_restore)

    quickstart = commands.add_parser(
        "quickstart", help="the whole pipeline on this machine: data, expert, SFT, GRPO, evaluation, report"
    )
    quickstart.add_argument("overrides", nargs="*", metavar="recipe=FILE|key=value")
    quickstart.set_defaults(run=_quickstart)

    demo = commands.add_parser("demo", help="restore test photos with the greedy oracle through the pool (no training)")
    demo.add_argument("overrides", nargs="*", metavar="recipe=FILE|key=value")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tir.config import RecipeError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except RecipeError as err:
        print(f"tir: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
