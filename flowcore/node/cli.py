"""``flowcore-worker ADDRESS``: join a node to a cluster."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
from typing import Callable

from .. import daemon
from .._version import __version__
from ..exceptions import AuthenticationError
from ..protocol import tls

logger = logging.getLogger("flowcore.node")


def _preload_worker_libraries() -> None:
    """Import what workers run and what most task arguments need before
    workers are forked: without it every new worker imports (and, without
    bytecode caches, compiles) the worker and client modules itself, which
    costs far more than the fork, and a task tree whose parents block in
    get() makes the node start dozens of workers."""
    import cloudpickle  # noqa: F401

    from ..objects import mapping  # noqa: F401  (reading store objects: ctypes)
    from . import worker
    worker.preload()
    try:
        import numpy  # noqa: F401
    except ImportError:  # a core dependency, but a broken install must still run
        pass


def default_store_memory() -> int:
    import psutil
    total = psutil.virtual_memory().total
    cap = int(total * 0.3)
    try:
        st = os.statvfs("/dev/shm")
        cap = min(cap, int(st.f_bavail * st.f_frsize * 0.8))
    except OSError:
        pass
    return max(cap, 64 << 20)


def detect_gpus() -> int:
    """GPUs visible through ``nvidia-smi -L`` (0 when it is absent or fails)."""
    import shutil
    import subprocess
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def _amount(integer: bool) -> Callable[[str], float | int]:
    """An argparse type: a finite number >= 0 (an integer if ``integer``)."""
    def parse(text: str) -> float | int:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if integer else 'a number'} >= 0")
        return value
    parse.__name__ = "integer" if integer else "number"
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowcore-worker",
                                description="Start a flowcore node and join it to a head.")
    p.add_argument("address", help="head address, tcp://HOST:PORT, 'auto' for the local "
                                   "head recorded in the state dir, or '-' to read it from "
                                   "stdin")
    p.add_argument("--num-cpus", type=_amount(False), default=None,
                   help="CPUs to offer (default: this machine's count)")
    p.add_argument("--num-gpus", type=_amount(True), default=None,
                   help="GPUs to offer (default: those nvidia-smi lists, else 0)")
    p.add_argument("--resources", default=None,
                   help='custom resources as JSON, e.g. \'{"disk": 2}\'')
    p.add_argument("--memory", type=_amount(True), default=None,
                   help="bytes of memory tasks and actors may reserve with memory= (a "
                        "scheduling quantity, not a limit; default: the machine's available "
                        "memory)")
    p.add_argument("--object-store-memory", type=_amount(True), default=None,
                   help="bytes of shared memory for the object store (default 30%% of RAM)")
    p.add_argument("--token", default=None)
    p.add_argument("--token-file", default=None)
    tls.add_flags(p)
    p.add_argument("--name", default=None, help="a name for this node")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface the node listens on (its own port, the bulk port, actor "
                        "ports); 0.0.0.0 for every interface. On a multi-machine cluster it "
                        "must be reachable from the other machines")
    p.add_argument("--advertise-host", default=None,
                   help="the address other machines reach this node at (default: --host; for "
                        "0.0.0.0, this machine's address on the route to the head)")
    p.add_argument("--worker-memory-limit", type=_amount(True), default=None,
                   help="bytes of memory (RSS) a worker may use before it is killed and its "
                        "task reported as such (default: no limit)")
    p.add_argument("--max-workers", type=_amount(True), default=None,
                   help="cap on worker processes (extra workers start when tasks block in get)")
    p.add_argument("--state-dir", default=None, help="session/state directory (logs, spill)")
    p.add_argument("--log-file", default=None)
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--lifeline-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--version", action="version", version=f"flowcore {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.max_workers == 0:
        p.error("argument --max-workers: a node needs at least one worker")
    daemon.setup_logging(args.log_file, args.log_level)
    try:
        tls_config = tls.from_flags(args)
    except ValueError as e:
        print(f"flowcore-worker: {e}", file=sys.stderr)
        return 2
    state_dir = args.state_dir or os.path.expanduser("~/.flowcore")
    address = args.address
    if address == "auto":
        try:
            with open(os.path.join(state_dir, "address")) as f:
                address = f.read().strip()
        except OSError:
            print(f"flowcore-worker: no local head found in {state_dir}; pass its address",
                  file=sys.stderr)
            return 2
    try:
        token = daemon.resolve_token(args.token, args.token_file)
    except OSError as e:
        print(f"flowcore-worker: cannot read token file: {e}", file=sys.stderr)
        return 2
    if token is None:
        path = os.path.join(state_dir, "token")
        if os.path.exists(path):
            token = daemon.resolve_token(None, path)
    if token is None:
        print("flowcore-worker: no token: pass --token, --token-file or set FLOWCORE_TOKEN",
              file=sys.stderr)
        return 2
    resources = {}
    if args.resources:
        try:
            resources = json.loads(args.resources)
            if not isinstance(resources, dict) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                    and math.isfinite(v) for v in resources.values()):
                raise ValueError("expected a JSON object of names to finite numbers >= 0, "
                                 "e.g. '{\"disk\": 2}'")
            if "CPU" in resources or "GPU" in resources:
                raise ValueError("use --num-cpus / --num-gpus for CPU and GPU")
        except ValueError as e:
            print(f"flowcore-worker: bad --resources {args.resources!r}: {e}", file=sys.stderr)
            return 2
    num_cpus = args.num_cpus if args.num_cpus is not None else float(os.cpu_count() or 1)
    from ..private_files import make_private_dir
    make_private_dir(state_dir)
    make_private_dir(os.path.join(state_dir, "logs"))

    from .server import NodeServer

    from tornado.ioloop import IOLoop
    # the process runs on Tornado's IOLoop (an asyncio loop underneath, which
    # the message transports use directly)
    asyncio.set_event_loop(asyncio.new_event_loop())
    loop = IOLoop.current()
    try:
        num_gpus = args.num_gpus if args.num_gpus is not None else detect_gpus()
        node = NodeServer(address, token.encode(), num_cpus=num_cpus,
                          num_gpus=num_gpus, resources=resources,
                          object_store_memory=args.object_store_memory or default_store_memory(),
                          session_dir=state_dir, host=args.host, name=args.name,
                          max_workers=args.max_workers,
                          worker_memory_limit=args.worker_memory_limit, tls=tls_config,
                          memory=args.memory, advertise_host=args.advertise_host)
    except (ValueError, OSError) as e:
        print(f"flowcore-worker: cannot start the node: {e}", file=sys.stderr)
        return 2
    if address == "-":
        # started beside its head: everything is imported and the store is
        # mapped; while the head boots, import NumPy too (workers are forked
        # from here, so their first array argument does not pay ~100 ms for
        # it); then wait for the head's address on stdin
        _preload_worker_libraries()
        node.head_address = sys.stdin.readline().strip()
        if not node.head_address:
            print("flowcore-worker: no head address on stdin", file=sys.stderr)
            node.stop()
            return 2
    daemon.watch_lifeline(args.lifeline_fd, node.stop)
    daemon.install_stop_signals(node.stop)
    try:
        loop.run_sync(node.start)
    except AuthenticationError as e:
        print(f"flowcore-worker: {e}", file=sys.stderr)
        node.stop()
        return 3
    except (ConnectionError, RuntimeError, OSError) as e:
        print(f"flowcore-worker: cannot join {address}: {e}", file=sys.stderr)
        node.stop()
        return 1
    if node.stopped.is_set():
        return 1
    daemon.report_ready(args.ready_fd, f"{node.address} {node.node_id}")
    if args.ready_fd is None:
        print(f"flowcore-worker: node {node.name} joined {address}, serving objects at "
              f"{node.address}", flush=True)
    loop.run_sync(node.stopped.wait)
    loop.run_sync(lambda: asyncio.sleep(0.05))
    logger.info("node stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
