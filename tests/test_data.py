import argparse
import json

import cv2
import numpy as np
import pytest
import skimage.data

import tir  # noqa: F401  (environment shims before basicsr)
from tir.data.degradations import degrade_chain, sample_rng
from tir.data.synth import (
    BUILTIN_PHOTOS,
    SourceImage,
    add_synth_arguments,
    crop_box,
    list_sources,
    load_source,
    make_sample,
    read_synth,
    synth_main,
    synthesize,
)
from tir.protocol import Batch

COLUMNS = ["image_id", "combo", "group", "degradations", "params", "depth_source", "seed", "crop_box", "lq", "hq"]


def write_rgb(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


@pytest.fixture
def photo_folder(tmp_path):
    """Three real photos (PNG, JPEG, one in a sub-folder), a corrupt PNG and a text file."""
    folder = tmp_path / "hq"
    write_rgb(folder / "b_coffee.png", skimage.data.coffee()[:100, :120])
    write_rgb(folder / "a_chelsea.jpg", skimage.data.chelsea()[:90, :110])
    write_rgb(folder / "sub" / "rocket.png", skimage.data.rocket()[:80, :80])
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_builtin_photos_load_offline():
    sources = list_sources("builtin")
    assert [s.image_id for s in sources] == list(BUILTIN_PHOTOS)
    for source in sources:
        loaded = load_source(source)
        assert loaded is not None, source.image_id
        assert loaded.image.dtype == np.uint8 and loaded.image.ndim == 3 and loaded.image.shape[2] == 3
        assert min(loaded.image.shape[:2]) >= 256
    motorcycle = load_source(SourceImage("stereo_motorcycle"))
    assert motorcycle.depth_source == "stereo" and motorcycle.depth.shape == motorcycle.image.shape[:2]
    assert np.isfinite(motorcycle.depth).all() and 0 < motorcycle.depth.min() and motorcycle.depth.max() == 1


def test_crop_box():
    rng = np.random.default_rng(0)
    assert crop_box(300, 451, None, "center", rng) == (0, 1, 300, 448)  # trimmed to multiples of 4
    assert crop_box(300, 451, 256, "center", rng) == (22, 97, 256, 256)
    assert crop_box(90, 110, 256, "center", rng) == (1, 11, 88, 88)  # capped at the short side
    for _ in range(20):
        top, left, h, w = crop_box(300, 451, 66, "random", rng)
        assert (h, w) == (64, 64) and 0 <= top <= 236 and 0 <= left <= 387
    with pytest.raises(ValueError, match="crop mode"):
        crop_box(100, 100, 64, "corner", rng)


def test_synthesize_builtin_rows_are_reproducible():
    sources = [SourceImage("astronaut"), SourceImage("stereo_motorcycle")]
    batch = synthesize(
        sources, "rain+haze,motion_blur+lowres", per_image=2, seed=5, crop=64, crop_mode="random", progress=False
    )
    assert batch.columns == COLUMNS and len(batch) == 2 * 2 * 2
    rows = batch.rows()
    assert [r["combo"] for r in rows[:4]] == ["rain+haze"] * 2 + ["motion_blur+lowres"] * 2
    assert {r["group"] for r in rows} == {"custom"}
    assert [r["depth_source"] for r in rows] == [
        "synthetic",
        "synthetic",
        "none",
        "none",
        "stereo",
        "stereo",
        "none",
        "none",
    ]
    for row in rows:
        assert row["hq"].shape == (64, 64, 3)
        assert row["lq"].shape == ((16, 16, 3) if "lowres" in row["degradations"] else (64, 64, 3))
        assert len(row["params"]) == len(row["degradations"])
    assert rows[0]["seed"] != rows[1]["seed"] and rows[0]["crop_box"] != rows[1]["crop_box"]  # k = 0, 1 differ
    assert not np.array_equal(rows[0]["lq"], rows[1]["lq"])

    # a row is remade from (image_id, combo, seed) alone ...
    row = rows[2]
    spec = type(
        "Spec",
        (),
        {
            "source": SourceImage(row["image_id"]),
            "group": "custom",
            "combo": tuple(row["degradations"]),
            "seed": row["seed"],
        },
    )
    remade = make_sample(spec, load_source(spec.source), crop=64, crop_mode="random")
    assert np.array_equal(remade["lq"], row["lq"]) and remade["params"] == row["params"]
    # ... or from the HQ crop and the recorded params
    replay, _ = degrade_chain(row["hq"], row["degradations"], np.random.default_rng(0), params=row["params"])
    assert np.array_equal(replay, row["lq"])
    # the whole batch again: identical; another seed: different
    assert synthesize(
        sources, "rain+haze,motion_blur+lowres", per_image=2, seed=5, crop=64, crop_mode="random", progress=False
    ).equals(batch)
    other = synthesize(sources[:1], "rain+haze", per_image=1, seed=6, crop=64, crop_mode="random", progress=False)
    assert not np.array_equal(other.column("lq")[0], rows[0]["lq"])


def test_the_rng_of_a_row_is_its_id_combo_and_seed():
    batch = synthesize([SourceImage("coffee")], "noise", per_image=1, seed=0, crop=32, progress=False)
    row = batch.rows()[0]
    lq, _ = degrade_chain(row["hq"], "noise", sample_rng("coffee", "noise", row["seed"]))  # center crop: no draw
    assert np.array_equal(lq, row["lq"])


def test_folder_skips_corrupt_files_by_name_and_round_trips(photo_folder, tmp_path):
    assert [s.image_id for s in list_sources(photo_folder)] == ["a_chelsea.jpg", "b_coffee.png", "broken.png"]
    with pytest.warns(UserWarning, match=r"skipping unreadable image 'broken.png'"):
        batch = synthesize(photo_folder, "groupB", per_image=1, seed=0, crop=64, recursive=True, progress=False)
    assert sorted(set(batch.column("image_id"))) == ["a_chelsea.jpg", "b_coffee.png", "sub/rocket.png"]
    assert len(batch) == 3 * 4 and set(batch.column("group")) == {"groupB"}
    assert batch.column("combo")[:4] == ["motion_blur+jpeg", "haze+noise", "defocus_blur+lowres", "rain+dark"]
    path = batch.to_parquet(tmp_path / "synth.parquet")
    back = read_synth(path)
    assert back.equals(batch) and back.meta["crop"] == 64
    assert back.kind("lq") == "image" and back.kind("params") == "json"
    first = back.rows()[1]
    assert first["params"][0]["depth_source"] == "synthetic" and isinstance(first["params"], list)


def test_depth_maps_next_to_a_folder_are_used(photo_folder, tmp_path):
    depth_dir = tmp_path / "depth"
    depth_dir.mkdir()
    np.save(depth_dir / "b_coffee.npy", np.linspace(1, 2, 50 * 60, dtype=np.float32).reshape(50, 60))
    with pytest.warns(UserWarning, match="broken.png"):
        batch = synthesize(photo_folder, "haze", seed=0, crop=64, depth_dir=depth_dir, progress=False)
    sources = dict(zip(batch.column("image_id"), batch.column("depth_source")))
    assert sources == {"a_chelsea.jpg": "synthetic", "b_coffee.png": "file"}


def test_bad_sources_and_specs_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'builtin' nor a folder"):
        list_sources(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no images"):
        list_sources(tmp_path)
    with pytest.raises(KeyError, match="did you mean 'groupA'"):
        synthesize("builtin", "grupA", progress=False)


def parse(argv):
    return add_synth_arguments(argparse.ArgumentParser(prog="tir data synth")).parse_args(argv)


def test_cli_writes_one_file(photo_folder, tmp_path, capsys):
    out = tmp_path / "out" / "x.parquet"
    with pytest.warns(UserWarning, match="broken.png"):
        code = synth_main(
            parse(
                [
                    "--hq",
                    str(photo_folder),
                    "--combos",
                    "noise+jpeg,dark",
                    "--per-image",
                    "2",
                    "--crop",
                    "48",
                    "--no-progress",
                    "--out",
                    str(out),
                ]
            )
        )
    assert code == 0 and "wrote 8 samples (2 photos, 2 combinations)" in capsys.readouterr().out
    batch = Batch.from_parquet(out)
    assert len(batch) == 8 and batch.column("hq")[0].shape == (48, 48, 3)
    assert synth_main(parse(["--combos", "groupZ", "--out", str(out)])) == 2
    assert "groupZ" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_photo_smaller_than_the_crop_is_named_and_skipped(photo_folder, tmp_path, capsys):
    write_rgb(photo_folder / "small.png", skimage.data.coffee()[:80, :100])  # 100x80: short side 80
    with pytest.warns(UserWarning, match=r"skipping 'small.png' .*100x80 is smaller than --crop 96"):
        batch = synthesize(photo_folder, "noise", crop=96, progress=False)
    assert set(batch.column("image_id")) == {"b_coffee.png"}  # 120x100 is the only one big enough
    assert {hq.shape for hq in batch.column("hq")} == {(96, 96, 3)}  # never a smaller crop
    out = tmp_path / "x.parquet"
    with pytest.warns(UserWarning, match="small.png"):
        assert synth_main(parse(["--hq", str(photo_folder), "--crop", "96", "--no-progress", "--out", str(out)])) == 0
    capsys.readouterr()
    for argv, expected in [
        (["--crop", "0"], "--crop must be >= 4"),
        (["--crop", "-8"], "--crop must be >= 4"),
        (["--resize-short", "0"], "--resize-short must be >= 4"),
        (["--out", str(tmp_path)], "is a folder; expected a .parquet file"),
        (["--shard-size", "2", "--out", str(out)], "is a file; with --shard-size it must be a folder"),
        (["--out", str(out / "y.parquet")], "is not a folder"),  # under a file: refused before any work
        (["--shard-size", "2", "--out", str(out / "deeper" / "shards")], "is not a folder"),
    ]:
        argv = argv if "--out" in argv else [*argv, "--out", str(tmp_path / "y.parquet")]
        assert synth_main(parse(["--hq", str(photo_folder), "--no-progress", *argv])) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err


def test_a_text_file_named_parquet_is_one_clear_error(tmp_path):
    from tir.data.synth import SynthReadError

    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(SynthReadError, match=r"fake.parquet' is not a readable Parquet file") as err:
        read_synth(fake)
    assert "\n" not in str(err.value)


def test_cli_shards_resume_after_an_interruption(tmp_path, capsys):
    out = tmp_path / "shards"
    argv = [
        "--hq",
        "builtin",
        "--combos",
        "noise,jpeg",
        "--crop",
        "32",
        "--shard-size",
        "5",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert synth_main(parse(argv)) == 0
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 4  # 8 photos x 2 combos = 16 samples in shards of 5
    assert json.loads((out / "manifest.json").read_text())["shard_size"] == 5
    whole = read_synth(out)
    assert len(whole) == 16 and whole.column("image_id")[:2] == ["astronaut", "astronaut"]
    # an interrupted run: a shard is missing; a rerun remakes exactly that one
    before = Batch.from_parquet(parts[2])
    parts[2].unlink()
    mtime = parts[0].stat().st_mtime_ns
    assert synth_main(parse(argv)) == 0
    assert Batch.from_parquet(parts[2]).table.equals(before.table) and parts[0].stat().st_mtime_ns == mtime
    # other settings into the same folder are refused
    assert synth_main(parse([*argv[:-2], "--seed", "1", "--out", str(out)])) == 2
    assert "other settings" in capsys.readouterr().err
