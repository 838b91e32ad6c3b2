"""``Checkpoint``: a directory of files on local disk or a ``pyarrow.fs``
filesystem that a trial or a training run can be resumed from.

This is the one checkpoint class of flowcore, as in Ray 2.60 where
``ray.train.Checkpoint is ray.tune.Checkpoint``: ``flowcore.train``
re-exports it, so ``flowcore.train.Checkpoint is flowcore.tune.Checkpoint``
and a checkpoint reported by a ``TorchTrainer`` run as a Tune trial is the
same object type Tune hands back.  The module needs only pyarrow (no other
part of flowcore.tune), so importing it from flowcore.train loads nothing
else.

A checkpoint is only a (filesystem, path) pair; the files stay where they
are.  ``to_directory`` copies them to a local directory (private: 0600
files, 0700 directories), ``as_directory`` gives a local directory for a
``with`` block (the directory itself when it is already local).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Iterator, Optional, Union

import pyarrow.fs as pafs

__all__ = ["Checkpoint", "resolve_filesystem", "is_local", "copy_tree"]

_METADATA_FILE = ".metadata.json"


def resolve_filesystem(path: Union[str, os.PathLike],
                       filesystem: Optional[pafs.FileSystem] = None
                       ) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, a URI
    (``s3://...``, ``file://...``) or a path on ``filesystem``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"expected a path or URI string, got {type(path).__name__}")
    path = os.fspath(path)
    if filesystem is not None:
        if not isinstance(filesystem, pafs.FileSystem):
            raise TypeError(f"filesystem={filesystem!r}: expected a pyarrow.fs.FileSystem")
        return filesystem, path
    if path.startswith("file://"):
        path = path[len("file://"):]
    elif "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def is_local(fs: pafs.FileSystem) -> bool:
    """True for the local filesystem."""
    return isinstance(fs, pafs.LocalFileSystem)


def _private_makedirs(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def copy_tree(src_fs: pafs.FileSystem, src: str, dst_fs: pafs.FileSystem, dst: str) -> None:
    """Copy the directory ``src`` into ``dst`` (merging with what is there);
    local copies are private (0600 files, 0700 directories)."""
    if is_local(src_fs) and is_local(dst_fs):
        _private_makedirs(dst)
        if os.path.abspath(src) == os.path.abspath(dst):
            return
        for root, _dirs, files in os.walk(src):
            rel = os.path.relpath(root, src)
            target = dst if rel == "." else os.path.join(dst, rel)
            _private_makedirs(target)
            for name in files:
                out = os.path.join(target, name)
                shutil.copyfile(os.path.join(root, name), out)
                os.chmod(out, 0o600)
        return
    if is_local(dst_fs):
        _private_makedirs(dst)
    else:
        dst_fs.create_dir(dst, recursive=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
    if is_local(dst_fs):
        for root, _dirs, files in os.walk(dst):
            os.chmod(root, 0o700)
            for name in files:
                os.chmod(os.path.join(root, name), 0o600)


class Checkpoint:
    """A reference to a directory of checkpoint files.

    ``Checkpoint(path, filesystem=None)``: ``path`` is a local path, a URI
    (``s3://...``; the filesystem is inferred) or a path on ``filesystem``.
    """

    def __init__(self, path: Union[str, os.PathLike],
                 filesystem: Optional[pafs.FileSystem] = None):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"Checkpoint(path=...) must be a path string, got "
                            f"{type(path).__name__}")
        if filesystem is not None and not isinstance(filesystem, pafs.FileSystem):
            raise TypeError(f"Checkpoint(filesystem=...) must be a pyarrow.fs.FileSystem, got "
                            f"{type(filesystem).__name__}")
        self.filesystem: pafs.FileSystem
        self.path: str
        self.filesystem, self.path = resolve_filesystem(path, filesystem)

    @classmethod
    def from_directory(cls, path: Union[str, os.PathLike]) -> "Checkpoint":
        """A checkpoint of the local directory ``path`` (which must exist)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"Checkpoint.from_directory({path!r}): not a directory; write the "
                             f"checkpoint files into a directory and pass that")
        return cls(path)

    def to_directory(self, path: Optional[Union[str, os.PathLike]] = None) -> str:
        """Copy the files to the local directory ``path`` (default: a new
        temporary directory) and return it."""
        if path is None:
            path = os.path.join(tempfile.gettempdir(), f"checkpoint_tmp_{uuid.uuid4().hex}")
        path = os.fspath(path)
        copy_tree(self.filesystem, self.path, pafs.LocalFileSystem(), path)
        return path

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        """A local directory holding the files, for the ``with`` block: the
        checkpoint's own directory when it is local (treat it as
        read-only), else a temporary copy removed afterwards."""
        if is_local(self.filesystem):
            yield self.path
            return
        tmp = self.to_directory()
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # metadata: a small JSON dict kept beside the files
    def get_metadata(self) -> dict[str, Any]:
        """The metadata dict stored with the checkpoint (``{}`` when none)."""
        target = f"{self.path}/{_METADATA_FILE}"
        try:
            with self.filesystem.open_input_stream(target) as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, OSError):
            return {}

    def set_metadata(self, metadata: dict[str, Any]) -> None:
        """Store ``metadata`` (JSON-serialisable) with the checkpoint."""
        if not isinstance(metadata, dict):
            raise TypeError(f"set_metadata() takes a dict, got {type(metadata).__name__}")
        data = json.dumps(metadata).encode()
        target = f"{self.path}/{_METADATA_FILE}"
        with self.filesystem.open_output_stream(target) as f:
            f.write(data)
        if is_local(self.filesystem):
            os.chmod(target, 0o600)

    def update_metadata(self, metadata: dict[str, Any]) -> None:
        """Merge ``metadata`` into the stored metadata."""
        merged = self.get_metadata()
        merged.update(metadata)
        self.set_metadata(merged)

    def __reduce__(self) -> Any:
        return (Checkpoint, (self.path, self.filesystem))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Checkpoint) or other.path != self.path:
            return False
        try:
            return bool(other.filesystem.equals(self.filesystem))
        except (TypeError, AttributeError):
            return type(other.filesystem) is type(self.filesystem)

    def __hash__(self) -> int:
        return hash(self.path)

    def __repr__(self) -> str:
        return f"Checkpoint(filesystem={self.filesystem.type_name}, path={self.path})"
