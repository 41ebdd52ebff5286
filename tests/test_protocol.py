import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tir.protocol import Batch, BatchError


@st.composite
def batches(draw, min_rows=0):
    rows = draw(st.integers(min_rows, 6))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)

    def image():
        h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    tokens = [draw(st.lists(st.integers(-(2**40), 2**40), max_size=7)) for _ in range(rows)]
    return Batch.from_pydict(
        {
            "tokens": tokens,
            "logprobs": [draw(st.lists(st.floats(-50, 0), max_size=5)) for _ in range(rows)],
            "reward": [draw(st.floats(-1e6, 1e6)) for _ in range(rows)],
            "text": [draw(st.text(max_size=8)) for _ in range(rows)],
            "params": [{"sigma": draw(st.integers(0, 50)), "names": ["noise"]} for _ in range(rows)],
            "lq": [image() for _ in range(rows)],
            "turns": [[image() for _ in range(draw(st.integers(0, 3)))] for _ in range(rows)],
        },
        meta={"step": draw(st.integers(0, 100)), "config_hash": "abc"},
        kinds={"lq": "image", "turns": "images", "params": "json"},
    )


def assert_same_rows(a: Batch, b: Batch):
    assert a.columns == b.columns
    for name in a.columns:
        for x, y in zip(a.column(name), b.column(name), strict=True):
            if isinstance(x, np.ndarray):
                np.testing.assert_array_equal(x, y)
            elif isinstance(x, list) and x and isinstance(x[0], np.ndarray):
                assert len(x) == len(y) and all(np.array_equal(p, q) for p, q in zip(x, y))
            else:
                assert x == y


SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(batches())
def test_parquet_round_trip_is_exact(tmp_path_factory, batch):
    path = tmp_path_factory.mktemp("pq") / "b.parquet"
    back = Batch.from_parquet(batch.to_parquet(path))
    assert back.equals(batch)
    assert back.kind("lq") == "image" and back.kind("turns") == "images" and back.kind("params") == "json"
    assert_same_rows(back, batch)


@SETTINGS
@given(batches(min_rows=1), st.integers(1, 4))
def test_chunk_concat_and_slices_keep_rows(batch, n):
    pieces = batch.chunk(n)
    assert len(pieces) == n and sum(len(p) for p in pieces) == len(batch)
    assert max(map(len, pieces)) - min(map(len, pieces)) <= 1
    assert_same_rows(Batch.concat(pieces), batch)
    # a middle slice decodes its own rows, images included
    mid = batch.slice(len(batch) // 2)
    assert_same_rows(mid, batch.take(range(len(batch) // 2, len(batch))))


@SETTINGS
@given(batches(min_rows=1))
def test_padding_round_trip(batch):
    for left in (False, True):
        tensor, mask = batch.to_padded("tokens", pad_value=-1, left=left)
        assert tensor.shape[0] == len(batch) and mask.sum().item() == sum(map(len, batch.column("tokens")))
        back = batch.with_padded("tokens_again", tensor, mask)
        assert back.column("tokens_again") == batch.column("tokens")


def test_padding_values_and_sides():
    batch = Batch.from_pydict({"ids": [[1, 2, 3], [4], []]})
    right, mask = batch.to_padded("ids", pad_value=0)
    assert right.tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    left, mask = batch.to_padded("ids", pad_value=9, left=True)
    assert left.tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    floats, _ = Batch.from_pydict({"lp": [[-0.5], [-1.0, -2.0]]}).to_padded("lp", dtype=torch.float32)
    assert floats.dtype == torch.float32 and floats.tolist() == [[-0.5, 0.0], [-1.0, -2.0]]


def test_repeat_interleaves_groups():
    batch = Batch.from_pydict({"id": ["a", "b"]})
    assert batch.repeat(3).column("id") == ["a", "a", "a", "b", "b", "b"]
    assert batch.repeat(2, interleave=False).column("id") == ["a", "b", "a", "b"]


def test_select_with_column_and_meta():
    batch = Batch.from_pydict({"a": [1, 2], "b": ["x", "y"]}, meta={"step": 3})
    out = batch.with_column("c", [0.5, 1.5]).select(["c", "a"]).with_meta(config_hash="h")
    assert out.columns == ["c", "a"] and out.column("c") == [0.5, 1.5]
    assert out.meta == {"step": 3, "config_hash": "h"}
    assert batch.with_column("a", [7, 8]).column("a") == [7, 8]  # replaced, not duplicated


def test_ray_object_store_round_trip(ray_cluster):
    ray = ray_cluster
    rng = np.random.default_rng(0)
    batch = Batch.from_pydict(
        {"lq": [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(8)], "i": list(range(8))},
        meta={"step": 1},
    )
    back = ray.get(ray.put(batch))
    assert back.equals(batch)
    piece = batch.chunk(4)[2]
    assert ray.get(ray.put(piece)).column("i") == [4, 5]


def test_a_pickled_slice_carries_only_its_rows():
    import pickle

    big = Batch.from_pydict({"lq": [np.zeros((64, 64, 3), np.uint8)] * 64})
    whole, quarter = (len(pickle.dumps(b, protocol=5)) for b in (big, big.chunk(4)[1]))
    assert quarter < whole / 3


def test_bad_input_errors_name_the_column():
    with pytest.raises(BatchError, match=r"lq\[1\]: expected an RGB uint8 HxWx3 image, got ndarray float64"):
        Batch.from_pydict({"lq": [np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2, 3))]}, kinds={"lq": "image"})
    with pytest.raises(BatchError, match="different lengths"):
        Batch.from_pydict({"a": [1], "b": [1, 2]})
    with pytest.raises(KeyError, match="did you mean 'reward'"):
        Batch.from_pydict({"reward": [1.0]}).column("rewards")
    with pytest.raises(BatchError, match="different schemas"):
        Batch.concat([Batch.from_pydict({"a": [1]}), Batch.from_pydict({"b": [1]})])
    with pytest.raises(BatchError, match="expected a list column"):
        Batch.from_pydict({"a": [1]}).to_padded("a")
