"""How a worker process's C allocator keeps memory it freed.

A task that copies large values out of the store (a ``bytearray``, a
pickled list) allocates tens of MiB and frees them when it returns.  With
glibc's defaults the freed top of the heap goes back to the kernel at once,
so the next task touches fresh pages again: one page fault per 4 KiB, which
costs more than the copy itself.  Workers keep up to
``FLOWCORE_WORKER_MALLOC_TRIM`` bytes (256 MiB by default, ``0`` leaves
glibc's defaults) of freed heap, and serve allocations up to glibc's
largest heap size (32 MiB) from it.  A user's own ``MALLOC_TRIM_THRESHOLD_``
or ``MALLOC_MMAP_THRESHOLD_`` is left alone; other C libraries are not
touched.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

#: glibc's mallopt parameters
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: the largest M_MMAP_THRESHOLD glibc accepts on 64-bit systems
MMAP_THRESHOLD_MAX = 32 * 2**20
DEFAULT_TRIM = 256 * 2**20


_MALLOPT: list[Any] = []  # [glibc's mallopt or None], once looked up


def find_mallopt() -> Any:
    """glibc's ``mallopt`` (None when the C library is not glibc).  Looked
    up once per process (``find_library`` runs ``ldconfig``): the node does
    it before forking workers, so they inherit the answer."""
    if not _MALLOPT:
        mallopt = None
        name = ctypes.util.find_library("c")
        if name:
            try:
                mallopt = ctypes.CDLL(name).mallopt
                mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                mallopt.restype = ctypes.c_int
            except (OSError, AttributeError):  # not glibc
                mallopt = None
        _MALLOPT.append(mallopt)
    return _MALLOPT[0]


def keep_freed_memory(environ: "os._Environ[str] | dict[str, str]" = os.environ) -> bool:
    """Apply the worker's allocator settings to this process; True when set."""
    if "MALLOC_TRIM_THRESHOLD_" in environ or "MALLOC_MMAP_THRESHOLD_" in environ:
        return False
    try:
        trim = int(environ.get("FLOWCORE_WORKER_MALLOC_TRIM", DEFAULT_TRIM))
    except ValueError:
        return False
    if trim <= 0:
        return False
    mallopt = find_mallopt()
    if mallopt is None:
        return False
    # both are set: setting either turns off glibc's own adjustment of the other
    ok = mallopt(M_MMAP_THRESHOLD, min(trim, MMAP_THRESHOLD_MAX))
    ok = mallopt(M_TRIM_THRESHOLD, min(trim, 2**31 - 1)) and ok
    return bool(ok)
