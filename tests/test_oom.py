"""OomWatch: which counter rose decides the words (files stand in for the kernel's)."""
from __future__ import annotations

import pytest

from flowcore.node.oom import OomWatch, _cgroup_counter_files

pytestmark = pytest.mark.timeout(10)


def _write(path, n):
    path.write_text(f"pgfault 5\noom_kill {n}\nother 1\n")


def test_no_rise_no_oom(tmp_path):
    vm, cg = tmp_path / "vmstat", tmp_path / "memory.events"
    _write(vm, 3), _write(cg, 1)
    w = OomWatch(str(vm), [str(cg)])
    assert w.explain_sigkill() is None


def test_cgroup_rise_is_certain_machine_rise_is_likely(tmp_path):
    vm, cg = tmp_path / "vmstat", tmp_path / "memory.events"
    _write(vm, 3), _write(cg, 1)
    w = OomWatch(str(vm), [str(cg)])
    _write(vm, 4), _write(cg, 2)
    assert w.explain_sigkill().startswith("by the kernel's out-of-memory killer")
    assert w.explain_sigkill() is None  # counted once
    _write(vm, 5)
    assert w.explain_sigkill().startswith("most likely")


def test_old_kills_are_forgotten_by_observe(tmp_path):
    vm = tmp_path / "vmstat"
    _write(vm, 0)
    w = OomWatch(str(vm), [])
    _write(vm, 7)
    w.observe()
    assert w.explain_sigkill() is None


def test_missing_files_mean_unknown(tmp_path):
    w = OomWatch(str(tmp_path / "nope"), [str(tmp_path / "nope2")])
    assert w.explain_sigkill() is None


def test_cgroup_files_v1_and_v2(tmp_path):
    root = tmp_path / "cg"
    (root / "memory" / "a" / "b").mkdir(parents=True)
    (root / "memory" / "a" / "b" / "memory.oom_control").write_text("oom_kill 0\n")
    (root / "x").mkdir()
    (root / "x" / "memory.events").write_text("oom_kill 0\n")
    pc = tmp_path / "cgroup"
    pc.write_text("4:memory:/a/b\n0::/x\n3:cpu:/zz\n")
    files = _cgroup_counter_files(str(pc), str(root))
    assert sorted(files) == sorted([str(root / "memory" / "a" / "b" / "memory.oom_control"),
                                    str(root / "x" / "memory.events")])
