"""The joblib backend: scikit-learn's n_jobs on flowcore gives what loky gives."""
from __future__ import annotations

import os

import pytest

if os.environ.get("CI") != "true":
    pytest.importorskip("joblib")
    pytest.importorskip("sklearn")

import joblib  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.ensemble import RandomForestClassifier  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.svm import SVC  # noqa: E402

import flowcore  # noqa: E402
from flowcore.util.joblib import register_flowcore  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def jcluster(tmp_path_factory):
    flowcore.shutdown()
    flowcore.init(num_cpus=2, object_store_memory=128 << 20,
                  session_dir=str(tmp_path_factory.mktemp("joblib")))
    register_flowcore()
    yield
    flowcore.shutdown()


def test_grid_search_matches_loky(jcluster):
    X, y = load_digits(return_X_y=True)
    X, y = X[:600], y[:600]
    grid = {"C": [1, 10], "gamma": [1e-3, 1e-4]}

    def search():
        return GridSearchCV(SVC(), grid, cv=3, n_jobs=2).fit(X, y)

    with joblib.parallel_backend("loky"):
        loky = search()
    with joblib.parallel_backend("flowcore"):
        ours = search()
    assert ours.best_params_ == loky.best_params_
    assert ours.best_score_ == pytest.approx(loky.best_score_)


def test_random_forest_matches_loky(jcluster):
    X, y = load_digits(return_X_y=True)
    X, y = X[:600], y[:600]

    def forest():
        model = RandomForestClassifier(n_estimators=8, n_jobs=2, random_state=0).fit(X, y)
        return model.predict_proba(X)  # (prediction needs shared memory: joblib uses threads)

    with joblib.parallel_backend("loky"):
        loky = forest()
    with joblib.parallel_backend("flowcore"):
        ours = forest()
    np.testing.assert_allclose(ours, loky)


def test_parallel_runs_in_workers_and_raises_like_loky(jcluster):
    # defined here, so workers get them by value and need not import this
    # module (and scikit-learn with it)
    def _pid_of(_):
        return os.getpid()

    def _boom(x):
        if x == 2:
            raise KeyError("no such item")
        return x

    with joblib.parallel_backend("flowcore", n_jobs=-1):
        pids = joblib.Parallel()(joblib.delayed(_pid_of)(i) for i in range(8))
        assert os.getpid() not in pids
        squares = joblib.Parallel()(joblib.delayed(pow)(i, 2) for i in range(20))
        assert squares == [i * i for i in range(20)]
        with pytest.raises(KeyError, match="no such item"):
            joblib.Parallel()(joblib.delayed(_boom)(i) for i in range(5))
    with joblib.parallel_backend("flowcore"):  # n_jobs=1: runs here
        assert joblib.Parallel(n_jobs=1)(joblib.delayed(_pid_of)(0) for _ in range(2)) == \
            [os.getpid()] * 2
