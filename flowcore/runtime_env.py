"""Runtime environments: code and settings shipped to the workers of a job.

A user writes ``runtime_env={"working_dir": ..., "py_modules": [...],
"env_vars": {...}}`` at ``init()`` (the whole job) or in ``.options()`` (one
task or actor).  This module checks that dict, packs the directories and
files it names into zip archives named by the hash of their bytes, uploads
each archive to the head once, and turns the whole thing into a small
*descriptor* that travels with every task of the job:

    {"key": <hash of the descriptor>, "working_dir": <package hash> | None,
     "py_modules": [<package hash>, ...], "env_vars": {name: value}}

Nodes fetch each package from the head the first time they run work that
needs it (``flowcore/node/packages.py``) and start dedicated worker
processes per descriptor ``key``, so two environments never share a worker.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import types
import zipfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client.core import CoreClient

ALLOWED_KEYS = ("env_vars", "py_modules", "working_dir")
DEFAULT_MAX_BYTES = 100 << 20
EXCLUDED_DIRS = frozenset({".git", "__pycache__", ".hg", ".svn", ".mypy_cache",
                           ".pytest_cache"})
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # zip entries carry no mtime: same content, same hash


def max_package_bytes() -> int:
    """The size limit of one package (``FLOWCORE_RUNTIME_ENV_MAX_BYTES``, default 100 MiB)."""
    v = os.environ.get("FLOWCORE_RUNTIME_ENV_MAX_BYTES")
    return int(v) if v else DEFAULT_MAX_BYTES


# ------------------------------------------------------------------ checking
def check(value: Any) -> bool:
    """Validate a user's ``runtime_env``; True, or raise an error naming the
    problem (used by the options table and by ``init``)."""
    if value is None:
        return True
    if not isinstance(value, dict):
        raise TypeError(f"runtime_env must be a dict with keys among {', '.join(ALLOWED_KEYS)}, "
                        f"got {type(value).__name__}")
    for key in value:
        if key not in ALLOWED_KEYS:
            raise ValueError(f"runtime_env: unknown key {key!r}; allowed keys: "
                             f"{', '.join(ALLOWED_KEYS)}")
    wd = value.get("working_dir")
    if wd is not None:
        if not isinstance(wd, (str, os.PathLike)):
            raise TypeError(f"runtime_env['working_dir'] must be a path to a local directory "
                            f"(str), got {type(wd).__name__}")
        if not os.path.isdir(wd):
            raise ValueError(f"runtime_env['working_dir']={os.fspath(wd)!r} is not a directory")
    mods = value.get("py_modules")
    if mods is not None:
        if not isinstance(mods, (list, tuple)):
            raise TypeError(f"runtime_env['py_modules'] must be a list of package directories, "
                            f".py files or imported modules, got {type(mods).__name__}")
        for i, m in enumerate(mods):
            _module_path(m, f"runtime_env['py_modules'][{i}]")
    env = value.get("env_vars")
    if env is not None:
        if not isinstance(env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise TypeError(f"runtime_env['env_vars'] must be a dict of str -> str, got "
                            f"{env!r}")
        for k in env:
            if not k or "=" in k or "\0" in k:
                raise ValueError(f"runtime_env['env_vars']: {k!r} is not a valid variable name")
            if k.startswith("FLOWCORE_"):
                raise ValueError(f"runtime_env['env_vars']: {k!r} is reserved (FLOWCORE_* "
                                 f"variables belong to flowcore itself)")
    return True


def _module_path(m: Any, where: str) -> str:
    """The local path a ``py_modules`` entry stands for (a package directory or a .py file)."""
    if isinstance(m, types.ModuleType):
        path = getattr(m, "__file__", None)
        if not path:
            raise ValueError(f"{where}: module {m.__name__} has no file to ship (a namespace "
                             f"or built-in module); pass its directory instead")
        if os.path.basename(path).startswith("__init__."):
            return os.path.dirname(os.path.abspath(path))
        return os.path.abspath(path)
    if not isinstance(m, (str, os.PathLike)):
        raise TypeError(f"{where} must be a package directory, a .py file or a module, got "
                        f"{type(m).__name__}")
    path = os.path.abspath(os.fspath(m))
    if os.path.isdir(path) or (os.path.isfile(path) and path.endswith(".py")):
        return path
    raise ValueError(f"{where}={os.fspath(m)!r} is neither a directory nor a .py file")


# ------------------------------------------------------------------ packing
def pack_directory(path: str, prefix: str = "", limit: int | None = None) -> bytes:
    """Zip the files under ``path`` (without VCS and cache directories), each
    stored under ``prefix``; the same content always gives the same bytes.
    Raises ValueError when the files add up to more than ``limit`` bytes."""
    limit = max_package_bytes() if limit is None else limit
    files: list[tuple[str, str]] = []
    total = 0
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS)
        for name in sorted(names):
            if name.endswith((".pyc", ".pyo")):
                continue
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:
                continue  # a dangling link
            if not stat.S_ISREG(st.st_mode):
                continue
            total += st.st_size
            if total > limit:
                raise ValueError(
                    f"runtime_env: {path} holds more than {_mib(limit)} of files (the limit; "
                    f"set FLOWCORE_RUNTIME_ENV_MAX_BYTES to change it). Keep large data out of "
                    f"the shipped directory: put it in the object store or on shared storage")
            files.append((full, prefix + os.path.relpath(full, path)))
    return _zip(files)


def pack_file(path: str) -> bytes:
    limit = max_package_bytes()
    if os.path.getsize(path) > limit:
        raise ValueError(f"runtime_env: {path} is larger than {_mib(limit)} (the limit; set "
                         f"FLOWCORE_RUNTIME_ENV_MAX_BYTES to change it)")
    return _zip([(path, os.path.basename(path))])


def _zip(files: list[tuple[str, str]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for full, arc in files:
            info = zipfile.ZipInfo(arc.replace(os.sep, "/"), _FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            mode = 0o755 if os.access(full, os.X_OK) else 0o644
            info.external_attr = (stat.S_IFREG | mode) << 16
            with open(full, "rb") as f:
                z.writestr(info, f.read())
    return buf.getvalue()


def package_hash(blob: bytes) -> str:
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


# ------------------------------------------------------------------ resolving
class Packager:
    """One per client: packs local paths into packages, uploads each to the
    head once, and builds descriptors.  A path is packed once per client (a
    job), so later edits to it are not seen by that job."""

    def __init__(self, client: CoreClient):
        self.client = client
        self.by_path: dict[tuple[str, str], str] = {}
        self.uploaded: set[str] = set()

    def _package(self, kind: str, path: str) -> str:
        path = os.path.abspath(path)
        h = self.by_path.get((kind, path))
        if h is not None:
            return h
        if kind == "working_dir":
            blob = pack_directory(path)
        elif os.path.isdir(path):  # a package: shipped under its own name
            blob = pack_directory(path, prefix=os.path.basename(path.rstrip(os.sep)) + os.sep)
        else:
            blob = pack_file(path)
        h = package_hash(blob)
        self._upload(h, blob)
        self.by_path[(kind, path)] = h
        return h

    def _upload(self, h: str, blob: bytes) -> None:
        if h in self.uploaded:
            return
        if not self.client.request("head", {"op": "has_package", "hash": h}).get("known"):
            reply = self.client.request("head", {"op": "upload_package", "hash": h,
                                                 "blob": blob}, timeout=600.0)
            if not reply.get("ok"):
                raise RuntimeError(f"runtime_env: the head refused package {h}: "
                                   f"{reply.get('error')}")
        self.uploaded.add(h)

    def partial(self, env: dict[str, Any]) -> dict[str, Any]:
        """The descriptor fields a user's ``runtime_env`` sets (packages uploaded)."""
        check(env)
        out: dict[str, Any] = {}
        if env.get("working_dir") is not None:
            out["working_dir"] = self._package("working_dir", os.fspath(env["working_dir"]))
        if env.get("py_modules") is not None:
            out["py_modules"] = [
                self._package("py_modules", _module_path(m, f"runtime_env['py_modules'][{i}]"))
                for i, m in enumerate(env["py_modules"])]
        if env.get("env_vars") is not None:
            out["env_vars"] = dict(env["env_vars"])
        return out


def combine(base: dict | None, partial: dict[str, Any]) -> dict | None:
    """``partial`` over ``base``: working_dir and py_modules are replaced,
    env_vars are merged (the task's win).  None when nothing is set."""
    desc: dict[str, Any] = {"working_dir": None, "py_modules": [], "env_vars": {}}
    if base:
        desc.update(working_dir=base.get("working_dir"),
                    py_modules=list(base.get("py_modules") or []),
                    env_vars=dict(base.get("env_vars") or {}))
    if "working_dir" in partial:
        desc["working_dir"] = partial["working_dir"]
    if "py_modules" in partial:
        desc["py_modules"] = list(partial["py_modules"])
    desc["env_vars"].update(partial.get("env_vars") or {})
    if desc["working_dir"] is None and not desc["py_modules"] and not desc["env_vars"]:
        return None
    body = json.dumps(desc, sort_keys=True).encode()
    desc["key"] = hashlib.blake2b(body, digest_size=8).hexdigest()
    return desc


def for_task(client: CoreClient, task_env: dict | None) -> dict | None:
    """The descriptor a task or actor submitted by ``client`` runs with: the
    job's (or, inside a task, the running task's) with ``task_env`` over it."""
    base = client.runtime_env
    if task_env is None:
        return base
    packager = client.packager
    if packager is None:
        packager = client.packager = Packager(client)
    return combine(base, packager.partial(task_env))


def init_job(client: CoreClient, env: dict | None) -> None:
    """Set up the job-level environment of a freshly connected driver."""
    if env is None:
        return
    client.packager = Packager(client)
    client.runtime_env = combine(None, client.packager.partial(env))
