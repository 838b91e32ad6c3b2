"""Every file and directory flowcore creates is private (0600/0700), in a
session_dir= and a --state-dir outside the temp dir too; a clean stop leaves
no empty spill directory and no stale address file; old sessions are pruned
by age and count, never a live one."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

import flowcore
from flowcore import cluster
from flowcore.private_files import make_private_dir, open_private, write_private

BIN = os.path.dirname(sys.executable)


def modes(root):
    """(path, mode) of everything under root, root included."""
    out = [(str(root), stat.S_IMODE(os.stat(root).st_mode))]
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                out.append((p, stat.S_IMODE(os.stat(p).st_mode)))
    return out


def assert_private(root):
    wide = [(p, oct(m)) for p, m in modes(root)
            if m != (0o700 if os.path.isdir(p) else 0o600)]
    assert not wide, f"not private: {wide}"


def test_helpers_narrow_what_exists_and_make_parents_private(tmp_path):
    os.umask(0o022)
    d = make_private_dir(tmp_path / "a" / "b" / "c")
    assert_private(tmp_path / "a")
    wide = tmp_path / "wide"
    wide.mkdir(mode=0o755)
    make_private_dir(wide)
    assert stat.S_IMODE(wide.stat().st_mode) == 0o700
    f = wide / "f"
    f.write_text("x")
    os.chmod(f, 0o644)
    os.close(open_private(f, os.O_WRONLY))
    write_private(os.path.join(d, "t"), "token")
    assert_private(wide)
    assert_private(tmp_path / "a")


@flowcore.remote
def chatty(i):
    print(f"task output {i}")
    return np.full(1 << 20, i, dtype=np.uint8)  # 1 MiB


@pytest.mark.timeout(120)
def test_session_dir_spill_and_worker_logs_are_private(tmp_path):
    flowcore.shutdown()
    session = tmp_path / "not-temp" / "session"   # parents made too
    flowcore.init(num_cpus=1, object_store_memory=16 << 20, session_dir=str(session))
    try:
        refs = [chatty.remote(i) for i in range(24)]   # 24 MiB into a 16 MiB store: spills
        assert [int(a[0]) for a in flowcore.get(refs, timeout=60)] == list(range(24))
        spills = [p for p, _ in modes(session) if "/spill-" in p and not os.path.isdir(p)]
        assert spills, "expected spilled objects"
        logs = os.listdir(session / "logs")
        assert any(name.startswith("worker") for name in logs), logs
        assert_private(tmp_path / "not-temp")
        del refs
    finally:
        flowcore.shutdown()
    assert not [e for e in os.listdir(session) if e.startswith("spill-")]
    assert_private(tmp_path / "not-temp")


def _start_head(state_dir):
    p = subprocess.Popen([os.path.join(BIN, "flowcore-scheduler"), "--port", "0",
                          "--dashboard-port", "-1", "--state-dir", str(state_dir)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if line.startswith("flowcore-scheduler: join nodes with:"):
            return p, line.split("flowcore-worker ")[1].split()[0]
    raise AssertionError("head did not start")


@pytest.mark.timeout(120)
def test_cli_state_dir_private_and_clean_stop_leaves_nothing_stale(tmp_path):
    flowcore.shutdown()
    os.umask(0o022)
    state = tmp_path / "state" / "dir"
    head, address = _start_head(state)
    node = subprocess.Popen([os.path.join(BIN, "flowcore-worker"), address, "--state-dir",
                             str(state), "--num-cpus", "1", "--object-store-memory",
                             str(32 << 20)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in node.stdout:
            if "joined" in line:
                break
        assert (state / "address").read_text().strip() == address
        assert [e for e in os.listdir(state) if e.startswith("spill-")]
        assert_private(tmp_path / "state")
    finally:
        for p in (node, head):
            p.send_signal(signal.SIGTERM)
            assert p.wait(30) == 0
    left = sorted(os.listdir(state))
    assert "address" not in left and not [e for e in left if e.startswith("spill-")], left
    assert_private(tmp_path / "state")


def _session(base, name, age, pid=None):
    d = base / f"{cluster.SESSION_PREFIX}{name}"
    d.mkdir()
    if pid is not None:
        (d / "driver.pid").write_text(str(pid))
    t = time.time() - age
    os.utime(d, (t, t))
    return d


def test_prune_by_age_and_count_never_a_live_session(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster.tempfile, "gettempdir", lambda: str(tmp_path))
    live_old = _session(tmp_path, "live-old", 10 * 86400, pid=os.getpid())
    dead_old = _session(tmp_path, "dead-old", 2 * 86400, pid=999999999)
    recent = [_session(tmp_path, f"recent{i}", 60 + i) for i in range(12)]
    cluster.prune_old_sessions()  # defaults: a day, 100 sessions
    assert live_old.is_dir() and all(d.is_dir() for d in recent)   # ten+ recent ones all kept
    assert not dead_old.exists()
    monkeypatch.setenv("FLOWCORE_SESSION_KEEP", "5")
    cluster.prune_old_sessions()
    kept = sorted(e for e in os.listdir(tmp_path))
    # the newest 5 stay, and the live one (the oldest) beyond the count
    assert kept == sorted([live_old.name] + [d.name for d in recent[:5]]), kept
    monkeypatch.setenv("FLOWCORE_SESSION_MAX_AGE", "30")
    cluster.prune_old_sessions()
    assert os.listdir(tmp_path) == [live_old.name]


def test_retention_settings_are_checked_and_described(monkeypatch):
    monkeypatch.setenv("FLOWCORE_SESSION_MAX_AGE", "7200")
    monkeypatch.setenv("FLOWCORE_SESSION_KEEP", "3")
    assert "kept 2 h after the program ends (the newest 3 at most" in cluster.describe_retention()
    monkeypatch.setenv("FLOWCORE_SESSION_MAX_AGE", "-1")
    with pytest.raises(ValueError, match="FLOWCORE_SESSION_MAX_AGE='-1'"):
        cluster.session_retention()
    monkeypatch.setenv("FLOWCORE_SESSION_MAX_AGE", "nan")
    with pytest.raises(ValueError, match="seconds >= 0"):
        cluster.session_retention()
    monkeypatch.delenv("FLOWCORE_SESSION_MAX_AGE")
    monkeypatch.setenv("FLOWCORE_SESSION_KEEP", "many")
    with pytest.raises(ValueError, match="FLOWCORE_SESSION_KEEP='many'"):
        cluster.session_retention()


def test_init_says_where_logs_are_and_how_long_they_are_kept(tmp_path):
    code = "import flowcore; flowcore.init(num_cpus=1); flowcore.shutdown()"
    env = {k: v for k, v in os.environ.items() if k != "FLOWCORE_QUIET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=90, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "/logs, kept 1 day after the program ends (the newest 100 at most" in done.stderr


def test_drawn_graph_files_are_private(tmp_path):
    """visualize/draw output (DOT text, a rendering, the DOT written beside
    when no renderer is found) is 0600, and an existing wider file is narrowed;
    the directory the user chose is left as it is."""
    import graphviz

    from flowcore.graph import draw

    os.chmod(tmp_path, 0o755)
    g = graphviz.Digraph()
    g.edge("a", "b")
    dot = tmp_path / "g.dot"
    dot.write_text("old")
    os.chmod(dot, 0o644)
    written = [draw.write(g, dot), draw.write(g, tmp_path / "g.svg")]
    for p in written:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    assert "a -> b" in dot.read_text()
    assert stat.S_IMODE(os.stat(tmp_path).st_mode) == 0o755
