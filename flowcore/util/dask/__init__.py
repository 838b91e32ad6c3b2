"""``flowcore.util.dask``: run Dask collections (``dask.delayed``,
``dask.array``, ``dask.dataframe``, ``dask.bag``) on flowcore.

``flowcore_dask_get`` is a Dask scheduler: every task of a Dask graph
becomes a flowcore task named by its Dask key, and intermediate results
live in the object store.  Use it per call (``x.compute(scheduler=
flowcore_dask_get)``), in a block (``with dask.config.set(scheduler=
flowcore_dask_get):``) or for the whole program (``enable_dask_on_flowcore()``).
Dask's own callbacks (``dask.diagnostics.ProgressBar`` and the like) fire
as the tasks finish, and ``FlowcoreDaskCallback`` adds Ray's
``RayDaskCallback`` hooks under flowcore names.
Needs the ``dask`` extra: ``pip install 'flowcore[dask]'``.
"""
try:
    import dask  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("flowcore.util.dask needs Dask: pip install 'flowcore[dask]'") from e

from .callbacks import (FlowcoreDaskCallback, ProgressBarCallback, local_flowcore_callbacks,
                        unpack_flowcore_callbacks)
from .scheduler import disable_dask_on_flowcore, enable_dask_on_flowcore, flowcore_dask_get

__all__ = ["flowcore_dask_get", "enable_dask_on_flowcore", "disable_dask_on_flowcore",
           "FlowcoreDaskCallback", "local_flowcore_callbacks", "unpack_flowcore_callbacks",
           "ProgressBarCallback"]
