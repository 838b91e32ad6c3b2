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
* ``shutdown()``         stops everything the engine started (the 2-node cluster too)

Multi-node workloads (they run last) use:

* ``start_cluster()``    stops the single-node instance and starts a local cluster of
                         ``CLUSTER_NODES`` nodes with ``CPUS_PER_NODE`` CPU each, connects
                         the driver to it and returns ``(node_a, node_b)``: node A is the
                         driver's node (Dask: the first worker), node B another one
* ``remote_on(fn, node)`` like ``remote`` but every call is pinned to ``node``
* ``remote_spread(fn)``  like ``remote`` but calls are spread over the nodes (flowcore,
                         Ray: ``scheduling_strategy="SPREAD"``; Dask: round-robin ``workers=``)
* ``wait_done(ref)``     blocks until the task that makes ``ref`` has finished, without
                         moving its result anywhere (``fetch_local=False``)
"""

import importlib

NUM_CPUS = 2

# The multi-node workloads: 2 nodes x 1 CPU (same machine, 127.0.0.1), and for the
# engines with a per-node object store (flowcore, Ray) 1 GiB of store per node.
CLUSTER_NODES = 2
CPUS_PER_NODE = 1
STORE_PER_NODE = 1 << 30


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

    def start_cluster(self):
        raise NotImplementedError(f"{self.name}: no multi-node local cluster in this harness")

    def remote_on(self, fn, node):
        raise NotImplementedError

    def remote_spread(self, fn):
        raise NotImplementedError

    def wait_done(self, ref):
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
        self.cluster = None  # the multi-node cluster object, once start_cluster() ran

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

    def _stop_instance(self):
        """Kill the actors still alive and disconnect/stop the current instance."""
        try:
            while self._actors:
                self.mod.kill(self._actors.pop())
        finally:
            if self._init_called:
                self._init_called = False
                self.mod.shutdown()

    def shutdown(self):
        cluster, self.cluster = self.cluster, None
        try:
            self._stop_instance()
        finally:
            if cluster is not None:
                cluster.shutdown()

    # ---- multi-node
    def start_cluster(self):
        self._stop_instance()  # the single-node instance goes first
        self._start_cluster()  # sets self.cluster as soon as there is something to stop
        a = self._driver_node_id()
        others = [n for n in self._node_ids() if n != a]
        if not a or len(others) != CLUSTER_NODES - 1:
            raise RuntimeError(f"{self.name}: expected {CLUSTER_NODES} nodes with the driver "
                               f"on one of them; driver node {a!r}, nodes {self._node_ids()}")
        return a, others[0]

    def remote_on(self, fn, node):
        return self.mod.remote(fn).options(scheduling_strategy=self._affinity(node)).remote

    def remote_spread(self, fn):
        return self.mod.remote(fn).options(scheduling_strategy="SPREAD").remote

    def wait_done(self, ref):
        self.mod.wait([ref], fetch_local=False)

    def _driver_node_id(self):
        return self.mod.get_runtime_context().get_node_id()


class FlowcoreEngine(RayLikeEngine):
    def __init__(self):
        super().__init__("flowcore", "flowcore", {"num_cpus": NUM_CPUS})

    def _start_cluster(self):
        from flowcore.cluster import LocalCluster
        self.cluster = LocalCluster(nodes=CLUSTER_NODES, cpus_per_node=CPUS_PER_NODE,
                                    object_store_memory=STORE_PER_NODE)
        self._init_called = True
        self.mod.init(address=self.cluster.address, token=self.cluster.token)

    def _node_ids(self):
        return list(self.cluster.node_ids())

    def _affinity(self, node):
        return self.mod.NodeAffinitySchedulingStrategy(node)


class RayEngine(RayLikeEngine):
    def __init__(self):
        super().__init__("ray", "ray", {"num_cpus": NUM_CPUS, "include_dashboard": False})

    def _start_cluster(self):
        from ray.cluster_utils import Cluster
        # Cluster() starts the head node (the driver's node) at once; keep the object
        # before adding the second node so that shutdown() can stop a partial cluster.
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": CPUS_PER_NODE, "object_store_memory": STORE_PER_NODE,
            "include_dashboard": False})
        for _ in range(CLUSTER_NODES - 1):
            self.cluster.add_node(num_cpus=CPUS_PER_NODE, object_store_memory=STORE_PER_NODE)
        self._init_called = True
        self.mod.init(address=self.cluster.address)
        self.cluster.wait_for_nodes()

    def _node_ids(self):
        return [n["NodeID"] for n in self.mod.nodes() if n.get("Alive")]

    def _affinity(self, node):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        return NodeAffinitySchedulingStrategy(node, soft=False)


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

    # ---- multi-node: the "nodes" are the worker processes of a fresh LocalCluster
    def start_cluster(self):
        import distributed
        self.shutdown()  # the single-node instance goes first
        self.cluster = distributed.LocalCluster(
            n_workers=CLUSTER_NODES, threads_per_worker=CPUS_PER_NODE, processes=True,
            dashboard_address=None)
        self.client = distributed.Client(self.cluster)
        self.client.wait_for_workers(CLUSTER_NODES)
        workers = sorted(self.client.scheduler_info()["workers"])
        if len(workers) != CLUSTER_NODES:
            raise RuntimeError(f"dask: expected {CLUSTER_NODES} workers, got {workers}")
        return workers[0], workers[1]

    def remote_on(self, fn, node):
        submit = self.client.submit

        def call(*args):
            return submit(fn, *args, pure=False, workers=[node], allow_other_workers=False)

        return call

    def remote_spread(self, fn):
        submit = self.client.submit
        workers = sorted(self.client.scheduler_info()["workers"])
        counter = [0]

        def call(*args):
            w = workers[counter[0] % len(workers)]
            counter[0] += 1
            return submit(fn, *args, pure=False, workers=[w], allow_other_workers=False)

        return call

    def wait_done(self, ref):
        import distributed
        distributed.wait([ref])

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
        return FlowcoreEngine()
    if name == "ray":
        return RayEngine()
    if name == "dask":
        return DaskEngine()
    raise ValueError(f"unknown engine {name!r} (known: {', '.join(ENGINE_NAMES)})")
