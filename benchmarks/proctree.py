"""Process-tree helpers: PSS accounting and clean-up of descendant processes.

Processes are only ever signalled by pid, after checking that the pid still
belongs to the same process (same create_time) that was recorded earlier.
"""

import time

import psutil

MiB = 1 << 20


def pss_bytes(proc):
    """PSS of one process (falls back to RSS when PSS is not readable)."""
    try:
        return proc.memory_full_info().pss, "pss"
    except (psutil.AccessDenied, AttributeError, OSError):
        return proc.memory_info().rss, "rss"


def tree_memory(root=None):
    """Sum of PSS over ``root`` (default: this process) and all its descendants."""
    root = root or psutil.Process()
    procs = [root]
    try:
        procs += root.children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    total, kinds, detail = 0, set(), []
    for p in procs:
        try:
            b, kind = pss_bytes(p)
            name = p.name()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        total += b
        kinds.add(kind)
        detail.append({"pid": p.pid, "name": name, "mib": round(b / MiB, 1)})
    return total, sorted(kinds), detail


def snapshot_descendants(root_pid, known):
    """Add descendants of root_pid to ``known`` ({pid: (create_time, name)})."""
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return known
    for c in children:
        try:
            known.setdefault(c.pid, (c.create_time(), c.name()))
        except psutil.Error:
            pass
    return known


def _same_process(pid, create_time):
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - create_time) > 0.01:
            return None
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except psutil.Error:
        return None


def alive(known):
    """The processes of ``known`` that still exist (same pid *and* create_time)."""
    out = []
    for pid, (ct, _name) in known.items():
        p = _same_process(pid, ct)
        if p is not None:
            out.append(p)
    return out


def reap(known, grace=5.0, ignore=()):
    """Wait up to ``grace`` s for recorded processes to exit, then terminate (and
    if needed kill) the survivors one by one, by pid. Processes whose command line
    contains one of ``ignore`` are left alone. Returns descriptions of the
    processes that had to be stopped."""
    deadline = time.monotonic() + grace
    survivors = alive(known)
    while survivors and time.monotonic() < deadline:
        time.sleep(0.2)
        survivors = alive(known)
    stopped, victims = [], []
    for p in survivors:
        try:
            cmd = " ".join(p.cmdline())[:160] or p.name()
        except psutil.Error:
            continue
        if any(s in cmd for s in ignore):
            continue
        stopped.append(f"pid {p.pid}: {cmd}")
        victims.append(p)
        try:
            p.terminate()
        except psutil.Error:
            pass
    if victims:
        _gone, still = psutil.wait_procs(victims, timeout=3)
        for p in still:
            try:
                p.kill()
            except psutil.Error:
                pass
    return stopped
