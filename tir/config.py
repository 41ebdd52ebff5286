"""Recipes: a typed schema with defaults, YAML files that name a base and override it, and
dotlist overrides from the command line.

    cfg = load_recipe("recipes/tiny_cpu.yaml", ["trainer.total_steps=3"])

A recipe file may say ``base: base.yaml`` (a path relative to the file, or a packaged recipe
name); bases chain. Every layer is checked against the schema as it is merged, so an error
names the layer (file or command line), the key, and the closest valid key.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from tir.registry import unknown_name

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"  # source tree / editable install
if not RECIPES_DIR.is_dir():  # a regular install ships recipes/ as the package tir.recipes
    RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


# ------------------------------------------------------------------------------ the schema
@dataclass
class RunConfig:
    name: str = "tir"
    output_dir: str = "runs/${run.name}"
    seed: int = 0


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: attach to a running cluster if there is one, else start one
    num_cpus: Optional[int] = None
    dashboard_host: str = "127.0.0.1"


@dataclass
class ModelConfig:
    path: str = "runs/tiny_policy"  # a local checkpoint dir or a hub cache name
    dtype: str = "float32"
    perception_cues: bool = False  # measured degradation cues as text beside each image
    cue_style: str = "full"  # "full": cues + guess; "guess": the guess; "confidence": guess + unsure ones (learned)
    # who guesses the degradations named in the cues and used by the baselines: "thresholds" (hand-set
    # cue thresholds) or "learned" (the recogniser of `tir perception train`, served by the pool)
    perception: str = "thresholds"
    perception_model: Optional[str] = None  # the recogniser's checkpoint folder; None: the one tir ships
    tool_prompt: str = "full"  # "full": the tools' JSON schemas; "names": names only, default arguments (tir.agent.prompts.policy_schemas)


@dataclass
class DataConfig:
    hq: str = "builtin"  # a folder of HQ photos, or the photos scikit-image ships
    train_combos: list[str] = field(default_factory=lambda: ["groupA"])
    test_combos: list[str] = field(default_factory=lambda: ["groupA", "groupB", "groupC"])
    per_image: int = 4
    test_per_image: int = 2  # test samples per held-out photo and combination (tir quickstart)
    crop_mode: Optional[str] = None  # "center" (the default) or "random" crops
    crop: int = 128
    train_path: str = "${run.output_dir}/data/train.parquet"
    test_path: str = "${run.output_dir}/data/test.parquet"


@dataclass
class PoolConfig:
    backend: str = "serve"  # "serve": the cluster-wide Ray Serve pool; "local": tools in the caller
    name: str = "tir_tool_pool"
    num_replicas: int = 1
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    # Ray custom resources each replica also takes, e.g. {head_node: 1}: only nodes started with
    # them (`ray start --resources`) can host it, which is how a recipe places it (multi-node)
    resources: dict[str, float] = field(default_factory=dict)
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01  # the longest a batch waits for more requests
    # the batch wait is this times the replica's recent forward time, at most batch_wait_timeout_s
    # (a GPU replica's 5 ms forwards wait 0.5 ms, a CPU one's seconds the cap); 0: always the cap
    batch_wait_scale: float = 0.1
    max_models_per_replica: int = 8
    tools: list[str] = field(default_factory=list)  # empty: every available tool
    manifest: Optional[str] = None  # YAML of neural tools and their checkpoints
    call_timeout_s: float = 60.0
    max_retries: int = 3
    # result cache per replica (and per local pool), bytes; 0: off (tool_pool/cache.py)
    cache_bytes: int = 256 * 2**20
    # torch intra-op threads per replica: "auto" = num_cpus_per_replica rounded up (at least 1), or
    # a number. Without it, torch follows Ray's OMP_NUM_THREADS (whole CPUs, at least 1: 1.5 -> 1)
    torch_threads: str = "auto"
    # images per tool forward pass within a batch: "auto" = the whole batch on GPU replicas, 1 on
    # CPU ones (stacked images cost more CPU per image there), or a number
    forward_batch: str = "auto"


@dataclass
class RolloutConfig:
    engine: str = "vllm"  # "vllm" or "hf" (transformers)
    num_replicas: int = 1
    tensor_parallel_size: int = 1
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    # Ray custom resources each replica also takes (as pool.resources); set, even the hf engine
    # runs as a replica where they are, never in the driver
    resources: dict[str, float] = field(default_factory=dict)
    n: int = 4  # trajectories per image (the GRPO group)
    max_turns: int = 4
    max_length: int = 4096  # tokens of a whole trajectory; longer ones end at a turn boundary
    max_format_errors: int = 3  # malformed replies before an episode ends
    concurrency: int = 64  # trajectories in flight per driver
    max_batch_size: int = 8  # turns one engine generates together (transformers backend)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    gpu_memory_utilization: float = 0.5
    # None: free generation. A list of texts: every reply in the RL rollouts is one of them, picked
    # with the policy's own probabilities (LoopSettings.choices): smoke runs of a random tiny policy.
    # Evaluations ignore it (greedy and free: tir.eval.tool_choice.greedy)
    choices: Optional[list[str]] = None


@dataclass
class EnvConfig:
    # the largest image a tool call may produce (tir.agent.env): a call over it is refused
    max_side: int = 4096
    max_pixels: int = 16_777_216  # 4096 x 4096


@dataclass
class ActorConfig:
    engine: str = "fsdp2"  # "fsdp2" or "deepspeed"
    num_workers: int = 1
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    # Ray custom resources each actor and reference worker also takes (as pool.resources)
    resources: dict[str, float] = field(default_factory=dict)
    zero_stage: int = 2
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # or "cosine" (down to min_lr_ratio x lr)
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 4


@dataclass
class AlgoConfig:
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    kl_coef: float = 0.01
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"  # or "seq-mean-token-mean", "seq-mean-token-sum"
    kl_kind: str = "k3"  # "k1", "k2" or the low-variance "k3"
    adv_eps: float = 1e-6
    adv_normalize_std: bool = True  # False: Dr. GRPO (no division by the group std)
    recompute_old_logprobs: Optional[bool] = None  # None: when rollout.temperature != 1 (sampled log-probs differ)
    # DAPO's dynamic sampling: groups whose rewards are all equal (no advantage, nothing to learn)
    # are dropped and more photos drawn (as many as groups are missing) until the batch holds
    # trainer.batch_size groups that differ or max_resample_batches extra draws were made
    dynamic_sampling: bool = False
    max_resample_batches: int = 2
    # a reward term relative to the expert's best schedule for the photo (its PSNR, from the SFT
    # data): minus this x the dB the final image falls short of it (0: off; tir.rl.algos.expert_shortfall)
    expert_gap_coef: float = 0.0


@dataclass
class RewardConfig:
    metrics: list[str] = field(default_factory=lambda: ["psnr", "ssim", "niqe"])
    weights: dict[str, float] = field(default_factory=dict)  # initial weights; empty: equal
    adaptive: bool = True  # False: the fixed-weight sum (the ablation)
    format_penalty: float = 0.5
    tool_cost: float = 0.05
    # adaptive weights (tir/rl/reward.py AdaptiveWeights): EMA decay and the pull of each signal
    decay: float = 0.9
    agreement_scale: float = 4.0
    improvement_scale: float = 1.0
    min_weight: float = 0.02


@dataclass
class SFTConfig:
    epochs: int = 2
    lr: float = 1e-4
    perturb: bool = True
    reorder_prob: float = 0.3
    swap_tool_prob: float = 0.3
    beam_width: int = 4
    partial_schedules: bool = True  # the expert may leave a degradation untreated (tir.data.expert)
    # None below: the driver's default, named beside each.
    tie_margin: Optional[float] = None  # expert near ties, in TIE_TOLERANCEs (tir.data.expert: 1.0)
    # "combination" (one order of subtasks per combination), "combination_tools" (one schedule of tools
    # per combination) or "sample" (each sample's best); tir.data.expert: combination
    expert_rule: Optional[str] = None
    batch_size: Optional[int] = None  # rows per SFT step (trainer.batch_size)
    data_path: Optional[str] = None  # expert trajectories (<run.output_dir>/data/sft.parquet)
    eval_samples: Optional[int] = None  # held-out rows scored each evaluation (64)
    eval_every: Optional[int] = None  # epochs between held-out evaluations (1; the last epoch always)
    heldout_images: Optional[list[str]] = None  # photos never trained on (chelsea, stereo_motorcycle)


@dataclass
class TrainerConfig:
    total_steps: int = 10
    batch_size: int = 8  # images per step (each rolled out rollout.n times)
    save_every: int = 5
    resume: str = "auto"  # "auto", "never", or a checkpoint dir
    keep_checkpoints: Optional[int] = None  # newest checkpoints kept, RL and SFT (2)
    dump_rollouts: bool = True
    log_every: int = 1
    # "sync", or "one_step_off": step k+1's rollouts are generated while the actor trains on step k
    # (tir/trainer/rl_ahead.py)
    rollout_mode: str = "sync"


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# ------------------------------------------------------------------------------ loading
class RecipeError(ValueError):
    pass


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            full = f"{prefix}{key}"
            keys.append(full)
            keys.extend(_valid_keys(node._get_node(key), full + "."))
    return keys


def _expected_type(schema: DictConfig, key: str) -> str:
    node: Any = schema
    try:
        for part in key.split("."):
            node = node._get_node(part)
        ref = node._metadata.ref_type
    except Exception:  # noqa: BLE001 - a key outside the schema: say what we can
        return "a value of the schema's type"
    return getattr(ref, "__name__", None) or str(ref).replace("typing.", "")


def _explain(err: Exception, layer: str, schema: DictConfig) -> RecipeError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        keys = _valid_keys(schema)
        section = str(key).rpartition(".")[0]
        siblings = [k for k in keys if k.rpartition(".")[0] == section]  # listed first
        return RecipeError(f"{layer}: " + unknown_name("key", key, siblings + [k for k in keys if k not in siblings]))
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return RecipeError(f"{layer}: key {key!r} expects {_expected_type(schema, key)}: {msg}")
    return RecipeError(f"{layer}: {err}")


def find_recipe(name: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """A recipe path as given, relative to the recipe naming it, or a packaged recipe."""
    name = str(name)
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name)
    candidates += [RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    packaged = sorted(p.name for p in RECIPES_DIR.glob("*.yaml"))
    raise RecipeError(f"recipe {name!r} not found (looked in: {', '.join(map(str, candidates))}; packaged: {packaged})")


def _layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """The chain of recipe files, base first."""
    if path in seen:
        raise RecipeError(f"recipe {path} names itself as a base (chain: {[str(p) for p in seen]})")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:  # a syntax error: one line naming the file and the line
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{where}: not valid YAML ({problem})") from None
    if not isinstance(loaded, DictConfig):
        raise RecipeError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
    base = loaded.pop("base", None)
    layers = _layers(find_recipe(base, path.parent), seen + (path,)) if base else []
    return layers + [(str(path), loaded)]


def load_recipe(recipe: str | os.PathLike | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Schema defaults <- base recipes <- the recipe <- command-line ``key=value`` overrides."""
    schema = OmegaConf.structured(Recipe)
    cfg = schema
    layers = _layers(find_recipe(recipe)) if recipe else []
    if overrides:
        try:
            layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
        except Exception as err:  # noqa: BLE001 - omegaconf raises several grammar errors
            raise RecipeError(f"command line: cannot parse overrides {overrides}: {err}") from err
    for name, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except (ConfigKeyError, ConfigAttributeError, ValidationError) as err:
            raise _explain(err, name, schema) from err
    try:
        OmegaConf.resolve(cfg)
    except Exception as err:  # noqa: BLE001
        raise RecipeError(f"cannot resolve interpolations: {err}") from err
    check_ranges(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


# key -> (the check, the range as the error says it); a value outside it fails at load time
_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_AUTO_OR_AT_LEAST_1 = (lambda v: v == "auto" or (v.isdigit() and int(v) >= 1), "'auto' or >= 1")


def _one_of(*names: str) -> tuple:
    return (lambda v: v in names, "one of " + ", ".join(names))


RANGES: dict[str, tuple] = {
    "trainer.total_steps": _AT_LEAST_1,
    "trainer.batch_size": _AT_LEAST_1,
    "trainer.save_every": _NON_NEGATIVE,
    "trainer.log_every": _AT_LEAST_1,
    "trainer.rollout_mode": _one_of("sync", "one_step_off"),  # tir.trainer.rl_ahead.ROLLOUT_MODES
    "actor.lr": _POSITIVE,
    "actor.num_workers": _AT_LEAST_1,
    "actor.micro_batch_size": _AT_LEAST_1,
    "pool.num_replicas": _AT_LEAST_1,
    "pool.max_batch_size": _AT_LEAST_1,
    "pool.cache_bytes": _NON_NEGATIVE,
    "pool.batch_wait_timeout_s": _NON_NEGATIVE,
    "pool.batch_wait_scale": _NON_NEGATIVE,
    "pool.torch_threads": _AUTO_OR_AT_LEAST_1,
    "pool.forward_batch": _AUTO_OR_AT_LEAST_1,
    "rollout.n": _AT_LEAST_1,
    "algo.kl_coef": _NON_NEGATIVE,
    "algo.entropy_coef": _NON_NEGATIVE,
    "algo.max_resample_batches": _NON_NEGATIVE,
    "algo.expert_gap_coef": _NON_NEGATIVE,
    "rollout.num_replicas": _AT_LEAST_1,
    "rollout.max_turns": _AT_LEAST_1,
    "rollout.max_new_tokens": _AT_LEAST_1,
    "rollout.max_length": _AT_LEAST_1,
    "rollout.temperature": _NON_NEGATIVE,
    "rollout.top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "data.crop": _AT_LEAST_1,
    "data.per_image": _AT_LEAST_1,
    "env.max_side": _AT_LEAST_1,
    "env.max_pixels": _AT_LEAST_1,
    "model.perception": _one_of("thresholds", "learned"),  # tir.agent.perceive.PERCEPTIONS
    "model.cue_style": _one_of("full", "guess", "confidence"),  # tir.data.perception.CUE_STYLES
    "model.tool_prompt": _one_of("full", "names"),  # tir.agent.prompts.TOOL_PROMPTS
}


def check_ranges(cfg: DictConfig) -> None:
    """Each value of ``RANGES`` (and ``rollout.engine`` among the registered rollout engines) in
    its range, or a ``RecipeError`` naming the key, the value and the range."""
    from workers.rollout.base import ROLLOUT_ENGINES  # the registry (a new backend adds itself)

    checks = dict(RANGES, **{"rollout.engine": _one_of(*sorted(ROLLOUT_ENGINES))})
    for key, (ok, allowed) in checks.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not ok(value):
            raise RecipeError(f"{key}={value!r} is out of range: expected {allowed}")
    style, perception = OmegaConf.select(cfg, "model.cue_style"), OmegaConf.select(cfg, "model.perception")
    if style == "confidence" and perception != "learned":
        raise RecipeError("model.cue_style=confidence needs model.perception=learned (thresholds give no confidence)")


def split_cli_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    """``["recipe=x.yaml", "a.b=1"]`` -> ("x.yaml", ["a.b=1"])."""
    recipe, rest = None, []
    for arg in args:
        if "=" not in arg:
            raise RecipeError(f"expected key=value arguments, got {arg!r}")
        key, value = arg.split("=", 1)
        if key == "recipe":
            recipe = value
        else:
            rest.append(arg)
    return recipe, rest


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_hash(cfg: DictConfig) -> str:
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:12]


def save_resolved(cfg: DictConfig, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config next to a run's outputs, atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "config.yaml"
    fd, tmp = tempfile.mkstemp(dir=run_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(to_yaml(cfg))
    os.replace(tmp, target)
    return target


def value_or(cfg, key: str, default):
    """``cfg``'s value at dotted ``key``, or ``default`` when it is null or absent (schema keys
    whose null means "the driver's default", named beside each key above)."""
    value = OmegaConf.select(cfg, key, default=None)
    if value is None:
        return default
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def custom_resources(section) -> dict[str, float]:
    """A recipe section's ``resources`` (placement by node) as a plain dict. CPUs and GPUs have
    their own keys (``num_cpus_per_*``): Ray refuses them among custom resources."""
    resources = {str(k): float(v) for k, v in (section.get("resources") or {}).items()}
    builtin = sorted(set(resources) & {"CPU", "GPU", "memory"})
    if builtin:
        raise RecipeError(f"resources: {builtin} are not custom resources; use num_cpus_per_* / num_gpus_per_* instead")
    return resources
