"""The pieces of ``tir tools train``: the network, the training pairs, the held-out scores.

The network is basicsr's SRVGGNetCompact (Real-ESRGAN's compact model) rebuilt with the very same
parameter names (``body.N.weight/bias``), so that a checkpoint saved as ``{"params_ema": ...}``
loads through basicsr (``arch: {type: SRVGGNetCompact, ...}`` in a tool manifest) and through
spandrel (detected as "Compact") alike. Its output is the body's plus the input upsampled
(nearest): at scale 1 it learns a residual.

A training pair for the degradation D of a subtask is a function of (seed, step, index) alone:
a random crop of a training photo (flips, 90-degree turns) under D alone or under one of the
protocol's combinations of groups A-C that contain D, with parameters drawn at the protocol's
ranges. The target is the same chain without D (same parameters), so the tool learns to undo
its own step and leave the other degradations to the other tools; when D ends the chain (JPEG
and low resolution always do) the target is simply the image before D.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from tir.data.degradations import GROUPS, SUBTASK_FOR_DEGRADATION, degrade, parse_combo

DEGRADATION_FOR_SUBTASK = {subtask: name for name, subtask in SUBTASK_FOR_DEGRADATION.items()}
SCALES = {"lowres": 4}  # output side / input side of the tool; 1 for every other degradation
MIX_SHARE = 0.5  # share of the training pairs that show a co-occurring combination


def build_compact(num_feat: int = 32, num_conv: int = 8, upscale: int = 1, num_in_ch: int = 3, num_out_ch: int = 3):
    """SRVGGNetCompact (act_type prelu) with basicsr's parameter names."""
    import torch
    from torch import nn

    class SRVGGNetCompact(nn.Module):
        def __init__(self):
            super().__init__()
            self.upscale = upscale
            body = [nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), nn.PReLU(num_parameters=num_feat)]
            for _ in range(num_conv):
                body += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.PReLU(num_parameters=num_feat)]
            body.append(nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, 1, 1))
            self.body = nn.ModuleList(body)
            self.upsampler = nn.PixelShuffle(upscale)

        def forward(self, x):
            out = x
            for layer in self.body:
                out = layer(out)
            out = self.upsampler(out)
            return out + torch.nn.functional.interpolate(x, scale_factor=self.upscale, mode="nearest")

    return SRVGGNetCompact()


def arch_entry(num_feat: int, num_conv: int, upscale: int) -> dict:
    """The manifest's ``arch`` for basicsr (spandrel detects the same from the keys)."""
    return {
        "type": "SRVGGNetCompact",
        "num_in_ch": 3,
        "num_out_ch": 3,
        "num_feat": num_feat,
        "num_conv": num_conv,
        "upscale": upscale,
        "act_type": "prelu",
    }


def mixes_of(degradation: str) -> list[tuple[str, ...]]:
    """The combinations of groups A-C in which ``degradation`` occurs, in the groups' order."""
    return [tuple(c) for group in GROUPS.values() for c in group if degradation in c]


def degrade_pair(clean: np.ndarray, combo: Sequence[str], degradation: str, rng: np.random.Generator):
    """(degraded, target): ``clean`` under the whole chain, and under the chain less ``degradation``."""
    combo = parse_combo(combo)
    image, target, applied = clean, None, []
    for name in combo:
        if name == degradation:
            target = image
        image, used = degrade(image, name, rng)
        applied.append((name, used))
    later = combo[combo.index(degradation) + 1 :]
    for name, used in applied[len(combo) - len(later) :]:  # replay the steps after D on the target
        target, _ = degrade(target, name, rng, **used)
    return image, target


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        image = image[:, ::-1]
    if rng.random() < 0.5:
        image = image[::-1]
    if rng.random() < 0.5:
        image = image.transpose(1, 0, 2)
    return np.ascontiguousarray(image)


def make_pair(photos: Sequence[np.ndarray], degradation: str, patch: int, seed: int, step: int, index: int):
    """Training pair ``index`` of ``step``: (input patch x patch, target patch*scale square), uint8."""
    rng = np.random.default_rng([seed, step, index])
    photo = photos[int(rng.integers(len(photos)))]
    side = patch * SCALES.get(degradation, 1)
    y, x = int(rng.integers(photo.shape[0] - side + 1)), int(rng.integers(photo.shape[1] - side + 1))
    clean = augment(photo[y : y + side, x : x + side], rng)
    mixes = mixes_of(degradation)
    combo = (degradation,) if not mixes or rng.random() >= MIX_SHARE else mixes[int(rng.integers(len(mixes)))]
    return degrade_pair(clean, combo, degradation, rng)


def to_tensor(images: Sequence[np.ndarray]):
    import torch

    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)


def batch_of(photos, degradation: str, patch: int, batch: int, seed: int, step: int):
    pairs = [make_pair(photos, degradation, patch, seed, step, i) for i in range(batch)]
    return to_tensor([p[0] for p in pairs]), to_tensor([p[1] for p in pairs])


# ------------------------------------------------------------------------------ held-out scores
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def eval_pairs(photos: Sequence[np.ndarray], degradation: str, size: int, seed: int, mixed: bool):
    """One (degraded, target) per photo: its centre crop (side a multiple of 8, at most ``size``)
    under ``degradation`` alone, or under a co-occurring combination when ``mixed``."""
    pairs, mixes = [], mixes_of(degradation)
    for i, photo in enumerate(photos):
        side = min(size, *photo.shape[:2]) // 8 * 8
        y, x = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
        rng = np.random.default_rng([seed, i, int(mixed)])
        combo = mixes[int(rng.integers(len(mixes)))] if mixed else (degradation,)
        pairs.append(degrade_pair(np.ascontiguousarray(photo[y : y + side, x : x + side]), combo, degradation, rng))
    return pairs


def run_network(network, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """uint8 in, uint8 out (clamped and rounded, as tool_pool.neural serves it)."""
    import torch

    outputs = []
    with torch.no_grad():
        for image in images:
            out = network(to_tensor([image])).clamp_(0, 1).mul_(255.0).round_().byte()
            outputs.append(out[0].permute(1, 2, 0).numpy())
    return outputs


def weight_free_tools(subtask: str) -> dict:
    """{name: callable(images) -> images} of the subtask's built-in weight-free tools."""
    from tool_pool.tool_base import FunctionTool
    from tool_pool.tools import tools_for_subtask

    return {t.name: t for t in tools_for_subtask(subtask) if isinstance(t, FunctionTool)}


def score_set(network, photos, degradation: str, subtask: str, size: int, seed: int, label: str = "") -> dict:
    """Mean PSNR (dB, RGB, whole crop) on held-out photos of: the degraded input (bicubic x4 for
    super-resolution), each weight-free tool of the subtask, and the trained network; for the
    degradation alone and, where it co-occurs in groups A-C, for those mixes."""
    import sys

    from tqdm import tqdm

    scale, tools = SCALES.get(degradation, 1), weight_free_tools(subtask)
    scores = {}
    for kind, mixed in (("alone", False), ("mixed", True)):
        if mixed and not mixes_of(degradation):
            continue
        sums = dict.fromkeys(["input", *tools, "network"], 0.0)
        pairs = eval_pairs(photos, degradation, size, seed, mixed)
        for lq, target in tqdm(pairs, desc=f"held-out {label} {kind}", unit="crop", file=sys.stderr):
            upscaled = cv2.resize(lq, (lq.shape[1] * scale, lq.shape[0] * scale), interpolation=cv2.INTER_CUBIC)
            outputs = {"input": upscaled, **{n: t([lq])[0] for n, t in tools.items()}}
            outputs["network"] = run_network(network, [lq])[0]
            for name, out in outputs.items():
                sums[name] += psnr(out, target) / len(pairs)
        row = {"crops": len(pairs), **sums}
        free = {name: row[name] for name in tools}
        best = max(free, key=free.get) if free else None
        row["best_weight_free"] = best
        row["gain_over_input"] = row["network"] - row["input"]
        row["gain_over_best_weight_free"] = row["network"] - free[best] if best else None
        scores[kind] = row
    return scores
