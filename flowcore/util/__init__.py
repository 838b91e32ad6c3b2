"""Utilities on top of flowcore's public API, and bridges to the tools users
already have: ``flowcore.util.queue``, ``flowcore.util.multiprocessing``,
``flowcore.util.dask`` and ``flowcore.util.joblib``.

Submodules are imported on use: the Dask and joblib bridges need their
optional extras (``pip install 'flowcore[dask]'``, ``'flowcore[sklearn]'``).
"""
