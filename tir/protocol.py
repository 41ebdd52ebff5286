"""``Batch``: the one data format that crosses process boundaries.

A Batch is a pyarrow Table plus a small ``meta`` dict (step, config hash, ...). Ray moves the
Arrow buffers through its object store without per-row copies; the same table is what a dump
writes to Parquet and what analysis reads back. Column kinds:

- images: ``image`` (one uint8 HxWx3 per row) and ``images`` (a list per row, for multi-turn
  trajectories), stored as ``struct<height, width, pixels: large_binary>`` so decoding is a
  zero-copy ``np.frombuffer`` view;
- ``json``: any JSON-able value, stored as a string column tagged in the schema;
- everything else is plain Arrow: ragged ``list<int64>`` token ids, ``list<double>`` log-probs
  and masks, scalars and strings.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tir.imaging import check_image

IMAGE_TYPE = pa.struct([("height", pa.int32()), ("width", pa.int32()), ("pixels", pa.large_binary())])
IMAGES_TYPE = pa.list_(IMAGE_TYPE)
_KIND_KEY = b"tir.kind"
_META_KEY = b"tir.meta"
KINDS = ("image", "images", "json", "auto")


class BatchError(ValueError):
    pass


# ---------------------------------------------------------------------------------- images
def _images_to_arrow(images: Sequence[np.ndarray | None], where: str) -> pa.StructArray:
    """Pack images into one struct array: a single concatenated pixel buffer, no per-row objects."""
    heights, widths, offsets, valid = [], [], [0], []
    for i, image in enumerate(images):
        if image is None:
            heights.append(0), widths.append(0), offsets.append(offsets[-1]), valid.append(False)
            continue
        check_image(image, f"{where}[{i}]", error=BatchError)
        heights.append(image.shape[0]), widths.append(image.shape[1]), valid.append(True)
        offsets.append(offsets[-1] + image.size)
    data = (
        np.concatenate([np.ascontiguousarray(im).reshape(-1) for im in images if im is not None])
        if offsets[-1]
        else np.zeros(0, np.uint8)
    )
    pixels = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(images), [None, pa.py_buffer(np.asarray(offsets, np.int64)), pa.py_buffer(data)]
    )
    mask = None if all(valid) else pa.array([not v for v in valid])
    return pa.StructArray.from_arrays(
        [pa.array(heights, pa.int32()), pa.array(widths, pa.int32()), pixels], fields=list(IMAGE_TYPE), mask=mask
    )


def _images_from_arrow(array: pa.StructArray) -> list[np.ndarray | None]:
    """Zero-copy views of the pixel buffer, one per row (read-only: copy before editing)."""
    pixels = array.field("pixels")
    if array.offset or pixels.offset:  # a sliced array: let Arrow rebase the buffers once
        array = pa.concat_arrays([array])
        pixels = array.field("pixels")
    heights = array.field("height").to_numpy(zero_copy_only=False)
    widths = array.field("width").to_numpy(zero_copy_only=False)
    offsets = np.frombuffer(pixels.buffers()[1], np.int64, len(array) + 1)
    data = np.frombuffer(pixels.buffers()[2], np.uint8) if pixels.buffers()[2] is not None else np.zeros(0, np.uint8)
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    return [
        data[offsets[i] : offsets[i + 1]].reshape(heights[i], widths[i], 3) if valid[i] else None
        for i in range(len(array))
    ]


def _image_lists_to_arrow(rows: Sequence[Sequence[np.ndarray] | None], where: str) -> pa.ListArray:
    flat = [im for row in rows if row is not None for im in row]
    offsets = np.cumsum([0] + [len(row) if row is not None else 0 for row in rows]).astype(np.int32)
    mask = None if all(r is not None for r in rows) else pa.array([r is None for r in rows])
    return pa.ListArray.from_arrays(pa.array(offsets), _images_to_arrow(flat, where), mask=mask)


def _image_lists_from_arrow(array: pa.ListArray) -> list[list[np.ndarray] | None]:
    array = pa.concat_arrays([array]) if array.offset else array
    flat = _images_from_arrow(array.values)
    offsets = array.offsets.to_numpy()
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    return [flat[offsets[i] : offsets[i + 1]] if valid[i] else None for i in range(len(array))]


# ---------------------------------------------------------------------------------- columns
def _infer_kind(values: Sequence[Any]) -> str:
    # the first informative value: not None, and not an empty list (a turn-less trajectory)
    first = next((v for v in values if v is not None and not (isinstance(v, (list, tuple)) and not v)), None)
    if isinstance(first, np.ndarray) and first.ndim == 3 and first.dtype == np.uint8:
        return "image"
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], np.ndarray) and first[0].ndim == 3:
        return "images"
    if isinstance(first, dict) or (isinstance(first, (list, tuple)) and first and isinstance(first[0], dict)):
        return "json"
    return "auto"


def _to_arrow(name: str, values: Sequence[Any], kind: str) -> tuple[pa.Field, pa.Array]:
    if kind not in KINDS:
        raise BatchError(f"column {name!r}: unknown kind {kind!r}, expected one of {KINDS}")
    if kind == "auto":
        kind = _infer_kind(values)
    if kind == "image":
        return pa.field(name, IMAGE_TYPE, metadata={_KIND_KEY: b"image"}), _images_to_arrow(values, name)
    if kind == "images":
        return pa.field(name, IMAGES_TYPE, metadata={_KIND_KEY: b"images"}), _image_lists_to_arrow(values, name)
    if kind == "json":
        array = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
        return pa.field(name, pa.string(), metadata={_KIND_KEY: b"json"}), array
    if isinstance(values, np.ndarray) and values.ndim == 2:  # a dense matrix: one list per row
        values = list(values)
    try:
        array = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise BatchError(f"column {name!r}: cannot store values of type {type(values[0]).__name__}: {err}") from err
    return pa.field(name, array.type), array


def _kind(field: pa.Field) -> str:
    return (field.metadata or {}).get(_KIND_KEY, b"auto").decode()


class Batch:
    """An Arrow table of rows (samples or trajectories) plus ``meta``; see the module docstring."""

    def __init__(self, table: pa.Table, meta: dict | None = None):
        self.table = table
        self.meta = dict(meta or {})

    # construction -------------------------------------------------------------------------
    @classmethod
    def from_pydict(
        cls, columns: dict[str, Sequence[Any]], meta: dict | None = None, kinds: dict[str, str] | None = None
    ) -> Batch:
        lengths = {name: len(values) for name, values in columns.items()}
        if len(set(lengths.values())) > 1:
            raise BatchError(f"columns have different lengths: {lengths}")
        kinds = kinds or {}
        unknown = set(kinds) - set(columns)
        if unknown:
            raise BatchError(f"kinds given for columns that are not there: {sorted(unknown)}")
        fields, arrays = (
            zip(*(_to_arrow(n, v, kinds.get(n, "auto")) for n, v in columns.items())) if columns else ((), ())
        )
        return cls(pa.Table.from_arrays(list(arrays), schema=pa.schema(list(fields))), meta)

    @classmethod
    def from_rows(
        cls, rows: Sequence[dict[str, Any]], meta: dict | None = None, kinds: dict[str, str] | None = None
    ) -> Batch:
        names = list(rows[0]) if rows else []
        for i, row in enumerate(rows):
            if list(row) != names:
                raise BatchError(f"row {i} has columns {list(row)}, expected {names}")
        return cls.from_pydict({n: [row[n] for row in rows] for n in names}, meta, kinds)

    # reading ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def columns(self) -> list[str]:
        return self.table.column_names

    def kind(self, name: str) -> str:
        return _kind(self.table.schema.field(self._check_column(name)))

    def _check_column(self, name: str) -> str:
        if name not in self.table.column_names:
            from tir.registry import unknown_name

            raise KeyError(unknown_name("column", name, self.columns))
        return name

    def column(self, name: str) -> list[Any]:
        """Decoded values: ndarrays for images, python objects for json, lists otherwise."""
        kind, array = self.kind(name), self._array(name)
        if kind == "image":
            return _images_from_arrow(array)
        if kind == "images":
            return _image_lists_from_arrow(array)
        if kind == "json":
            return [None if s is None else json.loads(s) for s in array.to_pylist()]
        return array.to_pylist()

    __getitem__ = column

    def _array(self, name: str) -> pa.Array:
        column = self.table.column(name)
        # combine_chunks copies even a single chunk: avoid it in the common case
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()

    def numpy(self, name: str) -> np.ndarray:
        """A scalar column as a numpy array (zero copy where Arrow allows)."""
        return self.table.column(self._check_column(name)).to_numpy()

    def rows(self) -> list[dict[str, Any]]:
        decoded = {name: self.column(name) for name in self.columns}
        return [{name: decoded[name][i] for name in self.columns} for i in range(len(self))]

    # reshaping ----------------------------------------------------------------------------
    def select(self, names: Iterable[str]) -> Batch:
        return Batch(self.table.select([self._check_column(n) for n in names]), self.meta)

    def drop(self, names: Iterable[str]) -> Batch:
        return Batch(self.table.drop_columns([self._check_column(n) for n in names]), self.meta)

    def slice(self, start: int, stop: int | None = None) -> Batch:
        stop = len(self) if stop is None else min(stop, len(self))
        return Batch(self.table.slice(start, max(0, stop - start)), self.meta)

    def take(self, indices: Sequence[int] | np.ndarray) -> Batch:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise IndexError(f"take: indices out of range for a batch of {len(self)} rows")
        return Batch(self.table.take(pa.array(indices % max(len(self), 1))), self.meta)

    def chunk(self, n: int) -> list[Batch]:
        """n contiguous pieces in order, sizes differing by at most one (verl requires equal
        sizes; uneven is friendlier for the last batch of an epoch)."""
        if n < 1:
            raise ValueError(f"chunk: n must be >= 1, got {n}")
        bounds = (
            np.linspace(0, len(self), n + 1).round().astype(int)
            if len(self) % n
            else np.arange(n + 1) * (len(self) // n)
        )
        return [self.slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def split(self, size: int) -> list[Batch]:
        """Pieces of ``size`` rows (the last may be shorter), e.g. micro-batches."""
        return [self.slice(i, i + size) for i in range(0, len(self), size)]

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        if not batches:
            raise ValueError("concat: no batches given")
        schemas = {str(b.table.schema) for b in batches}
        if len(schemas) > 1:
            names = [b.columns for b in batches]
            raise BatchError(f"concat: batches have different schemas (columns: {names})")
        return Batch(pa.concat_tables([b.table for b in batches]), batches[0].meta)

    def repeat(self, n: int, interleave: bool = True) -> Batch:
        """Each row n times: [a a b b] with interleave (GRPO groups stay adjacent), else [a b a b]."""
        rows = np.arange(len(self))
        return self.take(np.repeat(rows, n) if interleave else np.tile(rows, n))

    def with_column(self, name: str, values: Sequence[Any] | pa.Array, kind: str = "auto") -> Batch:
        """A new batch with the column added (or replaced)."""
        if len(values) != len(self):
            raise BatchError(f"column {name!r} has {len(values)} values for a batch of {len(self)} rows")
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            field, array = pa.field(name, values.type), values
        else:
            field, array = _to_arrow(name, values, kind)
        table = self.table.drop_columns([name]) if name in self.columns else self.table
        return Batch(table.append_column(field, array), self.meta)

    def with_meta(self, **meta: Any) -> Batch:
        return Batch(self.table, {**self.meta, **meta})

    # torch --------------------------------------------------------------------------------
    def to_padded(self, name: str, pad_value: float = 0, dtype=None, left: bool = False):
        """A ragged list column as (padded tensor [rows, max_len], attention mask), without a
        Python loop over rows. ``left`` pads on the left (as generation prompts want)."""
        import torch

        array = self._array(self._check_column(name))
        if not pa.types.is_list(array.type) and not pa.types.is_large_list(array.type):
            raise BatchError(f"to_padded: column {name!r} is {array.type}, expected a list column")
        array = pa.concat_arrays([array]) if array.offset else array
        lengths = pc.list_value_length(array).fill_null(0).to_numpy().astype(np.int64)
        values = array.flatten().to_numpy(zero_copy_only=False)
        rows, width = len(lengths), int(lengths.max(initial=0))
        row_ids = np.repeat(np.arange(rows), lengths)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        col_ids = np.arange(len(values)) - starts + (np.repeat(width - lengths, lengths) if left else 0)
        padded = np.full((rows, width), pad_value, dtype=values.dtype if values.size else np.float64)
        padded[row_ids, col_ids] = values
        mask = np.zeros((rows, width), dtype=np.int64)
        mask[row_ids, col_ids] = 1
        tensor = torch.from_numpy(padded)
        return (tensor.to(dtype) if dtype is not None else tensor), torch.from_numpy(mask)

    def with_padded(self, name: str, tensor, mask) -> Batch:
        """The inverse of ``to_padded``: keep the entries where mask is 1, one list per row."""
        values = tensor.detach().cpu().numpy()
        keep = mask.detach().cpu().numpy().astype(bool)
        offsets = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)
        return self.with_column(name, pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[keep])))

    # files --------------------------------------------------------------------------------
    def to_parquet(self, path: str | os.PathLike, compression: str = "zstd") -> str:
        """Write atomically (temp file + rename): a crash never leaves a half-written file."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        schema_meta = {**(self.table.schema.metadata or {}), _META_KEY: json.dumps(self.meta).encode()}
        table = self.table.replace_schema_metadata(schema_meta)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        os.close(fd)
        try:
            pq.write_table(table, tmp, compression=compression)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        return path

    @classmethod
    def from_parquet(cls, path: str | os.PathLike, columns: Sequence[str] | None = None) -> Batch:
        table = pq.read_table(path, columns=columns)
        schema_meta = dict(table.schema.metadata or {})
        meta = json.loads(schema_meta.pop(_META_KEY, b"{}"))
        return cls(table.replace_schema_metadata(schema_meta or None), meta)

    # pickling (Ray's object store) -----------------------------------------------------------
    def __reduce__(self):
        # Arrow pickles buffers out of band (zero-copy in Ray's object store) but pickles a
        # slice with its whole parent buffers: a chunk for one rank would carry every rank's
        # images. Compact slices first so each piece ships only its own rows.
        table = self.table
        if table.get_total_buffer_size() > 2 * table.nbytes + (1 << 16):
            table = pa.Table.from_arrays([pa.concat_arrays(c.chunks) for c in table.columns], schema=table.schema)
        return Batch, (table, self.meta)

    def equals(self, other: Batch) -> bool:
        return self.meta == other.meta and self.table.equals(other.table)

    def __repr__(self) -> str:
        cols = ", ".join(f"{f.name}: {_kind(f) if _kind(f) != 'auto' else f.type}" for f in self.table.schema)
        return f"Batch({len(self)} rows; {cols}; meta={self.meta})"
