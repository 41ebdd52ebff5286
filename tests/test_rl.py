"""`tir train rl`: reward plumbing, rollout dumps, and the driver end to end on the
tiny policy (the transformers engine in this process, real tools, FSDP2 actor and reference over
two Ray workers each), including a run killed mid-step and resumed.

Tiny sizes: 2 photos x n=2 trajectories, at most 2 turns, replies constrained to well-formed
calls or the answer (``rollout.choices``), so that episodes call tools while the policy still
picks among them with its own probabilities.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import tir  # noqa: F401  - shims before transformers
from tir.agent import models, prompts
from tir.config import load_recipe
from tir.data.synth import synthesize
from tir.dumps.reader import list_dumps, read_dump
from tir.dumps.writer import DumpWriter
from tir.protocol import Batch
from tir.trainer import rl, rl_setup
from tir.trainer.checkpoint import DataStream, latest_checkpoint
from tir.trainer.run_log import (
    advantage_metrics,
    busy_seconds,
    exploration_metrics,
    no_signal_warning,
    read_records,
)
from tool_pool.client import LocalPool
from tool_pool.tools import tool_schemas

TOOLS = ["brighten_shift", "dehaze_dcp", "denoise_tv", "derain_median", "sharpen_unsharp"]
REPLIES = [prompts.format_call(prompts.ToolCall(name, {})) for name in TOOLS] + [prompts.format_stop()]
STEPS = 3


# ---------------------------------------------------------------- pieces of a step


def test_step_diagnostics_say_whether_a_step_can_teach_anything():
    # two groups of 3: the first explores (2 distinct sequences, first tools a, a, b), the second does not
    sequences = [["a", "x"], ["a", "x"], ["b"], ["c"], ["c"], ["c"]]
    explore = exploration_metrics(sequences, 3)
    first_entropy = -(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3))
    assert explore["explore/distinct_sequences"] == pytest.approx((2 + 1) / 2)
    assert explore["explore/first_tool_entropy"] == pytest.approx(first_entropy / 2)
    assert exploration_metrics([[], []], 2)["explore/first_tool_entropy"] == 0.0  # "none" twice: no choice
    rewards = np.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    advantages = np.array([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    masks = [[1, 1], [1, 1], [1, 0], [1, 1, 1], [1], [1]]  # 5 + 5 policy tokens; 3 of them move
    metrics = advantage_metrics(rewards, advantages, 3, masks)
    assert metrics["advantage/flat_groups"] == 0.5 and metrics["advantage/signal_tokens"] == pytest.approx(3 / 10)
    assert no_signal_warning(metrics) is None
    flat = advantage_metrics(np.full(6, 0.3), np.zeros(6), 3, masks)
    assert flat["advantage/signal_tokens"] == 0.0
    assert "no learning signal" in no_signal_warning({**flat, **explore})
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        exploration_metrics(sequences, 4)


def test_missing_scores_count_as_the_worst_of_the_group():
    finals = [{"psnr": 20.0, "niqe": 5.0}, {"psnr": 22.0}, {"psnr": 18.0, "niqe": 4.0}, {"psnr": 19.0, "niqe": 6.0}]
    inputs = [{"psnr": 17.0, "niqe": 7.0}] * 2 + [{"psnr": 16.0}] * 2
    filled_finals, filled_inputs = rl.fill_missing(finals, inputs, ["psnr", "niqe"], {"psnr": False, "niqe": True}, 2)
    assert filled_finals[1]["niqe"] == 7.0  # NIQE: lower is better, so the worst known is the highest
    assert filled_inputs[2]["niqe"] == filled_inputs[3]["niqe"] == 6.0
    assert finals[1] == {"psnr": 22.0}  # the caller's rows are left alone


def test_busy_seconds_is_the_union_of_overlapping_spans():
    timings = [
        {"spans": [["generate", 0.0, 1.0], ["env", 1.0, 3.0]]},
        {"spans": [["generate", 0.5, 1.5], ["generate", 4.0, 4.5]]},
    ]
    assert busy_seconds(timings, "generate") == pytest.approx(2.0)
    assert busy_seconds(timings, "env") == pytest.approx(2.0)


def test_each_step_samples_with_its_own_reproducible_seed():
    cfg = load_recipe("tiny_cpu", ["run.seed=3", "rollout.temperature=1.0"])
    seeds = [rl.loop_settings(cfg, step).seed for step in (1, 2, 3)]
    assert len(set(seeds)) == 3 and seeds == [rl.loop_settings(cfg, step).seed for step in (1, 2, 3)]
    assert all(0 <= s < 2**31 for s in seeds)
    assert rl.loop_settings(cfg, 1).seed != rl.loop_settings(load_recipe("tiny_cpu", ["run.seed=4"]), 1).seed


def test_each_step_constrains_replies_to_the_recipes_choices():
    assert rl.loop_settings(load_recipe("tiny_cpu"), 1).choices is None
    cfg = recipe(Path("unused"), Path("unused"), Path("unused"))  # the end-to-end runs' recipe
    assert rl.loop_settings(cfg, 1).choices == tuple(REPLIES)
    assert rl.loop_settings(cfg, 1).sampling(8, None)["choices"] == REPLIES


def test_a_metric_the_pool_cannot_score_stops_the_run_at_start_up():
    samples = synthesize("builtin", "noise", per_image=1, seed=0, crop=64, progress=False)
    rl_setup.check_metrics(LocalPool(), samples, ["psnr", "ssim"])
    with pytest.raises(rl_setup.SetupError, match=r"musiq \(\[unavailable\].*nosuch \(\[unknown_metric\]"):
        rl_setup.check_metrics(
            LocalPool(), samples, ["psnr", "musiq", "nosuch"]
        )  # musiq: its weights are not on this machine


def test_policy_path_takes_an_sft_run_folders_hf_checkpoint(tmp_path):
    (tmp_path / "sft" / "hf").mkdir(parents=True)
    (tmp_path / "sft" / "hf" / "config.json").write_text("{}")
    assert rl_setup.policy_path(str(tmp_path / "sft")) == str(tmp_path / "sft" / "hf")
    assert rl_setup.policy_path("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"
    with pytest.raises(FileNotFoundError, match="tir model tiny"):
        rl_setup.policy_path(str(tmp_path / "nothing_here"))


def test_the_closing_line_reports_the_reward_and_each_metrics_raw_gain():
    # the reward's quality term is centred within each group: only the gains show restorations improving
    summary = {
        "steps": 12,
        "window": 3,
        "start": {"reward/mean": -0.5, "reward/gain/psnr": -2.0, "reward/gain/niqe": 0.1, "episode/tool_calls": 1.4},
        "end": {"reward/mean": -0.25, "reward/gain/psnr": -1.0, "reward/gain/niqe": 0.5, "episode/tool_calls": 1.5},
    }
    line = rl.progress_line(summary)
    assert line.startswith("over 12 steps (means of the first and last 3): reward -0.500 -> -0.250")
    assert "niqe gain +0.100 -> +0.500, psnr gain -2.000 -> -1.000, tool calls 1.40 -> 1.50" in line


def test_dumps_are_written_in_the_background_one_file_per_step(tmp_path):
    batch = Batch.from_pydict({"image": [np.full((4, 5, 3), 7, np.uint8)], "reward": [0.5]})
    with DumpWriter(tmp_path / "dumps") as dumps:
        for step in (1, 2, 12):
            dumps.write(step, batch.with_meta(step=step))
    assert list(list_dumps(tmp_path / "dumps")) == [1, 2, 12]
    assert not list((tmp_path / "dumps").glob("*.tmp"))
    back = read_dump(tmp_path / "dumps", 12)
    assert back.meta["step"] == 12 and back.column("image")[0].shape == (4, 5, 3)
    with pytest.raises(FileNotFoundError, match="dumped steps"):
        read_dump(tmp_path / "dumps", 3)


def test_a_failed_dump_is_reported_to_the_driver(tmp_path):
    (tmp_path / "dumps" / "step_000001.parquet").mkdir(parents=True)  # a folder where the file must go
    writer = DumpWriter(tmp_path / "dumps")
    writer.write(1, Batch.from_pydict({"reward": [1.0]}))
    with pytest.raises(RuntimeError, match="writing a rollout dump"):
        writer.flush()
    writer.write(2, Batch.from_pydict({"reward": [1.0]}))  # reported once; later dumps still go out
    writer.close()
    assert list(list_dumps(tmp_path / "dumps")) == [1, 2] and (tmp_path / "dumps" / "step_000002.parquet").is_file()


# ---------------------------------------------------------------- the driver end to end


@pytest.fixture(scope="module")
def policy(tiny_policy_dir):
    return tiny_policy_dir(tool_schemas(TOOLS))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    # 2 photos x 2 degradations (chelsea and stereo_motorcycle are held out for evaluation)
    samples = synthesize("builtin", "dark,noise", per_image=1, seed=0, crop=96, progress=False)
    samples.take(
        [i for i, name in enumerate(samples.column("image_id")) if name in ("astronaut", "coffee")]
    ).to_parquet(root / "train.parquet")
    return root


def recipe(policy, root, out, *overrides):
    cfg = load_recipe(
        "tiny_cpu",
        [
            f"run.output_dir={out}",
            f"model.path={policy}",
            f"data.train_path={root / 'train.parquet'}",
            "pool.backend=local",
            f"pool.tools=[{','.join(TOOLS)}]",
            "rollout.engine=hf",
            "rollout.n=2",
            "rollout.max_turns=2",
            "actor.engine=fsdp2",
            "actor.num_workers=2",
            "actor.micro_batch_size=2",
            "actor.lr=3e-4",
            "algo.kl_coef=0.05",
            f"trainer.total_steps={STEPS}",
            "trainer.batch_size=2",
            "trainer.save_every=1",
            "trainer.log_every=1",
            "rollout.choices=[" + ",".join(f"'{reply}'" for reply in REPLIES) + "]",
            *overrides,
        ],
    )
    assert list(cfg.rollout.choices) == REPLIES
    return cfg


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, policy, root):
    out = root / "uninterrupted"
    summary = rl.train_rl(recipe(policy, root, out))
    return out / "rl", summary


def test_a_run_logs_dumps_and_checkpoints_every_step(uninterrupted, root):
    out, summary = uninterrupted
    records = read_records(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and summary["steps"] == 3
    for record in records:
        for key in (
            "reward/mean",
            "reward/weight/psnr",
            "reward/weight/niqe",
            "reward/gain/psnr",
            "episode/tool_calls",
            "episode/format_errors",
            "actor/kl",
            "actor/entropy",
            "actor/grad_norm",
            "time/generate",
            "time/tools",
            "time/score",
            "time/reference",
            "time/update",
            "time/weight_sync",
            "time/checkpoint",
        ):
            assert key in record, key
        assert sum(record[f"reward/weight/{m}"] for m in ("psnr", "ssim", "niqe")) == pytest.approx(1.0)
        # the rollout engine's log-probs are the actor's: its weights were pushed after every update
        assert record["actor/rollout_logprob_diff"] < 1e-4
    assert records[0]["actor/kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert records[-1]["actor/kl"] > 1e-6  # and leaves it
    assert records[0]["episode/tool_calls"] > 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    # the dumps: every step's trajectories, with the reward's pieces, in the data stream's order
    assert list(list_dumps(out / "dumps")) == [1, 2, 3]
    stream = DataStream(4, seed=0)
    for step in (1, 2, 3):
        dump = read_dump(out / "dumps", step)
        assert len(dump) == 4 and dump.meta["step"] == step
        advantages = np.array(dump.column("advantage")).reshape(2, 2)
        assert np.allclose(advantages.sum(axis=1), 0.0, atol=1e-5)  # GRPO: centred within each image's group
        assert dump.column("image_id")[::2] == [rl_sample_ids(root)[i] for i in stream.indices(2 * (step - 1), 2)]
        row = dump.rows()[0]
        assert set(row["final_scores"]) == {"psnr", "ssim", "niqe"} and row["reward_weights"]["psnr"] > 0
        assert len(row["ref_logprobs"]) == len(row["rollout_logprobs"]) == len(row["input_ids"])
        # the photo, then each successful call's output (the last turn's output ends the episode unseen)
        shown = sum(call["ok"] for call in row["tool_calls"])
        assert np.array_equal(row["images"][0], row["lq"]) and len(row["images"]) - 1 in (shown - 1, shown)
        assert row["reward"] == pytest.approx(sum(row["reward_terms"][k] for k in ("quality", "format", "tool")))

    # checkpoints: the two newest are kept, latest.json names the last; an HF policy at the end
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000002", "step_000003"]
    assert latest_checkpoint(out).name == "step_000003"
    state = json.loads((out / "checkpoints" / "step_000003" / "state.json").read_text())
    assert state["step"] == 3 and state["data_position"] == 6 and state["reward"]["adaptive"]["steps"] == 3
    models.load_policy(summary["hf_checkpoint"])


def rl_sample_ids(root):
    return Batch.from_parquet(root / "train.parquet").column("image_id")


COMPARED = (  # what a resumed or one-step-off run must repeat
    "reward/mean",
    "reward/weight/psnr",
    "reward/gain/psnr",
    "episode/tool_calls",
    "actor/loss",
    "actor/pg_loss",
    "actor/kl",
    "actor/entropy",
    "actor/grad_norm",
)


def killed_during_last_checkpoint(done: Path, killed: Path) -> None:
    """What a kill during step 3's checkpoint leaves: step 3 logged and dumped, its checkpoint
    half-written (a .tmp folder), latest.json still naming step 2."""
    shutil.copytree(done, killed)
    shutil.rmtree(killed / "hf")
    (killed / "checkpoints" / "step_000003").rename(killed / "checkpoints" / "step_000003.tmp")
    (killed / "checkpoints" / "latest.json").write_text(json.dumps({"path": "step_000002", "step": 2}))


def test_a_run_killed_mid_step_resumes_where_it_stopped_and_repeats_the_same_numbers(uninterrupted, policy, root):
    done, _ = uninterrupted
    killed = root / "killed" / "rl"
    killed_during_last_checkpoint(done, killed)

    rl.train_rl(recipe(policy, root, root / "killed", "trainer.resume=auto"))
    before, after = read_records(done / "metrics.jsonl"), read_records(killed / "metrics.jsonl")
    assert [r["step"] for r in after] == [1, 2, 3]  # step 3 ran again and was logged once
    for key in COMPARED:
        assert after[2][key] == before[2][key], key
    assert read_dump(killed / "dumps", 3).column("input_ids") == read_dump(done / "dumps", 3).column("input_ids")
    assert latest_checkpoint(killed).name == "step_000003" and not (killed / "checkpoints" / "step_000003.tmp").exists()


def test_rl_main_says_what_to_make_when_the_policy_is_missing(ray_cluster, tmp_path, capsys):
    code = rl.rl_main(["recipe=tiny_cpu", f"run.output_dir={tmp_path}", f"model.path={tmp_path}/no_policy"])
    assert code == 2 and "tir model tiny" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["policy missing at start-up", "file lost mid-run"])
def test_only_setup_errors_become_one_line_a_file_lost_mid_run_keeps_its_traceback(
    case, policy, monkeypatch, tmp_path, capsys
):
    """No Ray: the cluster, the worker groups and the rollout engine are stand-ins; the recipe,
    policy, data, pool and the setup checks are real. A step that raises FileNotFoundError is a bug, not
    a recipe mistake: ``rl_main`` lets it through with its traceback instead of exit code 2."""
    import contextlib

    import tir.cluster
    import workers.actor

    class StandIn:  # an actor group and a rollout engine that are never reached by a step
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def close(self):
            pass

    def lost_mid_run(run, state, step, schedule=None):
        raise FileNotFoundError("a file lost mid-run")

    monkeypatch.setattr(tir.cluster, "ray_session", lambda ray_cfg: contextlib.nullcontext())
    monkeypatch.setattr(workers.actor, "actor_group", lambda cfg, model_path: StandIn())
    monkeypatch.setattr(rl, "start_rollout_engine", lambda cfg, model_path: StandIn())
    monkeypatch.setattr(rl, "record_placement", lambda run: {})
    monkeypatch.setattr(rl, "rl_step", lost_mid_run)
    samples = synthesize("builtin", "noise", per_image=1, seed=0, crop=64, progress=False)
    samples.to_parquet(tmp_path / "train.parquet")
    if case == "policy missing at start-up":
        policy = tmp_path / "no_policy"
    args = [
        "recipe=tiny_cpu",
        f"run.output_dir={tmp_path / 'out'}",
        f"model.path={policy}",
        f"data.train_path={tmp_path / 'train.parquet'}",
        "pool.backend=local",
        "pool.tools=[denoise_tv]",
        "reward.metrics=[psnr]",
        "algo.kl_coef=0",
        "trainer.resume=never",
        "trainer.dump_rollouts=false",
    ]
    if case == "policy missing at start-up":
        assert rl.rl_main(args) == 2
        printed = capsys.readouterr().out
        assert printed.startswith("[rl] error: ") and str(policy) in printed and "tir model tiny" in printed
        assert printed.count("\n") == 1 and "Traceback" not in printed
    else:
        with pytest.raises(FileNotFoundError, match="a file lost mid-run"):
            rl.rl_main(args)
        assert "[rl] error" not in capsys.readouterr().out


# ---------------------------------------------------------------- exploration and signal options

ABLATIONS = {  # recipe -> the option it changes (besides its name, policy and data paths)
    "ablation_dynamic_sampling": {"algo.dynamic_sampling": True},
    "ablation_high_temperature": {"rollout.temperature": 1.2},
    "ablation_entropy_bonus": {"algo.entropy_coef": 0.01},
    "ablation_no_kl": {"algo.kl_coef": 0.0},
    "ablation_group8": {"rollout.n": 8},
    "ablation_expert_gap": {"algo.expert_gap_coef": 0.1},
    "ablation_one_step_off": {"trainer.rollout_mode": "one_step_off"},
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_each_exploration_ablation_changes_its_option_and_nothing_else(name):
    from omegaconf import OmegaConf

    def flat(cfg, prefix=""):
        out = {}
        for key, value in cfg.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    base = flat(OmegaConf.to_container(load_recipe("tiny_cpu")))
    ablation = flat(OmegaConf.to_container(load_recipe(name)))
    changed = {k: ablation[k] for k in ablation if ablation[k] != base[k]}
    paths = {"run.name", "run.output_dir", "model.path", "data.train_path", "data.test_path"}
    assert {k: v for k, v in changed.items() if k not in paths} == ABLATIONS[name]


@pytest.mark.parametrize(
    "override",
    ["algo.kl_coef=-0.1", "algo.entropy_coef=-1", "algo.max_resample_batches=-1", "algo.expert_gap_coef=-0.5"],
)
def test_exploration_options_out_of_range_fail_at_load_time(override):
    from tir.config import RecipeError

    with pytest.raises(RecipeError, match=override.split("=")[0]):
        load_recipe("tiny_cpu", [override])


def test_the_gap_to_the_experts_best_is_read_from_the_sft_data_and_logged(tmp_path):
    from tir.trainer.run_log import expert_gap_metrics

    samples = Batch.from_pydict({"image_id": ["a", "a", "b"], "combo": ["noise", "noise", "dark"], "seed": [1, 2, 3]})
    Batch.from_pydict(
        {
            "image_id": ["a", "b", "z"],
            "combo": ["noise", "dark", "dark"],
            "seed": [2, 3, 3],
            "sample_expert_scores": ['{"psnr": 24.0}', '{"psnr": 30.5, "ssim": 0.9}', '{"psnr": 1.0}'],
        }
    ).to_parquet(tmp_path / "sft.parquet")
    cfg = load_recipe("tiny_cpu", [f"data.train_path={tmp_path / 'train.parquet'}"])  # sft.parquet beside it
    expert = rl_setup.expert_scores(cfg, samples)
    assert np.isnan(expert[0]) and expert[1:].tolist() == [24.0, 30.5]
    assert np.isnan(
        rl_setup.expert_scores(load_recipe("tiny_cpu", ["data.train_path=/nowhere/t.parquet"]), samples)
    ).all()
    metrics = expert_gap_metrics(np.array([20.0, 23.0, 31.0]), expert)
    assert metrics["reward/gap_to_expert_db"] == pytest.approx((1.0 - 0.5) / 2)  # row 0 has no expert score
    assert metrics["reward/reaches_expert"] == 0.5 and metrics["reward/expert_known"] == pytest.approx(2 / 3)
    assert expert_gap_metrics(np.array([20.0]), np.array([np.nan])) == {}


def test_dynamic_sampling_trains_on_groups_that_differ_and_counts_every_photo_drawn(ray_cluster, policy, root):
    # with kl_coef 0 (no reference group) and a hotter rollout (old log-probs recomputed)
    folder = root / "dynamic"
    folder.mkdir()
    shutil.copy(root / "train.parquet", folder / "train.parquet")
    cfg = recipe(
        policy,
        root,
        folder,
        f"data.train_path={folder / 'train.parquet'}",
        "algo.dynamic_sampling=true",
        "algo.max_resample_batches=3",
        "algo.kl_coef=0",
        "rollout.temperature=1.3",
        "trainer.total_steps=2",
    )
    out = Path(rl.train_rl(cfg)["hf_checkpoint"]).parent
    records = read_records(out / "metrics.jsonl")
    assert "reference" not in json.loads((out / "placement.json").read_text())
    drawn = 0
    for record in records:
        assert "time/reference" not in record and "actor/kl" not in record and "time/old_logprobs" in record
        draws, kept = record["sampling/draws"], int(record["sampling/groups_kept"])
        photos = record["sampling/photos_drawn"]
        assert 1 <= draws <= 4 and draws + 1 <= photos <= 2 * draws and 1 <= kept <= 2
        drawn += photos
        rewards = np.array(read_dump(out / "dumps", record["step"]).column("reward")).reshape(kept, 2)
        differ = np.ptp(rewards, axis=1) > 1e-6
        # the first groups that differ, as many as the batch holds; only when none did within the cap, draw 0 as is
        assert differ.all() or (not differ.any() and draws == 4 and kept == 2)
        assert record["advantage/flat_groups"] == (0.0 if differ.all() else 1.0)
        assert record["sampling/groups_dropped"] == (photos - kept if differ.any() else 0)
    state = json.loads((out / "checkpoints" / "step_000002" / "state.json").read_text())
    assert state["data_position"] == drawn


# ---------------------------------------------------------------- one-step-off rollouts (trainer.rollout_mode)

FROZEN = "actor.lr=1e-30"  # an Adam step of 1e-30 leaves every float32 weight as it was


def test_one_step_off_with_weights_that_do_not_change_computes_what_sync_computes(ray_cluster, policy, root):
    runs = {}
    for mode in ("sync", "one_step_off"):
        cfg = recipe(policy, root, root / f"frozen_{mode}", FROZEN, f"trainer.rollout_mode={mode}")
        runs[mode] = Path(rl.train_rl(cfg)["hf_checkpoint"]).parent
    sync, ahead = (read_records(runs[m] / "metrics.jsonl") for m in ("sync", "one_step_off"))
    assert [r["step"] for r in ahead] == [1, 2, 3]
    for before, after in zip(sync, ahead):
        for key in COMPARED:
            assert after[key] == pytest.approx(before[key], rel=1e-6, abs=1e-9), (after["step"], key)
        assert after["step"] == 1 or "time/rollout_wait" in after  # steps 2 and 3 were collected ahead
        assert "time/rollout_wait" not in before
    for step in (1, 2, 3):
        assert read_dump(runs["one_step_off"] / "dumps", step).column("input_ids") == read_dump(
            runs["sync"] / "dumps", step
        ).column("input_ids")


@pytest.fixture(scope="module")
def ahead_run(ray_cluster, policy, root):
    out = root / "ahead"
    rl.train_rl(recipe(policy, root, out, "trainer.rollout_mode=one_step_off"))
    return out / "rl"


def test_one_step_off_trains_on_the_previous_weights_rollouts_and_resumes_exactly(ahead_run, policy, root):
    records = read_records(ahead_run / "metrics.jsonl")
    # step 1 was rolled out with the actor's weights; steps 2 and 3 with those one update older
    assert records[0]["actor/rollout_logprob_diff"] < 1e-4
    assert all(r["actor/rollout_logprob_diff"] > 1e-6 for r in records[1:])
    # the checkpoint of step 2 holds step 3's batch, collected before it was written
    assert (ahead_run / "checkpoints" / "step_000002" / "prefetched.pkl").is_file()
    assert not (ahead_run / "checkpoints" / "step_000003" / "prefetched.pkl").exists()  # the last step

    killed = root / "ahead_killed" / "rl"
    killed_during_last_checkpoint(ahead_run, killed)
    rl.train_rl(recipe(policy, root, root / "ahead_killed", "trainer.rollout_mode=one_step_off"))
    after = read_records(killed / "metrics.jsonl")
    assert [r["step"] for r in after] == [1, 2, 3]
    for key in COMPARED:
        assert after[2][key] == records[2][key], key
    assert read_dump(killed / "dumps", 3).column("input_ids") == read_dump(ahead_run / "dumps", 3).column("input_ids")


def test_rollout_mode_out_of_range_fails_at_load_time():
    from tir.config import RecipeError

    with pytest.raises(RecipeError, match="trainer.rollout_mode=.async.*one of sync, one_step_off"):
        load_recipe("tiny_cpu", ["trainer.rollout_mode=async"])


def test_the_one_step_off_timing_model_overlaps_the_shorter_side():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "one_step_off.py"
    spec = importlib.util.spec_from_file_location("one_step_off_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # R 4 s of rollout, T 2 s of training, 1 s serial: 7 s in sync
    assert bench.predicted_step(4.0, 2.0, 1.0, contention=0.0) == 5.0  # the training hides behind the rollout
    assert bench.predicted_step(4.0, 2.0, 1.0, contention=1.0) == 7.0  # nothing hidden: the sync step
    assert bench.fitted_contention((4.0, 2.0, 1.0), 6.0) == pytest.approx(0.5)
    assert bench.gain_for_share(0.5, serial_share=0.0) == pytest.approx(2.0)
    # a one-step-off step: its rollout ran during the previous step; the driver waited 0.5 s for it
    record = {"time/step": 4.0, "time/rollout": 3.0, "time/score": 1.0, "time/update": 2.5, "time/rollout_wait": 0.5}
    assert bench.phase_split(record) == (4.0, 2.5, 1.0)


def test_the_label_ceiling_picks_each_perceived_sets_best_schedule_on_training_crops():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "label_ceiling.py"
    spec = importlib.util.spec_from_file_location("label_ceiling_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    schedules = bench.schedules_of(list("abcdefgh"), 2)
    assert len(schedules) == 1 + 8 + 56 and schedules[0] == () and ("a", "a") not in schedules
    # PSNR [crop, schedule]: crops 0-1 perceived {noise}, crop 2 {dark}
    train = np.array([[20.0, 22.0, 21.0], [20.0, 21.0, 24.0], [18.0, 17.0, 19.0]])
    seen = [("noise",), ("noise",), ("dark",)]
    choice = bench.best_per_set(train, seen)
    assert choice == {("noise",): 2, ("dark",): 2}  # noise: means 20, 21.5, 22.5
    test = np.array([[10.0, 11.0, 12.0], [30.0, 31.0, 29.0]])
    # a set unseen in training gets the fallback schedule (here 1)
    assert bench.apply(choice, 1, test, [("noise",), ("rain",)]) == pytest.approx((12.0 + 31.0) / 2)
