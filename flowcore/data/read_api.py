"""Creating datasets: ``range``, ``range_tensor``, ``from_*`` (in-memory
data, put into the store as blocks at once) and ``read_*`` (lazy: one read
task per file, run when the dataset executes)."""
from __future__ import annotations

import builtins
import math
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

import flowcore

from .block import require_pandas, rows_to_table, to_table
from .context import DataContext
from .dataset import Dataset, MaterializedDataset, _check_remote_args
from .datasource import Partitioning, file_read_tasks, formats, partition_values, resolve_paths
from .executor import block_meta
from .plan import InputSource, LogicalPlan, ReadSource, ReadTask, even_ranges

__all__ = [
    "range", "range_tensor", "from_items", "from_numpy", "from_pandas", "from_arrow",
    "from_arrow_refs", "from_pandas_refs", "from_numpy_refs", "from_blocks", "from_torch",
    "read_parquet", "read_csv",
    "read_json", "read_numpy", "read_text", "read_binary_files", "read_images",
]


def _check_blocks(n: Any, op: str) -> None:
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"{op}: override_num_blocks={n!r}; expected an int >= 1")


def _num_blocks(nbytes: int, rows: int, override: int | None) -> int:
    if override:
        return max(1, builtins.min(override, rows) if rows else 1)
    ctx = DataContext.get_current()
    by_size = math.ceil(nbytes / (1 << 20))
    n = builtins.max(builtins.min(ctx.read_op_min_num_blocks, by_size),
                     math.ceil(nbytes / ctx.target_max_block_size))
    return builtins.max(1, builtins.min(n, rows or 1))


class _RangeRead:
    def __init__(self, start: int, count: int, shape: tuple | None) -> None:
        self.start, self.count, self.shape = start, count, shape

    def __call__(self) -> Iterator[pa.Table]:
        ids = np.arange(self.start, self.start + self.count, dtype=np.int64)
        if self.shape is None:
            yield pa.table({"id": ids})
        else:
            data = np.ones((self.count,) + self.shape, dtype=np.int64) * \
                ids.reshape((-1,) + (1,) * len(self.shape))
            yield to_table({"data": data}, "range_tensor")


def _range(n: int, shape: tuple | None, override: int | None, op: str,
           concurrency: int | None = None) -> Dataset:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"{op}: n={n!r}; expected an int >= 0")
    _check_blocks(override, op)
    per_row = 8 * (int(np.prod(shape)) if shape else 1)
    k = _num_blocks(n * per_row, n, override)
    tasks = [ReadTask(_RangeRead(off, ln, shape), ln, ln * per_row)
             for off, ln in even_ranges(n, k) if ln or n == 0][:builtins.max(k, 1)]
    if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
        raise ValueError(f"{op}: concurrency={concurrency!r}; expected an int >= 1")
    return Dataset(LogicalPlan(ReadSource(tasks, "ReadRange" if shape is None
                                          else "ReadRangeTensor", concurrency=concurrency)))


def range(n: int, *, parallelism: int = -1, concurrency: int | None = None,  # noqa: A001
          override_num_blocks: int | None = None) -> Dataset:
    """Rows ``{"id": 0}`` ... ``{"id": n - 1}`` (int64); ``concurrency``:
    read tasks in flight; ``parallelism``: Ray's old ``override_num_blocks``."""
    return _range(n, None, _blocks_arg(parallelism, override_num_blocks), "range",
                  concurrency)


def range_tensor(n: int, *, shape: tuple = (1,), parallelism: int = -1,
                 concurrency: int | None = None, override_num_blocks: int | None = None
                 ) -> Dataset:
    """Rows ``{"data": array of shape filled with i}`` for i in range(n)."""
    if not isinstance(shape, tuple) or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"range_tensor: shape={shape!r}; expected a tuple of ints > 0")
    return _range(n, shape, _blocks_arg(parallelism, override_num_blocks), "range_tensor",
                  concurrency)


def _blocks_arg(parallelism: Any, override: int | None) -> int | None:
    if override is None and isinstance(parallelism, int) and parallelism > 0:
        return parallelism
    return override


def _from_tables(tables: list[pa.Table], name: str, override: int | None = None
                 ) -> MaterializedDataset:
    if override and len(tables) == 1 and tables[0].num_rows:
        t = tables[0]
        tables = [t.slice(o, ln) for o, ln in even_ranges(t.num_rows,
                                                          builtins.min(override, t.num_rows))]
    if not flowcore.is_initialized():
        flowcore.init()
    bundles = [(flowcore.put(t), block_meta(t)) for t in tables]
    return MaterializedDataset(LogicalPlan(InputSource(bundles, name)))


def from_items(items: list, *, parallelism: int = -1, override_num_blocks: int | None = None
               ) -> MaterializedDataset:
    """A dataset of ``items``: dicts become rows; any other value becomes
    ``{"item": value}`` (``parallelism``: Ray's old name of
    ``override_num_blocks``)."""
    if override_num_blocks is None and isinstance(parallelism, int) and parallelism > 0:
        override_num_blocks = parallelism
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"from_items: expected a list, got {type(items).__name__}")
    _check_blocks(override_num_blocks, "from_items")
    items = list(items)
    if items and all(isinstance(i, dict) for i in items):
        t = rows_to_table(items, "from_items")
    else:
        t = rows_to_table([{"item": i} for i in items], "from_items") if items else pa.table({})
    n = override_num_blocks or builtins.max(1, math.ceil(t.nbytes / DataContext.get_current()
                                                         .target_max_block_size))
    return _from_tables([t], "FromItems", n if t.num_rows else None)


def from_pandas(dfs: Any, override_num_blocks: int | None = None) -> MaterializedDataset:
    """One block per DataFrame (or ``override_num_blocks``)."""
    pd = require_pandas()
    dfs = [dfs] if isinstance(dfs, pd.DataFrame) else list(dfs)
    for d in dfs:
        if not isinstance(d, pd.DataFrame):
            raise TypeError(f"from_pandas: expected pandas.DataFrame(s), got {type(d).__name__}")
    tables = [pa.Table.from_pandas(d, preserve_index=False) for d in dfs]
    return _from_tables(tables, "FromPandas", override_num_blocks)


def from_numpy(ndarrays: Any) -> MaterializedDataset:
    """Column ``data``: one row per first-axis element of each array."""
    arrs = [ndarrays] if isinstance(ndarrays, np.ndarray) else list(ndarrays)
    for a in arrs:
        if not isinstance(a, np.ndarray):
            raise TypeError(f"from_numpy: expected numpy.ndarray(s), got {type(a).__name__}")
    return _from_tables([to_table({"data": a}, "from_numpy") for a in arrs], "FromNumpy")


def from_arrow(tables: Any, *, override_num_blocks: int | None = None) -> MaterializedDataset:
    tables = [tables] if isinstance(tables, pa.Table) else list(tables)
    for t in tables:
        if not isinstance(t, pa.Table):
            raise TypeError(f"from_arrow: expected pyarrow.Table(s), got {type(t).__name__}")
    return _from_tables(tables, "FromArrow", override_num_blocks)


def from_blocks(blocks: list) -> MaterializedDataset:
    """One block per ``pyarrow.Table`` or pandas DataFrame in ``blocks``."""
    if not isinstance(blocks, (list, tuple)):
        raise TypeError(f"from_blocks: expected a list of pyarrow.Table/pandas.DataFrame, "
                        f"got {type(blocks).__name__}")
    tables = []
    for b in blocks:
        if isinstance(b, pa.Table):
            tables.append(b)
        elif type(b).__name__ == "DataFrame" and hasattr(b, "to_numpy"):
            tables.append(pa.Table.from_pandas(b, preserve_index=False))
        else:
            raise TypeError(f"from_blocks: a block is {type(b).__name__}; expected "
                            f"pyarrow.Table or pandas.DataFrame")
    return _from_tables(tables or [pa.table({})], "FromBlocks")


def from_torch(dataset: Any, local_read: bool = False) -> MaterializedDataset:
    """The items of a map-style ``torch.utils.data.Dataset`` (``len`` and
    ``[i]``), read in this process, in column ``item``."""
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"from_torch: expected a map-style torch Dataset (with __len__ and "
                        f"__getitem__), got {type(dataset).__name__}")
    return from_items([{"item": dataset[i]} for i in builtins.range(len(dataset))])


def _from_refs(refs: Any, name: str, convert: Any) -> MaterializedDataset:
    refs = [refs] if isinstance(refs, flowcore.ObjectRef) else list(refs)
    tables = [convert(t) for t in flowcore.get(refs)]
    return _from_tables(tables, name)


def from_arrow_refs(tables: Any) -> MaterializedDataset:
    """From refs of ``pyarrow.Table``s already in the store."""
    return _from_refs(tables, "FromArrow", lambda t: t)


def from_pandas_refs(dfs: Any) -> MaterializedDataset:
    """From refs of pandas DataFrames."""
    return _from_refs(dfs, "FromPandas", lambda d: pa.Table.from_pandas(d, preserve_index=False))


def from_numpy_refs(ndarrays: Any) -> MaterializedDataset:
    """From refs of NumPy arrays (column ``data``)."""
    return _from_refs(ndarrays, "FromNumpy", lambda a: to_table({"data": a}, "from_numpy"))


# -- files ---------------------------------------------------------------------------
#: Ray's arguments of every read_* function, taken out of ``**kwargs``
#: before the rest goes to the format's reader
_TASK_ARGS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type", "runtime_env",
              "max_calls", "label_selector", "fallback_strategy")
_READ_ARGS = ("parallelism", "concurrency", "ray_remote_args", "ignore_missing_paths",
              "file_extensions", "shuffle", "partition_filter", "partitioning",
              "arrow_open_stream_args", "override_num_blocks") + _TASK_ARGS


class _ReadOptions:
    """Ray's common read arguments: which files (``ignore_missing_paths``,
    ``file_extensions``, ``partition_filter``, ``shuffle="files"``) and how
    the read tasks run (``num_cpus=``..., ``ray_remote_args``,
    ``concurrency``)."""

    def __init__(self, op: str, kwargs: dict, partitioning: Any = None) -> None:
        got = {k: kwargs.pop(k) for k in _READ_ARGS if k in kwargs}
        self.op = op
        self.partitioning = got.get("partitioning", partitioning)
        if self.partitioning is not None and not isinstance(self.partitioning, Partitioning):
            raise TypeError(f"{op}: partitioning={self.partitioning!r}; expected a "
                            f"flowcore.data.datasource.Partitioning (such as "
                            f"Partitioning('hive')) or None")
        self.override = got.get("override_num_blocks")
        par = got.get("parallelism", -1)
        if self.override is None and isinstance(par, int) and par > 0:
            self.override = par  # Ray's deprecated spelling
        _check_blocks(self.override, op)
        self.ignore_missing = bool(got.get("ignore_missing_paths", False))
        exts = got.get("file_extensions")
        if exts is not None and (isinstance(exts, str) or not all(isinstance(e, str)
                                                                  for e in exts)):
            raise TypeError(f"{op}: file_extensions={exts!r}; expected a list of extensions "
                            f"such as ['csv']")
        self.extensions = None if exts is None else ["." + e.lower().lstrip(".") for e in exts]
        self.partition_filter = got.get("partition_filter")
        if self.partition_filter is not None and not callable(self.partition_filter):
            raise TypeError(f"{op}: partition_filter= must be callable (paths -> paths kept)")
        self.shuffle = got.get("shuffle")
        if self.shuffle is not None and self.shuffle != "files" and not hasattr(self.shuffle,
                                                                                "seed"):
            raise ValueError(f"{op}: shuffle={self.shuffle!r}; expected None or 'files'")
        if got.get("arrow_open_stream_args") is not None:
            raise NotImplementedError(f"{op}: arrow_open_stream_args= is not supported; read "
                                      f"the files without it")
        remote = dict(got.get("ray_remote_args") or {})
        remote.update({k: got[k] for k in _TASK_ARGS if got.get(k) is not None})
        remote.pop("memory", None)
        if remote:
            _check_remote_args(remote, False, op)
        self.remote_args = remote
        conc = got.get("concurrency")
        if conc is not None and (not isinstance(conc, int) or isinstance(conc, bool)
                                 or conc < 1):
            raise ValueError(f"{op}: concurrency={conc!r}; expected an int >= 1")
        self.concurrency = conc

    def files(self, paths: Any, filesystem: Any, default_exts: Sequence[str] | None = None
              ) -> list:
        files = resolve_paths(paths, filesystem, self.op, self.extensions or default_exts,
                              self.ignore_missing)
        if self.partition_filter is not None:
            keep = set(self.partition_filter([p for _, p, _ in files]))
            files = [f for f in files if f[1] in keep]
        if self.shuffle is not None:
            rng = np.random.default_rng(getattr(self.shuffle, "seed", None))
            files = [files[i] for i in rng.permutation(len(files))]
        return files

    def source(self, tasks: list[ReadTask], name: str) -> ReadSource:
        return ReadSource(tasks, name, self.remote_args, self.concurrency)


def _read(paths: Any, filesystem: Any, op: str, reader: Any, name: str, include_paths: bool,
          opts: _ReadOptions, extensions: Sequence[str] | None = None,
          size_factor: float = 1.0) -> Dataset:
    files = opts.files(paths, filesystem, extensions)
    tasks = file_read_tasks(files, reader, include_paths, size_factor, opts.partitioning)
    return Dataset(LogicalPlan(opts.source(tasks, name)))


def _no_more(op: str, kwargs: dict) -> None:
    if kwargs:
        raise TypeError(f"{op}: unexpected arguments {sorted(kwargs)}")


def read_parquet(paths: Any, *, filesystem: Any = None, columns: list[str] | None = None,
                 filter: Any = None, include_paths: bool = False,  # noqa: A002
                 override_num_blocks: int | None = None, **arrow_parquet_args: Any) -> Dataset:
    """Parquet files (or directories of them); ``columns`` and ``filter`` (a
    ``pyarrow.dataset`` expression) are pushed down into the reader.  Ray's
    common read arguments (``file_extensions``, ``ignore_missing_paths``,
    ``shuffle``, ``partition_filter``, ``num_cpus``, ``concurrency``,
    ``ray_remote_args``...) apply; the rest go to the parquet reader."""
    opts = _ReadOptions("read_parquet", dict(arrow_parquet_args,
                                             override_num_blocks=override_num_blocks),
                        partitioning=Partitioning("hive"))
    for k in _READ_ARGS:
        arrow_parquet_args.pop(k, None)
    files = opts.files(paths, filesystem)
    # partition columns come from the paths: the file reader is asked only
    # for the others, and with columns= only the named partition keys are kept
    pkeys = {k for parts in partition_values(files, opts.partitioning) for k in parts}
    keep = None if columns is None else (lambda k: k in columns)
    file_columns = columns if columns is None or not pkeys else [c for c in columns
                                                                 if c not in pkeys]
    target = DataContext.get_current().target_max_block_size
    total = sum(size for _, _, size in files)
    if opts.override and opts.override > len(files):
        target = builtins.max(1, total // opts.override)
    whole = formats.parquet_reader(file_columns, filter, arrow_parquet_args)
    tasks: list[ReadTask] = []
    part = opts.partitioning
    for fs, path, size in files:
        runs = formats.parquet_split(fs, path, target) \
            if size > target and not arrow_parquet_args else []
        if len(runs) <= 1:
            tasks.extend(file_read_tasks([(fs, path, size)], whole, include_paths, 4.0, part,
                                         keep))
            continue
        for groups, nbytes in runs:  # a big file: one task per run of row groups
            reader = formats.parquet_row_groups_reader(file_columns, filter, groups)
            tasks.extend(file_read_tasks([(fs, path, nbytes)], reader, include_paths, 1.0,
                                         part, keep))
    return Dataset(LogicalPlan(opts.source(tasks, "ReadParquet")))


def read_csv(paths: Any, *, filesystem: Any = None, include_paths: bool = False,
             override_num_blocks: int | None = None, **arrow_csv_args: Any) -> Dataset:
    """CSV files; ``arrow_csv_args`` go to ``pyarrow.csv.read_csv``
    (``read_options``, ``parse_options``, ``convert_options``)."""
    opts = _ReadOptions("read_csv", arrow_csv_args, partitioning=Partitioning("hive"))
    _check_blocks(override_num_blocks, "read_csv")
    return _read(paths, filesystem, "read_csv", formats.csv_reader(arrow_csv_args), "ReadCSV",
                 include_paths, opts)


def read_json(paths: Any, *, filesystem: Any = None, include_paths: bool = False,
              override_num_blocks: int | None = None, lines: bool = True,
              **arrow_json_args: Any) -> Dataset:
    """Newline-delimited JSON files (one object per line)."""
    opts = _ReadOptions("read_json", arrow_json_args, partitioning=Partitioning("hive"))
    _check_blocks(override_num_blocks, "read_json")
    if not lines:
        raise NotImplementedError("read_json(lines=False): only newline-delimited JSON (one "
                                  "object per line) is read; convert the file first")
    return _read(paths, filesystem, "read_json", formats.json_reader(arrow_json_args),
                 "ReadJSON", include_paths, opts)


def read_numpy(paths: Any, *, filesystem: Any = None, include_paths: bool = False,
               override_num_blocks: int | None = None, **read_args: Any) -> Dataset:
    """``.npy`` files; column ``data``."""
    opts = _ReadOptions("read_numpy", read_args)
    _no_more("read_numpy", read_args)
    return _read(paths, filesystem, "read_numpy", formats.numpy_reader(), "ReadNumpy",
                 include_paths, opts, extensions=[".npy"])


def read_text(paths: Any, *, encoding: str = "utf-8", drop_empty_lines: bool = True,
              filesystem: Any = None, include_paths: bool = False,
              override_num_blocks: int | None = None, **read_args: Any) -> Dataset:
    """One row per line; column ``text``."""
    opts = _ReadOptions("read_text", read_args)
    _no_more("read_text", read_args)
    return _read(paths, filesystem, "read_text", formats.text_reader(encoding, drop_empty_lines),
                 "ReadText", include_paths, opts)


def read_binary_files(paths: Any, *, filesystem: Any = None, include_paths: bool = False,
                      override_num_blocks: int | None = None, **read_args: Any) -> Dataset:
    """One row per file; column ``bytes``."""
    opts = _ReadOptions("read_binary_files", read_args)
    _no_more("read_binary_files", read_args)
    return _read(paths, filesystem, "read_binary_files", formats.binary_reader(),
                 "ReadBinary", include_paths, opts)


def read_images(paths: Any, *, filesystem: Any = None, size: tuple[int, int] | None = None,
                mode: str | None = None, include_paths: bool = False,
                override_num_blocks: int | None = None, **read_args: Any) -> Dataset:
    """One row per image file; column ``image`` (needs Pillow)."""
    opts = _ReadOptions("read_images", read_args)
    _no_more("read_images", read_args)
    return _read(paths, filesystem, "read_images", formats.images_reader(size, mode),
                 "ReadImage", include_paths, opts,
                 extensions=[".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"])
