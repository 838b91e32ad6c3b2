"""Old embedded session directories are pruned, never one whose driver runs."""
from __future__ import annotations

import os

from flowcore import cluster


def test_prune_keeps_live_sessions_and_removes_dead_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster.tempfile, "gettempdir", lambda: str(tmp_path))
    live = tmp_path / f"{cluster.SESSION_PREFIX}live"
    dead = tmp_path / f"{cluster.SESSION_PREFIX}dead"
    unknown = tmp_path / f"{cluster.SESSION_PREFIX}old"
    newest = tmp_path / f"{cluster.SESSION_PREFIX}new"
    for d in (live, dead, unknown, newest):
        d.mkdir()
    (live / "driver.pid").write_text(str(os.getpid()))
    (dead / "driver.pid").write_text("999999999")
    for d in (live, dead, unknown):
        os.utime(d, (1, 1))
    cluster.prune_old_sessions(keep=1)
    assert live.is_dir() and newest.is_dir()
    assert not dead.exists() and not unknown.exists()
