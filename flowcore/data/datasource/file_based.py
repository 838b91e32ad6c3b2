"""File paths and filesystems, read tasks (one per file) and the file
sink (one file per block, written under a temporary name and renamed, so
a failed write leaves no partial file)."""
from __future__ import annotations

import enum
import os
import uuid
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.fs as pafs

from ..plan import ReadTask
from ..shuffle import split_groups
from .partitioning import Partitioning, PathPartitionParser, add_partition_columns, hive_dir

__all__ = ["resolve_paths", "file_read_tasks", "FileDatasink", "filesystem_for", "SaveMode"]


class SaveMode(str, enum.Enum):
    """What a write does when its directory already holds files (Ray's
    names; plain strings work too).  UPSERT is Ray's for table sinks and
    is refused for files."""
    CREATE = "create"
    APPEND = "append"
    OVERWRITE = "overwrite"
    IGNORE = "ignore"
    ERROR = "error"
    UPSERT = "upsert"


def filesystem_for(path: str, filesystem: Any, op: str) -> tuple[pafs.FileSystem, str]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{op}: paths must be strings, got {type(path).__name__}")
    path = os.fspath(path)
    if filesystem is not None:
        if not isinstance(filesystem, pafs.FileSystem):
            raise TypeError(f"{op}: filesystem= must be a pyarrow.fs.FileSystem, got "
                            f"{type(filesystem).__name__}")
        return filesystem, path
    if "://" in path:
        fs, p = pafs.FileSystem.from_uri(path)
        return fs, p
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _hidden(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith(".") or base.startswith("_")


def resolve_paths(paths: Any, filesystem: Any, op: str,
                  extensions: Sequence[str] | None = None, ignore_missing: bool = False
                  ) -> list[tuple[pafs.FileSystem, str, int]]:
    """(filesystem, file path, size) for every file ``paths`` names
    (directories are listed recursively, hidden files skipped; with
    ``ignore_missing`` a path that does not exist is skipped)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError(f"{op}: no paths given; expected a file or directory path or a "
                         f"list of them")
    out: list[tuple[pafs.FileSystem, str, int]] = []
    for p in paths:
        fs, path = filesystem_for(p, filesystem, op)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            if ignore_missing:
                continue
            raise FileNotFoundError(f"{op}: path {os.fspath(p)!r} does not exist; expected an "
                                    f"existing file or directory")
        if info.type == pafs.FileType.Directory:
            found = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                     if i.type == pafs.FileType.File
                     and not _hidden(i.path[len(path):].lstrip("/"))]
            if extensions:
                found = [i for i in found if i.path.lower().endswith(tuple(extensions))]
            out.extend((fs, i.path, i.size or 0) for i in sorted(found, key=lambda i: i.path))
        elif not extensions or path.lower().endswith(tuple(extensions)):
            out.append((fs, path, info.size or 0))
    if not out:
        raise FileNotFoundError(f"{op}: no files found under {paths}"
                                + (f" with extensions {list(extensions)}" if extensions else ""))
    return out


class _FileRead:
    def __init__(self, reader: Callable[[pafs.FileSystem, str], pa.Table],
                 fs: pafs.FileSystem, path: str, include_paths: bool,
                 parts: dict[str, Any] | None = None) -> None:
        self.reader = reader
        self.fs = fs
        self.path = path
        self.include_paths = include_paths
        self.parts = parts

    def __call__(self) -> Iterator[pa.Table]:
        try:
            t = self.reader(self.fs, self.path)
        except (pa.ArrowInvalid, ValueError, OSError) as e:
            raise type(e)(f"reading {self.path}: {e}") from e
        if self.parts:
            t = add_partition_columns(t, self.parts, self.path)
        if self.include_paths:
            t = t.append_column("path", pa.array([self.path] * t.num_rows, pa.string()))
        yield t


def partition_values(files: list[tuple[pafs.FileSystem, str, int]],
                     partitioning: Partitioning | None) -> list[dict[str, Any]]:
    """The partition values each file's path names (parsed here, before
    any task runs, so a path that does not fit the scheme fails early)."""
    if partitioning is None:
        return [{} for _ in files]
    parser = PathPartitionParser(partitioning)
    return [parser(path) for _, path, _ in files]


def file_read_tasks(files: list[tuple[pafs.FileSystem, str, int]],
                    reader: Callable[[pafs.FileSystem, str], pa.Table],
                    include_paths: bool = False, size_factor: float = 1.0,
                    partitioning: Partitioning | None = None,
                    keep_parts: Callable[[str], bool] | None = None) -> list[ReadTask]:
    """One read task per file; with ``partitioning``, each file's
    partition values become columns (those ``keep_parts`` accepts)."""
    out = []
    for (fs, path, size), parts in zip(files, partition_values(files, partitioning)):
        if keep_parts is not None:
            parts = {k: v for k, v in parts.items() if keep_parts(k)}
        out.append(ReadTask(_FileRead(reader, fs, path, include_paths, parts), None,
                            int(size * size_factor), [path]))
    return out


class FileDatasink:
    """Writes each block to ``{path}/{uuid}_{index:06d}_000000.{ext}``
    (with ``partition_cols``, each block's rows of one partition to
    ``{path}/k1=v1/k2=v2/...``, without those columns: Hive style)."""

    def __init__(self, path: str, filesystem: Any, ext: str,
                 write: Callable[[pa.Table, Any], None], op: str, *,
                 try_create_dir: bool = True, filename_provider: Any = None,
                 max_rows_per_file: int | None = None,
                 partition_cols: list[str] | None = None) -> None:
        self.fs, self.dir = filesystem_for(path, filesystem, op)
        self.ext = ext
        self.write = write
        self.op = op
        self.uuid = uuid.uuid4().hex[:16]
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        if filename_provider is not None and not callable(
                getattr(filename_provider, "get_filename_for_block", None)):
            raise TypeError(f"{op}: filename_provider= must have a get_filename_for_block("
                            f"block, write_uuid, task_index, block_index) method")
        self.filename_provider = filename_provider
        self.max_rows = max_rows_per_file
        if partition_cols is not None and (isinstance(partition_cols, str) or not all(
                isinstance(c, str) for c in partition_cols)):
            raise TypeError(f"{op}: partition_cols={partition_cols!r}; expected a list of "
                            f"column names")
        self.partition_cols = list(partition_cols or [])
        if self.fs.get_file_info(self.dir).type == pafs.FileType.NotFound:
            if not try_create_dir:
                raise FileNotFoundError(f"{op}: directory {path!r} does not exist and "
                                        f"try_create_dir=False; create it or pass "
                                        f"try_create_dir=True")
            if self.local:
                os.makedirs(self.dir, mode=0o700, exist_ok=True)
            else:
                self.fs.create_dir(self.dir, recursive=True)
        info = self.fs.get_file_info(self.dir)
        if info.type != pafs.FileType.Directory:
            raise NotADirectoryError(f"{op}: {path!r} is not a directory; expected a "
                                     f"directory to write one file per block into")

    def file_name(self, index: int, part: int = 0, table: pa.Table | None = None) -> str:
        if self.filename_provider is not None:
            return str(self.filename_provider.get_filename_for_block(table, self.uuid, index,
                                                                     part))
        return f"{self.uuid}_{index:06d}_{part:06d}.{self.ext}"

    def existing_files(self) -> list[str]:
        """Files (not hidden) already in the directory."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.dir, recursive=True))
        return [i.path for i in infos if i.type == pafs.FileType.File
                and not i.path.rsplit("/", 1)[-1].startswith(".")]

    def delete_existing(self) -> None:
        """``mode="overwrite"``: empty the directory first."""
        self.fs.delete_dir_contents(self.dir)

    def write_table(self, table: pa.Table, index: int) -> list[str]:
        """``table`` as one file, or files of at most ``max_rows_per_file``
        (with ``partition_cols``: per partition, in its directory)."""
        if self.partition_cols:
            missing = [c for c in self.partition_cols if c not in table.column_names]
            if missing:
                raise ValueError(f"{self.op}: partition_cols {missing} are not columns of "
                                 f"the dataset (columns: {table.column_names})")
            if len(self.partition_cols) == table.num_columns:
                raise ValueError(f"{self.op}: partition_cols={self.partition_cols} names "
                                 f"every column; the files would have none left")
            out = []
            for values, rows in split_groups(table, self.partition_cols):
                sub = hive_dir(self.partition_cols, tuple(values))
                out.extend(self._write_rows(rows.drop_columns(self.partition_cols), index,
                                            sub))
            return out
        return self._write_rows(table, index, "")

    def _write_rows(self, table: pa.Table, index: int, sub: str) -> list[str]:
        if not self.max_rows or table.num_rows <= self.max_rows:
            return [self.write_block(table, index, 0, sub)]
        return [self.write_block(table.slice(off, self.max_rows), index, part, sub)
                for part, off in enumerate(range(0, table.num_rows, self.max_rows))]

    def _make_dir(self, sub: str) -> str:
        d = f"{self.dir}/{sub}"
        if self.local:
            base = self.dir
            for seg in sub.split("/"):   # each level private to its user
                base = f"{base}/{seg}"
                try:
                    os.mkdir(base, 0o700)
                except FileExistsError:
                    pass
        else:
            self.fs.create_dir(d, recursive=True)
        return d

    def write_block(self, table: pa.Table, index: int, part: int = 0, sub: str = "") -> str:
        name = self.file_name(index, part, table)
        d = self._make_dir(sub) if sub else self.dir
        final = f"{d}/{name}"
        tmp = f"{d}/.{self.uuid}.{name}.tmp"
        try:
            if self.local:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with open(fd, "wb") as f:
                    self.write(table, f)
                os.replace(tmp, final)
            else:
                with self.fs.open_output_stream(tmp) as f:
                    self.write(table, f)
                self.fs.move(tmp, final)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except (OSError, FileNotFoundError):
                pass
            raise
        return final

    def cleanup(self, before: set[str] | None = None) -> None:
        """Remove every file this sink wrote (after a failed write): its
        temporary files and, given the files ``before`` the write, any
        new file (else the files named with this write's id)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.dir, recursive=True))
        except OSError:
            return
        for i in infos:
            if i.type != pafs.FileType.File:
                continue
            name = i.path.rsplit("/", 1)[-1]
            ours = name.startswith(self.uuid) or name.startswith("." + self.uuid)
            if ours or (before is not None and i.path not in before):
                try:
                    self.fs.delete_file(i.path)
                except OSError:
                    pass
