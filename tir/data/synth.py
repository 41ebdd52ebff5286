"""HQ photo sources and the synthesis of (LQ, HQ) training and evaluation pairs.

A source is either ``"builtin"`` (the colour photos scikit-image ships, usable offline) or a
folder of PNG/JPEG/... photos. ``synthesize`` degrades every photo with every combination
``per_image`` times and returns a ``Batch`` with one row per sample. Each row is reproducible
from its ``(image_id, combo, seed)``: ``sample_rng`` derives the generator from those three, the
optional random crop is drawn from it first, then the degradation chain.

``tir data synth`` (``add_synth_arguments`` / ``synth_main``) writes the batch to Parquet, either
as one file (atomic) or, with ``--shard-size``, as a folder of shards so that an interrupted run
loses at most one shard and resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from tir.data.degradations import combo_name, degrade_chain, parse_combos, sample_rng
from tir.data.depth import depth_from_disparity, find_depth, load_depth, resize_depth
from tir.paths import check_writable_folder
from tir.protocol import Batch

BUILTIN_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "stereo_motorcycle",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
CROP_MODES = ("center", "random")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class SourceImage:
    """One HQ photo, loaded on demand: ``path`` is None for a builtin photo."""

    image_id: str
    path: Path | None = None
    depth_path: Path | None = None


@dataclass(frozen=True)
class Loaded:
    image: np.ndarray  # RGB uint8 HxWx3
    depth: np.ndarray | None  # HxW float, larger = farther; None -> haze uses its fallback
    depth_source: str  # "file", "stereo" or "synthetic"


@dataclass(frozen=True)
class SampleSpec:
    source: SourceImage
    group: str
    combo: tuple[str, ...]
    seed: int


# ------------------------------------------------------------------------------ sources
def list_sources(spec: str | Path, recursive: bool = False, depth_dir: str | Path | None = None) -> list[SourceImage]:
    """``"builtin"`` or a folder (sorted by relative path; ``recursive`` descends into sub-folders).
    ``depth_dir``: where depth maps of the folder's photos live (see ``tir.data.depth.find_depth``)."""
    if str(spec) == "builtin":
        return [SourceImage(name) for name in BUILTIN_PHOTOS]
    folder = Path(spec)
    if not folder.is_dir():
        raise FileNotFoundError(f"HQ source {str(spec)!r} is neither 'builtin' nor a folder")
    files = folder.rglob("*") if recursive else folder.iterdir()
    photos = sorted(
        p.relative_to(folder).as_posix()
        for p in files
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not photos:
        raise FileNotFoundError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {str(folder)!r}"
            + ("" if recursive else " (not recursive)")
        )
    return [SourceImage(rel, folder / rel, find_depth(depth_dir, rel) if depth_dir else None) for rel in photos]


def _load_builtin(name: str) -> Loaded:
    import skimage.data

    if name == "stereo_motorcycle":  # the left view, and a real depth from the stereo disparity
        left, _, disparity = skimage.data.stereo_motorcycle()
        return Loaded(np.ascontiguousarray(left), depth_from_disparity(disparity), "stereo")
    return Loaded(np.ascontiguousarray(getattr(skimage.data, name)()[..., :3]), None, "synthetic")


def _read_photo(path: Path) -> np.ndarray | None:
    """RGB uint8 (grey, 16-bit and alpha images converted by OpenCV), or None when unreadable."""
    try:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    return None if image is None or image.size == 0 else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def load_source(source: SourceImage) -> Loaded | None:
    """The photo (and its depth map, if any); None with a warning naming it when unreadable."""
    try:
        if source.path is None:
            return _load_builtin(source.image_id)
        image = _read_photo(source.path)
        if image is None:
            raise ValueError("not a readable image")
        if source.depth_path is None:
            return Loaded(image, None, "synthetic")
        return Loaded(image, resize_depth(load_depth(source.depth_path), *image.shape[:2]), "file")
    except Exception as err:  # noqa: BLE001 - one bad file must never end a long synthesis run
        where = source.path or f"skimage.data.{source.image_id}"
        warnings.warn(f"skipping unreadable image {source.image_id!r} ({where}): {err}", stacklevel=2)
        return None


# ------------------------------------------------------------------------------ crops
def crop_box(
    height: int, width: int, size: int | None, mode: str, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w): a square of ``size`` (at most the short side), or the whole image when
    size is None; both sides trimmed to a multiple of 4 so that lowres (x1/4) divides exactly."""
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode must be one of {CROP_MODES}, got {mode!r}")
    if size is None:
        h, w = height // 4 * 4, width // 4 * 4
    else:
        h = w = min(int(size), height, width) // 4 * 4
    if h < 4 or w < 4:
        raise ValueError(f"image of {height}x{width} is too small for a crop of {size} (needs at least 4x4)")
    if mode == "random" and size is not None:
        return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return (height - h) // 2, (width - w) // 2, h, w


def shrink(image: np.ndarray, depth: np.ndarray | None, short_side: int | None):
    """Downscale (area) so the short side is ``short_side``; never upscale."""
    if short_side is None or min(image.shape[:2]) <= short_side:
        return image, depth
    factor = short_side / min(image.shape[:2])
    size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return image, (None if depth is None else cv2.resize(depth, size, interpolation=cv2.INTER_AREA))


# ------------------------------------------------------------------------------ synthesis
def sample_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th sample of an (image, combo): distinct for every (seed, index)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def plan_samples(
    sources: Sequence[SourceImage], combos: Sequence[tuple[str, tuple[str, ...]]], per_image: int, seed: int
) -> list[SampleSpec]:
    """Every (image, combo, k) in a fixed order, image by image (each photo is loaded once)."""
    if per_image < 1:
        raise ValueError(f"per_image must be >= 1, got {per_image}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return [
        SampleSpec(s, group, combo, sample_seed(seed, k))
        for s in sources
        for group, combo in combos
        for k in range(per_image)
    ]


def make_sample(
    spec: SampleSpec,
    loaded: Loaded,
    crop: int | None = None,
    crop_mode: str = "center",
    resize_short: int | None = None,
) -> dict:
    """One row: crop the HQ photo, degrade it along the combination, record everything used."""
    rng = sample_rng(spec.source.image_id, spec.combo, spec.seed)
    image, depth = shrink(loaded.image, loaded.depth, resize_short)
    top, left, h, w = crop_box(*image.shape[:2], crop, crop_mode, rng)
    hq = np.ascontiguousarray(image[top : top + h, left : left + w])
    haze_params = (
        {"depth": depth[top : top + h, left : left + w], "depth_source": loaded.depth_source}
        if depth is not None
        else None
    )
    lq, applied = degrade_chain(hq, spec.combo, rng, [haze_params if name == "haze" else None for name in spec.combo])
    depth_source = next((p["depth_source"] for name, p in zip(spec.combo, applied) if name == "haze"), "none")
    return {
        "image_id": spec.source.image_id,
        "combo": combo_name(spec.combo),
        "group": spec.group,
        "degradations": list(spec.combo),
        "params": applied,
        "depth_source": depth_source,
        "seed": spec.seed,
        "crop_box": [top, left, h, w],
        "lq": lq,
        "hq": hq,
    }


def _rows(plan: Iterable[SampleSpec], bar: tqdm, **crop_args) -> list[dict]:
    rows, cache = [], {}
    for spec in plan:
        if spec.source not in cache:  # the plan is ordered by image: keep only the current one
            cache = {spec.source: _big_enough(load_source(spec.source), spec.source, **crop_args)}
        if cache[spec.source] is not None:
            rows.append(make_sample(spec, cache[spec.source], **crop_args))
        bar.update(1)
    return rows


def _big_enough(loaded: Loaded | None, source: SourceImage, crop=None, resize_short=None, **_) -> Loaded | None:
    """``loaded``, or None with a warning naming the photo when its short side (after
    ``resize_short``) is under ``crop``: it is skipped, never cropped smaller than asked."""
    if loaded is None or crop is None or min(*loaded.image.shape[:2], resize_short or crop) >= crop:
        return loaded
    height, width = loaded.image.shape[:2]
    after = f" (--resize-short {resize_short})" if resize_short and resize_short < min(height, width) else ""
    warnings.warn(
        f"skipping {source.image_id!r} ({source.path or 'builtin'}): {width}x{height}{after} is smaller than --crop {crop}",
        stacklevel=2,
    )
    return None


def check_sizes(crop: int | None, resize_short: int | None) -> None:
    """``--crop`` and ``--resize-short`` in range (ValueError naming the flag)."""
    for flag, value in (("--crop", crop), ("--resize-short", resize_short)):
        if value is not None and value < 4:
            raise ValueError(f"{flag} must be >= 4 (pixels; trimmed to a multiple of 4), got {value}")


def rows_to_batch(rows: list[dict], meta: dict) -> Batch:
    if not rows:
        raise ValueError("no samples were produced (every source image was unreadable or smaller than --crop?)")
    return Batch.from_rows(rows, meta=meta, kinds={"params": "json", "lq": "image", "hq": "image"})


def _resolve(sources, combos, recursive: bool, depth_dir):
    sources = list_sources(sources, recursive, depth_dir) if isinstance(sources, (str, Path)) else list(sources)
    return sources, parse_combos(combos) if isinstance(combos, str) or all(
        isinstance(c, str) for c in combos
    ) else list(combos)


def synthesize(
    sources: str | Path | Sequence[SourceImage],
    combos: str | Sequence,
    per_image: int = 1,
    seed: int = 0,
    crop: int | None = None,
    crop_mode: str = "center",
    resize_short: int | None = None,
    depth_dir: str | Path | None = None,
    recursive: bool = False,
    progress: bool = True,
) -> Batch:
    """Degraded pairs of every source photo x combination x ``per_image``, as one Batch.

    ``sources``: "builtin", a folder, or a list of ``SourceImage``; ``combos``: a spec such as
    "groupA,noise+jpeg" or a list of (group, combo) pairs. Columns: image_id, combo, group,
    degradations, params (json), depth_source, seed, crop_box, lq, hq.
    """
    check_sizes(crop, resize_short)
    sources, combos = _resolve(sources, combos, recursive, depth_dir)
    plan = plan_samples(sources, combos, per_image, seed)
    with tqdm(total=len(plan), desc="synth", unit="sample", disable=not progress) as bar:
        rows = _rows(plan, bar, crop=crop, crop_mode=crop_mode, resize_short=resize_short)
    meta = {
        "kind": "synth",
        "seed": seed,
        "per_image": per_image,
        "crop": crop,
        "crop_mode": crop_mode,
        "resize_short": resize_short,
    }
    return rows_to_batch(rows, meta)


def synthesize_shards(
    out_dir: str | Path,
    sources,
    combos,
    shard_size: int,
    per_image: int = 1,
    seed: int = 0,
    crop=None,
    crop_mode: str = "center",
    resize_short=None,
    depth_dir=None,
    recursive: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Write the samples as ``out_dir/part-NNNNN.parquet`` shards of ``shard_size`` samples.

    Shards already present are kept (each was written atomically): rerunning the same command
    after an interruption only makes the missing ones. ``manifest.json`` records the run's
    settings, and a rerun with different settings into the same folder is refused.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    check_sizes(crop, resize_short)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} is a file; with --shard-size it must be a folder")
    sources, combos = _resolve(sources, combos, recursive, depth_dir)
    plan = plan_samples(sources, combos, per_image, seed)
    settings = {
        "sources": [s.image_id for s in sources],
        "combos": [[g, list(c)] for g, c in combos],
        "per_image": per_image,
        "seed": seed,
        "crop": crop,
        "crop_mode": crop_mode,
        "resize_short": resize_short,
        "shard_size": shard_size,
    }
    check_manifest(out_dir, settings)
    paths = []
    with tqdm(total=len(plan), desc="synth", unit="sample", disable=not progress) as bar:
        for index, start in enumerate(range(0, len(plan), shard_size)):
            path = out_dir / f"part-{index:05d}.parquet"
            chunk = plan[start : start + shard_size]
            if not path.exists():
                rows = _rows(chunk, bar, crop=crop, crop_mode=crop_mode, resize_short=resize_short)
                if not rows:
                    continue
                rows_to_batch(rows, {"kind": "synth", "shard": index, **settings}).to_parquet(path)
            else:
                bar.update(len(chunk))
            paths.append(path)
    return paths


def check_manifest(out_dir: Path, settings: dict) -> None:
    manifest = out_dir / MANIFEST
    if manifest.exists():
        if json.loads(manifest.read_text()) != settings:
            raise ValueError(
                f"{out_dir} holds shards of a run with other settings ({manifest}); use another --out or remove it"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings, indent=1))
    tmp.replace(manifest)


def read_synth(path: str | Path) -> Batch:
    """A synthesized batch from one Parquet file or a folder of shards (concatenated in order)."""
    path = Path(path)
    if path.is_dir():
        parts = sorted(path.glob("part-*.parquet"))
        if not parts:
            raise FileNotFoundError(f"no part-*.parquet shards in {path}")
        return Batch.concat([_read_part(p) for p in parts])
    return _read_part(path)


class SynthReadError(ValueError):
    """A file that is not a readable Parquet file (one line naming it)."""


def _read_part(path: Path) -> Batch:
    try:
        return Batch.from_parquet(path)
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
        if isinstance(err, FileNotFoundError):
            raise
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise SynthReadError(f"{str(path)!r} is not a readable Parquet file from `tir data synth` ({reason})") from None


# ------------------------------------------------------------------------------ CLI
def add_synth_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``tir data synth``."""
    parser.add_argument(
        "--hq", default="builtin", help="'builtin' (scikit-image's colour photos) or a folder of photos"
    )
    parser.add_argument(
        "--combos",
        default="groupA",
        help="comma-separated sets (groupA, groupB, groupC, single, ood, ood2, ood3) and/or combinations like noise+jpeg",
    )
    parser.add_argument("--per-image", type=int, default=1, help="samples per photo and combination")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--crop", type=int, default=None, help="square crop size in pixels (trimmed to a multiple of 4)"
    )
    parser.add_argument("--crop-mode", choices=CROP_MODES, default="center")
    parser.add_argument(
        "--resize-short", type=int, default=None, help="first downscale photos so the short side is this"
    )
    parser.add_argument(
        "--depth", default=None, help="folder of depth maps for haze (<name>.npy/.png/.mat or <name>/predict_depth.mat)"
    )
    parser.add_argument("--recursive", action="store_true", help="also read photos in sub-folders")
    parser.add_argument(
        "--shard-size", type=int, default=0, help="write --out as a folder of shards of this many samples (resumable)"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", required=True, help="output .parquet file, or folder with --shard-size")
    return parser


def synth_main(args: argparse.Namespace) -> int:
    common = {
        "per_image": args.per_image,
        "seed": args.seed,
        "crop": args.crop,
        "crop_mode": args.crop_mode,
        "resize_short": args.resize_short,
        "depth_dir": args.depth,
        "recursive": args.recursive,
        "progress": not args.no_progress,
    }
    try:
        if not args.shard_size and Path(args.out).is_dir():
            raise ValueError(f"--out {args.out!r} is a folder; expected a .parquet file (or pass --shard-size)")
        check_writable_folder(Path(args.out).parent, f"--out {args.out!r}")  # before any work
        if args.shard_size:
            paths = synthesize_shards(args.out, args.hq, args.combos, args.shard_size, **common)
            count = sum(len(Batch.from_parquet(p, columns=["seed"])) for p in paths)
            print(f"wrote {count} samples in {len(paths)} shards to {args.out}")
        else:
            batch = synthesize(args.hq, args.combos, **common)
            batch.to_parquet(args.out)
            print(
                f"wrote {len(batch)} samples ({len(set(batch.column('image_id')))} photos, {len(set(batch.column('combo')))} combinations) to {args.out}"
            )
    except (KeyError, ValueError, FileNotFoundError) as err:
        print(f"tir data synth: error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    return 0
