"""``flowcore-scheduler``: start the head."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any
from urllib.parse import quote

from .. import daemon
from .._version import __version__
from ..private_files import make_private_dir
from ..protocol import tls

logger = logging.getLogger("flowcore.scheduler")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowcore-scheduler",
        description="Start the flowcore head: the control store and global scheduler.")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1; 0.0.0.0 exposes the head "
                        "to the network and prints a warning)")
    p.add_argument("--port", type=int, default=8786, help="port (0 = a free port)")
    p.add_argument("--dashboard-port", type=int, default=8265,
                   help="port of the web dashboard and /metrics (0 = a free port, "
                        "-1 = no dashboard)")
    p.add_argument("--dashboard-host", default=None,
                   help="interface the dashboard listens on (default: the same as --host)")
    p.add_argument("--token", default=None, help="cluster token (default: generate one)")
    p.add_argument("--token-file", default=None, help="read the token from this file")
    tls.add_flags(p)
    p.add_argument("--state-dir", default=None,
                   help="directory for the token, address, logs and the head's persisted tables "
                        "(default ~/.flowcore); a head restarted at the same --port with the "
                        "same state dir and token recovers its nodes, named and detached "
                        "actors, functions and jobs")
    p.add_argument("--log-file", default=None, help="log here instead of stderr")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--lifeline-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--version", action="version", version=f"flowcore {__version__}")
    return p


def _token_of_crashed_head(state_dir: str, port: int) -> str | None:
    """A head that crashed at this port left its tables and generated token in
    the state dir: reuse the token, so its nodes and drivers can come back."""
    from .persist import state_path
    if not os.path.exists(os.path.join(state_path(state_dir, port), "tables.msgpack")):
        return None
    try:
        with open(os.path.join(state_dir, "token")) as f:
            token = f.read().strip()
    except OSError:
        return None
    if token:
        logger.warning("reusing the token in %s: a head that crashed at port %d left its "
                       "tables in %s", os.path.join(state_dir, "token"), port, state_dir)
    return token


def _forget_address(path: str, address: str) -> None:
    """A clean stop removes the address file ``init(address="auto")`` and
    ``flowcore-worker`` read, unless another head has written its own since."""
    try:
        with open(path) as f:
            if f.read().strip() != address:
                return
        os.unlink(path)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    daemon.setup_logging(args.log_file, args.log_level)
    from .server import HeadServer

    state_dir = args.state_dir or os.path.expanduser("~/.flowcore")
    try:
        make_private_dir(state_dir)
    except OSError as e:
        print(f"flowcore-scheduler: cannot use --state-dir {state_dir}: {e}", file=sys.stderr)
        return 2
    try:
        token = daemon.resolve_token(args.token, args.token_file)
    except OSError as e:
        print(f"flowcore-scheduler: cannot read token file: {e}", file=sys.stderr)
        return 2
    if token is None and args.port:
        token = _token_of_crashed_head(state_dir, args.port)
    try:
        tls_config = tls.from_flags(args)
    except ValueError as e:
        print(f"flowcore-scheduler: {e}", file=sys.stderr)
        return 2
    generated = token is None
    if token is None:
        token = daemon.new_token()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        if tls_config is None:
            logger.warning("listening on %s: the head is reachable from the network; only "
                           "token holders can join, but traffic is not encrypted: consider "
                           "a firewall or TLS (--tls-cert/--tls-key/--tls-ca)", args.host)

    from tornado.ioloop import IOLoop
    # the process runs on Tornado's IOLoop (an asyncio loop underneath, which
    # the message transports use directly)
    asyncio.set_event_loop(asyncio.new_event_loop())
    loop = IOLoop.current()
    head = HeadServer(token.encode(), args.host, args.port, session_dir=state_dir,
                      tls=tls_config, persist_dir=state_dir)
    from .machine import tune_collector
    tune_collector()
    try:
        address = loop.run_sync(head.start)
    except OSError as e:
        print(f"flowcore-scheduler: cannot listen on {args.host}:{args.port}: {e}. "
              f"Pick another --port (0 = any free port).", file=sys.stderr)
        return 1
    # before anything is printed or reported: a SIGTERM right after the ready
    # line must stop the head cleanly
    daemon.watch_lifeline(args.lifeline_fd, head.stop)
    daemon.install_stop_signals(head.stop)
    dashboard: Any = None
    dash_sockets: list = []
    dash_url = ""
    dash_host = args.dashboard_host or args.host
    if args.dashboard_port >= 0:
        # bind now (to report the URL); the web stack loads after the ready line
        from ..dashboard import listen
        try:
            dash_sockets, dash_url = listen(dash_host, args.dashboard_port)
        except OSError as e:
            print(f"flowcore-scheduler: cannot serve the dashboard on {dash_host}:"
                  f"{args.dashboard_port}: {e}. Pick another --dashboard-port (0 = any free "
                  f"port, -1 = no dashboard).", file=sys.stderr)
            head.stop()
            return 1
        if dash_host not in ("127.0.0.1", "localhost", "::1"):
            logger.warning("the dashboard listens on %s: only token holders can log in, but "
                           "traffic is not encrypted", dash_host)
    address_file = None
    if args.ready_fd is None:
        address_file = os.path.join(state_dir, "address")
        daemon.write_private(os.path.join(state_dir, "address"), address + "\n")
        if generated:
            path = os.path.join(state_dir, "token")
            daemon.write_private(path, token + "\n")
            print(f"flowcore-scheduler: token written to {path} (mode 0600)", flush=True)
        print(f"flowcore-scheduler {__version__} listening at {address}", flush=True)
        how = (f"--token-file {os.path.join(state_dir, 'token')}" if generated
               else "with the same token (--token / --token-file / FLOWCORE_TOKEN)")
        if tls_config is not None:
            how += " --tls-cert NODE.crt --tls-key NODE.key --tls-ca CA.crt"
        print(f"flowcore-scheduler: join nodes with: flowcore-worker {address} {how}",
              flush=True)
        if dash_url:
            print(f"flowcore-scheduler: dashboard at {dash_url}/?token={quote(token, safe='')}",
                  flush=True)
    # the ready line: the head's address, then the dashboard's URL if it serves one
    daemon.report_ready(args.ready_fd, address + (f" {dash_url}" if dash_url else ""))
    if dash_sockets:
        from ..dashboard import OnFirstConnection
        hint = (args.token_file if args.token_file and not args.token
                else os.path.join(state_dir, "token") if generated else None)
        head.dashboard_url = dash_url

        def make_dashboard() -> Any:
            from ..dashboard import Dashboard
            return Dashboard(head, token.encode(), dash_host, args.dashboard_port,
                             token_hint=hint)
        # the web stack loads when the first browser or scraper connects
        dashboard = OnFirstConnection(dash_sockets, dash_url, make_dashboard)
    loop.run_sync(head.stopped.wait)
    if dashboard is not None:
        loop.run_sync(dashboard.stop)
    loop.run_sync(lambda: asyncio.sleep(0.05))  # let final messages flush
    if address_file is not None:
        _forget_address(address_file, address)
    logger.info("flowcore-scheduler stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
