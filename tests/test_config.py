import re
from pathlib import Path

import pytest
import yaml

from tir.config import RECIPES_DIR, RecipeError, config_hash, load_recipe, save_resolved, split_cli_overrides


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_schema_defaults_without_a_recipe():
    cfg = load_recipe()
    assert cfg.trainer.total_steps == 10 and cfg.actor.engine == "fsdp2"
    assert cfg.run.output_dir == "runs/tir"  # interpolation resolved


def test_packaged_tiny_recipe_inherits_base_and_takes_overrides():
    recipe, overrides = split_cli_overrides(
        ["recipe=recipes/tiny_cpu.yaml", "trainer.total_steps=3", "algo.kl_coef=0.5"]
    )
    cfg = load_recipe(recipe, overrides)
    assert cfg.run.name == "tiny_cpu" and cfg.model.path == "runs/tiny_cpu/tiny_policy"
    assert cfg.reward.metrics == ["psnr", "ssim", "niqe"]  # from base.yaml
    assert cfg.trainer.total_steps == 3 and cfg.algo.kl_coef == 0.5
    assert load_recipe("tiny_cpu").trainer.total_steps == 3  # found by packaged name too


def test_chained_bases_override_in_order(tmp_path):
    write(tmp_path / "a.yaml", "base: base.yaml\nrollout:\n  n: 3\n  max_turns: 2\n")
    write(tmp_path / "b.yaml", "base: a.yaml\nrollout:\n  n: 8\n")
    cfg = load_recipe(tmp_path / "b.yaml")
    assert (cfg.rollout.n, cfg.rollout.max_turns, cfg.rollout.engine) == (8, 2, "vllm")


def test_unknown_key_names_key_file_and_closest(tmp_path):
    path = write(tmp_path / "typo.yaml", "trainer:\n  total_step: 3\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert (
        str(path) in message and "'trainer.total_step'" in message and "did you mean 'trainer.total_steps'" in message
    )


def test_unknown_key_on_the_command_line():
    with pytest.raises(
        RecipeError, match=r"command line: unknown key 'rollout.temprature'; did you mean 'rollout.temperature'"
    ):
        load_recipe("tiny_cpu", ["rollout.temprature=0.7"])


def test_wrong_type_names_the_expected_type(tmp_path):
    path = write(tmp_path / "bad.yaml", "trainer:\n  total_steps: many\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: key 'trainer.total_steps' expects int"):
        load_recipe(path)


def test_missing_recipe_and_cycles(tmp_path):
    with pytest.raises(RecipeError, match="recipe 'nope.yaml' not found"):
        load_recipe("nope.yaml")
    write(tmp_path / "x.yaml", "base: y.yaml\n")
    write(tmp_path / "y.yaml", "base: x.yaml\n")
    with pytest.raises(RecipeError, match="names itself as a base"):
        load_recipe(tmp_path / "x.yaml")
    with pytest.raises(RecipeError, match="expected key=value"):
        split_cli_overrides(["trainer.total_steps"])


def test_resolved_config_is_saved_and_reloads_identically(tmp_path):
    cfg = load_recipe("tiny_cpu", ["run.seed=7"])
    saved = save_resolved(cfg, tmp_path / "run")
    assert yaml.safe_load(saved.read_text())["run"]["seed"] == 7
    again = load_recipe(saved)
    assert config_hash(again) == config_hash(cfg)


def test_rollout_choices_is_a_recipe_key(tmp_path):
    replies = ['<tool_call>{"name": "denoise_tv", "arguments": {}}</tool_call>', "<answer>done</answer>"]
    assert load_recipe("tiny_cpu").rollout.choices is None  # free generation
    cfg = load_recipe("tiny_cpu", ["rollout.choices=[" + ",".join(f"'{r}'" for r in replies) + "]"])
    assert list(cfg.rollout.choices) == replies
    path = write(tmp_path / "smoke.yaml", "base: tiny_cpu\nrollout:\n  choices:\n    - " + yaml.safe_dump(replies[0]))
    assert list(load_recipe(path).rollout.choices) == replies[:1]
    with pytest.raises(RecipeError, match=r"key 'rollout.choices' expects"):
        load_recipe("tiny_cpu", ["rollout.choices=3"])


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  total_steps: 3\n  batch_size: [1, 2\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml:\d+: not valid YAML") as err:
        load_recipe(bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override, words",
    [
        ("trainer.total_steps=-5", "trainer.total_steps=-5 is out of range: expected >= 1"),
        ("trainer.batch_size=0", "trainer.batch_size=0 is out of range: expected >= 1"),
        ("actor.lr=-1", "actor.lr=-1.0 is out of range: expected > 0"),
        ("pool.num_replicas=0", "pool.num_replicas=0 is out of range: expected >= 1"),
        ("rollout.engine=foo", "rollout.engine='foo' is out of range: expected one of hf, vllm"),
        ("rollout.n=0", "rollout.n=0 is out of range"),
        ("model.perception=magic", "expected one of thresholds, learned"),
        ("model.cue_style=long", "expected one of full, guess, confidence"),
        ("model.tool_prompt=some", "expected one of full, names"),
    ],
)
def test_recipe_values_are_range_checked_at_load_time(override, words):
    with pytest.raises(RecipeError, match=re.escape(words)):
        load_recipe("tiny_cpu", [override])


def test_confidence_cues_need_the_learned_perception():
    with pytest.raises(RecipeError, match="model.cue_style=confidence needs model.perception=learned"):
        load_recipe("tiny_cpu", ["model.cue_style=confidence", "model.perception=thresholds"])
    assert (
        load_recipe("tiny_cpu", ["model.cue_style=confidence", "model.perception=learned"]).model.cue_style
        == "confidence"
    )


def test_every_packaged_recipe_is_in_range():
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        load_recipe(path)


def test_a_quickstart_folder_from_other_inputs_is_set_aside_never_reused(tmp_path):
    from tir.quickstart import INPUTS_FILE, claim_run_folder, run_inputs

    cfg = load_recipe("quickstart", [f"run.output_dir={tmp_path / 'run'}"])
    inputs = run_inputs(cfg)
    assert set(inputs) >= {"recipe", "recogniser"} and "missing" not in inputs.values()
    assert run_inputs(load_recipe("quickstart", [f"run.output_dir={tmp_path / 'run'}", "ray.num_cpus=1"])) == inputs
    assert run_inputs(load_recipe("quickstart", ["sft.epochs=1"]))["recipe"] != inputs["recipe"]
    other = tmp_path / "other_recogniser"
    other.mkdir()
    (other / "model.pt").write_bytes(b"another checkpoint")
    changed = run_inputs(load_recipe("quickstart", [f"model.perception_model={other}"]))
    assert changed["recogniser"] != inputs["recogniser"]
    # the quickstart serves both trained networks: their weights count; a tool it does not serve does not
    assert {"manifest", "tool:jpeg_compact", "tool:sr_compact"} <= set(inputs)
    assert "tool:sr_compact" not in run_inputs(load_recipe("ablation_neural_jpeg"))
    assert "manifest" not in run_inputs(load_recipe("quickstart_weight_free"))

    out = tmp_path / "run"
    claim_run_folder(out, inputs)  # a new folder: the inputs are recorded
    (out / "stage_output").write_text("made from these inputs")
    claim_run_folder(out, inputs)  # the same inputs: a killed run continues where it stopped
    assert (out / "stage_output").is_file()
    claim_run_folder(out, changed)  # other inputs: the old run is renamed aside, nothing is deleted
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.stale-")]
    assert len(aside) == 1 and (aside[0] / "stage_output").read_text() == "made from these inputs"
    assert sorted(p.name for p in out.iterdir()) == [INPUTS_FILE]
    (out / INPUTS_FILE).unlink()
    (out / "stage_output").write_text("from a version that recorded no inputs")
    claim_run_folder(out, changed)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run.stale-")]) == 2  # even within one second
    assert not (out / "stage_output").exists()
