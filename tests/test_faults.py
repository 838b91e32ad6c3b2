"""Crashes, cancellation, resources and process hygiene, each on a private cluster."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import psutil
import pytest

import flowcore
from flowcore.exceptions import TaskCancelledError, WorkerCrashedError
from flowcore.testing import Signal

pytestmark = pytest.mark.timeout(90)


def _store_stats():
    return flowcore.context.current_client().request("node", {"op": "stats"})["store"]


def test_spill_and_restore_when_store_is_full(fresh_cluster):
    fresh_cluster(object_store_memory=64 << 20)
    refs = [flowcore.put(np.full(2_000_000, i, dtype=np.float64)) for i in range(12)]  # 192 MB
    stats = _store_stats()
    assert stats["num_spilled"] > 0 or stats["fallback_bytes"] > 0
    for i, r in enumerate(refs):
        assert flowcore.get(r)[0] == i


def test_pinned_store_falls_back_to_disk(fresh_cluster):
    fresh_cluster(object_store_memory=32 << 20)
    views = [flowcore.get(flowcore.put(np.full(1_000_000, i, dtype=np.float64)))
             for i in range(6)]  # 48 MB pinned by live views
    assert _store_stats()["fallback_bytes"] > 0
    assert [v[0] for v in views] == list(range(6))


def test_worker_crash_is_retried_then_reported(fresh_cluster, tmp_path):
    fresh_cluster()
    marker = tmp_path / "attempts"

    @flowcore.remote(max_retries=2)
    def crash_twice(path):
        with open(path, "a") as f:
            f.write("x")
        if len(open(path).read()) < 3:
            os._exit(7)
        return "survived"
    assert flowcore.get(crash_twice.remote(str(marker)), timeout=60) == "survived"
    assert marker.read_text() == "xxx"

    @flowcore.remote(max_retries=1)
    def always_crash():
        os.kill(os.getpid(), signal.SIGKILL)
    with pytest.raises(WorkerCrashedError) as ei:
        flowcore.get(always_crash.remote(), timeout=60)
    assert "SIGKILL" in str(ei.value) and "always_crash" in str(ei.value)

    @flowcore.remote(max_retries=0)
    def exit_code():
        os._exit(3)
    with pytest.raises(WorkerCrashedError, match="code 3"):
        flowcore.get(exit_code.remote(), timeout=60)

    # the node replaced its workers and keeps serving
    @flowcore.remote
    def ok():
        return os.getpid()
    assert len(set(flowcore.get([ok.remote() for _ in range(4)], timeout=60))) >= 1


def test_retry_exceptions(fresh_cluster, tmp_path):
    fresh_cluster()
    marker = tmp_path / "n"

    @flowcore.remote(retry_exceptions=[KeyError], max_retries=3)
    def flaky(path):
        with open(path, "a") as f:
            f.write("x")
        if len(open(path).read()) < 3:
            raise KeyError("not yet")
        return "done"
    assert flowcore.get(flaky.remote(str(marker)), timeout=60) == "done"

    @flowcore.remote(max_retries=3)
    def not_retried(path):
        with open(path, "a") as f:
            f.write("y")
        raise KeyError("app error")
    m2 = tmp_path / "m2"
    with pytest.raises(KeyError):
        flowcore.get(not_retried.remote(str(m2)), timeout=60)
    assert m2.read_text() == "y"


def test_cancel_queued_running_and_forced(fresh_cluster):
    fresh_cluster(num_cpus=1)
    sig = Signal()

    @flowcore.remote
    def hold(s):
        s.wait()
        return "released"

    running = hold.remote(sig)
    sig.wait_for_waiters(1)
    queued = hold.remote(sig)  # cannot start: the only CPU is busy
    flowcore.cancel(queued)
    with pytest.raises(TaskCancelledError):
        flowcore.get(queued, timeout=30)
    flowcore.cancel(running)
    with pytest.raises(TaskCancelledError):
        flowcore.get(running, timeout=30)

    @flowcore.remote
    def stubborn(s):
        try:
            s.wait()
        except KeyboardInterrupt:
            s.wait()  # ignores the polite cancel
        return "never"
    r = stubborn.remote(sig)
    sig.wait_for_waiters(2)
    flowcore.cancel(r, force=True)
    with pytest.raises(TaskCancelledError):
        flowcore.get(r, timeout=30)
    sig.set()

    @flowcore.remote
    def fine():
        return 1
    assert flowcore.get(fine.remote(), timeout=30) == 1
    assert "CANCELLED" in {t["state"] for t in flowcore.state.list_tasks()}


@pytest.mark.parametrize("recursive", [True, False])
def test_cancel_reaches_the_tasks_a_task_submitted(fresh_cluster, recursive):
    fresh_cluster(num_cpus=2)
    sig = Signal()

    @flowcore.remote
    def child(s):
        s.wait()
        return "child done"

    @flowcore.remote
    def parent(s):
        return flowcore.get([child.remote(s) for _ in range(3)])

    p = parent.remote(sig)
    sig.wait_for_waiters(2)  # two children run (the parent gave its CPU back), one queued

    kids = {t["task_id"] for t in flowcore.state.list_tasks() if t["name"].endswith("child")}
    assert len(kids) == 3
    flowcore.cancel(p, recursive=recursive)
    with pytest.raises(TaskCancelledError):
        flowcore.get(p, timeout=30)
    if not recursive:
        sig.set()  # the children were left alone: they finish

    def ends() -> dict[str, tuple[str, str]]:  # child -> (final state, cause)
        return {e["task_id"]: (e["to"], e["cause"]) for e in flowcore.state.task_events(5000)
                if e["task_id"] in kids and e["to"] in ("CANCELLED", "FINISHED")}
    deadline = time.monotonic() + 30
    while len(ends()) < 3 and time.monotonic() < deadline:
        pass  # running children stop at their cancel / finish after the signal
    final = ends()
    if recursive:
        assert {state for state, _ in final.values()} == {"CANCELLED"} and len(final) == 3
    else:
        assert {state for state, _ in final.values()} == {"FINISHED"} and len(final) == 3
    sig.set()


def test_resources_custom_gpu_and_infeasible(fresh_cluster):
    fresh_cluster(num_cpus=2, num_gpus=2, resources={"disk": 1})
    res = flowcore.cluster_resources()
    assert res.pop("memory") > 0  # the machine's available memory, by default
    assert res == {"CPU": 2.0, "GPU": 2.0, "disk": 1.0}

    @flowcore.remote(num_gpus=1)
    def gpu():
        return flowcore.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")
    ids, env = flowcore.get(gpu.remote(), timeout=30)
    assert len(ids) == 1 and env == str(ids[0])

    @flowcore.remote(num_gpus=2)
    def two_gpus():
        return sorted(flowcore.get_gpu_ids())
    assert flowcore.get(two_gpus.remote(), timeout=30) == [0, 1]

    sig = Signal()

    @flowcore.remote(resources={"disk": 1})
    def uses_disk(s):
        s.wait()
        return flowcore.get_runtime_context().get_task_id()
    a = uses_disk.remote(sig)
    sig.wait_for_waiters(1)
    b = uses_disk.remote(sig)  # waits: only one "disk"
    assert flowcore.available_resources().get("disk", 0) == 0
    ready, _ = flowcore.wait([b], timeout=0.3)
    assert ready == []
    sig.set()
    assert len(set(flowcore.get([a, b], timeout=30))) == 2

    with pytest.warns(RuntimeWarning, match="no node"):
        big = flowcore.remote(num_cpus=64)(lambda: 1).remote()
        ready, not_ready = flowcore.wait([big], timeout=0.5)
        flowcore.cluster_resources()  # let the warning arrive
    assert not_ready == [big]
    assert [t["state"] for t in flowcore.state.list_tasks(state="INFEASIBLE")]


def test_function_from_unimportable_module_is_shipped_by_value(fresh_cluster, tmp_path):
    fresh_cluster()
    mod_dir = tmp_path / "private_mods"
    mod_dir.mkdir()
    (mod_dir / "secretmod.py").write_text("def triple(x):\n    return 3 * x\n")
    sys.path.insert(0, str(mod_dir))
    try:
        import secretmod
        f = flowcore.remote(secretmod.triple)
        assert flowcore.get(f.remote(5), timeout=30) == 15
    finally:
        sys.path.remove(str(mod_dir))
        sys.modules.pop("secretmod", None)


DRIVER = textwrap.dedent("""
    import os, sys, time
    import flowcore
    flowcore.init(num_cpus=2, object_store_memory=64 << 20, session_dir=sys.argv[1])
    import numpy as np
    keep = flowcore.put(np.ones(1_000_000))
    @flowcore.remote
    def forever():
        import threading
        threading.Event().wait()
    ref = forever.remote()
    mode = sys.argv[2]
    if mode == "interrupt":
        try:
            # the test's Ctrl-C may come as soon as READY is out: still in here
            print("READY", flush=True)
            flowcore.get(ref)
        except KeyboardInterrupt:
            print("INTERRUPTED", flush=True)
        @flowcore.remote
        def after():
            return 5
        # the cluster survived the Ctrl-C
        print("AFTER", flowcore.get(after.remote(), timeout=30), flush=True)
        flowcore.shutdown()
    else:
        print("READY", flush=True)
        flowcore.get(ref)
""")


def _descendants(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _run_driver(tmp_path, mode):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    # a name of its own: the shared-memory check below matches on it
    session = tmp_path / f"sess{uuid.uuid4().hex[:8]}"
    p = subprocess.Popen([sys.executable, str(script), str(session), mode],
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip() == "READY", line
    return p, session


def test_ctrl_c_interrupts_get_without_killing_cluster(tmp_path):
    p, _ = _run_driver(tmp_path, "interrupt")
    flowcore_children = _descendants(p.pid)
    assert flowcore_children
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=60)
    assert "INTERRUPTED" in out and "AFTER 5" in out
    assert p.returncode == 0
    gone, alive = psutil.wait_procs(flowcore_children, timeout=20)
    assert not alive


def test_killed_driver_leaves_nothing_behind(tmp_path):
    p, session = _run_driver(tmp_path, "kill")
    children = _descendants(p.pid)
    assert len(children) >= 3  # head, node, worker(s)
    mine = f"flowcore-{os.path.basename(session)}-"
    segs = [s for s in os.listdir("/dev/shm") if mine in s]
    assert segs
    p.kill()
    p.wait(10)
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"still running after the driver died: {alive}"
    assert not [s for s in os.listdir("/dev/shm") if mine in s]


def test_memory_guard_kills_a_runaway_worker_and_says_so(fresh_cluster):
    fresh_cluster(num_cpus=1, worker_memory_limit=400 << 20)
    sig = Signal()

    @flowcore.remote(max_retries=0)
    def hog(s):
        big = np.ones(600 << 17)  # 600 MiB, touched
        s.wait()
        return big.sum()
    ref = hog.remote(sig)
    with pytest.raises(WorkerCrashedError) as ei:
        flowcore.get(ref, timeout=60)
    assert "memory limit" in str(ei.value) and "400 MiB" in str(ei.value)
    sig.set()

    @flowcore.remote
    def fine():
        return 1
    assert flowcore.get(fine.remote(), timeout=60) == 1  # the node carries on


def _child_memory_cgroup(name: str) -> tuple[str, dict[str, str]]:
    """A new memory cgroup under this process's own (v2 or v1) and the files
    that cap it at 64 MiB without swap.  The tests run as root (CI does)."""
    for line in open("/proc/self/cgroup").read().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            d = os.path.join("/sys/fs/cgroup", path.lstrip("/"), name)
            return d, {"memory.max": str(64 << 20), "memory.swap.max": "0"}
        if "memory" in controllers.split(","):
            d = os.path.join("/sys/fs/cgroup/memory", path.lstrip("/"), name)
            return d, {"memory.limit_in_bytes": str(64 << 20),
                       "memory.memsw.limit_in_bytes": str(64 << 20)}
    raise AssertionError("no memory cgroup found in /proc/self/cgroup")


def test_kernel_oom_kill_is_named(fresh_cluster):
    """A worker the kernel's OOM killer ends (here inside a 64 MiB memory
    cgroup of its own, so nothing else is at risk) is reported as such."""
    fresh_cluster(num_cpus=1)
    cg, limits = _child_memory_cgroup(f"flowcore-oom-test-{os.getpid()}")
    os.makedirs(cg)
    try:
        @flowcore.remote(max_retries=0)
        def blow_up(cg, limits):
            import os
            for f, v in limits.items():
                if os.path.exists(os.path.join(cg, f)):
                    with open(os.path.join(cg, f), "w") as fh:
                        fh.write(v)
            with open(os.path.join(cg, "cgroup.procs"), "w") as fh:
                fh.write(str(os.getpid()))
            return np.ones(256 << 17).sum()  # 256 MiB, touched
        with pytest.raises(WorkerCrashedError) as ei:
            flowcore.get(blow_up.remote(cg, limits), timeout=60)
        text = str(ei.value)
        assert "SIGKILL" in text and "out-of-memory killer" in text, text

        @flowcore.remote
        def fine():
            return 1
        assert flowcore.get(fine.remote(), timeout=60) == 1
    finally:
        os.rmdir(cg)
