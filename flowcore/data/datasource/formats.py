"""Per-format readers and writers."""
from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from ..block import column_to_numpy, iter_rows, to_table

__all__ = ["parquet_reader", "csv_reader", "json_reader", "numpy_reader", "text_reader",
           "binary_reader", "images_reader", "parquet_writer", "csv_writer", "json_writer",
           "numpy_writer"]


def parquet_reader(columns: list[str] | None, filter: Any, kwargs: dict) -> Callable:
    def read(fs: pafs.FileSystem, path: str) -> pa.Table:
        import pyarrow.parquet as pq
        return pq.read_table(path, filesystem=fs, columns=columns, filters=filter, **kwargs)
    return read


def parquet_row_groups_reader(columns: list[str] | None, filter: Any,
                              groups: list[int]) -> Callable:
    """Read some row groups of one parquet file (big files are split)."""
    def read(fs: pafs.FileSystem, path: str) -> pa.Table:
        import pyarrow.parquet as pq
        with fs.open_input_file(path) as f:
            t = pq.ParquetFile(f).read_row_groups(groups, columns=None if filter is not None
                                                  else columns)
        if filter is not None:
            t = t.filter(filter)
            if columns is not None:
                t = t.select(columns)
        return t
    return read


def parquet_split(fs: pafs.FileSystem, path: str, target: int) -> list[tuple[list[int], int]]:
    """Row groups of ``path`` in runs of about ``target`` bytes each:
    [(row group indices, bytes)]."""
    import pyarrow.parquet as pq
    with fs.open_input_file(path) as f:
        md = pq.ParquetFile(f).metadata
    runs: list[tuple[list[int], int]] = []
    cur: list[int] = []
    size = 0
    for i in range(md.num_row_groups):
        b = md.row_group(i).total_byte_size
        if cur and size + b > target:
            runs.append((cur, size))
            cur, size = [], 0
        cur.append(i)
        size += b
    if cur:
        runs.append((cur, size))
    return runs


def csv_reader(kwargs: dict) -> Callable:
    def read(fs: pafs.FileSystem, path: str) -> pa.Table:
        import pyarrow.csv as pacsv
        with fs.open_input_stream(path) as f:
            return pacsv.read_csv(f, **kwargs)
    return read


def json_reader(kwargs: dict) -> Callable:
    def read(fs: pafs.FileSystem, path: str) -> pa.Table:
        import pyarrow.json as pajson
        with fs.open_input_stream(path) as f:
            return pajson.read_json(f, **kwargs)
    return read


def numpy_reader() -> Callable:
    def read(fs: pafs.FileSystem, path: str) -> pa.Table:
        import io
        with fs.open_input_stream(path) as f:
            arr = np.load(io.BytesIO(f.read()), allow_pickle=False)
        return to_table({"data": arr}, "read_numpy")
    return read


def text_reader(encoding: str, drop_empty_lines: bool) -> Callable:
    def read(fs: pafs.FileSystem, path: str) -> pa.Table:
        with fs.open_input_stream(path) as f:
            lines = f.read().decode(encoding).splitlines()
        if drop_empty_lines:
            lines = [ln for ln in lines if ln.strip()]
        return pa.table({"text": pa.array(lines, pa.string())})
    return read


def binary_reader() -> Callable:
    def read(fs: pafs.FileSystem, path: str) -> pa.Table:
        with fs.open_input_stream(path) as f:
            data = f.read()
        return pa.table({"bytes": pa.array([data], pa.binary())})
    return read


def images_reader(size: tuple[int, int] | None, mode: str | None) -> Callable:
    def read(fs: pafs.FileSystem, path: str) -> pa.Table:
        import io
        try:
            from PIL import Image
        except ImportError:
            raise ImportError("read_images needs Pillow: pip install 'flowcore[data]'"
                              ) from None
        with fs.open_input_stream(path) as f:
            img: Image.Image = Image.open(io.BytesIO(f.read()))
            if mode:
                img = img.convert(mode)
            if size:
                img = img.resize((size[1], size[0]))
            arr = np.asarray(img)
        return to_table({"image": arr[None, ...]}, "read_images")
    return read


def parquet_writer(kwargs: dict) -> Callable:
    def write(t: pa.Table, f: Any) -> None:
        import pyarrow.parquet as pq
        pq.write_table(t, f, **kwargs)
    return write


def csv_writer(kwargs: dict) -> Callable:
    def write(t: pa.Table, f: Any) -> None:
        import pyarrow.csv as pacsv
        pacsv.write_csv(t, f, **kwargs)
    return write


def _json_default(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def json_writer() -> Callable:
    def write(t: pa.Table, f: Any) -> None:
        for row in iter_rows(t):
            f.write((json.dumps(row, default=_json_default) + "\n").encode())
    return write


def numpy_writer(column: str) -> Callable:
    def write(t: pa.Table, f: Any) -> None:
        if column not in t.column_names:
            raise KeyError(f"write_numpy: unknown column {column!r}; the dataset has "
                           f"columns {t.column_names}")
        np.save(f, column_to_numpy(t.column(column)))
    return write
