"""``Checkpoint``: a directory of files in a local or ``pyarrow.fs``
filesystem, as in Ray Train 2.60.

A checkpoint is only a (filesystem, path) pair; the files stay where they
are. ``to_directory`` copies them to a local directory, ``as_directory``
gives a local directory for the duration of a ``with`` block (the directory
itself when it is already local).
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

_METADATA_FILE = ".metadata.json"


def _private_makedirs(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)


def resolve_filesystem(path: Union[str, os.PathLike],
                       filesystem: Optional[pafs.FileSystem] = None
                       ) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, a URI or a path on
    ``filesystem``."""
    path = os.fspath(path)
    if filesystem is not None:
        if not isinstance(filesystem, pafs.FileSystem):
            raise TypeError(f"filesystem={filesystem!r}: expected a pyarrow.fs.FileSystem")
        return filesystem, path
    if "://" in path and not path.startswith("file://"):
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs, inner
    if path.startswith("file://"):
        path = path[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def copy_tree(src_fs: pafs.FileSystem, src: str, dst_fs: pafs.FileSystem, dst: str) -> None:
    """Copy the directory ``src`` into ``dst`` (merging with what is there);
    local copies keep files private (0600 files, 0700 dirs)."""
    if is_local(src_fs) and is_local(dst_fs):
        _private_makedirs(dst)
        for root, dirs, files in os.walk(src):
            rel = os.path.relpath(root, src)
            target = dst if rel == "." else os.path.join(dst, rel)
            _private_makedirs(target)
            for name in files:
                out = os.path.join(target, name)
                shutil.copyfile(os.path.join(root, name), out)
                os.chmod(out, 0o600)
        return
    dst_fs.create_dir(dst, recursive=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
    if is_local(dst_fs):
        for root, dirs, files in os.walk(dst):
            os.chmod(root, 0o700)
            for name in files:
                os.chmod(os.path.join(root, name), 0o600)


class Checkpoint:
    """A reference to a directory of checkpoint files.

    ``Checkpoint(path, filesystem=None)``: ``path`` is a local path, a URI
    (``s3://...``, the filesystem is inferred) or a path on ``filesystem``.
    """

    def __init__(self, path: Union[str, os.PathLike],
                 filesystem: Optional[pafs.FileSystem] = None):
        self.filesystem, self.path = resolve_filesystem(path, filesystem)

    @classmethod
    def from_directory(cls, path: Union[str, os.PathLike]) -> "Checkpoint":
        """A checkpoint of the local directory ``path``."""
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
        checkpoint's own directory when it is local (do not change it),
        else a temporary copy removed afterwards."""
        if is_local(self.filesystem):
            yield self.path
            return
        tmp = self.to_directory()
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def get_metadata(self) -> dict[str, Any]:
        """The metadata dict stored with the checkpoint (``{}`` when none)."""
        target = f"{self.path}/{_METADATA_FILE}"
        info = self.filesystem.get_file_info(target)
        if info.type == pafs.FileType.NotFound:
            return {}
        with self.filesystem.open_input_stream(target) as f:
            return json.loads(f.read().decode())

    def set_metadata(self, metadata: dict[str, Any]) -> None:
        """Store ``metadata`` (JSON-serialisable) with the checkpoint."""
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
        return (isinstance(other, Checkpoint) and other.path == self.path
                and other.filesystem.equals(self.filesystem))

    def __hash__(self) -> int:
        return hash(self.path)

    def __repr__(self) -> str:
        return f"Checkpoint(filesystem={self.filesystem.type_name}, path={self.path})"
