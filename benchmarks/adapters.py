"""Thin engine adapters giving flowcore, Ray and Dask one common surface.

Only the standard library is imported at module level: each engine is imported
inside ``Engine.start()`` so that the import is counted in the cold-start time.

The surface used by the workloads:

* ``start()``            import the engine and initialise a 2-CPU local instance
* ``remote(fn)``         returns ``submit(*args) -> ref``
* ``get(ref | [refs])``  blocks and returns the value(s)
* ``put(value)``         stores a value, returns a ref
* ``actor(cls)``         creates one actor of ``cls`` (no constructor arguments),
                         returns its handle
* ``actor_method(h, name)``  returns ``submit(*args) -> ref`` calling ``h.name``;
                         ``get`` takes these refs (or a list of them) too
* ``kill_actor(h)``      ends the actor (``shutdown()`` also ends any actor still alive)
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

    def actor(self, cls):
        raise NotImplementedError

    def actor_method(self, handle, name):
        raise NotImplementedError

    def kill_actor(self, handle):
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
        self._actors = []  # handles not killed yet; shutdown() kills them

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

    def actor(self, cls):
        if not hasattr(self.mod, "kill"):
            raise NotImplementedError(f"{self.module_name} has no kill(): cannot clean up actors")
        handle = self.mod.remote(cls).remote()
        self._actors.append(handle)
        return handle

    def actor_method(self, handle, name):
        return getattr(handle, name).remote

    def kill_actor(self, handle):
        self._actors = [h for h in self._actors if h is not handle]
        self.mod.kill(handle)

    def shutdown(self):
        try:
            while self._actors:
                self.mod.kill(self._actors.pop())
        finally:
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
        self._actor_future_types = ()
        self._actors = []  # (actor, the future that keeps it alive) not killed yet

    def version(self):
        return self._version

    def start(self):
        try:
            import distributed
        except ImportError as exc:
            raise EngineUnavailable(f"import distributed failed: {exc}") from exc
        self._version = distributed.__version__
        from distributed.actor import BaseActorFuture
        self._actor_future_types = (BaseActorFuture,)
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
            if ref and isinstance(ref[0], self._actor_future_types):
                # ActorFutures are not task futures: client.gather cannot take them.
                return [r.result() for r in ref]
            return self.client.gather(ref)
        return ref.result()

    def put(self, value):
        # hash=False: a random key per call (hashing would also dedupe equal values
        # and tokenize the whole 100 MB array).
        return self.client.scatter(value, hash=False)

    def actor(self, cls):
        fut = self.client.submit(cls, actor=True)
        handle = fut.result()
        self._actors.append((handle, fut))
        return handle

    def actor_method(self, handle, name):
        # Returns an ActorFuture at once; the call runs on the worker holding the
        # actor (async def methods on its event loop, plain ones in its actor thread).
        return getattr(handle, name)

    def kill_actor(self, handle):
        futs = [f for h, f in self._actors if h is handle]
        self._actors = [(h, f) for h, f in self._actors if h is not handle]
        # cancel() releases the key whatever other futures still point at it (the
        # Actor object holds one too); the worker then drops the actor object.
        if futs:
            self.client.cancel(futs)

    def shutdown(self):
        client, cluster = self.client, self.cluster
        self.client = self.cluster = None
        try:
            try:
                if client is not None and self._actors:
                    client.cancel([f for _, f in self._actors])
            finally:
                self._actors = []
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
