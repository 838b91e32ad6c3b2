"""Dask collections on flowcore: the same results as Dask's own threaded
scheduler, each Dask task a flowcore task named by its key."""
from __future__ import annotations

import os
import signal

import pytest

if os.environ.get("CI") != "true":
    pytest.importorskip("dask")
    pytest.importorskip("pandas")

import dask  # noqa: E402
import dask.threaded  # noqa: E402
import dask.array as da  # noqa: E402
import dask.bag as db  # noqa: E402
import dask.dataframe as dd  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import flowcore  # noqa: E402
from flowcore.testing import Signal  # noqa: E402
from flowcore.util.dask import (disable_dask_on_flowcore, enable_dask_on_flowcore,  # noqa: E402
                                flowcore_dask_get)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def dcluster(tmp_path_factory):
    flowcore.shutdown()
    flowcore.init(num_cpus=2, object_store_memory=256 << 20,
                  session_dir=str(tmp_path_factory.mktemp("dask")))
    yield
    flowcore.shutdown()


def test_array_reduction_matches_threaded(dcluster):
    x = da.random.RandomState(42).random_sample((1200, 1200), chunks=300)
    expr = (x + x.T).mean(axis=0)
    ours = expr.compute(scheduler=flowcore_dask_get)
    theirs = expr.compute(scheduler="threads")
    np.testing.assert_allclose(ours, theirs)
    assert ours.shape == (1200,)
    a, b = dask.compute(x.std(), x[::7, 3].sum(), scheduler=flowcore_dask_get)
    np.testing.assert_allclose([a, b], dask.compute(x.std(), x[::7, 3].sum(),
                                                    scheduler="threads"))


def test_dataframe_groupby_matches_threaded(dcluster):
    rng = np.random.default_rng(0)
    pdf = pd.DataFrame({"k": rng.integers(0, 7, 2000), "v": rng.normal(size=2000),
                        "w": rng.integers(0, 100, 2000)})
    ddf = dd.from_pandas(pdf, npartitions=4)
    expr = ddf.groupby("k").agg({"v": "mean", "w": "sum"})
    with dask.config.set(scheduler=flowcore_dask_get):
        ours = expr.compute()
        counts = ddf.k.value_counts().compute()
    theirs = expr.compute(scheduler="threads")
    pd.testing.assert_frame_equal(ours.sort_index(), theirs.sort_index())
    pd.testing.assert_series_equal(counts.sort_index(), pdf.k.value_counts().sort_index())


def test_delayed_graph_and_bag_match_threaded(dcluster):
    @dask.delayed
    def inc(x):
        return x + 1

    @dask.delayed
    def add(a, b):
        return a + b

    layer = [inc(i) for i in range(10)]
    total = layer[0]
    for item in layer[1:]:
        total = add(total, item)
    both = add(total, inc(total))  # a diamond
    assert both.compute(scheduler=flowcore_dask_get) == both.compute(scheduler="threads") == 111
    bag = db.from_sequence(range(100), npartitions=5).map(lambda v: v % 7).frequencies()
    assert sorted(bag.compute(scheduler=flowcore_dask_get)) == \
        sorted(bag.compute(scheduler="threads"))


def test_tasks_are_named_by_dask_keys_and_persist_keeps_refs(dcluster):
    x = da.ones((400, 400), chunks=200) * 3
    with enable_dask_on_flowcore():
        kept = x.persist()
        held = list(dict(kept.__dask_graph__()).values())
        assert len(held) == 4 and all(isinstance(v, flowcore.ObjectRef) for v in held)
        (here,) = dask.persist(x, flowcore_persist=False)  # values brought here instead
        assert all(isinstance(v, np.ndarray) for v in dict(here.__dask_graph__()).values())
        df = dd.from_pandas(pd.DataFrame({"a": range(10)}), npartitions=2).persist()
        assert any(isinstance(v, flowcore.ObjectRef) for v in dict(df.__dask_graph__()).values())
        assert int(df.a.sum().compute()) == 45
        # later graphs read the persisted chunks from the store, even where
        # Dask's optimizer fused them into a task
        assert float((kept + 1).sum().compute()) == 400 * 400 * 4.0
    assert dask.config.get("scheduler", None) is None
    names = {t["name"] for t in flowcore.state.list_tasks()}
    for k in flatten_keys(x.__dask_keys__()):
        assert str(k) in names
    # the graph picture labels tasks with their keys too
    y = (da.ones((100, 100), chunks=50) + 2).sum()
    refs = flowcore_dask_get(dict(y.__dask_graph__()), y.__dask_keys__(),
                             flowcore_persist=True)
    assert str(y.__dask_keys__()[0]) in flowcore.visualize(refs).source
    assert float(flowcore.get(refs[0])) == 100 * 100 * 3.0
    enable_dask_on_flowcore()
    try:
        assert dask.config.get("scheduler") is flowcore_dask_get
    finally:
        disable_dask_on_flowcore()


def flatten_keys(keys):
    for k in keys:
        if isinstance(k, list):
            yield from flatten_keys(k)
        else:
            yield k


def test_a_worker_killed_mid_graph_is_retried(dcluster, tmp_path):
    sig = Signal()
    pid_file = str(tmp_path / "pid")

    def slow_once(part, pid_file, sig):
        if not os.path.exists(pid_file):
            with open(pid_file, "w") as f:
                f.write(str(os.getpid()))
            sig.wait()  # the test kills this worker here
        with open(pid_file) as f:
            assert int(f.read()) != os.getpid()  # this is the retry, in another worker
        return part * 10

    parts = [dask.delayed(lambda i: i + 1)(i) for i in range(4)]
    mid = dask.delayed(slow_once)(dask.delayed(sum)(parts), pid_file, sig)
    out = dask.delayed(lambda v: v + 1)(mid)
    fut = flowcore_dask_get(dict(out.__dask_graph__()), [out.key], flowcore_persist=True)[0]
    sig.wait_for_waiters(1, timeout=60)
    with open(pid_file) as f:
        os.kill(int(f.read()), signal.SIGKILL)
    assert flowcore.get(fut, timeout=90) == (1 + 2 + 3 + 4) * 10 + 1


def test_graph_errors_are_clear(dcluster):
    with pytest.raises(KeyError, match="not in the graph"):
        flowcore_dask_get({"a": 1}, ["b"])
    from dask._task_spec import Task, TaskRef
    with pytest.raises(KeyError, match="does not contain"):
        flowcore_dask_get({"a": Task("a", len, TaskRef("missing"))}, ["a"])
    # only what the wanted keys need runs: the failing task is culled
    graph = {"a": 1, "b": (int.__add__, "a", 2), "bad": (divmod, "a", 0)}
    assert flowcore_dask_get(graph, ["b"]) == [3]
    # a task's error is raised as its own class, as with Dask's schedulers
    with pytest.raises(ZeroDivisionError):
        dask.threaded.get(graph, ["bad"])
    with pytest.raises(ZeroDivisionError):
        flowcore_dask_get(graph, ["bad"])
