"""``flowcore.util.joblib``: a joblib backend that runs ``joblib.Parallel``
(and so scikit-learn's ``n_jobs``) on a flowcore cluster::

    from flowcore.util.joblib import register_flowcore
    register_flowcore()
    with joblib.parallel_backend("flowcore"):
        search.fit(X, y)

Needs joblib (``pip install 'flowcore[sklearn]'`` brings it with scikit-learn).
"""
try:
    import joblib  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("flowcore.util.joblib needs joblib: pip install 'flowcore[sklearn]'") \
        from e

from .backend import FlowcoreBackend, register_flowcore

__all__ = ["register_flowcore", "FlowcoreBackend"]
