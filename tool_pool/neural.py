"""Neural restoration tools: checkpoints named in a tool manifest, loaded by spandrel or basicsr.

A manifest is a YAML list (or ``{"tools": [...]}``) of entries. Four fields are enough: spandrel
detects the architecture and its scale from the state dict (SCUNet, NAFNet, FBCNN, DRUNet, SwinIR,
HAT, Real-ESRGAN, RetinexFormer, ...)::

    - name: denoise_scunet             # snake_case, unique among all tools
      subtask: denoising               # one of tool_pool.tools.SUBTASKS
      description: Removes strong colour noise with SCUNet (PSNR-oriented).
      checkpoint: weights/scunet_color_real_psnr.pth   # .pth/.pt/.ckpt/.safetensors; relative: to the manifest

Optional fields::

      arch: {type: SwinIR, upscale: 4, img_size: 64, window_size: 8, ...}  # build with basicsr instead
      scale: 4                         # output side / input side; spandrel: checked against the detected one
      device: auto                     # auto | cpu | cuda | cuda:N  (default auto)
      tile: 256                        # run in tiles of this input size (default: 512 above TILE_ABOVE pixels)
      tile_pad: 16                     # context around each tile (default 16; at least the receptive field)
      pad_multiple: 8                  # reflect-pad inputs to a multiple (spandrel's own requirement is added)
      param_key: params_ema            # which entry of the checkpoint holds the weights

Loading is in tool_pool.neural_loading: the releases' layouts ``{"params": ...}`` /
``{"params_ema": ...}`` (EMA preferred), ``module.`` prefixes and ``.safetensors`` are handled;
with ``arch:`` the keys must match the basicsr architecture exactly. A 1-channel (gray) spandrel
model runs on each colour channel in turn; other channel counts are refused. A checkpoint that
cannot be used (truncated, unknown architecture, not a state dict, wrong scale) makes the tool
unavailable with one line naming the file. A tool whose checkpoint is missing is still registered
but marked unavailable with the reason (``available_tools()`` / ``unavailable_tools()`` in
tool_pool.tools), so one absent file does not take the pool down; calling it raises
``ToolUnavailableError`` naming the tool and the path.

Memory: one forward pass sees at most ``TILE_ABOVE`` input pixels. Same-size images are batched
up to that budget; a larger image runs alone, in overlapping tiles (``tile``, ``tile_pad``), so a
4000x3000 photo needs a few hundred MB beyond its input and output. spandrel models run one image
per call (their contract). Tiles equal the untiled result where ``tile_pad`` covers the
network's receptive field (convolutional nets); transformers and U-Nets (spandrel marks their
tiling DISCOURAGED) differ slightly at tile borders, which is the price of not running out of memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tir.registry import unknown_name
from tool_pool.neural_loading import (  # noqa: F401 - build_network, read_state_dict: public here too
    PARAM_KEYS,
    CheckpointError,
    Network,
    build_network,
    check_keys_match,
    load_basicsr,
    load_spandrel,
    read_state_dict,
)
from tool_pool.tool_base import (
    SUBTASKS,
    TOOLS,
    Tool,
    ToolUnavailableError,
    check_definition,
    no_arguments,
    register_tool,
)

REQUIRED = ("name", "subtask", "description", "checkpoint")
OPTIONAL = ("arch", "scale", "device", "tile", "tile_pad", "pad_multiple", "param_key")
TILE_ABOVE = 1024 * 1024  # input pixels in one forward pass; a larger image is tiled
AUTO_TILE = 512  # the tile side when the manifest gives none


class ManifestError(ValueError):
    """A tool manifest that cannot be read or has a malformed entry."""


@dataclass
class NeuralToolSpec:
    name: str
    subtask: str
    description: str
    checkpoint: Path
    arch: dict | None = None  # None: spandrel detects it
    scale: int | None = None  # None: spandrel's detected scale (basicsr: 1)
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
    arch = entry.get("arch")
    if arch is not None and (not isinstance(arch, dict) or "type" not in arch):
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
        checkpoint=checkpoint if checkpoint.is_absolute() else base / checkpoint,
        arch=dict(arch) if arch is not None else None,
        scale=entry.get("scale"),
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


def manifest_path(path: str | Path) -> Path:
    """A recipe's ``pool.manifest``, absolute: as given when it exists (relative to the working
    directory), else relative to the project (``tool_pool/manifests/trained.yaml`` from anywhere,
    and in every Serve replica whatever its working directory)."""
    given = Path(path).expanduser()
    if given.is_absolute() or given.exists():
        return given.resolve()
    project = Path(__file__).resolve().parent.parent / given
    return project if project.exists() else given.resolve()


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


# ---------------------------------------------------------------- running


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
        self.name, self.subtask, self.description = spec.name, spec.subtask, spec.description
        self.parameters = no_arguments()
        self.network: Network | None = None
        self.device = None
        self.load_error: str | None = None
        self._detected_scale: int | None = None

    @property
    def scale(self) -> int:
        """The manifest's scale; without one, basicsr tools are x1 and spandrel's is detected (this
        loads the checkpoint once; 1 while the tool cannot load)."""
        if self.spec.scale is not None:
            return self.spec.scale
        if self.spec.arch is not None:
            return 1
        if self._detected_scale is None and self.available:
            try:
                self.load()
            except ToolUnavailableError:
                return 1
        return self._detected_scale or 1

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
        """Build the network and load its checkpoint (basicsr: strict keys; spandrel: detected). Idempotent."""
        if self.network is not None:
            return self
        reason = self.unavailable_reason
        if reason:
            raise ToolUnavailableError(reason)
        spec = self.spec
        try:
            if spec.arch is not None:
                network = load_basicsr(spec.arch, spec.checkpoint, spec.param_key, spec.scale or 1)
            else:
                network = load_spandrel(spec.checkpoint, spec.param_key, spec.scale)
            self.device = resolve_device(spec.device)
        except (ValueError, RuntimeError, OSError, TypeError, KeyError, ImportError, ToolUnavailableError) as err:
            # e.g. shape mismatches (RuntimeError), a corrupt file, bad arch kwargs, unknown architecture
            message = str(err) if isinstance(err, CheckpointError) else f"cannot load {spec.checkpoint}: {err}"
            self.load_error = f"tool {self.name!r}: {message}"
            raise ToolUnavailableError(self.load_error) from err
        network.module.to(self.device)
        self._detected_scale = network.scale
        self.network = network
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
        with torch.inference_mode():  # spandrel's outputs are inference tensors: no in-place ops outside it
            for shape, indices in by_shape.items():
                per_batch = 1 if self.network.one_image_per_call else max(1, TILE_ABOVE // (shape[0] * shape[1]))
                for start in range(0, len(indices), per_batch):
                    chunk = indices[start : start + per_batch]  # at most TILE_ABOVE pixels (or one image)
                    batch = torch.from_numpy(np.stack([images[i] for i in chunk])).to(self.device)
                    batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
                    restored = self._restore(batch)
                    del batch
                    restored = restored.clamp_(0, 1).mul_(255.0).round_().byte()
                    for i, out in zip(chunk, restored.permute(0, 2, 3, 1).cpu().numpy()):
                        outputs[i] = np.ascontiguousarray(out)
        return outputs

    def _tile_side(self, h: int, w: int) -> int | None:
        if self.spec.tile:
            return self.spec.tile if max(h, w) > self.spec.tile else None
        if h * w > TILE_ABOVE and self.network.tiling != "INTERNAL":
            return AUTO_TILE
        return None

    def _restore(self, batch):
        """float NCHW in [0, 1] -> float N C (H*scale) (W*scale)."""
        tile = self._tile_side(*batch.shape[-2:])
        return self._tiled(batch, tile) if tile else self._forward_padded(batch)

    def _forward_padded(self, batch):
        import math

        import torch

        network = self.network
        n, c, h, w = batch.shape
        m = math.lcm(self.spec.pad_multiple, network.multiple_of)
        batch = pad_to(batch, -(-max(h, network.minimum) // m) * m, -(-max(w, network.minimum) // m) * m)
        pieces = batch.reshape(n * c, 1, *batch.shape[-2:]) if network.gray else batch
        if network.one_image_per_call:
            out = torch.cat([network.call(pieces[i : i + 1]) for i in range(len(pieces))])
        else:
            out = network.call(pieces)
        out = out.reshape(n, c, *out.shape[-2:]) if network.gray else out
        expected = (batch.shape[-2] * network.scale, batch.shape[-1] * network.scale)
        if tuple(out.shape[-2:]) != expected or out.shape[1] != c:
            raise RuntimeError(
                f"tool {self.name!r}: network output {tuple(out.shape[1:])} is not {c} channels of input x scale "
                f"{network.scale} = {expected}; check 'scale' in the manifest"
            )
        return out[..., : h * network.scale, : w * network.scale]

    def _tiled(self, batch, tile: int):
        """Run image by image, tile by tile, with ``tile_pad`` pixels of context each side (as
        Real-ESRGAN does): memory is bounded by one tile whatever the batch and image size."""
        import torch

        n, c, h, w = batch.shape
        s, pad = self.network.scale, self.spec.tile_pad
        out = torch.empty((n, c, h * s, w * s), dtype=batch.dtype, device=batch.device)
        for i in range(n):
            for y in range(0, h, tile):
                for x in range(0, w, tile):
                    y0, y1, x0, x1 = max(y - pad, 0), min(y + tile + pad, h), max(x - pad, 0), min(x + tile + pad, w)
                    piece = self._forward_padded(batch[i : i + 1, :, y0:y1, x0:x1])
                    ty, tx = min(tile, h - y), min(tile, w - x)
                    out[i, :, y * s : (y + ty) * s, x * s : (x + tx) * s] = piece[
                        0, :, (y - y0) * s : (y - y0 + ty) * s, (x - x0) * s : (x - x0 + tx) * s
                    ]
        return out


def pad_to(batch, height: int, width: int):
    """Pad NCHW at the bottom and right: reflect as far as the image allows, then replicate."""
    import torch.nn.functional as F

    pad_h, pad_w = height - batch.shape[-2], width - batch.shape[-1]
    if not (pad_h or pad_w):
        return batch
    reflect_h, reflect_w = min(pad_h, batch.shape[-2] - 1), min(pad_w, batch.shape[-1] - 1)
    if reflect_h or reflect_w:
        batch = F.pad(batch, (0, reflect_w, 0, reflect_h), mode="reflect")
    if pad_h > reflect_h or pad_w > reflect_w:
        batch = F.pad(batch, (0, pad_w - reflect_w, 0, pad_h - reflect_h), mode="replicate")
    return batch
