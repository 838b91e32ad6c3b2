"""Blocks: ``pyarrow.Table`` values, and their conversion to and from the
batch formats user functions see (dict of NumPy arrays, pandas, Arrow).

NumPy arrays with more than one dimension are stored as Arrow fixed-shape
tensor columns, so images and embeddings keep their shape.  Reading a
column back is zero-copy where Arrow allows it (one chunk, no nulls,
numeric type).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

__all__ = [
    "BATCH_FORMATS", "check_batch_format", "to_table", "rows_to_table", "to_batch",
    "column_to_numpy", "iter_rows", "concat", "describe_batch", "describe_row",
    "empty_table", "schema_str", "PythonObjectType",
]

BATCH_FORMATS = ("default", "numpy", "pandas", "pyarrow")


class PythonObjectType(pa.ExtensionType):
    """A column of Python objects Arrow has no type for (pickled cells), so
    rows can hold anything, as in Ray."""

    def __init__(self) -> None:
        super().__init__(pa.large_binary(), "flowcore.data.python_object")

    def __arrow_ext_serialize__(self) -> bytes:
        return b""

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type: Any, serialized: bytes) -> "PythonObjectType":
        return cls()

    def __reduce__(self) -> Any:
        return PythonObjectType, ()


try:
    pa.register_extension_type(PythonObjectType())
except pa.ArrowKeyError:  # registered already (module reloaded)
    pass


def _objects_to_arrow(values: list) -> pa.Array:
    import cloudpickle
    storage = pa.array([None if v is None else cloudpickle.dumps(v) for v in values],
                       pa.large_binary())
    return pa.ExtensionArray.from_storage(PythonObjectType(), storage)


def _is_objects(t: pa.DataType) -> bool:
    return isinstance(t, PythonObjectType)


def _objects_to_numpy(col: pa.Array) -> np.ndarray:
    import pickle
    raw = col.storage.to_pylist()
    out = np.empty(len(raw), dtype=object)
    for i, b in enumerate(raw):
        out[i] = None if b is None else pickle.loads(b)
    return out


def check_batch_format(fmt: Any, op: str) -> None:
    if fmt is not None and fmt not in BATCH_FORMATS:
        raise ValueError(f"{op}: batch_format={fmt!r} is not supported; expected one of "
                         f"'default', 'numpy', 'pandas', 'pyarrow' or None")


def require_pandas() -> Any:
    """pandas, or an ImportError naming the extra that installs it."""
    try:
        import pandas
    except ImportError:
        raise ImportError("this flowcore.data call needs pandas: pip install "
                          "'flowcore[data]'") from None
    return pandas


def empty_table() -> pa.Table:
    return pa.table({})


def _numpy_to_arrow(arr: np.ndarray) -> pa.Array:
    if arr.ndim > 1:
        if arr.dtype == object:
            return pa.array(list(arr))
        arr = np.ascontiguousarray(arr)
        canonical = tuple(int(np.prod(arr.shape[i + 1:])) * arr.itemsize
                          for i in range(arr.ndim))
        if arr.strides != canonical:  # e.g. a size-1 axis with an odd stride
            arr = arr.copy(order="C")
            if arr.strides != canonical:
                arr = np.lib.stride_tricks.as_strided(arr, strides=canonical)
        return pa.FixedShapeTensorArray.from_numpy_ndarray(arr)
    if arr.dtype == object:
        vals = list(arr)
        if vals and all(isinstance(v, np.ndarray) for v in vals):
            shapes = {v.shape for v in vals}
            if len(shapes) == 1 and vals[0].ndim >= 1:
                return _numpy_to_arrow(np.stack(vals))
            return pa.array([v.tolist() for v in vals])
        return _array_or_objects(vals)
    return pa.array(arr)


def _column_to_arrow(values: Any) -> pa.Array | pa.ChunkedArray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    if isinstance(values, np.ndarray):
        return _numpy_to_arrow(values)
    try:
        import pandas as pd
        if isinstance(values, pd.Series):
            return _numpy_to_arrow(values.to_numpy())
    except ImportError:  # pragma: no cover - pandas is optional
        pass
    values = list(values)
    if values and all(isinstance(v, np.ndarray) for v in values):
        if len({v.shape for v in values}) > 1:
            return _array_or_objects([v.tolist() for v in values])
        return _numpy_to_arrow(np.stack(values))
    return _array_or_objects(values)


def _array_or_objects(values: list) -> pa.Array:
    """An Arrow array of ``values``; pickled objects when Arrow has no type."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError,
            ValueError, OverflowError):
        return _objects_to_arrow(values)


def to_table(data: Any, op: str) -> pa.Table:
    """A user function's batch output as a Table; TypeError naming ``op``
    when it is not a dict of columns, a pandas DataFrame or an Arrow Table."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, dict):
        if not data:
            return empty_table()
        try:
            cols = {str(k): _column_to_arrow(v) for k, v in data.items()}
            return pa.table(cols)
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, TypeError) as e:
            lengths = {k: (len(v) if hasattr(v, "__len__") else "scalar") for k, v in data.items()}
            raise TypeError(f"{op}: the returned dict cannot become a table ({e}); expected "
                            f"equal-length array columns, got lengths {lengths}") from None
    try:
        import pandas as pd
        if isinstance(data, pd.DataFrame):
            return pa.Table.from_pandas(data, preserve_index=False)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"{op}: the function returned {type(data).__name__}; expected a dict of "
                    f"column name -> array (numpy), a pandas.DataFrame or a pyarrow.Table")


def rows_to_table(rows: list, op: str) -> pa.Table:
    """Rows (dicts) as a Table; TypeError naming ``op`` for a non-dict row."""
    if not rows:
        return empty_table()
    names: list[str] = []
    seen: set = set()
    for r in rows:
        if not isinstance(r, dict):
            raise TypeError(f"{op}: the function returned a row of type {type(r).__name__}; "
                            f"expected a dict of column name -> value")
        for k in r:
            if k not in seen:
                seen.add(k)
                names.append(k)
    cols = {}
    for k in names:
        vals = [r.get(k) for r in rows]
        try:
            cols[str(k)] = _column_to_arrow(vals)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
            raise TypeError(f"{op}: column {k!r} has values Arrow cannot store together "
                            f"({e})") from None
    return pa.table(cols)


def column_to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if isinstance(col.type, pa.FixedShapeTensorType):
        return col.to_numpy_ndarray()
    if _is_objects(col.type):
        return _objects_to_numpy(col)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) \
            or pa.types.is_fixed_size_list(col.type):
        out = np.empty(len(col), dtype=object)
        for i, v in enumerate(col.to_pylist()):
            out[i] = None if v is None else np.asarray(v)
        return out
    return col.to_numpy(zero_copy_only=False)


def to_batch(table: pa.Table, batch_format: Any) -> Any:
    """``table`` in ``batch_format`` (None: the Table itself)."""
    if batch_format is None or batch_format == "pyarrow":
        return table
    if batch_format in ("default", "numpy"):
        return {name: column_to_numpy(table.column(name)) for name in table.column_names}
    if batch_format == "pandas":
        pd = require_pandas()
        if any(isinstance(f.type, pa.FixedShapeTensorType) or _is_objects(f.type)
               for f in table.schema):
            return pd.DataFrame({n: list(column_to_numpy(table.column(n)))
                                 if isinstance(table.schema.field(n).type,
                                               pa.FixedShapeTensorType)
                                 or _is_objects(table.schema.field(n).type)
                                 else table.column(n).to_pandas()
                                 for n in table.column_names})
        return table.to_pandas()
    raise ValueError(f"unknown batch_format {batch_format!r}")


def iter_rows(table: pa.Table) -> Iterator[dict]:
    """The rows of ``table`` as dicts (tensor cells as NumPy arrays)."""
    names = table.column_names
    cols: list[Any] = []
    for name in names:
        col = table.column(name)
        if isinstance(col.type, pa.FixedShapeTensorType) or _is_objects(col.type):
            cols.append(column_to_numpy(col))
        else:
            cols.append(col.to_pylist())
    for values in zip(*cols):
        yield dict(zip(names, values))


def concat(tables: Iterable[pa.Table]) -> pa.Table:
    tables = [t for t in tables if t is not None]
    nonempty = [t for t in tables if t.num_columns]
    if not nonempty:
        return tables[0] if tables else empty_table()
    if len(nonempty) == 1:
        return nonempty[0]
    first = nonempty[0].schema
    if all(t.schema.equals(first) for t in nonempty[1:]):
        return pa.concat_tables(nonempty)
    return pa.concat_tables(nonempty, promote_options="permissive")


def schema_str(schema: pa.Schema | None) -> str:
    if schema is None:
        return "Unknown schema"
    return "{" + ", ".join(f"{f.name}: {f.type}" for f in schema) + "}"


def _short(v: Any, n: int = 200) -> str:
    s = repr(v)
    return s if len(s) <= n else s[:n] + "..."


def describe_row(row: Any) -> str:
    return f"row {_short(row)}"


def describe_batch(table: pa.Table) -> str:
    if table.num_rows == 0:
        return "an empty batch"
    first = next(iter_rows(table.slice(0, 1)), {})
    return f"a batch of {table.num_rows} rows, first row {_short(first)}"
