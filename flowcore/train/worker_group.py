"""The training workers: actors in one placement group, one bundle each.

``WorkerGroup.start()`` checks that the cluster can ever hold the group (a
clear error instead of a wait that never ends), reserves the bundles, starts
one ``_TrainWorker`` actor per bundle, orders the workers by node (so local
ranks are contiguous) and picks the rendezvous address: a free port on rank
0's node. The coordinator (the process calling ``fit()``) holds no
resources. ``shutdown()`` kills every worker and frees the bundles.
"""
from __future__ import annotations

import inspect
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import flowcore

from .config import ScalingConfig
from .context import _Session, _set_session
from .result import BackendSetupError

_POLL_SECONDS = 5.0
logger = logging.getLogger(__name__)


class _TrainWorker:
    """One training worker process (an actor with two threads: the training
    function runs in one, the coordinator's long polls in the other)."""

    def __init__(self) -> None:
        import threading
        self._session: Optional[_Session] = None
        self._ready = threading.Condition()

    def info(self) -> dict:
        ctx = flowcore.get_runtime_context()
        return {"pid": os.getpid(), "node_id": ctx.get_node_id(),
                "gpu_ids": list(flowcore.get_gpu_ids())}

    def free_port(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, fn: Callable, config: Optional[dict], session_kwargs: dict,
            env: dict, backend_config: Any) -> None:
        os.environ.update(env)
        session = _Session(**session_kwargs)
        _set_session(session)
        with self._ready:
            self._session = session
            self._ready.notify_all()
        try:
            try:
                backend_config._on_worker_start(session)
            except Exception as e:
                raise BackendSetupError(f"setting up the workers' process group failed: "
                                        f"{type(e).__name__}: {e}") from e
            try:
                if _takes_config(fn):
                    fn(config if config is not None else {})
                else:
                    fn()
            finally:
                backend_config._on_worker_end(session)
        finally:
            session.finish()

    def poll(self, timeout: float = _POLL_SECONDS, acked: int = 0) -> tuple[list, bool]:
        deadline = time.monotonic() + timeout
        with self._ready:
            while self._session is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return [], False
                self._ready.wait(left)
            session = self._session
        return session.drain(max(0.0, deadline - time.monotonic()), acked)


def _takes_config(fn: Callable) -> bool:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return True
    return len(params) >= 1


@dataclass
class WorkerSlot:
    actor: Any
    pid: int
    node_id: str
    gpu_ids: list
    world_rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0


def _check_feasible(scaling: ScalingConfig) -> None:
    """Raise ValueError when no set of the cluster's nodes can ever hold the
    group, naming what is missing and the fix."""
    per_worker = scaling._resources_per_worker_not_none
    n = scaling.num_workers
    nodes = [nd for nd in flowcore.nodes() if nd.get("alive", True)]
    totals = [nd.get("resources_total", {}) for nd in nodes]
    fix = ("lower ScalingConfig(num_workers=...) or resources_per_worker, "
           + ("set use_gpu=False, " if scaling.use_gpu else "") + "or add nodes that have them")
    for name, amount in per_worker.items():
        have = sum(t.get(name, 0.0) for t in totals)
        biggest = max((t.get(name, 0.0) for t in totals), default=0.0)
        if biggest < amount:
            raise ValueError(
                f"infeasible: each training worker asks for {name}={amount:g} but no node has "
                f"that much (largest: {biggest:g}; cluster total {have:g}); {fix}")
        if have < amount * n:
            raise ValueError(
                f"infeasible: {n} training workers ask for {name}={amount * n:g} in total but "
                f"the cluster has {have:g}; {fix}")
        fits = [int(t.get(name, 0.0) // amount) for t in totals]
        if scaling.placement_strategy == "STRICT_PACK" and max(fits) < n:
            raise ValueError(f"infeasible: placement_strategy='STRICT_PACK' needs one node with "
                             f"{name}={amount * n:g}; {fix}, or use 'PACK'")
        if scaling.placement_strategy == "STRICT_SPREAD" and sum(f >= 1 for f in fits) < n:
            raise ValueError(f"infeasible: placement_strategy='STRICT_SPREAD' needs {n} nodes "
                             f"with {name}={amount:g} each; {fix}, or use 'SPREAD'")


class WorkerGroup:
    """``num_workers`` training actors in a placement group."""

    def __init__(self, scaling: ScalingConfig, runtime_env: Optional[dict] = None):
        self.scaling = scaling
        self.runtime_env = runtime_env
        self.pg: Any = None
        self.workers: list[WorkerSlot] = []
        self.master_addr = "127.0.0.1"
        self.master_port = 0

    def start(self) -> None:
        _check_feasible(self.scaling)
        per_worker = self.scaling._resources_per_worker_not_none
        n = self.scaling.num_workers
        self.pg = flowcore.placement_group([dict(per_worker) for _ in range(n)],
                                           strategy=self.scaling.placement_strategy)
        self._wait_placed()
        cls = flowcore.remote(_TrainWorker)
        opts: dict[str, Any] = {"num_cpus": per_worker.get("CPU", 0.0),
                                "num_gpus": per_worker.get("GPU", 0.0),
                                "max_concurrency": 2}
        extra = {k: v for k, v in per_worker.items() if k not in ("CPU", "GPU")}
        if extra:
            opts["resources"] = extra
        if self.runtime_env:
            opts["runtime_env"] = self.runtime_env
        actors = [cls.options(scheduling_strategy=flowcore.PlacementGroupSchedulingStrategy(
            self.pg, i), **opts).remote() for i in range(n)]
        self.workers = [WorkerSlot(actor=a, pid=info["pid"], node_id=info["node_id"],
                                   gpu_ids=info["gpu_ids"])
                        for a, info in zip(actors, flowcore.get([a.info.remote() for a in actors]))]
        self._assign_ranks()
        rank0 = self.workers[0]
        self.master_port = flowcore.get(rank0.actor.free_port.remote())
        self.master_addr = _node_host(rank0.node_id)

    def _wait_placed(self) -> None:
        waited = 0.0
        while not self.pg.wait(1.0):
            waited += 1.0
            rows = [r for r in flowcore.state.list_placement_groups()
                    if r.get("placement_group_id") == self.pg.id.hex()]
            if rows and rows[0].get("feasible") is False:
                flowcore.remove_placement_group(self.pg)
                raise ValueError(f"infeasible: the cluster cannot hold the training workers' "
                                 f"placement group ({rows[0].get('cause')}); lower "
                                 f"ScalingConfig(num_workers=...) or resources_per_worker")
            if rows and rows[0].get("state") == "REMOVED":
                raise RuntimeError("the training workers' placement group was removed")
            if waited == 10.0:
                logger.warning("the %d training workers wait for resources %s each: the "
                               "placement group is pending (%s); other work holds them",
                               self.scaling.num_workers,
                               self.scaling._resources_per_worker_not_none,
                               rows[0].get("cause") if rows else "not reserved yet")

    def _assign_ranks(self) -> None:
        node_order: list[str] = []
        for w in self.workers:
            if w.node_id not in node_order:
                node_order.append(w.node_id)
        self.workers.sort(key=lambda w: node_order.index(w.node_id))
        per_node: dict[str, list[WorkerSlot]] = {}
        for rank, w in enumerate(self.workers):
            w.world_rank = rank
            w.node_rank = node_order.index(w.node_id)
            per_node.setdefault(w.node_id, []).append(w)
        for group in per_node.values():
            for local, w in enumerate(group):
                w.local_rank = local
                w.local_world_size = len(group)

    def node_gpu_ids(self, node_id: str) -> list:
        ids: list = []
        for w in self.workers:
            if w.node_id == node_id:
                ids.extend(g for g in w.gpu_ids if g not in ids)
        return sorted(ids)

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                flowcore.kill(w.actor)
            except Exception:  # already dead, or the cluster went away
                pass
        if self.pg is not None:
            try:
                flowcore.remove_placement_group(self.pg)
            except Exception:
                pass
        self.workers = []
        self.pg = None


def _node_host(node_id: str) -> str:
    for nd in flowcore.nodes():
        if nd.get("node_id") == node_id:
            addr = str(nd.get("address", ""))
            host = addr.split("://", 1)[-1].rsplit(":", 1)[0]
            if host and host not in ("0.0.0.0", "::"):
                return host
    return "127.0.0.1"
