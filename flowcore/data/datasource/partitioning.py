"""Path-based partitions: the columns a file's directories name.

``Partitioning("hive")`` reads ``.../year=2024/month=05/part.parquet`` as
the columns ``year`` and ``month``; ``Partitioning("dir", field_names=[...])``
reads ``.../2024/05/part.parquet`` the same way, naming the directories by
position.  Values are strings unless ``field_types`` names a type (``int``,
``float``, ``bool``, ``str``).  ``PathPartitionFilter`` keeps or drops
files by those values before anything is read; ``hive_dir`` builds the
directory of one partition for ``write_parquet(partition_cols=...)``.
"""
from __future__ import annotations

import enum
import os
import posixpath
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["PartitionStyle", "Partitioning", "PathPartitionParser", "PathPartitionFilter",
           "add_partition_columns", "hive_dir"]

_TYPES: dict[Any, pa.DataType] = {int: pa.int64(), float: pa.float64(), bool: pa.bool_(),
                                  str: pa.string()}


class PartitionStyle(str, enum.Enum):
    """How the directories of a path name their partition values."""
    HIVE = "hive"        # key=value directories
    DIRECTORY = "dir"    # value directories, keys from field_names


@dataclass
class Partitioning:
    """How file paths under ``base_dir`` encode partition values.

    ``style``: ``"hive"`` or ``"dir"``; ``base_dir``: only paths under it
    are parsed (the part after it); ``field_names``: the keys in directory
    order (needed by ``"dir"``; checked against the path with ``"hive"``);
    ``field_types``: key -> ``int``/``float``/``bool``/``str`` (default
    ``str``); ``filesystem``: the ``pyarrow.fs`` filesystem of
    ``base_dir``."""
    style: PartitionStyle | str
    base_dir: str | None = None
    field_names: list[str] | None = None
    field_types: dict[str, type] | None = field(default=None)
    filesystem: Any = None

    def __post_init__(self) -> None:
        try:
            self.style = PartitionStyle(getattr(self.style, "value", self.style))
        except ValueError:
            raise ValueError(f"Partitioning: style={self.style!r}; expected 'hive' or "
                             f"'dir'") from None
        if self.base_dir is None:
            self.base_dir = ""
        if self.field_types is None:
            self.field_types = {}
        for k, t in self.field_types.items():
            if t not in _TYPES:
                raise TypeError(f"Partitioning: field_types[{k!r}]={t!r}; expected one of "
                                f"int, float, bool, str")
        if self.style == PartitionStyle.DIRECTORY and not self.field_names:
            raise ValueError("Partitioning('dir') needs field_names=[...]: the key of each "
                             "directory level, in order")

    @property
    def normalized_base_dir(self) -> str:
        """``base_dir`` as the filesystem spells it, ending in ``/`` (or
        empty: every path is parsed from its start)."""
        b = self.base_dir or ""
        if not b:
            return ""
        if "://" in b:
            import pyarrow.fs as pafs
            _, b = pafs.FileSystem.from_uri(b)
        elif self.filesystem is None or _is_local(self.filesystem):
            b = os.path.abspath(os.path.expanduser(b))
        return b if b.endswith("/") else b + "/"

    def to_pyarrow(self) -> Any:
        """The equivalent ``pyarrow.dataset`` partitioning."""
        import pyarrow.dataset as pds
        names = self.field_names or []
        schema = pa.schema([(n, _TYPES[(self.field_types or {}).get(n, str)]) for n in names])
        if self.style == PartitionStyle.HIVE:
            return pds.HivePartitioning(schema)
        return pds.DirectoryPartitioning(schema)


def _is_local(fs: Any) -> bool:
    import pyarrow.fs as pafs
    return isinstance(fs, pafs.LocalFileSystem)


def _cast(value: str, typ: Any) -> Any:
    if typ is int:
        return int(value)
    if typ is float:
        return float(value)
    if typ is bool:
        return value.lower() == "true"
    return value


class PathPartitionParser:
    """Reads the partition values of one file path: ``parser(path)`` gives
    ``{key: value}`` (empty for a path outside ``base_dir`` or without
    partition directories)."""

    def __init__(self, partitioning: Partitioning) -> None:
        if not isinstance(partitioning, Partitioning):
            raise TypeError(f"PathPartitionParser: expected a Partitioning, got "
                            f"{type(partitioning).__name__}")
        self._scheme = partitioning
        self._base = partitioning.normalized_base_dir

    @staticmethod
    def of(style: PartitionStyle | str = PartitionStyle.HIVE, base_dir: str | None = None,
           field_names: list[str] | None = None, field_types: dict[str, type] | None = None,
           filesystem: Any = None) -> "PathPartitionParser":
        return PathPartitionParser(Partitioning(style, base_dir, field_names, field_types,
                                                filesystem))

    @property
    def scheme(self) -> Partitioning:
        return self._scheme

    def __call__(self, path: str) -> dict[str, Any]:
        if self._base and not path.startswith(self._base):
            return {}
        dirs = [d for d in posixpath.dirname(path[len(self._base):]).split("/") if d]
        names = self._scheme.field_names
        if self._scheme.style == PartitionStyle.HIVE:
            pairs = [d.split("=", 1) for d in dirs if d.count("=") == 1]
            parts = {k: urllib.parse.unquote(v) for k, v in pairs}
            if names and parts and list(parts) != list(names):
                raise ValueError(f"partitioning: path {path!r} has partition keys "
                                 f"{list(parts)}; field_names={names} expects them in that "
                                 f"order")
        else:
            if not dirs:
                return {}
            assert names is not None
            if len(dirs) != len(names):
                raise ValueError(f"partitioning: path {path!r} has {len(dirs)} directory "
                                 f"level(s) under the base directory; field_names={names} "
                                 f"expects {len(names)} (set base_dir= to the directory "
                                 f"above the first partition level)")
            parts = {k: v for k, v in zip(names, dirs) if k is not None}
        types = self._scheme.field_types or {}
        for k, t in types.items():
            if k in parts:
                try:
                    parts[k] = _cast(parts[k], t)
                except ValueError:
                    raise ValueError(f"partitioning: path {path!r}: value {parts[k]!r} of "
                                     f"{k!r} is not a {t.__name__} (field_types)") from None
        return parts


class PathPartitionFilter:
    """Keeps the files whose partition values ``filter_fn(values) -> bool``
    accepts; files without partition values are kept.  Pass as
    ``partition_filter=`` to a ``read_*`` function."""

    def __init__(self, path_partition_parser: PathPartitionParser,
                 filter_fn: Callable[[dict[str, Any]], bool]) -> None:
        if not callable(filter_fn):
            raise TypeError("PathPartitionFilter: filter_fn must be callable (a dict of "
                            "partition values -> bool)")
        self._parser = path_partition_parser
        self._fn = filter_fn

    @staticmethod
    def of(filter_fn: Callable[[dict[str, Any]], bool],
           style: PartitionStyle | str = PartitionStyle.HIVE, base_dir: str | None = None,
           field_names: list[str] | None = None, field_types: dict[str, type] | None = None,
           filesystem: Any = None) -> "PathPartitionFilter":
        return PathPartitionFilter(PathPartitionParser.of(style, base_dir, field_names,
                                                          field_types, filesystem), filter_fn)

    @property
    def parser(self) -> PathPartitionParser:
        return self._parser

    def __call__(self, paths: list[str]) -> list[str]:
        out = []
        for p in paths:
            parts = self._parser(p)
            if not parts or self._fn(parts):
                out.append(p)
        return out


def add_partition_columns(table: pa.Table, parts: dict[str, Any], path: str) -> pa.Table:
    """``table`` with a column per partition key (a column the file already
    has must hold the same value)."""
    for k, v in parts.items():
        col = pa.array([v] * table.num_rows)
        if k in table.column_names:
            typ = table.schema.field(k).type
            try:
                col = col.cast(typ)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise ValueError(f"reading {path}: partition value {v!r} of {k!r} does not "
                                 f"fit the file's column type {typ}") from None
            if table.num_rows and not pc.all(pc.equal(col, table[k])).as_py():
                raise ValueError(f"reading {path}: column {k!r} is in the file and in the "
                                 f"path, with different values (path: {v!r}); rename one "
                                 f"or read with partitioning=None")
            table = table.set_column(table.schema.get_field_index(k), k, col)
        else:
            table = table.append_column(k, col)
    return table


def hive_dir(keys: list[str], values: tuple) -> str:
    """The ``k1=v1/k2=v2`` directory of one partition (values URL-quoted;
    a null is ``__HIVE_DEFAULT_PARTITION__``, as pyarrow writes it)."""
    segs = []
    for k, v in zip(keys, values):
        s = "__HIVE_DEFAULT_PARTITION__" if v is None else urllib.parse.quote(str(v), safe="")
        segs.append(f"{k}={s}")
    return "/".join(segs)
