"""Neural restoration tools: basicsr architectures with checkpoints named in a tool manifest.

A manifest is a YAML list (or ``{"tools": [...]}``) of entries::

    - name: sr_swinir                  # snake_case, unique among all tools
      subtask: super_resolution        # one of tool_pool.tools.SUBTASKS
      description: Upscales x4 with SwinIR (PSNR-oriented).
      arch: {type: SwinIR, upscale: 4, img_size: 64, window_size: 8, ...}  # basicsr ARCH_REGISTRY
      checkpoint: weights/001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth       # relative: to the manifest
      scale: 4                         # output side / input side (default 1)
      device: auto                     # auto | cpu | cuda | cuda:N  (default auto)
      tile: 256                        # optional: run in tiles of this input size (memory)
      tile_pad: 16                     # optional: context around each tile (default 16)
      pad_multiple: 8                  # optional: reflect-pad inputs to a multiple (SwinIR windows)
      param_key: params_ema            # optional: which entry of the checkpoint holds the weights

Checkpoints are read with ``torch.load(weights_only=True)``; the releases' layouts
``{"params": ...}`` / ``{"params_ema": ...}`` (EMA preferred) and ``module.`` prefixes (from
DataParallel) are handled, and keys must match the architecture exactly. A tool whose checkpoint
is missing is still registered but marked unavailable with the reason (``available_tools()`` /
``unavailable_tools()`` in tool_pool.tools), so one absent file does not take the pool down;
calling it raises ``ToolUnavailableError`` naming the tool and the path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tir.registry import unknown_name
from tool_pool.tool_base import (
    SUBTASKS,
    TOOLS,
    Tool,
    ToolUnavailableError,
    check_definition,
    no_arguments,
    register_tool,
)

REQUIRED = ("name", "subtask", "description", "arch", "checkpoint")
OPTIONAL = ("scale", "device", "tile", "tile_pad", "pad_multiple", "param_key")
PARAM_KEYS = ("params_ema", "params", "state_dict")  # in order of preference


class ManifestError(ValueError):
    """A tool manifest that cannot be read or has a malformed entry."""


@dataclass
class NeuralToolSpec:
    name: str
    subtask: str
    description: str
    arch: dict
    checkpoint: Path
    scale: int = 1
    device: str = "auto"
    tile: int | None = None
    tile_pad: int = 16
    pad_multiple: int = 1
    param_key: str | None = None


# ---------------------------------------------------------------- manifest


def load_manifest(path: str | Path) -> list[NeuralToolSpec]:
    """Parse and check a manifest; checkpoint paths are resolved (env vars, ~, relative to it)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"tool manifest not found: {path}")
    with open(path, encoding="utf-8") as f:
        content = yaml.safe_load(f)
    entries = content.get("tools") if isinstance(content, dict) else content
    if not isinstance(entries, list):
        raise ManifestError(
            f"{path}: expected a list of tools (or a mapping with a 'tools' list), got {type(content).__name__}"
        )
    specs, seen = [], set()
    for index, entry in enumerate(entries):
        spec = parse_entry(entry, where=f"{path}: tool #{index}", base=path.parent)
        if spec.name in seen:
            raise ManifestError(f"{path}: tool {spec.name!r} is listed twice")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def parse_entry(entry: Any, where: str, base: Path) -> NeuralToolSpec:
    if not isinstance(entry, dict):
        raise ManifestError(f"{where}: expected a mapping, got {type(entry).__name__}")
    where = f"{where} ({entry.get('name', '?')!r})"
    missing = [k for k in REQUIRED if k not in entry]
    if missing:
        raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = [k for k in entry if k not in REQUIRED + OPTIONAL]
    if unknown:
        raise ManifestError(f"{where}: " + unknown_name("field", unknown[0], REQUIRED + OPTIONAL))
    if entry["subtask"] not in SUBTASKS:
        raise ManifestError(f"{where}: " + unknown_name("subtask", entry["subtask"], SUBTASKS))
    arch = entry["arch"]
    if not isinstance(arch, dict) or "type" not in arch:
        raise ManifestError(f"{where}: 'arch' must be a mapping with a 'type' (a basicsr architecture name)")
    for key in ("scale", "tile", "tile_pad", "pad_multiple"):
        value = entry.get(key)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "tile_pad" else 1)
        ):
            raise ManifestError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    checkpoint = Path(os.path.expanduser(os.path.expandvars(str(entry["checkpoint"]))))
    spec = NeuralToolSpec(
        name=entry["name"],
        subtask=entry["subtask"],
        description=entry["description"],
        arch=dict(arch),
        checkpoint=checkpoint if checkpoint.is_absolute() else base / checkpoint,
        scale=entry.get("scale", 1),
        device=str(entry.get("device", "auto")),
        tile=entry.get("tile"),
        tile_pad=entry.get("tile_pad", 16),
        pad_multiple=entry.get("pad_multiple", 1),
        param_key=entry.get("param_key"),
    )
    try:
        check_definition(spec.name, spec.subtask, spec.description, no_arguments())
    except (ValueError, KeyError) as err:
        raise ManifestError(f"{where}: {err}") from None
    return spec


def register_manifest(path: str | Path) -> dict[str, str]:
    """Register every tool of a manifest; returns {name: reason} for those unavailable here."""
    unavailable = {}
    for spec in load_manifest(path):
        existing = TOOLS.get(spec.name) if spec.name in TOOLS else None
        if isinstance(existing, NeuralTool) and existing.spec == spec:
            tool = existing  # the same manifest read again (another replica, a test): a no-op
        else:
            tool = register_tool(NeuralTool(spec))  # a different tool of that name: an error
        if not tool.available:
            unavailable[tool.name] = tool.unavailable_reason
    return unavailable


# ---------------------------------------------------------------- building and loading


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


def read_state_dict(path: Path, param_key: str | None = None) -> dict:
    """The weights in a checkpoint file: a release's params_ema / params, or a bare state dict."""
    import torch

    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise TypeError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict")
    if param_key is not None:
        if param_key not in checkpoint:
            raise ValueError(f"checkpoint {path} has no {param_key!r} entry (has: {', '.join(map(str, checkpoint))})")
        state = checkpoint[param_key]
    else:
        state = next((checkpoint[k] for k in PARAM_KEYS if isinstance(checkpoint.get(k), dict)), checkpoint)
    return {(k.removeprefix("module.")): v for k, v in state.items()}


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


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ToolUnavailableError(f"device {device!r} requested but CUDA is not available")
    return device


class NeuralTool(Tool):
    """A manifest entry; the network is built and its checkpoint read on first use (``load``)."""

    parameters = no_arguments()

    def __init__(self, spec: NeuralToolSpec):
        self.spec = spec
        self.name, self.subtask, self.description, self.scale = spec.name, spec.subtask, spec.description, spec.scale
        self.parameters = no_arguments()
        self.network = None
        self.device = None
        self.load_error: str | None = None

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None

    @property
    def unavailable_reason(self) -> str | None:
        if self.load_error:
            return self.load_error
        if not self.spec.checkpoint.is_file():
            unset = "$" in str(self.spec.checkpoint)
            return f"tool {self.name!r}: checkpoint not found: {self.spec.checkpoint}" + (
                " (an environment variable in the path is not set)" if unset else ""
            )
        return None

    def load(self) -> NeuralTool:
        """Build the network and load its checkpoint (strict keys). Idempotent."""
        if self.network is not None:
            return self
        reason = self.unavailable_reason
        if reason:
            raise ToolUnavailableError(reason)

        try:
            network = build_network(self.spec.arch)
            state = read_state_dict(self.spec.checkpoint, self.spec.param_key)
            check_keys_match(network, state, self.spec.checkpoint, self.spec.arch["type"])
            network.load_state_dict(state, strict=True)
            self.device = resolve_device(self.spec.device)
        except (ValueError, RuntimeError, OSError, TypeError, KeyError, ToolUnavailableError) as err:
            # e.g. shape mismatches (RuntimeError), a corrupt file (pickle error), bad arch kwargs
            self.load_error = f"tool {self.name!r}: cannot load {self.spec.checkpoint}: {err}"
            raise ToolUnavailableError(self.load_error) from err
        self.network = network.to(self.device).eval()
        return self

    def unload(self) -> None:
        """Drop the network (the pool's multiplexer calls this when it evicts the tool)."""
        self.network = None

    def run(self, images: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        self.load()
        outputs: list[np.ndarray | None] = [None] * len(images)
        by_shape: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):  # same-size images go through the network together
            by_shape.setdefault(image.shape, []).append(i)
        with torch.no_grad():
            for indices in by_shape.values():
                batch = torch.from_numpy(np.stack([images[i] for i in indices])).to(self.device)
                batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
                restored = self._restore(batch).clamp_(0, 1).mul_(255.0).round_().byte()
                for i, out in zip(indices, restored.permute(0, 2, 3, 1).cpu().numpy()):
                    outputs[i] = np.ascontiguousarray(out)
        return outputs

    def _restore(self, batch):
        """float NCHW in [0, 1] -> float N C (H*scale) (W*scale)."""
        if self.spec.tile and max(batch.shape[-2:]) > self.spec.tile:
            return self._tiled(batch)
        return self._forward_padded(batch)

    def _forward_padded(self, batch):
        import torch.nn.functional as F

        h, w = batch.shape[-2:]
        m = self.spec.pad_multiple
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            batch = F.pad(batch, (0, pad_w, 0, pad_h), mode=mode)
        out = self.network(batch)
        expected = (batch.shape[-2] * self.scale, batch.shape[-1] * self.scale)
        if tuple(out.shape[-2:]) != expected:
            raise RuntimeError(
                f"tool {self.name!r}: network output {tuple(out.shape[-2:])} is not input x scale {self.scale} = {expected}; check 'scale' in the manifest"
            )
        return out[..., : h * self.scale, : w * self.scale]

    def _tiled(self, batch):
        """Run tile by tile with ``tile_pad`` pixels of context each side (as Real-ESRGAN does)."""
        import torch

        n, c, h, w = batch.shape
        s, tile, pad = self.scale, self.spec.tile, self.spec.tile_pad
        out = torch.zeros((n, c, h * s, w * s), dtype=batch.dtype, device=batch.device)
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                y0, y1, x0, x1 = max(y - pad, 0), min(y + tile + pad, h), max(x - pad, 0), min(x + tile + pad, w)
                piece = self._forward_padded(batch[..., y0:y1, x0:x1])
                ty, tx = min(tile, h - y), min(tile, w - x)
                out[..., y * s : (y + ty) * s, x * s : (x + tx) * s] = piece[
                    ..., (y - y0) * s : (y - y0 + ty) * s, (x - x0) * s : (x - x0 + tx) * s
                ]
        return out
