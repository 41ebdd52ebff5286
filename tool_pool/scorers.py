"""Image-quality scorers: pyiqa metrics, each registered by name in ``METRICS``.

A scorer scores a batch of uint8 RGB images (HxWx3), full-reference ones against references:
``get_scorer("psnr").score(images, references) -> np.ndarray``. Models are built once per
process and kept per (name, device, weights folders).

Weights never come from the network. Metrics with weights look for each file in, in order:
the ``weights_dir`` argument, the folder named by ``$TIR_IQA_WEIGHTS``, then the cache of the
library that owns it (pyiqa's ``<torch hub>/pyiqa``, torchvision's ``<torch hub>/checkpoints``,
CLIP's ``<torch hub>/clip``, the Hugging Face cache for timm). Backbones that torchvision or
timm load by themselves are only found in their own caches (set ``TORCH_HOME`` / ``HF_HOME``).
A missing file raises ``MetricUnavailable`` naming the metric, the file and where it was sought.

NIQE needs only the pristine-image statistics that basicsr ships; they are written once to a
``.mat`` file in tir's cache folder, the format pyiqa reads.
"""

from __future__ import annotations

import os

# Before pyiqa (and through it timm / huggingface_hub) is imported: huggingface_hub reads this
# once at import, and without it a missing timm backbone means minutes of DNS retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from pyiqa.default_model_configs import DEFAULT_CONFIGS

import tir  # noqa: F401  (environment shims: before torchvision / pyiqa)
from tir.registry import Registry
from tool_pool.imaging import NR_MAX_PIXELS, bounded_view  # noqa: F401  (no-reference scoring's view)

METRICS = Registry("metric")

# Work offline on any machine, on images of 96 px and more (the reward's default).
DEFAULT_METRICS = ("psnr", "ssim", "niqe", "piqe")
# Everything that needs no downloaded weights (ms_ssim needs 161 px, so it is not a default).
OFFLINE_METRICS = ("psnr", "ssim", "ms_ssim", "niqe", "piqe", "fsim", "gmsd", "vif", "entropy")
# What AgenticIR (and so TIR-Agent) reports: needs downloaded weights for the last four.
PROTOCOL_METRICS = ("psnr", "ssim", "lpips", "maniqa", "clipiqa", "musiq")


class MetricUnavailable(RuntimeError):
    """A metric cannot be built here: its weights (or a module it needs) are missing."""


# ---------------------------------------------------------------- where weights live


@dataclass(frozen=True)
class WeightFile:
    """One file a metric needs. ``owner`` says which library loads it from which cache:
    "pyiqa", "clip" (both also searched in the weights folders), "torchvision" or "timm"."""

    filename: str
    owner: str
    url: str = ""
    hf_repo: str = ""  # timm only: the Hugging Face repository the backbone comes from


def _torch_hub_dir() -> Path:
    # Read at call time: torch.hub.get_dir() follows $TORCH_HOME.
    return Path(torch.hub.get_dir())


def _hf_cached_file(repo: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for name in ("model.safetensors", "pytorch_model.bin"):  # timm tries safetensors first
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return Path(found)
    return None


def _candidate_paths(weight: WeightFile, weights_dirs: Sequence[Path]) -> list[Path]:
    own_cache = {"pyiqa": "pyiqa", "clip": "clip", "torchvision": "checkpoints"}[weight.owner]
    searched = list(weights_dirs) if weight.owner in ("pyiqa", "clip") else []
    return [d / weight.filename for d in searched] + [_torch_hub_dir() / own_cache / weight.filename]


def locate(weight: WeightFile, weights_dirs: Sequence[Path] = ()) -> Path | None:
    """The path of ``weight`` on this machine, or None. Looks only at files, never the network."""
    if weight.owner == "timm":
        return _hf_cached_file(weight.hf_repo)
    return next((p for p in _candidate_paths(weight, weights_dirs) if p.is_file()), None)


def _where_sought(weight: WeightFile, weights_dirs: Sequence[Path]) -> str:
    if weight.owner == "timm":
        return f"the Hugging Face cache (HF_HOME) as repository {weight.hf_repo}"
    return " or ".join(str(p) for p in _candidate_paths(weight, weights_dirs))


def weights_dirs_for(weights_dir: str | os.PathLike | None = None) -> tuple[Path, ...]:
    """The folders searched before the libraries' own caches: the argument, then $TIR_IQA_WEIGHTS."""
    dirs = [weights_dir, os.environ.get("TIR_IQA_WEIGHTS")]
    return tuple(Path(d).expanduser() for d in dirs if d)


# ---------------------------------------------------------------- NIQE statistics


def tir_cache_dir() -> Path:
    """Where tir writes generated files: $TIR_CACHE_DIR, else $XDG_CACHE_HOME/tir, else ~/.cache/tir."""
    if os.environ.get("TIR_CACHE_DIR"):
        return Path(os.environ["TIR_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "tir"


def basicsr_niqe_npz() -> Path:
    """basicsr's shipped NIQE statistics, found without importing basicsr (which imports a lot)."""
    spec = importlib.util.find_spec("basicsr")
    if spec is None or not spec.submodule_search_locations:
        raise MetricUnavailable("metric 'niqe' needs basicsr, which ships its pristine statistics")
    return Path(next(iter(spec.submodule_search_locations))) / "metrics" / "niqe_pris_params.npz"


def niqe_params_path() -> Path:
    """A .mat with ``mu_prisparam`` / ``cov_prisparam`` (pyiqa's format), written once, atomically."""
    import scipy.io

    path = tir_cache_dir() / "niqe_pris_params.mat"
    if path.is_file():
        return path
    stats = np.load(basicsr_niqe_npz())
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename: concurrent processes never see half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".mat.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            scipy.io.savemat(f, {"mu_prisparam": stats["mu_pris_param"], "cov_prisparam": stats["cov_pris_param"]})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ---------------------------------------------------------------- metric specs


@dataclass(frozen=True, eq=False)
class MetricSpec:
    """What tir knows about one pyiqa metric before building it."""

    name: str
    full_reference: bool
    lower_better: bool
    score_range: str | None
    units: str | None = None
    checkpoint: WeightFile | None = None  # the metric's own weights, loaded by tir
    strict: bool = True  # False where the checkpoint holds only part of the net (LPIPS' heads)
    backbones: tuple[tuple[WeightFile, str | None], ...] = ()  # (file, create_metric option or None)
    generated: Callable[[], Path] | None = None  # a file tir makes itself, passed as pretrained_model_path
    modules: tuple[str, ...] = ()  # Python modules the metric imports
    min_side: int = 1  # smallest height/width it accepts (window sizes, scales, NIQE's 96-px blocks)


def _spec(name: str, units: str | None = None, **kwargs) -> MetricSpec:
    """A spec whose mode, direction and range come from pyiqa's own table."""
    cfg = DEFAULT_CONFIGS[name]
    spec = MetricSpec(
        name=name,
        full_reference=cfg["metric_mode"] == "FR",
        lower_better=bool(cfg.get("lower_better", False)),
        score_range=cfg.get("score_range"),
        units=units,
        **kwargs,
    )
    METRICS.register(name)(spec)
    return spec


def _pyiqa_file(url: str) -> WeightFile:
    return WeightFile(os.path.basename(url), "pyiqa", url)


def _register_all() -> None:
    from pyiqa.archs import clip_model, lpips_arch, maniqa_arch, musiq_arch
    from torchvision.models import AlexNet_Weights

    # Weight-free metrics (pyiqa ships all they need).
    _spec("psnr", units="dB")
    _spec("ssim", min_side=11)  # one 11x11 Gaussian window
    _spec("ms_ssim", min_side=161)  # the window at the 5th scale (1/16)
    _spec("vif", min_side=33)
    for name in ("piqe", "fsim", "gmsd", "entropy"):
        _spec(name)
    _spec("niqe", generated=niqe_params_path, modules=("basicsr",), min_side=96)  # one 96x96 block

    # Metrics with weights: the file names are pyiqa's, so a pyiqa cache works as is.
    alexnet = AlexNet_Weights.IMAGENET1K_V1.url
    _spec(
        "lpips",
        checkpoint=_pyiqa_file(lpips_arch.default_model_urls["0.1_alex"]),
        strict=False,
        backbones=((WeightFile(os.path.basename(alexnet), "torchvision", alexnet), None),),
    )
    _spec("musiq", checkpoint=_pyiqa_file(musiq_arch.default_model_urls["koniq10k"]))
    clip_url = clip_model._MODELS["RN50"]
    _spec(
        "clipiqa",
        backbones=((WeightFile(os.path.basename(clip_url), "clip", clip_url), "backbone"),),
        modules=("clip", "pkg_resources"),
    )
    vit = "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k"  # what timm's vit_base_patch8_224 loads
    _spec(
        "maniqa",
        checkpoint=_pyiqa_file(maniqa_arch.default_model_urls["koniq"]),
        backbones=((WeightFile("model.safetensors", "timm", f"https://huggingface.co/{vit}", vit), None),),
        modules=("timm",),
    )


_register_all()


# ---------------------------------------------------------------- availability


class Availability(NamedTuple):
    available: bool
    reason: str


def _missing(spec: MetricSpec, weights_dirs: Sequence[Path]) -> list[str]:
    """What ``spec`` lacks here, one readable line each; empty when it can be built."""
    lines = [f"Python module {m!r}" for m in spec.modules if importlib.util.find_spec(m) is None]
    if spec.name == "niqe" and not lines and not basicsr_niqe_npz().is_file():
        lines.append(f"basicsr's {basicsr_niqe_npz()}")
    files = ([spec.checkpoint] if spec.checkpoint else []) + [w for w, _ in spec.backbones]
    for weight in files:
        if locate(weight, weights_dirs) is None:
            lines.append(f"{weight.filename} (looked in {_where_sought(weight, weights_dirs)}; from {weight.url})")
    return lines


def available_metrics(weights_dir: str | os.PathLike | None = None) -> dict[str, Availability]:
    """Every registered metric -> whether it can be built here, and why not. Checks files only."""
    dirs = weights_dirs_for(weights_dir)
    result = {}
    for name in METRICS.names():
        missing = _missing(METRICS.get(name), dirs)
        result[name] = Availability(not missing, "missing: " + "; ".join(missing) if missing else "ok")
    return result


# ---------------------------------------------------------------- images


def as_float_image(image, what: str = "image") -> np.ndarray:
    """An RGB image as float32 HxWx3 in [0, 1]; accepts uint8, or float already in [0, 1]."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{what}: expected an RGB image of shape HxWx3, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ValueError(f"{what}: float images must lie in [0, 1], got [{array.min()}, {array.max()}]")
        return array.astype(np.float32, copy=False)
    raise TypeError(f"{what}: expected uint8 (or float in [0, 1]) pixels, got dtype {array.dtype}")


def match_reference_size(image, reference) -> np.ndarray:
    """``image`` at the reference's size, as float32 in [0, 1] (AgenticIR's scoring rule).

    An output at exactly 1/4 of the reference (a super-resolution tool was never called) is
    upscaled x4 with MATLAB bicubic, kept unrounded as AgenticIR does; any other mismatch is
    an error."""
    out, ref_shape = as_float_image(image, "image"), np.shape(reference)
    as_float_image(reference, "reference")  # validates it
    (h, w), (ref_h, ref_w) = out.shape[:2], ref_shape[:2]
    if (h, w) == (ref_h, ref_w):
        return out
    if (4 * h, 4 * w) == (ref_h, ref_w):
        from basicsr.utils.matlab_functions import imresize

        return np.clip(imresize(out, 4), 0.0, 1.0).astype(np.float32)
    raise ValueError(
        f"image shape {np.shape(image)} does not match reference shape {ref_shape}: full-reference "
        "metrics need the same size, or an image at exactly 1/4 of it (then upscaled x4)"
    )


def _to_tensor(images: Sequence[np.ndarray], device) -> torch.Tensor:
    return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy()).to(device)


def _same_shape_runs(images: Sequence[np.ndarray], batch_size: int) -> list[range]:
    """Index ranges of consecutive same-size images, at most ``batch_size`` long: one forward each."""
    runs, start = [], 0
    for i in range(1, len(images) + 1):
        if i == len(images) or images[i].shape != images[start].shape or i - start == batch_size:
            runs.append(range(start, i))
            start = i
    return runs


# ---------------------------------------------------------------- scorers


class Scorer:
    """A built metric: ``score(images, references=None) -> np.ndarray`` (float64, one per image)."""

    deterministic = True  # eval mode, no sampling: the pool may cache scores (tool_pool.cache)

    def __init__(self, spec: MetricSpec, metric: torch.nn.Module, device: str):
        self.spec, self.metric, self.device = spec, metric, device
        self.name = spec.name
        self.full_reference = spec.full_reference
        self.lower_better = bool(getattr(metric, "lower_better", spec.lower_better))
        self.score_range, self.units, self.min_side = spec.score_range, spec.units, spec.min_side

    def __repr__(self) -> str:
        kind = "full-reference" if self.full_reference else "no-reference"
        better = "lower" if self.lower_better else "higher"
        return f"Scorer({self.name!r}, {kind}, {better} is better, device={self.device!r})"

    def score(self, images: Sequence, references: Sequence | None = None, batch_size: int = 16) -> np.ndarray:
        """Scores of ``images`` (a list of HxWx3 uint8 arrays). Full-reference metrics need one
        reference per image; an image at 1/4 of its reference is upscaled x4 first. No-reference
        metrics ignore ``references`` and score images over ``NR_MAX_PIXELS`` on their centre crop
        of that area (``bounded_view``)."""
        if not self.full_reference:  # crop the uint8 image first: only the crop becomes float
            images = [
                bounded_view(im, min_side=self.spec.min_side) if isinstance(im, np.ndarray) and im.ndim == 3 else im
                for im in images
            ]
        images = [as_float_image(im, f"images[{i}]") for i, im in enumerate(images)]
        refs = None
        if self.full_reference:
            if references is None:
                raise ValueError(f"metric {self.name!r} is full-reference: pass references, one per image")
            if len(references) != len(images):
                raise ValueError(f"metric {self.name!r}: {len(images)} images but {len(references)} references")
            refs = [as_float_image(r, f"references[{i}]") for i, r in enumerate(references)]
            images = [match_reference_size(im, ref) for im, ref in zip(images, refs, strict=True)]
        for i, im in enumerate(images):
            if min(im.shape[:2]) < self.spec.min_side:
                raise ValueError(
                    f"metric {self.name!r} needs images of at least {self.spec.min_side} px "
                    f"on each side, got images[{i}] of {im.shape[0]}x{im.shape[1]}"
                )
        scores: list[float] = []
        for run in _same_shape_runs(images, batch_size):
            x = _to_tensor([images[i] for i in run], self.device)
            with torch.no_grad():
                out = self.metric(x, _to_tensor([refs[i] for i in run], self.device)) if refs else self.metric(x)
            values = out.detach().double().cpu().reshape(-1)
            if values.numel() != len(run):
                raise RuntimeError(f"metric {self.name!r} returned {values.numel()} scores for {len(run)} images")
            scores.extend(values.tolist())
        return np.asarray(scores, dtype=np.float64)


_SCORERS: dict[tuple, Scorer] = {}
_BUILD_LOCK = threading.Lock()


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_checkpoint(net: torch.nn.Module, path: Path, strict: bool) -> None:
    from pyiqa.archs.arch_util import clean_state_dict

    # weights_only=False as pyiqa's own loader: these are pyiqa's release files.
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and isinstance(state.get("params"), dict):  # basicsr-style wrapper
        state = state["params"]
    net.load_state_dict(clean_state_dict(state), strict=strict)


def _build(spec: MetricSpec, device: str, dirs: Sequence[Path]) -> Scorer:
    import pyiqa

    missing = _missing(spec, dirs)
    if missing:
        raise MetricUnavailable(
            f"metric {spec.name!r} cannot be built offline here; missing: "
            + "; ".join(missing)
            + ". Put weight files in a folder named by $TIR_IQA_WEIGHTS, or in their caches."
        )
    options = {}
    for weight, option in spec.backbones:
        if option:
            options[option] = str(locate(weight, dirs))
    if spec.generated:
        options["pretrained_model_path"] = str(spec.generated())
    if spec.checkpoint:
        options["pretrained"] = False  # tir loads the checkpoint it found, wherever that was
    try:
        metric = pyiqa.create_metric(spec.name, device=device, **options)
        if spec.checkpoint:
            _load_checkpoint(metric.net, locate(spec.checkpoint, dirs), spec.strict)
    except OSError as exc:  # a download attempt (DNS, hub) for a file tir did not know about
        raise MetricUnavailable(f"metric {spec.name!r} tried to download weights: {exc}") from exc
    metric.eval()
    return Scorer(spec, metric, device)


def get_scorer(name: str, device: str | None = None, weights_dir: str | os.PathLike | None = None) -> Scorer:
    """The scorer ``name``, built on first use and kept for the process.

    Raises KeyError for an unknown name (with a did-you-mean hint) and MetricUnavailable when
    its weights are not on this machine."""
    spec = METRICS.get(name)
    device = str(device or _default_device())
    dirs = weights_dirs_for(weights_dir)
    key = (name, device, dirs)
    with _BUILD_LOCK:
        if key not in _SCORERS:
            _SCORERS[key] = _build(spec, device, dirs)
        return _SCORERS[key]


def score_all(
    metric_names: Sequence[str],
    image,
    reference=None,
    device: str | None = None,
    weights_dir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Scores of one image under several metrics: ``{"psnr": 24.1, "niqe": 5.3, ...}``.

    With a reference the image is first brought to its size (x4 rule), and every metric, the
    no-reference ones included, scores that image, as AgenticIR does."""
    if reference is not None:
        image = match_reference_size(image, reference)
    result = {}
    for name in metric_names:
        scorer = get_scorer(name, device, weights_dir)
        refs = [reference] if reference is not None else None
        result[name] = float(scorer.score([image], refs)[0])
    return result
