"""``tir perception train``: train the degradation recogniser on synthetic degradations of photos.

    tir perception train --hq /data/BSDS500/train --hq /data/BSDS500/test --samples 24000 --seed 0 --out runs/recognizer

The story: list the training photos (built-in or folders; the field's standard test sets are
refused) and set a tenth of them aside for validation -> draw ``--samples`` training examples,
each a random crop (several sizes, flips, mild exposure and colour changes of the clean photo,
so that "a dark photo" and "a darkened photo" are told apart as far as the pixels allow) under
one combination of degradations (none, a single one, the protocol's groups A-C, or an
out-of-domain pair or triple) at the protocol's parameter ranges -> their features, in shards on
disk (``features/``: a killed run recomputes only missing shards) -> the MLP (AdamW, one-cycle
LR) -> each degradation's decision threshold, chosen on the validation photos -> the held-out
scores (group-A crops of 128 px of photos it never saw, as given and partly restored) ->
``model.pt`` and ``README.md``. ``--restored N`` adds N examples seen after tool calls
(``partly_restore``), which the network tells apart by one more input (``after_call``).

Every example is a function of (seed, index) alone, and training is seeded: the same command
gives the same model on the same machine (float results may differ across CPUs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tir.data.degradations import COMBINATIONS, NAMES, SUBTASK_FOR_DEGRADATION, degrade_chain
from tir.data.recognizer import Ensemble, Recognizer, RecognizerError, build_network, set_scores, with_after_call
from tir.data.recognizer_card import model_card
from tir.data.recognizer_features import FEATURES_DIGEST, NUM_FEATURES, degradation_features

# The field's standard test sets: evaluation only, never training data.
TEST_SETS = tuple("set5 set14 mcmaster kodak24 kodak cbsd68 bsd68 bsd100 urban100 classic5 set12".split())
# How often each kind of example is drawn: a combination is drawn uniformly within its kind.
# Drawing uniformly over all combinations instead would make 3 examples in 5 triples (ood3 has
# 52), and the model would learn to see three degradations everywhere.
KIND_WEIGHTS = {"clean": 1, "single": 2, "groupA": 2, "groupB": 1, "groupC": 1, "ood2": 1, "ood3": 1}
CROP_SIDES = (96, 128, 160, 192)
SHARD = 2000  # examples per feature shard: what a kill can lose at most


def training_combos() -> dict[str, list[tuple[str, ...]]]:
    """What an example may show, by kind: nothing, each single degradation, groups A-C, out of domain."""
    kinds = {"clean": [()], "single": [(name,) for name in NAMES]}
    return kinds | {g: [tuple(c) for c in COMBINATIONS[g]] for g in KIND_WEIGHTS if g not in kinds}


def draw_combo(combos: dict[str, list[tuple[str, ...]]], rng: np.random.Generator) -> tuple[str, ...]:
    kinds = [k for k, c in combos.items() if c]  # a kind KIND_WEIGHTS does not name weighs 1
    weights = np.array([KIND_WEIGHTS.get(k, 1) for k in kinds], float)
    chosen = combos[kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]]
    return chosen[int(rng.integers(len(chosen)))]


def jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flips and a mild change of exposure (gamma 0.85-1.2) and saturation (x0.8-1.2) of a clean crop."""
    if rng.random() < 0.5:
        image = image[:, ::-1]
    if rng.random() < 0.3:
        image = image[::-1]
    x = (image.astype(np.float32) / 255.0) ** rng.uniform(0.85, 1.2)
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(0.8, 1.2)
    return np.ascontiguousarray(np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8))


def make_example(
    photos: Sequence[np.ndarray], combos, sides: Sequence[int], seed: int, index: int, restored: bool = False
):
    """(degraded crop, true degradations) of example ``index``: a function of (seed, index).
    ``restored``: a crop as the agent sees it after one or more tool calls (``partly_restore``)."""
    rng = np.random.default_rng([seed, index])
    photo = photos[int(rng.integers(len(photos)))]
    side = min(int(rng.choice(sides)), *photo.shape[:2])
    y, x = int(rng.integers(photo.shape[0] - side + 1)), int(rng.integers(photo.shape[1] - side + 1))
    image = jitter(photo[y : y + side, x : x + side], rng)
    combo = draw_combo(combos, rng)
    if combo:
        image, _ = degrade_chain(image, list(combo), rng)
    if restored and combo:
        image, combo = partly_restore(image, combo, rng)
    return image, combo


def partly_restore(image: np.ndarray, combo: Sequence[str], rng: np.random.Generator):
    """``image`` after a tool for each of 1..all of its degradations (random ones, in random order,
    each a random weight-free tool of its subtask), and the degradations left.

    The agent perceives again after every call, so the recogniser must read tool outputs too:
    trained on degraded photos only, it took the smoothing of a denoiser for defocus blur and the
    ringing of a deblurrer for JPEG: after one call of the quickstart's tools it named the exact
    remaining set in 43% of group-A crops of Kodak24 and McMaster (81% before any call)."""
    from tool_pool.tools import tools_for_subtask

    order = [combo[int(i)] for i in rng.permutation(len(combo))]
    handled = order[: int(rng.integers(1, len(combo) + 1))]
    for name in handled:
        tools = tools_for_subtask(SUBTASK_FOR_DEGRADATION[name])
        image = tools[int(rng.integers(len(tools)))]([image])[0]
    return image, tuple(name for name in combo if name not in handled)


def labels_of(combo: Sequence[str]) -> np.ndarray:
    return np.array([name in combo for name in NAMES], np.float32)


_PHOTOS: list[np.ndarray] = []


def _init_worker(photos):
    global _PHOTOS
    _PHOTOS = photos


def _features_of(task) -> tuple[np.ndarray, np.ndarray]:
    combos, sides, seed, index, restored = task
    image, combo = make_example(_PHOTOS, combos, sides, seed, index, restored)
    return degradation_features(image), labels_of(combo)


def examples_digest(photos: Sequence[np.ndarray], combos, sides: Sequence[int]) -> str:
    """Names what examples are drawn from: the photos' pixels, the combinations and crop sides.
    A shard's name carries it, so that a rerun into the same folder with other photos (another
    ``--hq``) computes its own shards instead of reading the other run's as its own."""
    digest = hashlib.sha1(repr((sorted((k, sorted(v)) for k, v in combos.items()), tuple(sides))).encode())
    for photo in photos:
        digest.update(repr(photo.shape).encode())
        digest.update(np.ascontiguousarray(photo).data)
    return digest.hexdigest()[:8]


def example_features(
    photos, count, seed, combos=None, sides=CROP_SIDES, workers=1, shard_dir=None, desc="features", restored=False
):
    """Features [count, F] and labels [count, 8] of examples 0..count-1, computed by ``workers``
    processes; with ``shard_dir``, cached there shard by shard (a rerun reads what exists).
    ``restored``: partly restored examples (``make_example``), in shards of their own name."""
    from tqdm import tqdm

    combos = training_combos() if combos is None else combos
    source = examples_digest(photos, combos, sides) if shard_dir else ""
    shards = [(start, min(start + SHARD, count)) for start in range(0, count, SHARD)]
    features, labels = [], []
    # spawned, not forked: a fork of a process whose torch threads are running can deadlock
    pool = mp.get_context("spawn").Pool(workers, _init_worker, (photos,)) if workers > 1 else None
    if pool is None:
        _init_worker(photos)
    try:
        with tqdm(total=count, desc=desc, unit="crop", file=sys.stderr) as bar:
            for start, end in shards:
                kind = "restored_" if restored else ""  # other features or examples: another name
                name = f"shard_{FEATURES_DIGEST}_{source}_{kind}{seed}_{start:07d}_{end:07d}.npz"
                path = Path(shard_dir) / name if shard_dir else None
                if path is not None and path.is_file():
                    cached = np.load(path)
                    x, y = cached["x"], cached["y"]
                    bar.update(end - start)
                else:
                    tasks = [(combos, tuple(sides), seed, i, restored) for i in range(start, end)]
                    rows = []
                    for row in pool.imap(_features_of, tasks, chunksize=32) if pool else map(_features_of, tasks):
                        rows.append(row)
                        bar.update(1)
                    x, y = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
                    if path is not None:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        np.savez(path.with_suffix(".tmp.npz"), x=x, y=y)
                        os.replace(path.with_suffix(".tmp.npz"), path)
                features.append(x)
                labels.append(y)
    finally:
        if pool is not None:
            pool.terminate()
    return np.concatenate(features).reshape(-1, NUM_FEATURES), np.concatenate(labels).reshape(-1, len(NAMES))


def fit(
    features: np.ndarray,
    labels: np.ndarray,
    seed: int,
    steps: int = 4000,
    hidden: int = 128,
    lr: float = 3e-3,
    batch: int = 256,
    members: int = 1,
):
    """The MLP on standardised features (AdamW, one-cycle LR, binary cross-entropy), thresholds at
    0.5; with ``members`` > 1, that many MLPs from seeds ``seed``, ``seed + 1``, ... (same
    examples, other initialisation and batch order) whose logits are averaged."""
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
    x = ((features - mean) / std).astype(np.float32)
    networks = [
        _fit_mlp(x, labels, seed + k, steps, hidden, lr, batch, f"training {k + 1}/{members}") for k in range(members)
    ]
    network = networks[0] if members == 1 else Ensemble(networks)
    return Recognizer(network, mean, std, NAMES, np.full(len(NAMES), 0.5, np.float32))


def _fit_mlp(x: np.ndarray, labels: np.ndarray, seed: int, steps: int, hidden: int, lr: float, batch: int, desc: str):
    import torch
    from tqdm import tqdm

    torch.manual_seed(seed)
    x, y = torch.from_numpy(x), torch.from_numpy(labels.astype(np.float32))
    network = build_network(x.shape[1], hidden, y.shape[1])
    optimizer = torch.optim.AdamW(network.parameters(), lr, weight_decay=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    network.train()
    with tqdm(range(steps), desc=desc, unit="step", file=sys.stderr) as bar:
        for step in bar:
            rows = torch.randint(len(x), (batch,), generator=generator)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(network(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 200 == 0:
                bar.set_postfix(bce=f"{loss.item():.3f}")
    return network


def tune_thresholds(model: Recognizer, features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each degradation's threshold maximising its F1 on validation examples (0.5 without positives)."""
    probs = model.probabilities_of_features(features)
    thresholds = np.full(len(NAMES), 0.5, np.float32)
    for j in range(len(NAMES)):
        truth = labels[:, j] > 0.5
        if not truth.any():
            continue
        f1 = {}
        for t in np.linspace(0.1, 0.9, 33).tolist():
            guess = probs[:, j] >= t
            f1[t] = 2 * float((guess & truth).sum()) / (guess.sum() + truth.sum())
        thresholds[j] = max(f1, key=f1.get)  # the lowest threshold among equal F1s
    return thresholds


def held_out_scores(model: Recognizer, features: np.ndarray, labels: np.ndarray) -> dict:
    predicted = [model.decide(dict(zip(NAMES, row))) for row in model.probabilities_of_features(features)]
    truth = [[n for n, v in zip(NAMES, row) if v > 0.5] for row in labels]
    return set_scores(predicted, truth)


# ------------------------------------------------------------------------------ the command
def load_photos(specs: Sequence[str], exclude: Sequence[str] = ()) -> tuple[list[str], list[np.ndarray]]:
    """(ids, RGB photos) of every source in ``specs`` ("builtin" or folders), less ``exclude``
    ids; a folder named like one of the field's standard test sets is refused."""
    from tir.data.synth import list_sources, load_source

    ids, photos = [], []
    for spec in specs:
        parts = {part.lower() for part in Path(spec).parts}
        banned = sorted(parts & set(TEST_SETS))
        if spec != "builtin" and banned:
            raise RecognizerError(
                f"--hq {spec}: {banned[0]!r} is a standard test set, for evaluation only; train on training photos"
            )
        for source in list_sources(spec):
            if source.image_id in exclude:
                continue
            loaded = load_source(source)
            if loaded is not None and min(loaded.image.shape[:2]) >= max(CROP_SIDES):
                ids.append(f"{spec}:{source.image_id}")
                photos.append(loaded.image)
    if len(photos) < 2:
        raise RecognizerError(
            f"--hq {', '.join(specs)}: {len(photos)} usable photo(s) of at least {max(CROP_SIDES)} px a side; need 2 or more"
        )
    return ids, photos


def held_out_sets(photos: Sequence[np.ndarray], seed: int, count: int, workers: int) -> dict[str, tuple]:
    """Features and labels of ``count`` 128 px crops of held-out photos per kind: group A (the
    headline), B, C, out of domain, and group A after one or more tool calls."""
    kinds = {"A": ("groupA", False), "B": ("groupB", False), "C": ("groupC", False), "ood": ("ood", False)}
    kinds["A, partly restored"] = ("groupA", True)
    return {
        label: example_features(
            photos,
            count,
            seed + 1000 + i,
            {group: [tuple(c) for c in COMBINATIONS[group]]},
            (128,),
            workers,
            desc=f"held-out {label}",
            restored=restored,
        )
        for i, (label, (group, restored)) in enumerate(kinds.items())
    }


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--hq", action="append", default=None, help="training photos: 'builtin' or a folder (repeatable)"
    )
    parser.add_argument(
        "--heldout", default="chelsea,stereo_motorcycle", help="built-in photos never trained on, scored at the end"
    )
    parser.add_argument("--samples", type=int, default=24000, help="synthetic training examples")
    parser.add_argument(
        "--restored",
        type=int,
        default=0,
        help="extra examples seen after tool calls, partly restored, read with an after_call input (default 0: none)",
    )
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps")
    parser.add_argument("--hidden", type=int, default=128, help="width of the MLP's two hidden layers")
    parser.add_argument(
        "--members", type=int, default=1, help="MLPs trained from consecutive seeds, logits averaged (default 1)"
    )
    parser.add_argument("--heldout-crops", type=int, default=400, help="crops per held-out set (A, B, C, ood)")
    parser.add_argument(
        "--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="processes computing features"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="checkpoint folder (model.pt, README.md, scores.json, features/)")
    return parser


def train_main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    specs = args.hq or ["builtin"]
    heldout = tuple(s.strip() for s in args.heldout.split(",") if s.strip())
    if args.restored < 0:
        print(f"tir perception train: error: --restored must be >= 0, got {args.restored}", file=sys.stderr)
        return 2
    for name, value in (
        ("--samples", args.samples),
        ("--steps", args.steps),
        ("--hidden", args.hidden),
        ("--members", args.members),
        ("--workers", args.workers),
    ):
        if value < 1:
            print(f"tir perception train: error: {name} must be >= 1, got {value}", file=sys.stderr)
            return 2
    try:
        ids, photos = load_photos(specs, exclude=heldout)
        _, heldout_photos = (
            load_photos(["builtin"], exclude=[n for n in _builtin_names() if n not in heldout]) if heldout else ([], [])
        )
    except (RecognizerError, FileNotFoundError) as err:
        print(f"tir perception train: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    order = np.random.default_rng(args.seed).permutation(len(photos))
    validation = sorted(order[: max(1, len(photos) // 10)].tolist())
    held = set(validation)
    train = [photo for i, photo in enumerate(photos) if i not in held]
    features, labels = example_features(
        train, args.samples, args.seed, workers=args.workers, shard_dir=out / "features"
    )
    val_x, val_y = example_features(
        [photos[i] for i in validation],
        max(200, args.samples // 10),
        args.seed + 1,
        workers=args.workers,
        desc="validation",
    )
    if args.restored:  # after tool calls: drawn from streams of their own, so the others stay as they were
        more = {kind: combos for kind, combos in training_combos().items() if kind != "clean"}
        x, y = example_features(
            train,
            args.restored,
            args.seed + 2,
            more,
            workers=args.workers,
            shard_dir=out / "features",
            desc="restored",
            restored=True,
        )
        # one more input tells the two apart (tir.data.recognizer: after_call)
        features = np.concatenate([with_after_call(features, False), with_after_call(x, True)])
        labels = np.concatenate([labels, y])
        x, y = example_features(
            [photos[i] for i in validation],
            max(100, args.restored // 10),
            args.seed + 3,
            more,
            workers=args.workers,
            desc="validation, restored",
            restored=True,
        )
        val_x = np.concatenate([with_after_call(val_x, False), with_after_call(x, True)])
        val_y = np.concatenate([val_y, y])
    model = fit(features, labels, args.seed, steps=args.steps, hidden=args.hidden, members=args.members)
    model.thresholds = tune_thresholds(model, val_x, val_y)
    sets = held_out_sets(heldout_photos, args.seed, args.heldout_crops, args.workers) if heldout_photos else {}
    if model.after_call_input:
        sets = {label: (with_after_call(x, "restored" in label), y) for label, (x, y) in sets.items()}
    scores = {label: held_out_scores(model, x, y) for label, (x, y) in sets.items()}
    scores["validation"] = held_out_scores(model, val_x, val_y)
    model.save(out, extra={"seed": args.seed, "samples": args.samples})
    command = (
        "tir perception train " + " ".join(shlex.quote(a) for a in sys.argv[3:])
        if sys.argv[1:3] == ["perception", "train"]
        else "tir perception train ..."
    )
    (out / "README.md").write_text(
        model_card(
            args,
            command,
            ids,
            heldout,
            [ids[i] for i in validation],
            scores,
            time.perf_counter() - started,
            CROP_SIDES,
            KIND_WEIGHTS,
        )
    )
    (out / "scores.json").write_text(json.dumps(scores, indent=1))
    for label, score in scores.items():
        print(f"{label}: exact set {score['exact_set']:.1%} on {score['samples']} crops")
    print(f"wrote {out / 'model.pt'} and {out / 'README.md'} ({(time.perf_counter() - started) / 60:.1f} min)")
    return 0


def _builtin_names() -> list[str]:
    from tir.data.synth import BUILTIN_PHOTOS

    return list(BUILTIN_PHOTOS)
