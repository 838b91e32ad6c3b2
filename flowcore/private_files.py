"""Files and directories flowcore creates, private to their user.

Every directory flowcore makes is 0700 and every file 0600, wherever it is
(the default temp dir, ``session_dir=``, ``--state-dir``): spilled objects,
logs and tokens are nobody else's business.  Modes are set explicitly, not
left to the umask.
"""
from __future__ import annotations

import os
import threading

__all__ = ["make_private_dir", "open_private", "write_private", "replace_private", "DIR_MODE", "FILE_MODE"]

DIR_MODE = 0o700
FILE_MODE = 0o600


def make_private_dir(path: str | os.PathLike) -> str:
    """Create ``path`` and any missing parents as 0700 directories; an
    existing ``path`` owned by this user is narrowed to 0700.  Returns it."""
    path = os.fspath(path)
    missing = []
    head = os.path.abspath(path)
    while head and not os.path.isdir(head):
        missing.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            pass
        os.chmod(d, DIR_MODE)
    if not missing:
        st = os.stat(path)
        if st.st_uid == os.getuid() and st.st_mode & 0o777 != DIR_MODE:
            os.chmod(path, DIR_MODE)
    return path


def open_private(path: str | os.PathLike, flags: int) -> int:
    """``os.open(path, flags | O_CREAT)`` with 0600, also narrowing a file
    that already existed with a wider mode.  Returns the descriptor."""
    fd = os.open(path, flags | os.O_CREAT, FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o777 != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` (0600; a missing parent is made 0700).
    Atomically (``replace_private``): a reader (a node reading the token
    file the head writes) sees the whole text or no file, never a part."""
    path = os.fspath(path)
    make_private_dir(os.path.dirname(os.path.abspath(path)))
    replace_private(path, text.encode())


def replace_private(path: str, data: bytes) -> None:
    """Write ``data`` to a private file beside ``path``, renamed over it."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
