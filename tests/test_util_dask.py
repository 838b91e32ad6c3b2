"""Dask collections on flowcore: the same results as Dask's own threaded
scheduler, each Dask task a flowcore task named by its key."""
from __future__ import annotations

import os
import signal
import time

import pytest

if os.environ.get("CI") != "true":
    pytest.importorskip("dask")
    pytest.importorskip("pandas")

import dask  # noqa: E402
import dask.callbacks  # noqa: E402
import dask.threaded  # noqa: E402
import dask.array as da  # noqa: E402
import dask.bag as db  # noqa: E402
import dask.dataframe as dd  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import flowcore  # noqa: E402
from flowcore.testing import Signal  # noqa: E402
from flowcore.util.dask import (FlowcoreDaskCallback, ProgressBarCallback,  # noqa: E402
                                disable_dask_on_flowcore, enable_dask_on_flowcore,
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


class _Recorder(dask.callbacks.Callback):
    """A ProgressBar-like Dask callback: what it saw, in order."""

    def __init__(self):
        super().__init__()
        self.events = []
        self.posted = []
        self.progress = []

    def _start(self, dsk):
        self.events.append("start")

    def _start_state(self, dsk, state):
        self.events.append("start_state")

    def _pretask(self, key, dsk, state):
        self.events.append(("pre", key))

    def _posttask(self, key, result, dsk, state, worker_id):
        self.events.append(("post", key))
        self.posted.append(key)
        total = sum(len(state[k]) for k in ("ready", "waiting", "running")) + \
            len(state["finished"])
        self.progress.append((len(state["finished"]), total))

    def _finish(self, dsk, state, errored):
        self.events.append(("finish", errored))


def _check_order(events):
    """start, start_state, then each key's pre before its post, then finish."""
    assert events[:2] == ["start", "start_state"] and events[-1] == ("finish", False)
    pre = {e[1]: i for i, e in enumerate(events) if isinstance(e, tuple) and e[0] == "pre"}
    post = {e[1]: i for i, e in enumerate(events) if isinstance(e, tuple) and e[0] == "post"}
    assert pre.keys() == post.keys() and all(pre[k] < post[k] for k in pre)
    return set(post)


def test_dask_local_callbacks_see_every_task(dcluster):
    """Dask's own callbacks (ProgressBar's kind) fire as the flowcore tasks
    finish and see the same keys as under Dask's threaded scheduler."""
    from dask.diagnostics import ProgressBar
    x = da.ones((400, 400), chunks=100)
    expr = (x + x.T).sum(axis=0)
    ours, theirs = _Recorder(), _Recorder()
    with ours:
        got = expr.compute(scheduler=flowcore_dask_get)
    with theirs:
        want = expr.compute(scheduler="threads")
    np.testing.assert_allclose(got, want)
    seen, expected = _check_order(ours.events), _check_order(theirs.events)
    # each compute has its own (random) finalize key; every other key is Dask's
    assert [str(k)[:9] for k in seen - expected] == ["finalize-"]
    assert [str(k)[:9] for k in expected - seen] == ["finalize-"]
    assert len(seen) == len(expected) > 16
    done, total = ours.progress[-1]
    assert done == total == len(ours.posted) == len(set(ours.posted))
    assert [d for d, _ in ours.progress] == sorted(d for d, _ in ours.progress)
    import io
    import contextlib
    out = io.StringIO()
    with contextlib.redirect_stdout(out), ProgressBar(out=out, dt=0.01):
        dask.delayed(sum)([dask.delayed(abs)(-i) for i in range(5)]).compute(
            scheduler=flowcore_dask_get)
    assert "100%" in out.getvalue()
    # a failing graph finishes with errored=True
    failing = _Recorder()
    with failing, pytest.raises(ZeroDivisionError):
        dask.delayed(lambda: 1 / 0)().compute(scheduler=flowcore_dask_get)
    assert failing.events[-1] == ("finish", True)


class _Hooks(FlowcoreDaskCallback):
    """Records the driver-side hooks here and the worker-side ones in a
    Signal-like actor (they run in the workers)."""

    def __init__(self, log, tag, short_circuit=None):
        super().__init__()
        self.log, self.tag, self.short_circuit = log, tag, short_circuit
        self.driver = []

    def _flowcore_presubmit(self, task, key, deps):
        self.driver.append(("presubmit", key))
        return self.short_circuit(key) if self.short_circuit else None

    def _flowcore_postsubmit(self, task, key, deps, object_ref):
        assert isinstance(object_ref, flowcore.ObjectRef)
        self.driver.append(("postsubmit", key))

    def _flowcore_pretask(self, key, object_refs):
        return f"{self.tag}:{key}"

    def _flowcore_posttask(self, key, result, pre_state):
        self.log.add.remote(self.tag, key, result, pre_state)

    def _flowcore_postsubmit_all(self, object_refs, dsk):
        self.driver.append(("postsubmit_all", len(dsk)))

    def _flowcore_finish(self, result):
        self.driver.append(("finish", result))


@flowcore.remote
class _Log:
    def __init__(self):
        self.rows = []

    def add(self, *row):
        self.rows.append(row)

    def get(self):
        return self.rows


def test_flowcore_dask_callback_hooks_fire_in_order(dcluster):
    log = _Log.remote()
    def inc(v):
        return v + 1

    graph = dask.delayed(sum)([dask.delayed(inc)(1), dask.delayed(inc)(2)])
    first, second = _Hooks(log, "a"), _Hooks(log, "b")
    with first, second:
        assert graph.compute(scheduler=flowcore_dask_get) == 5
    assert not FlowcoreDaskCallback.flowcore_active
    for cb in (first, second):
        names = [e[0] for e in cb.driver]
        n = names.count("presubmit")
        assert n == 3 and names.count("postsubmit") == n
        # finish sees the result before Dask repacks it for the collection
        assert names[-2:] == ["postsubmit_all", "finish"] and cb.driver[-1] == ("finish", [5])
        for i in range(0, 2 * n, 2):  # each submission between its pre and post hooks
            assert names[i:i + 2] == ["presubmit", "postsubmit"]
            assert cb.driver[i][1] == cb.driver[i + 1][1]
    rows = flowcore.get(log.get.remote())
    # posttask in the workers got its own callback's pretask state, for every task
    assert sorted((tag, pre) for tag, _, _, pre in rows) == sorted(
        (tag, f"{tag}:{key}") for tag, key, _, _ in rows)
    assert {tag for tag, *_ in rows} == {"a", "b"} and len(rows) == 6
    assert sorted(r for tag, _, r, _ in rows if tag == "a") == [2, 3, 5]
    # a presubmit answer replaces the task (nothing submitted, no postsubmit)
    cut = _Hooks(log, "c", short_circuit=lambda key: 100 if str(key).startswith("inc-") else None)
    assert graph.compute(scheduler=flowcore_dask_get, flowcore_callbacks=[cut]) == 200
    assert [e[0] for e in cut.driver].count("postsubmit") == 1

    # Ray's ProgressBarCallback: a named actor records every task's times
    with ProgressBarCallback() as progress:
        assert graph.compute(scheduler=flowcore_dask_get) == 5
    deadline = time.monotonic() + 60
    while flowcore.get(progress.pb.result.remote()) != (3, 3):  # sent from the workers
        assert time.monotonic() < deadline, flowcore.get(progress.pb.result.remote())
        time.sleep(0.05)
    report = flowcore.get(progress.pb.report.remote())
    assert len(report["submission_order"]) == 3
    assert all(report[k]["execution_time"] >= 0 for k, _ in report["submission_order"])
