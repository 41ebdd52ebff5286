"""A learned degradation recogniser: which of the eight degradations a photo shows.

The hand-set cue thresholds (``tir.data.perception.likely_degradations``) were tuned on six
photos and name the exact set in about 4 of 10 crops of other photos. This model reads the same
kind of evidence (``tir.data.recognizer_features``: noise, blur, JPEG-grid, light, haze, rain and
size statistics) and learns, from thousands of synthetic degradations of many photos, how to
combine it: a small MLP, multi-label (one sigmoid per degradation), on standardised features.
``tir perception train --members K`` trains K such MLPs from consecutive seeds on the same
examples and averages their logits (``Ensemble``): on photos unlike the training photos part of
one MLP's error is its own initialisation's, and the mean is steadier.

The agent perceives again after every tool call, and a tool's output is not a degraded photo: a
denoiser's smoothing looks like defocus blur, a deblurrer's ringing like JPEG. A recogniser
trained with partly restored examples (``tir perception train --restored``) takes one more
input, ``after_call`` (0 for the photo as given, 1 for a tool's output), so that it reads both
without trading one for the other.

A checkpoint is one folder: ``model.pt`` (the weights, the feature standardisation, the label
order, each label's decision threshold, the feature names it was trained on) and
``README.md`` (command, data, seed, held-out scores). ``tir perception train`` writes it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tir.data.degradations import NAMES
from tir.data.recognizer_features import FEATURE_NAMES, degradation_features

# The checkpoint the recipes use by default: trained by `tir perception train` on 360 BSDS500 train
# and test photos and 536 ImageNet sample photos (never the evaluation sets), shipped in the
# repository (tir/data/models/, with its model card).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "models" / "recognizer"
WEIGHTS_FILE = "model.pt"
# A degradation is "maybe" when its probability reaches this fraction of its decision threshold
# without reaching the threshold: the recogniser's second candidates (cue style ``confidence``).
MAYBE_FRACTION = 0.5


class RecognizerError(ValueError):
    """A recogniser checkpoint that cannot be used (the message names the file and why)."""


def build_network(num_features: int, hidden: int, num_labels: int, dropout: float = 0.1, members: int = 1):
    """Standardised features -> two GELU layers -> one logit per degradation; with ``members`` > 1,
    that many such MLPs whose logits are averaged (``Ensemble``)."""
    import torch

    def mlp():
        return torch.nn.Sequential(
            torch.nn.Linear(num_features, hidden),
            torch.nn.GELU(),
            torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, hidden),
            torch.nn.GELU(),
            torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, num_labels),
        )

    return mlp() if members == 1 else Ensemble([mlp() for _ in range(members)])


@functools.cache
def _ensemble_class():
    import torch

    class Ensemble(torch.nn.Module):
        """MLPs trained from different seeds on the same examples; their mean logit. One MLP's
        errors on photos unlike the training photos are partly its own initialisation's, so the
        mean is steadier than any member (measured in the shipped model's card)."""

        def __init__(self, members):
            super().__init__()
            self.members = torch.nn.ModuleList(members)

        def forward(self, x):
            return torch.stack([member(x) for member in self.members]).mean(dim=0)

    return Ensemble


def Ensemble(members):  # noqa: N802 - a class, built on first use so that importing this module needs no torch
    return _ensemble_class()(members)


def network_shape(network) -> tuple[int, int]:
    """(hidden width, members) of a ``build_network`` network."""
    members = list(getattr(network, "members", [network]))
    return int(members[0][0].out_features), len(members)


class Recognizer:
    """A trained recogniser: ``probabilities(images)`` and ``degradations(image)``."""

    def __init__(self, network, mean: np.ndarray, std: np.ndarray, labels: Sequence[str], thresholds: np.ndarray):
        self.network = network.eval()
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.labels, self.thresholds = tuple(labels), np.asarray(thresholds, np.float32)

    @property
    def after_call_input(self) -> bool:
        """Whether the network reads one input past the features: is the image a tool's output?"""
        return len(self.mean) == len(FEATURE_NAMES) + 1

    def probabilities_of_features(self, features: np.ndarray) -> np.ndarray:
        """[N, labels] probabilities of a [N, features] matrix."""
        import torch

        x = torch.from_numpy(((np.asarray(features, np.float32) - self.mean) / self.std).astype(np.float32))
        with torch.no_grad():
            return torch.sigmoid(self.network(x)).numpy()

    def probabilities(self, images: Sequence[np.ndarray], after_call: bool = False) -> list[dict[str, float]]:
        """{degradation: probability} of each RGB uint8 image; ``after_call``: the images are
        tool outputs (read only by a recogniser trained on partly restored examples)."""
        features = np.stack([degradation_features(image) for image in images])
        if self.after_call_input:
            features = with_after_call(features, after_call)
        probs = self.probabilities_of_features(features)
        return [dict(zip(self.labels, map(float, row))) for row in probs]

    def limits(self) -> dict[str, float]:
        """Each degradation's decision threshold (0.5 for one the checkpoint has no label for)."""
        return dict.fromkeys(NAMES, 0.5) | dict(zip(self.labels, self.thresholds.tolist()))

    def decide(self, probabilities: Mapping[str, float]) -> list[str]:
        """The degradations whose probability reaches their threshold, in ``NAMES`` order."""
        limit = self.limits()
        return [name for name in NAMES if name in probabilities and probabilities[name] >= limit[name]]

    def unsure(self, probabilities: Mapping[str, float]) -> list[str]:
        """The degradations not decided on whose probability reaches ``MAYBE_FRACTION`` of their
        threshold, in ``NAMES`` order."""
        limit = self.limits()
        return [
            name
            for name in NAMES
            if name in probabilities and MAYBE_FRACTION * limit[name] <= probabilities[name] < limit[name]
        ]

    def degradations(self, image: np.ndarray, after_call: bool = False) -> list[str]:
        return self.decide(self.probabilities([image], after_call)[0])

    def state(self) -> dict:
        return {
            "network": self.network.state_dict(),
            **dict(zip(("hidden", "members"), network_shape(self.network))),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "labels": list(self.labels),
            "thresholds": self.thresholds.tolist(),
            "feature_names": list(FEATURE_NAMES),
        }

    def save(self, folder: str | os.PathLike, extra: Mapping | None = None) -> Path:
        """``folder/model.pt``, written atomically."""
        import torch

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (WEIGHTS_FILE + ".tmp")
        torch.save({**self.state(), **(dict(extra) if extra else {})}, tmp)
        os.replace(tmp, folder / WEIGHTS_FILE)
        return folder / WEIGHTS_FILE


def checkpoint_file(path: str | os.PathLike | None = None) -> Path:
    """The weights file of the recogniser at ``path`` (a checkpoint folder or its model.pt; None:
    the shipped one); it may not exist."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    return path / WEIGHTS_FILE if path.is_dir() else path


def load_recognizer(path: str | os.PathLike | None = None) -> Recognizer:
    """The recogniser in ``path`` (a checkpoint folder or its model.pt; default: the shipped one)."""
    import torch

    file = checkpoint_file(path)
    if not file.is_file():
        raise RecognizerError(
            f"{file}: no recogniser checkpoint (expected a folder written by `tir perception train`, holding {WEIGHTS_FILE})"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise RecognizerError(f"{file}: not a readable recogniser checkpoint ({type(err).__name__}: {err})") from None
    missing = [
        k for k in ("network", "hidden", "mean", "std", "labels", "thresholds", "feature_names") if k not in state
    ]
    if missing:
        raise RecognizerError(f"{file}: not a recogniser checkpoint (missing {', '.join(missing)})")
    if list(state["feature_names"]) != list(FEATURE_NAMES):
        raise RecognizerError(
            f"{file}: trained on other features ({len(state['feature_names'])} named, this version computes "
            f"{len(FEATURE_NAMES)}); retrain it with `tir perception train`"
        )
    # the features, and an after_call input in a checkpoint trained on partly restored examples
    members = int(state.get("members", 1))  # checkpoints before ensembles hold one MLP
    network = build_network(len(state["mean"]), int(state["hidden"]), len(state["labels"]), members=members)
    network.load_state_dict(state["network"])
    return Recognizer(
        network, np.array(state["mean"]), np.array(state["std"]), state["labels"], np.array(state["thresholds"])
    )


def with_after_call(features: np.ndarray, after_call: bool) -> np.ndarray:
    """``features`` [N, F] with the ``after_call`` input appended as a last column (0 or 1)."""
    return np.concatenate([features, np.full((len(features), 1), float(after_call), features.dtype)], axis=1)


# ------------------------------------------------------------------------------ scoring a recogniser
def set_scores(predicted: Sequence[Sequence[str]], truth: Sequence[Sequence[str]]) -> dict:
    """Exact-set accuracy and per-degradation precision / recall / support of predicted sets."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} true sets")
    exact = float(np.mean([set(p) == set(t) for p, t in zip(predicted, truth)])) if truth else float("nan")
    per = {}
    for name in NAMES:
        tp = sum(name in p and name in t for p, t in zip(predicted, truth))
        guessed, actual = sum(name in p for p in predicted), sum(name in t for t in truth)
        per[name] = {
            "precision": tp / guessed if guessed else None,
            "recall": tp / actual if actual else None,
            "support": actual,
        }
    return {"exact_set": exact, "samples": len(truth), "per_degradation": per}
