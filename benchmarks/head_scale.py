"""The head alone: its IO-free state machine driven in-process, no sockets.

Usage::

    python -m benchmarks.head_scale [--runs 3] [--tasks 10000] [--nodes 1,10,100,1000]
                                    [--quick] [--json out.json] [--profile NODES]

``SchedulerState.handle()`` is fed what the server feeds it: ``register_node``
of N simulated nodes (16 CPUs each), one driver's ``submit`` messages (batches
of 100 task specs, as the client batches them), a ``task_done`` from the node
for every ``run_task`` the head sends out (results inline, in dispatch order),
and the driver's ``decref`` of the results it got (batches of 100). The
figure is tasks per second of the driving thread's CPU time over the whole
run (submission, placement, dispatch, completion and release; the messages
are made before the clock starts, as the server hands them over decoded):
the state machine is single-threaded and does no IO, so CPU time is what it
costs, and unlike wall time it does not count the time other processes on a
busy machine take the core away. Wall-clock tasks/s is printed beside it. The garbage
collector is set up as in the head's process (``tune_collector``), and a
collection before the clock starts puts the set-up (registering the nodes,
making the messages) and the previous run's tables behind it.

Two task graphs per node count:

* ``independent``: M no-op tasks without arguments;
* ``chains``: 16 chains of M/16 tasks, each taking the previous one's result
  (its argument is ready only when the previous task is done).

Each (graph, node count) is measured in a fresh state machine; the median of
``--runs`` repetitions is printed. ``--profile N [--graph chains]`` runs
cProfile over one run at N nodes and prints where the time goes.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections import deque
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

CPUS_PER_NODE = 16
BATCH = 100
CHAINS = 16
DRIVER = "driver-1"
GRAPHS = ("independent", "chains")
DEFAULT_NODES = (1, 10, 100, 1000)


def _specs(graph: str, n_tasks: int) -> list[dict]:
    """Task specs as the client sends them (made before the clock starts)."""
    from flowcore.ids import IdSource, object_id
    ids = IdSource()

    def spec(deps: list[bytes]) -> dict:
        return {"tid": ids.task_id(), "fid": b"fid-noop", "name": "noop", "args": b"args",
                "deps": deps, "nested": [], "nret": 1, "res": {"CPU": 1.0},
                "retries": 0, "retry_exc": False}

    if graph == "independent":
        return [spec([]) for _ in range(n_tasks)]
    if graph == "chains":
        length = max(1, n_tasks // CHAINS)
        chains = []
        for _ in range(CHAINS):
            chain, prev = [], None
            for _ in range(length):
                s = spec([prev] if prev is not None else [])
                prev = object_id(s["tid"], 0)
                chain.append(s)
            chains.append(chain)
        # submitted interleaved (step k of every chain, then step k+1), as a
        # driver building the chains side by side would
        return [c[k] for k in range(length) for c in chains]
    raise ValueError(f"unknown graph {graph!r} (known: {', '.join(GRAPHS)})")


def run_once(n_nodes: int, n_tasks: int, graph: str) -> dict[str, Any]:
    """Drive one fresh state machine; return tasks/s and counts."""
    from flowcore.ids import object_id
    from flowcore.scheduler.machine import SchedulerState

    # validate mode (the tests' books check after every message) stays off
    # whatever the environment says: the bench measures what a head runs
    state = SchedulerState(validate=False)
    handle = state.handle
    handle(DRIVER, {"op": "register_client", "kind": "driver"})
    for i in range(n_nodes):
        nid = f"node-{i:04d}"
        handle(nid, {"op": "register_node", "node_id": nid, "name": nid,
                     "address": f"tcp://10.0.{i // 250}.{i % 250}:1",
                     "resources": {"CPU": float(CPUS_PER_NODE)}})
    specs = _specs(graph, n_tasks)
    n_tasks = len(specs)
    # the nodes' answers, made before the clock starts as the specs are (the
    # head's server gets them decoded off the wire): (task_done, result id)
    answers = {}
    for s in specs:
        oid = object_id(s["tid"], 0)
        answers[s["tid"]] = ({"op": "task_done", "tid": s["tid"], "status": "ok",
                              "results": [{"oid": oid, "size": 4, "error": False,
                                           "nested": [], "inline": b"None"}]}, oid)
    submits = [{"op": "submit", "tasks": specs[i:i + BATCH]} for i in range(0, n_tasks, BATCH)]
    dispatched: deque[tuple[str, bytes]] = deque()
    done = 0
    to_release: list[bytes] = []

    def take(out: list) -> None:
        for dest, msg in out:
            if msg["op"] == "run_task":
                dispatched.append((dest, msg["tid"]))

    # the set-up (and the previous run's tables) out of the collector's young
    # generation: a head registers its nodes once, long before a burst of tasks
    gc.collect()
    c0, t0 = time.thread_time(), time.perf_counter()
    for submit in submits:
        take(handle(DRIVER, submit))
    while dispatched:
        node, tid = dispatched.popleft()
        done_msg, oid = answers[tid]
        take(handle(node, done_msg))
        done += 1
        to_release.append(oid)
        if len(to_release) >= BATCH:
            take(handle(DRIVER, {"op": "decref", "oids": to_release}))
            to_release = []
    if to_release:
        take(handle(DRIVER, {"op": "decref", "oids": to_release}))
    cpu, wall = time.thread_time() - c0, time.perf_counter() - t0
    if done != n_tasks or state.counts["finished"] != n_tasks:
        raise AssertionError(f"{graph} at {n_nodes} nodes: {done} of {n_tasks} tasks ran, "
                             f"{state.counts['finished']} finished")
    return {"tasks_per_s": n_tasks / cpu, "wall_tasks_per_s": n_tasks / wall,
            "cpu_seconds": cpu, "wall_seconds": wall, "tasks": n_tasks}


def measure(nodes: list[int], n_tasks: int, runs: int) -> list[dict]:
    from flowcore.scheduler.machine import tune_collector
    tune_collector()  # as the head's process does
    rows = []
    for graph in GRAPHS:
        for n in nodes:
            got = [run_once(n, n_tasks, graph) for _ in range(runs)]
            rows.append({"graph": graph, "nodes": n, "tasks": n_tasks,
                         "tasks_per_s": statistics.median(g["tasks_per_s"] for g in got),
                         "wall_tasks_per_s": statistics.median(g["wall_tasks_per_s"]
                                                               for g in got),
                         "runs": got})
    for row in rows:  # relative to the same graph at the fewest nodes
        base = next(r for r in rows if r["graph"] == row["graph"])
        row["vs_fewest_nodes"] = row["tasks_per_s"] / base["tasks_per_s"]
    return rows


def render(rows: list[dict]) -> str:
    lines = [f"{'graph':<12} {'nodes':>6} {'CPUs':>6} {'tasks':>7} {'tasks/s':>10} "
             f"{'vs fewest nodes':>16} {'(wall tasks/s)':>15}"]
    for r in rows:
        lines.append(f"{r['graph']:<12} {r['nodes']:>6} {r['nodes'] * CPUS_PER_NODE:>6} "
                     f"{r['tasks']:>7} {r['tasks_per_s']:>10,.0f} "
                     f"{r['vs_fewest_nodes']:>15.2f}x {r['wall_tasks_per_s']:>15,.0f}")
    return "\n".join(lines)


def profile(n_nodes: int, n_tasks: int, graph: str = "independent", top: int = 25) -> str:
    """cProfile of one run of ``graph`` at ``n_nodes``: the functions with
    the most own time and the most cumulative time."""
    import cProfile
    import io
    import pstats
    from flowcore.scheduler.machine import tune_collector
    tune_collector()  # as the head's process does
    prof = cProfile.Profile()
    prof.enable()
    run_once(n_nodes, n_tasks, graph)
    prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.head_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="repetitions per row (median)")
    p.add_argument("--tasks", type=int, default=None,
                   help="tasks per run (default 10000; 2000 with --quick)")
    p.add_argument("--nodes", default=",".join(map(str, DEFAULT_NODES)),
                   help="comma-separated simulated node counts")
    p.add_argument("--quick", action="store_true", help="short smoke run")
    p.add_argument("--json", default=None, help="write the rows to this file")
    p.add_argument("--profile", type=int, default=None, metavar="NODES",
                   help="print a cProfile of one run at NODES nodes instead")
    p.add_argument("--graph", choices=GRAPHS, default="independent",
                   help="the task graph --profile runs")
    args = p.parse_args(argv)
    try:
        args.nodes = [int(x) for x in args.nodes.split(",") if x.strip()]
    except ValueError:
        p.error(f"--nodes takes comma-separated integers, got {args.nodes!r}")
    if not args.nodes or min(args.nodes) < 1:
        p.error("--nodes needs node counts >= 1")
    if args.runs < 1:
        p.error("--runs must be >= 1")
    if args.tasks is None:
        args.tasks = 2000 if args.quick else 10_000
    if args.tasks < CHAINS:
        p.error(f"--tasks must be >= {CHAINS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.profile is not None:
        print(profile(args.profile, args.tasks, args.graph))
        return 0
    rows = measure(args.nodes, args.tasks, args.runs)
    print(f"head alone (IO-free state machine, no sockets): {CPUS_PER_NODE} CPUs per node, "
          f"{args.tasks} tasks per run, median of {args.runs}; tasks/s of CPU time")
    print(render(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpus_per_node": CPUS_PER_NODE, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
