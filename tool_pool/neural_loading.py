"""Reading a neural tool's checkpoint into a runnable network: basicsr or spandrel.

- ``arch:`` given (``{"type": name, **kwargs}``): basicsr builds that architecture and the
  checkpoint's keys must match it exactly (``load_basicsr``).
- No ``arch:``: spandrel (the loader behind chaiNNer and ComfyUI) detects the architecture, its
  hyper-parameters and its scale from the state dict (``load_spandrel``): SCUNet, NAFNet, FBCNN,
  DRUNet, SwinIR, HAT, Real-ESRGAN / Compact, RetinexFormer, MixDehazeNet, FFTformer, ...

Both read the file with ``read_state_dict``: ``.pth`` / ``.pt`` / ``.ckpt`` (``torch.load`` with
``weights_only=True``) or ``.safetensors``; releases' ``{"params_ema": ...}`` / ``{"params": ...}``
wrappers (EMA preferred) and ``module.`` prefixes are unwrapped. Every failure is a
``CheckpointError``: one line that names the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tir.registry import unknown_name

PARAM_KEYS = ("params_ema", "params", "state_dict")  # in order of preference


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not hold a network this tool can run."""


@dataclass
class Network:
    """A loaded network, as ``NeuralTool`` runs it: ``call(x)`` maps float N C H W in [0, 1] to
    N C (H*scale) (W*scale), on inputs padded to ``multiple_of`` and at least ``minimum`` a side."""

    module: Any  # the torch.nn.Module holding the weights (moved to the tool's device)
    call: Callable
    scale: int
    arch: str  # the architecture's name, for messages
    multiple_of: int = 1
    minimum: int = 0
    one_image_per_call: bool = False  # spandrel's contract: a batch of one per call
    gray: bool = False  # a 1-channel model: run on each colour channel in turn
    tiling: str = "SUPPORTED"  # spandrel's ModelTiling: SUPPORTED, DISCOURAGED or INTERNAL


def one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def read_state_dict(path: Path, param_key: str | None = None) -> dict:
    """The weights in a checkpoint file: a release's params_ema / params, or a bare state dict."""
    import torch

    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            checkpoint = load_file(str(path), device="cpu")
        else:
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch, pickle, zipfile and safetensors all raise their own
        raise CheckpointError(
            f"checkpoint {path} cannot be read (truncated, or not a PyTorch / safetensors file): {one_line(err)}"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict")
    if param_key is not None:
        if param_key not in checkpoint:
            raise CheckpointError(
                f"checkpoint {path} has no {param_key!r} entry (has: {', '.join(map(str, checkpoint))})"
            )
        state = checkpoint[param_key]
    else:
        state = next((checkpoint[k] for k in PARAM_KEYS if isinstance(checkpoint.get(k), dict)), checkpoint)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kinds = sorted({type(v).__name__ for v in state.values()}) if isinstance(state, dict) else []
        raise CheckpointError(
            f"checkpoint {path} is not a state dict (a mapping of parameter names to tensors): "
            + (f"its entries are {', '.join(kinds)}" if kinds else "it is empty")
        )
    return {(k.removeprefix("module.")): v for k, v in state.items()}


# ---------------------------------------------------------------- basicsr


def build_network(arch: dict):
    """Instantiate a basicsr architecture from {"type": name, **kwargs}."""
    import basicsr.archs  # noqa: F401  (fills ARCH_REGISTRY; imports all of basicsr: slow, once)
    from basicsr.utils.registry import ARCH_REGISTRY

    kwargs = dict(arch)
    name = kwargs.pop("type")
    known = list(ARCH_REGISTRY._obj_map)  # basicsr's registry has no public listing
    # basicsr registers a few archs with a suffix when the name clashes (SRVGGNetCompact_basicsr)
    found = next((n for n in (name, f"{name}_basicsr") if n in known), None)
    if found is None:
        raise ValueError(unknown_name("basicsr architecture", name, sorted(known)))
    return ARCH_REGISTRY._obj_map[found](**kwargs)


def check_keys_match(network, state: dict, path: Path, arch_type: str) -> None:
    """Raise one readable ValueError when a state dict does not fit a network exactly."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{len(items)} {what} {items[:3]}" + (" ..." if len(items) > 3 else "")
        for what, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("size mismatches (checkpoint vs model)", resized),
        )
        if items
    ]
    if problems:
        raise ValueError(f"checkpoint {path} does not match architecture {arch_type}: " + "; ".join(problems))


def load_basicsr(arch: dict, path: Path, param_key: str | None, scale: int) -> Network:
    network = build_network(arch)
    state = read_state_dict(path, param_key)
    check_keys_match(network, state, path, arch["type"])
    network.load_state_dict(state, strict=True)
    return Network(module=network.eval(), call=network, scale=scale, arch=arch["type"])


# ---------------------------------------------------------------- spandrel


def load_spandrel(path: Path, param_key: str | None, scale: int | None) -> Network:
    """Detect the architecture with spandrel; ``scale`` (the manifest's, if any) must agree."""
    import spandrel

    state = spandrel.canonicalize_state_dict(read_state_dict(path, param_key))  # also drops e.g. "netG."
    try:
        model = spandrel.ModelLoader(device="cpu").load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        example = ", ".join(list(state)[:3])
        raise CheckpointError(
            f"checkpoint {path}: unknown architecture: spandrel {spandrel.__version__} recognises none of its "
            f"architectures in this state dict ({len(state)} tensors: {example}, ...); "
            "for a basicsr architecture give 'arch: {type: ...}' in the manifest"
        ) from None
    except Exception as err:  # noqa: BLE001 - an architecture recognised, but the weights do not build it
        raise CheckpointError(
            f"checkpoint {path}: spandrel cannot build the architecture it detected: {one_line(err)}"
        ) from None
    name = model.architecture.name
    if not isinstance(model, spandrel.ImageModelDescriptor):
        raise CheckpointError(
            f"checkpoint {path} holds a {name} model for {model.purpose}, which needs more than an image (a mask)"
        )
    if scale is not None and scale != model.scale:
        raise CheckpointError(
            f"checkpoint {path} holds a x{model.scale} {name} model, but the manifest says scale: {scale}"
        )
    channels = (model.input_channels, model.output_channels)
    if channels not in ((3, 3), (1, 1)):
        raise CheckpointError(
            f"checkpoint {path} holds a {name} model from {channels[0]} to {channels[1]} channels; tools "
            "need RGB (3 to 3) or gray (1 to 1, run on each colour channel)"
        )
    requirements = model.size_requirements
    if requirements.square:
        raise CheckpointError(f"checkpoint {path} holds a {name} model that only takes square images")
    return Network(
        module=model.model.eval(),
        call=model,  # the descriptor: its call_fn (FBCNN's tuple, DRUNet's noise map), clamped to [0, 1]
        scale=model.scale,
        arch=str(model.architecture.id),
        multiple_of=requirements.multiple_of,
        minimum=requirements.minimum,
        one_image_per_call=True,
        gray=channels == (1, 1),
        tiling=model.tiling.name,
    )
