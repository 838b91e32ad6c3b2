"""``FlowcoreBackend``: joblib's pool backend with flowcore's
``multiprocessing.Pool`` (actors) as the pool.

joblib batches calls itself (``AutoBatchingMixin``) and sends each batch as
one ``apply_async``; the pool hands batches to whichever worker actor is
free.  ``n_jobs=-1`` means every CPU of the cluster (not of this machine);
``n_jobs=1`` runs in this process, as with joblib's other process backends.
"""
from __future__ import annotations

from typing import Any

import joblib
from joblib._parallel_backends import (AutoBatchingMixin, FallbackToBackend,
                                       ParallelBackendBase, PoolManagerMixin,
                                       SequentialBackend)

import flowcore

from ..multiprocessing import Pool


class FlowcoreBackend(PoolManagerMixin, AutoBatchingMixin, ParallelBackendBase):
    """A joblib backend whose workers are flowcore actors (one CPU each)."""

    supports_retrieve_callback = True
    supports_return_generator = False
    supports_timeout = True

    def __init__(self, nesting_level: int | None = None,
                 inner_max_num_threads: int | None = None,
                 flowcore_remote_args: dict | None = None, **kwargs: Any) -> None:
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads, **kwargs)
        self.flowcore_remote_args = flowcore_remote_args

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if n_jobs < 0:
            if not flowcore.is_initialized():
                flowcore.init()
            cpus = int(flowcore.cluster_resources().get("CPU", 1))
            n_jobs = max(cpus + 1 + n_jobs, 1)
        return n_jobs

    def configure(self, n_jobs: int = 1, parallel: Any = None, prefer: Any = None,
                  require: Any = None, **kwargs: Any) -> int:
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self._pool = Pool(processes=n_jobs, flowcore_remote_args=self.flowcore_remote_args)
        self.parallel = parallel
        return n_jobs

    def terminate(self) -> None:
        super().terminate()
        self.reset_batch_stats()


def register_flowcore() -> None:
    """Register the ``"flowcore"`` joblib backend: then
    ``with joblib.parallel_backend("flowcore"):`` runs ``joblib.Parallel``
    calls (scikit-learn's ``n_jobs``) on the cluster this process is
    connected to (``flowcore.init()`` is called if it is not)."""
    joblib.register_parallel_backend("flowcore", FlowcoreBackend)
