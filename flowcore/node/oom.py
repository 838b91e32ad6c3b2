"""Telling an out-of-memory kill apart from any other SIGKILL.

A process the kernel's OOM killer ends looks, to its parent, exactly like one
killed by ``kill -9``.  The kernel does count its OOM kills, though: in
``/proc/vmstat`` (``oom_kill``, every kill on the machine, memory-cgroup ones
included) and per memory cgroup (cgroup v2 ``memory.events``, cgroup v1
``memory.oom_control``).  A node keeps the last counts it saw; when a worker
dies of SIGKILL and a count has risen since, the death is reported as an OOM
kill.  The counters are machine- or cgroup-wide, so the report says "most
likely" when only the machine-wide count rose.
"""
from __future__ import annotations

import os


def _read_counter(path: str, key: str = "oom_kill") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        return None
    return None


def _cgroup_counter_files(proc_cgroup: str = "/proc/self/cgroup",
                          root: str = "/sys/fs/cgroup") -> list[str]:
    """The OOM counter files of this process's memory cgroup (v2 or v1)."""
    out: list[str] = []
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2 unified hierarchy
            out.append(os.path.join(root, path.lstrip("/"), "memory.events"))
        elif "memory" in controllers.split(","):
            out.append(os.path.join(root, "memory", path.lstrip("/"), "memory.oom_control"))
    return [p for p in out if os.path.exists(p)]


class OomWatch:
    """Remembers the kernel's OOM-kill counts and says whether they rose."""

    def __init__(self, vmstat: str = "/proc/vmstat", cgroup_files: list[str] | None = None):
        self.vmstat = vmstat
        self.cgroup_files = (_cgroup_counter_files() if cgroup_files is None
                             else list(cgroup_files))
        self._last: dict[str, int | None] = {}
        self.observe()

    def _counts(self) -> dict[str, int | None]:
        counts = {self.vmstat: _read_counter(self.vmstat)}
        for path in self.cgroup_files:
            counts[path] = _read_counter(path)
        return counts

    def observe(self) -> dict[str, int]:
        """Read the counters; return those that rose since the last read."""
        now = self._counts()
        last = self._last
        rose = {p: v for p, v in now.items()
                if v is not None and (was := last.get(p)) is not None and v > was}
        self._last = now
        return rose

    def explain_sigkill(self) -> str | None:
        """After a SIGKILL death: words naming an OOM kill, or None."""
        rose = self.observe()
        if not rose:
            return None
        if any(p != self.vmstat for p in rose):
            return "by the kernel's out-of-memory killer (this node's memory cgroup ran out)"
        return ("most likely by the kernel's out-of-memory killer (the machine's OOM-kill "
                "count rose at the same time)")
