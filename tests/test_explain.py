"""flowcore.explain(ref) and the warning of a long get()."""
from __future__ import annotations

import pytest

import flowcore
from flowcore.testing import Signal

pytestmark = pytest.mark.timeout(60)


def test_explain_each_state(fresh_cluster):
    fresh_cluster(num_cpus=2, resources={"slot": 1})
    sig = Signal()
    running = sig.wait_task.options(resources={"slot": 1}).remote()
    sig.wait_for_waiters(1)
    e = flowcore.explain(running)
    assert e["state"] == "RUNNING" and "running on node" in e["text"]
    assert [ev["to"] for ev in e["events"]][-1] == "RUNNING"

    @flowcore.remote(resources={"slot": 1})
    def after(x):
        return x
    queued = after.remote(1)
    e = flowcore.explain(queued)
    assert "queued for resources" in e["text"] and "1 of 1 node(s) could ever run it" in e["text"]
    waiting = after.remote(running)
    e = flowcore.explain(waiting)
    assert e["state"] == "WAITING_FOR_ARGS" and running.hex() in e["waiting_for"]
    assert "waiting for 1 argument" in e["text"] and "RUNNING" in e["text"]

    huge = flowcore.remote(num_gpus=8)(lambda: 1)  # no node has GPUs
    with pytest.warns(RuntimeWarning):
        impossible = huge.remote()
        flowcore.wait([impossible], timeout=0.2)
        flowcore.cluster_resources()
    e = flowcore.explain(impossible)
    assert e["state"] == "INFEASIBLE" and "infeasible" in e["text"]
    sig.set()
    assert flowcore.get(waiting, timeout=30) is True
    assert flowcore.get(queued, timeout=30) == 1
    assert flowcore.explain(waiting)["state"] == "READY"
    with pytest.raises(TypeError):
        flowcore.explain("nope")


def test_long_get_warns_once_with_the_reason(fresh_cluster, monkeypatch):
    import flowcore.client.object_io as object_io
    fresh_cluster(num_cpus=2, resources={"slot": 1})
    monkeypatch.setattr(object_io, "GET_WARN_AFTER", 0.3)
    sig = Signal()
    blocker = sig.wait_task.options(resources={"slot": 1}).remote()
    sig.wait_for_waiters(1)
    stuck = flowcore.remote(resources={"slot": 1})(lambda: 2).remote()  # behind the blocker
    with pytest.warns(RuntimeWarning, match="still waiting .* queued for resources") as rec:
        with pytest.raises(flowcore.exceptions.GetTimeoutError):
            flowcore.get(stuck, timeout=1.0)
    assert len([w for w in rec if "still waiting" in str(w.message)]) == 1
    sig.set()
    assert flowcore.get([blocker, stuck], timeout=30) == [True, 2]
