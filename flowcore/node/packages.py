"""The node's runtime-environment packages: fetched from the head and
unpacked once per hash, then turned into what a worker process starts with.

Each package lands in ``{session}/runtime_env/{hash}/``; it is unpacked into
a temporary directory next to it and renamed into place, so a half-written
directory is never used.  Concurrent requests for the same hash share one
fetch.
"""
from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass, field
from typing import Awaitable, Callable


@dataclass
class WorkerSetup:
    """How to start a worker process for one runtime_env descriptor."""
    cwd: str | None = None
    paths: list[str] = field(default_factory=list)   # first on sys.path, in order
    env_vars: dict[str, str] = field(default_factory=dict)


class PackageCache:
    def __init__(self, root: str, fetch: Callable[[str], Awaitable[bytes | None]]):
        self.root = root
        self.fetch = fetch
        self.fetched: list[str] = []
        self._pending: dict[str, asyncio.Future] = {}

    def path(self, h: str) -> str:
        return os.path.join(self.root, h)

    async def ensure(self, h: str) -> str:
        """The directory holding package ``h``, fetched and unpacked if needed."""
        target = self.path(h)
        if os.path.isdir(target):
            return target
        fut = self._pending.get(h)
        if fut is None:
            fut = self._pending[h] = asyncio.ensure_future(self._install(h))

            def forget(_f: asyncio.Future, h: str = h) -> None:
                self._pending.pop(h, None)
            fut.add_done_callback(forget)
        return await asyncio.shield(fut)

    async def _install(self, h: str) -> str:
        blob = await self.fetch(h)
        if blob is None:
            raise RuntimeError(f"the head does not have runtime_env package {h}")
        self.fetched.append(h)
        target = self.path(h)
        loop = asyncio.get_event_loop()
        await loop.run_in_executor(None, _unpack, blob, target)
        return target

    async def prepare(self, renv: dict) -> WorkerSetup:
        setup = WorkerSetup(env_vars=dict(renv.get("env_vars") or {}))
        wd = renv.get("working_dir")
        if wd:
            setup.cwd = await self.ensure(wd)
            setup.paths.append(setup.cwd)
        for h in renv.get("py_modules") or []:
            setup.paths.append(await self.ensure(h))
        return setup


def _unpack(blob: bytes, target: str) -> None:
    import io
    parent = os.path.dirname(target)
    from ..private_files import make_private_dir
    make_private_dir(parent)
    tmp = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp, 0o700)
    try:
        import zipfile  # only nodes that run a runtime_env need it
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            for info in z.infolist():
                name = os.path.normpath(info.filename)
                if name.startswith("..") or os.path.isabs(name):
                    raise ValueError(f"runtime_env package entry {info.filename!r} points "
                                     f"outside its directory")
                z.extract(info, tmp)
                mode = (info.external_attr >> 16) & 0o700  # private: the owner's bits only
                if mode:
                    os.chmod(os.path.join(tmp, name), mode)
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isdir(target):
                raise
            # another node sharing this session directory unpacked it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
