"""Where an experiment's files live: a local directory or any
``pyarrow.fs`` filesystem, behind the few operations Tune needs.

Local files are written private to their user (0600 files, 0700 dirs)."""
from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
from typing import Any, Callable

import pyarrow.fs as pafs

__all__ = ["resolve", "is_local", "makedirs", "write_bytes", "read_bytes", "exists",
           "write_new", "upload_dir", "download_dir", "delete_dir", "list_dir", "join",
           "DEFAULT_STORAGE_PATH", "BackgroundWriter"]

DEFAULT_STORAGE_PATH = os.path.expanduser(os.environ.get("FLOWCORE_RESULTS_DIR",
                                                         "~/flowcore_results"))


def resolve(storage_path: str | os.PathLike | None,
            filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for ``storage_path``."""
    if storage_path is None:
        storage_path = DEFAULT_STORAGE_PATH
    if not isinstance(storage_path, (str, os.PathLike)):
        raise TypeError(f"RunConfig(storage_path=...) must be a path or URI string, got "
                        f"{type(storage_path).__name__}")
    storage_path = os.fspath(storage_path)
    if filesystem is not None:
        if not isinstance(filesystem, pafs.FileSystem):
            raise TypeError(f"storage_filesystem must be a pyarrow.fs.FileSystem, got "
                            f"{type(filesystem).__name__}")
        return filesystem, storage_path.rstrip("/") or "/"
    if "://" in storage_path:
        fs, path = pafs.FileSystem.from_uri(storage_path)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(storage_path))


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def join(*parts: str) -> str:
    return "/".join(p.rstrip("/") if i == 0 else p.strip("/")
                    for i, p in enumerate(parts) if p != "")


def private_makedirs(path: str) -> None:
    """``os.makedirs`` that makes every new directory 0700 (os.makedirs
    applies its mode to the last one only)."""
    path = os.path.abspath(path)
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            pass


def makedirs(fs: pafs.FileSystem, path: str) -> None:
    if is_local(fs):
        private_makedirs(path)
    else:
        fs.create_dir(path, recursive=True)


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` whole (locally: a new file renamed into place)."""
    if is_local(fs):
        d = os.path.dirname(path)
        private_makedirs(d)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_new(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a file that nobody reads yet (no temporary file and rename)."""
    if is_local(fs):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return
    write_bytes(fs, path, data)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_dir(fs: pafs.FileSystem, path: str) -> list[str]:
    """Base names directly under ``path`` (empty if it does not exist)."""
    if not exists(fs, path):
        return []
    return sorted(os.path.basename(i.path.rstrip("/"))
                  for i in fs.get_file_info(pafs.FileSelector(path, recursive=False)))


def _private_tree(path: str) -> None:
    os.chmod(path, 0o700)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o700)
        for f in files:
            os.chmod(os.path.join(root, f), 0o600)


def upload_dir(local_dir: str, fs: pafs.FileSystem, dest: str) -> None:
    """Copy the local directory ``local_dir`` to ``dest`` on ``fs``."""
    if is_local(fs):
        private_makedirs(os.path.dirname(dest) or ".")
        if os.path.exists(dest):
            shutil.rmtree(dest)
        shutil.copytree(local_dir, dest)
        _private_tree(dest)
        return
    fs.create_dir(dest, recursive=True)
    pafs.copy_files(local_dir, dest, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download_dir(fs: pafs.FileSystem, src: str, local_dir: str) -> None:
    """Copy ``src`` on ``fs`` into the local directory ``local_dir``."""
    private_makedirs(local_dir)
    if is_local(fs):
        shutil.copytree(src, local_dir, dirs_exist_ok=True)
        return
    pafs.copy_files(src, local_dir, source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())


def delete_dir(fs: pafs.FileSystem, path: str) -> None:
    try:
        if is_local(fs):
            shutil.rmtree(path, ignore_errors=True)
        else:
            fs.delete_dir(path)
    except (OSError, FileNotFoundError):
        pass


def describe(fs: Any) -> str:
    return "local" if is_local(fs) else type(fs).__name__


class BackgroundWriter:
    """Runs file writes in order on one thread, so the experiment loop does
    not wait for the filesystem (trial directories, params, result lines).
    ``flush()`` waits until everything queued is written; the first error of
    a write is raised from the next ``submit``/``flush``."""

    def __init__(self) -> None:
        self._q: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="tune-storage-writer")
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                fn, args = item
                if self._error is None:
                    fn(*args)
            except BaseException as e:  # noqa: BLE001 - reported to the caller
                self._error = e
            finally:
                self._q.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise OSError(f"writing experiment files failed: {err}") from err

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._raise()
        self._q.put((fn, args))

    def flush(self) -> None:
        self._q.join()
        self._raise()

    def close(self, raise_error: bool = True) -> BaseException | None:
        """Write what is queued and end the thread; returns (or raises) the
        first write error."""
        self._q.put(None)
        self._thread.join()
        err = self._error
        if raise_error:
            self._raise()
        return err
