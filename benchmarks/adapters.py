"""Thin engine adapters giving flowcore, Ray and Dask one common surface.

Only the standard library is imported at module level: each engine is imported
inside ``Engine.start()`` so that the import is counted in the cold-start time.

The surface used by the workloads:

* ``start()``            import the engine and initialise a 2-CPU local instance
* ``remote(fn)``         returns ``submit(*args) -> ref``
* ``get(ref | [refs])``  blocks and returns the value(s)
* ``put(value)``         stores a value, returns a ref
* ``shutdown()``         stops everything the engine started
"""

import importlib

NUM_CPUS = 2


class EngineUnavailable(Exception):
    """The engine is not installed (or does not expose the required API yet)."""


class Engine:
    name = "?"

    def version(self):
        return None

    def start(self):
        raise NotImplementedError

    def remote(self, fn):
        raise NotImplementedError

    def get(self, ref):
        raise NotImplementedError

    def put(self, value):
        raise NotImplementedError

    def shutdown(self):
        pass


class RayLikeEngine(Engine):
    """Any module with Ray's API: ``init/remote/get/put/shutdown``."""

    REQUIRED = ("init", "remote", "get", "put", "shutdown")

    def __init__(self, name, module, init_kwargs):
        self.name = name
        self.module_name = module
        self.init_kwargs = init_kwargs
        self.mod = None
        self._init_called = False

    def version(self):
        return getattr(self.mod, "__version__", None) if self.mod else None

    def start(self):
        try:
            self.mod = importlib.import_module(self.module_name)
        except ImportError as exc:
            raise EngineUnavailable(f"import {self.module_name} failed: {exc}") from exc
        missing = [a for a in self.REQUIRED if not hasattr(self.mod, a)]
        if missing:
            raise EngineUnavailable(
                f"{self.module_name} does not provide {', '.join(missing)} yet")
        self._init_called = True  # even if init() raises, shutdown() must still run
        self.mod.init(**self.init_kwargs)

    def remote(self, fn):
        return self.mod.remote(fn).remote

    def get(self, ref):
        return self.mod.get(ref)

    def put(self, value):
        return self.mod.put(value)

    def shutdown(self):
        if self._init_called:
            self._init_called = False
            self.mod.shutdown()


class DaskEngine(Engine):
    """dask.distributed on a 2-process LocalCluster; put = scatter, get = result/gather."""

    name = "dask"

    def __init__(self):
        self.client = None
        self.cluster = None
        self._version = None

    def version(self):
        return self._version

    def start(self):
        try:
            import distributed
        except ImportError as exc:
            raise EngineUnavailable(f"import distributed failed: {exc}") from exc
        self._version = distributed.__version__
        self.cluster = distributed.LocalCluster(
            n_workers=NUM_CPUS, threads_per_worker=1, processes=True,
            dashboard_address=None)
        self.client = distributed.Client(self.cluster)

    def remote(self, fn):
        submit = self.client.submit

        def call(*args):
            return submit(fn, *args, pure=False)

        return call

    def get(self, ref):
        if isinstance(ref, list):
            return self.client.gather(ref)
        return ref.result()

    def put(self, value):
        # hash=False: a random key per call (hashing would also dedupe equal values
        # and tokenize the whole 100 MB array).
        return self.client.scatter(value, hash=False)

    def shutdown(self):
        client, cluster = self.client, self.cluster
        self.client = self.cluster = None
        try:
            if client is not None:
                client.close()
        finally:
            if cluster is not None:
                cluster.close()


ENGINE_NAMES = ("flowcore", "ray", "dask")


def make_engine(name):
    if name == "flowcore":
        return RayLikeEngine("flowcore", "flowcore", {"num_cpus": NUM_CPUS})
    if name == "ray":
        return RayLikeEngine("ray", "ray",
                             {"num_cpus": NUM_CPUS, "include_dashboard": False})
    if name == "dask":
        return DaskEngine()
    raise ValueError(f"unknown engine {name!r} (known: {', '.join(ENGINE_NAMES)})")
