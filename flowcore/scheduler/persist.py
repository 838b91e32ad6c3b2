"""The head's small tables on disk (file IO only; the decisions are in
``recovery.py``).

Layout, under ``STATE_DIR/head-{port}/`` (mode 0700):

* ``tables.msgpack``: nodes, named and detached actors (creation spec and
  where each ran) and jobs, rewritten whole when they change;
* ``functions/{fid hex}``: one file per registered function (its pickled
  blob and name), written once.

Writes are batched by the server (at most one write per flush interval,
only when something changed; an actor coming up or going is written at
once) and atomic (write to a temporary file, then rename), without fsync: a
crash loses at most the last interval's other changes, and a half-written
file is never read.  A clean stop removes the directory, since
nothing it names survives a clean stop.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import msgpack

from ..private_files import make_private_dir, replace_private

logger = logging.getLogger("flowcore.scheduler")

FORMAT = 1


def state_path(state_dir: str, port: int) -> str:
    """Where the head listening on ``port`` keeps its tables."""
    return os.path.join(state_dir, f"head-{port}")


def _write_atomic(path: str, data: bytes) -> None:
    replace_private(path, data)


class TableFiles:
    """Reads and writes one head's persisted tables."""

    def __init__(self, path: str):
        self.path = path
        self.functions_dir = os.path.join(path, "functions")
        self._last: bytes | None = None
        self._written: set[bytes] = set()

    def load(self) -> tuple[dict[str, Any], dict[bytes, dict]] | None:
        """The tables and functions a previous head left, or None."""
        try:
            with open(os.path.join(self.path, "tables.msgpack"), "rb") as f:
                tables = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, msgpack.UnpackException) as e:
            logger.warning("cannot read the persisted tables in %s (%s): starting without them",
                           self.path, e)
            return None
        if not isinstance(tables, dict) or tables.get("format") != FORMAT:
            logger.warning("the persisted tables in %s have an unknown format: starting "
                           "without them", self.path)
            return None
        functions: dict[bytes, dict] = {}
        try:
            names = os.listdir(self.functions_dir)
        except FileNotFoundError:
            names = []
        for name in names:
            if name.endswith(".tmp"):
                continue
            try:
                fid = bytes.fromhex(name)
                with open(os.path.join(self.functions_dir, name), "rb") as f:
                    rec = msgpack.unpackb(f.read(), raw=False)
            except (OSError, ValueError, msgpack.UnpackException) as e:
                logger.warning("skipping persisted function %s: %s", name, e)
                continue
            functions[fid] = {"blob": rec["blob"], "name": rec.get("name", "")}
        self._written = set(functions)
        return tables, functions

    def save(self, tables: dict[str, Any], functions: dict[bytes, dict]) -> bool:
        """Write what changed since the last save; True if anything was written."""
        wrote = False
        new = [] if len(functions) == len(self._written) else \
            [fid for fid in functions if fid not in self._written]
        if new or self._last is None:
            make_private_dir(self.functions_dir)  # and head-PORT, 0700 too
        for fid in new:
            f = functions[fid]
            _write_atomic(os.path.join(self.functions_dir, fid.hex()),
                          msgpack.packb({"blob": f["blob"], "name": f.get("name", "")}))
            self._written.add(fid)
            wrote = True
        data = msgpack.packb(dict(tables, format=FORMAT), use_bin_type=True)
        if data != self._last:
            _write_atomic(os.path.join(self.path, "tables.msgpack"), data)
            self._last = data
            wrote = True
        return wrote

    def clear(self) -> None:
        """Forget everything (a clean stop: nothing persisted survives it)."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._last = None
        self._written = set()
