"""``Checkpoint``: a directory of files on local disk or a ``pyarrow.fs``
filesystem that a trial (or a training run) can be resumed from.

The class is self-contained (it needs only pyarrow) so other flowcore
libraries can share it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Iterator

import pyarrow.fs as pafs

__all__ = ["Checkpoint"]

_METADATA_FILE = ".metadata.json"


class Checkpoint:
    """A checkpoint directory at ``path`` on ``filesystem`` (local by default)."""

    def __init__(self, path: str | os.PathLike, filesystem: pafs.FileSystem | None = None):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"Checkpoint(path=...) must be a path string, got "
                            f"{type(path).__name__}")
        if filesystem is not None and not isinstance(filesystem, pafs.FileSystem):
            raise TypeError(f"Checkpoint(filesystem=...) must be a pyarrow.fs.FileSystem, got "
                            f"{type(filesystem).__name__}")
        path = os.fspath(path)
        if filesystem is None:
            if "://" in path:
                filesystem, path = pafs.FileSystem.from_uri(path)
            else:
                filesystem = pafs.LocalFileSystem()
                path = os.path.abspath(os.path.expanduser(path))
        self.path: str = path
        self.filesystem: pafs.FileSystem = filesystem

    @classmethod
    def from_directory(cls, path: str | os.PathLike) -> "Checkpoint":
        """A checkpoint of the local directory ``path`` (which must exist)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"Checkpoint.from_directory({path!r}): no such directory")
        return cls(path)

    def _is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def to_directory(self, path: str | os.PathLike | None = None) -> str:
        """Copy the checkpoint into the local directory ``path`` (a new
        temporary directory when None) and return that path."""
        dest = os.fspath(path) if path is not None else os.path.join(
            tempfile.gettempdir(), f"checkpoint_tmp_{uuid.uuid4().hex}")
        os.makedirs(dest, mode=0o700, exist_ok=True)
        if self._is_local():
            if os.path.abspath(dest) != os.path.abspath(self.path):
                shutil.copytree(self.path, dest, dirs_exist_ok=True)
        else:
            pafs.copy_files(self.path, dest, source_filesystem=self.filesystem,
                            destination_filesystem=pafs.LocalFileSystem())
        for root, _dirs, files in os.walk(dest):  # the copy is private, as all flowcore writes
            os.chmod(root, 0o700)
            for name in files:
                os.chmod(os.path.join(root, name), 0o600)
        return dest

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        """A local directory with the checkpoint's files for the ``with``
        block: the checkpoint itself when local, else a temporary copy
        removed afterwards.  Treat it as read-only."""
        if self._is_local():
            yield self.path
            return
        tmp = self.to_directory()
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # metadata: a small JSON dict kept beside the files
    def get_metadata(self) -> dict[str, Any]:
        p = f"{self.path}/{_METADATA_FILE}"
        try:
            with self.filesystem.open_input_stream(p) as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, OSError):
            return {}

    def set_metadata(self, metadata: dict[str, Any]) -> None:
        if not isinstance(metadata, dict):
            raise TypeError(f"set_metadata() takes a dict, got {type(metadata).__name__}")
        data = json.dumps(metadata).encode()
        p = f"{self.path}/{_METADATA_FILE}"
        with self.filesystem.open_output_stream(p) as f:
            f.write(data)
        if self._is_local():
            os.chmod(p, 0o600)

    def update_metadata(self, metadata: dict[str, Any]) -> None:
        current = self.get_metadata()
        current.update(metadata)
        self.set_metadata(current)

    def __repr__(self) -> str:
        fs = "local" if self._is_local() else type(self.filesystem).__name__
        return f"Checkpoint(filesystem={fs}, path={self.path})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Checkpoint) and other.path == self.path
                and type(other.filesystem) is type(self.filesystem))

    def __hash__(self) -> int:
        return hash(self.path)
