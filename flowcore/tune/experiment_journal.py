"""The experiment's append-only journal.

Every change of experiment state (a trial added, a result, a checkpoint,
a status change, a new config) is one JSON line appended as it happens, so
a restore after any crash replays everything that was recorded; there is
no snapshot file to go stale.  On a local disk the lines go to one file
(``experiment_journal.jsonl``, appended with O_APPEND); filesystems that
cannot append (object stores) get numbered segment files
(``experiment_journal-000001.jsonl``...), each written once.  A torn last
line (the driver killed mid-write) is skipped on reading.
"""
from __future__ import annotations

import base64
import json
import math
import os
import time
from typing import Any

import cloudpickle
import numpy as np

from . import storage

__all__ = ["ExperimentJournal", "read_journal", "encode_obj", "decode_obj", "to_json"]

JOURNAL_FILE = "experiment_journal.jsonl"


def _default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray) and o.size <= 64:
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return repr(o)


def _finite(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return {"__float__": repr(o)}
    if isinstance(o, dict):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _restore_floats(o: Any) -> Any:
    if isinstance(o, dict):
        if len(o) == 1 and "__float__" in o:
            return float(o["__float__"])
        return {k: _restore_floats(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_restore_floats(v) for v in o]
    return o


def to_json(obj: Any) -> str:
    return json.dumps(obj, default=_default)


def encode_obj(obj: Any) -> str:
    return base64.b64encode(cloudpickle.dumps(obj)).decode()


def decode_obj(text: str) -> Any:
    return cloudpickle.loads(base64.b64decode(text))


class ExperimentJournal:
    """Appends records to the journal of the experiment at ``path``."""

    def __init__(self, fs: Any, path: str, flush_interval: float = 1.0):
        self.fs = fs
        self.path = path
        self.local = storage.is_local(fs)
        self.fd: int | None = None
        self.buffer: list[str] = []
        self.flush_interval = flush_interval
        self.last_flush = time.monotonic()
        if self.local:
            storage.private_makedirs(path)
            self.fd = os.open(os.path.join(path, JOURNAL_FILE),
                              os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        else:
            self.segment = len([n for n in storage.list_dir(fs, path)
                                if n.startswith("experiment_journal-")])

    def append(self, kind: str, **fields: Any) -> None:
        fields["t"] = kind
        line = json.dumps(_finite(fields), default=_default) + "\n"
        if self.fd is not None:
            os.write(self.fd, line.encode())
        else:
            self.buffer.append(line)
            if time.monotonic() - self.last_flush >= self.flush_interval:
                self.flush()

    def flush(self) -> None:
        if self.fd is not None or not self.buffer:
            return
        self.segment += 1
        storage.write_bytes(self.fs, storage.join(
            self.path, f"experiment_journal-{self.segment:06d}.jsonl"),
            "".join(self.buffer).encode())
        self.buffer.clear()
        self.last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def read_journal(fs: Any, path: str) -> list[dict]:
    """Every complete record of the journal at ``path``, oldest first."""
    names = storage.list_dir(fs, path)
    files = ([JOURNAL_FILE] if JOURNAL_FILE in names else []) + sorted(
        n for n in names if n.startswith("experiment_journal-"))
    records: list[dict] = []
    for name in files:
        text = storage.read_bytes(fs, storage.join(path, name)).decode(errors="replace")
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                records.append(_restore_floats(json.loads(line)))
            except json.JSONDecodeError:
                continue  # a line torn by a crash
    return records
