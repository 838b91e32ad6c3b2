"""The dashboard's Tornado application: pages, the JSON API and /metrics.

It runs on the head's own event loop.  Every handler answers from the
cached snapshot (see ``snapshot.py``), so requests never walk the scheduler's
tables themselves, except a single task's detail (on a click) and the DAG
export (rate-limited, rendered by ``dot`` or graphviz-pure on a thread).
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from typing import Any
from urllib.parse import quote

from tornado.httpserver import HTTPServer
from tornado.web import Application, HTTPError, RequestHandler, StaticFileHandler

from .. import ids
from .._version import __version__
from .auth import COOKIE, cookie_secret, safe_next, token_matches
from .handlers import Api, Base
from .jobs import manager_for
from .jobs import routes as jobs_routes
from .libraries import routes as library_routes
from .metrics import CONTENT_TYPE_LATEST, HeadMetrics
from .snapshot import TASK_STATES, SnapshotCache

logger = logging.getLogger("flowcore.dashboard")

HERE = os.path.dirname(os.path.abspath(__file__))
STATIC = os.path.join(HERE, "static")
TEMPLATES = os.path.join(HERE, "templates")
#: static files the login page needs before anyone is logged in (no data in them)
PUBLIC_STATIC = frozenset({"style.css", "favicon.svg", "login.js"})
#: most graph nodes exported for the DAG view, and most drawn (after siblings collapse)
DAG_EXPORT_LIMIT = 2000
DAG_DRAW_LIMIT = 300
#: a DAG picture is re-rendered at most this often, seconds
DAG_INTERVAL = 3.0

#: an HTTP request line: METHOD SP target SP HTTP/x.y
REQUEST_LINE = re.compile(rb"^[A-Z]{1,16} [\x21-\x7e]+ HTTP/\d\.\d\r?\n$")
#: a connection that has not sent a whole request head by then is closed
HEADER_TIMEOUT = 30.0

class Page(Base):
    async def get(self) -> None:
        with open(os.path.join(STATIC, "index.html"), "rb") as f:
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.finish(f.read())


class Static(Base, StaticFileHandler):
    def initialize(self, dash: "Dashboard", path: str) -> None:  # type: ignore[override]
        self.dash = dash
        self._head_header()
        StaticFileHandler.initialize(self, path)

    def prepare(self) -> None:
        name = self.path_args[0] if self.path_args else ""
        if name in PUBLIC_STATIC:
            return
        super().prepare()

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache")


class Login(Base):
    auth_required = False

    def get(self) -> None:
        nxt = safe_next(self.get_query_argument("next", "/"))
        if self.current_user:
            self.redirect(nxt)
            return
        bad = self.get_query_argument("bad", None) is not None
        self._form(nxt, "That token is not this cluster's token." if bad else None)

    def post(self) -> None:
        nxt = safe_next(self.get_body_argument("next", "/"))
        if token_matches(self.get_body_argument("token", ""), self.dash.token):
            self.log_in()
            self.redirect(nxt)
            return
        logger.warning("dashboard: failed login from %s", self.request.remote_ip)
        self.set_status(401)
        self._form(nxt, "That token is not this cluster's token.")

    def _form(self, nxt: str, error: str | None) -> None:
        self.render("login.html", next=nxt, error=error, version=__version__,
                    address=self.dash.head_info.get("address", ""),
                    token_hint=self.dash.token_hint)


class Logout(Base):
    auth_required = False

    def get(self) -> None:
        self.clear_cookie(COOKIE)
        self.redirect("/login")


class Summary(Api):
    def get(self) -> None:
        s = self.snap
        self.write_json(s.json("summary", lambda: s["summary"]))


class Nodes(Api):
    def get(self) -> None:
        s = self.snap
        self.write_json(s.json("nodes", lambda: {"time": s["time"], "nodes": s["nodes"]}))


class Tasks(Api):
    def get(self) -> None:
        s = self.snap
        state = self.get_query_argument("state", None) or None
        if state is not None:
            state = state.upper()
            if state not in TASK_STATES:
                raise HTTPError(400, f"unknown state {state!r}; expected one of "
                                     f"{', '.join(TASK_STATES)}")
        limit = self._limit()
        key = f"tasks:{state}:{limit}"
        self.write_json(s.json(key, lambda: {
            "time": s["time"], "state": state, "limit": limit,
            "counts": s["summary"]["tasks"]["by_state"],
            "tasks": s.tasks(state, limit)}))

    def _limit(self) -> int:
        raw = self.get_query_argument("limit", None)
        cap = self.dash.cache.max_tasks
        if raw is None:
            return cap
        try:
            n = int(raw)
        except ValueError:
            raise HTTPError(400, f"limit={raw!r} is not a number") from None
        return max(1, min(n, cap))


class TaskDetail(Api):
    def get(self, tid_hex: str) -> None:
        try:
            tid = bytes.fromhex(tid_hex)
        except ValueError:
            raise HTTPError(400, "a task id is hexadecimal") from None
        if len(tid) != ids.TASK_ID_SIZE:
            raise HTTPError(400, f"a task id has {ids.TASK_ID_SIZE * 2} hex digits")
        tid_hex = tid.hex()
        state = self.dash.state
        cache = self.dash.cache
        names = {n["node_id"]: n["name"] for n in self.snap["nodes"]}
        row = None
        t = state.tasks.get(tid)
        if t is not None:
            row = cache.task_row(t, names)
        else:
            for h in reversed(state.history):  # bounded (the newest finished tasks)
                if h["task_id"] == tid_hex:
                    row = cache.history_row(h, names)
                    break
        if row is None:
            raise HTTPError(404, f"task {tid_hex} is not known (any more): the head keeps the "
                                 f"newest {state.history.maxlen} finished tasks")
        row = dict(row, events=state.log.for_task(tid))
        self.write_json(row)


class Actors(Api):
    def get(self) -> None:
        s = self.snap
        self.write_json(s.json("actors", lambda: {
            "time": s["time"], "counts": s["summary"]["actors"]["by_state"],
            "actors": s["actors"]}))


class Objects(Api):
    def get(self) -> None:
        s = self.snap
        self.write_json(s.json("objects", lambda: {
            "time": s["time"], "summary": s["summary"]["objects"], "objects": s["objects"]}))


class Timeline(Api):
    def get(self) -> None:
        s = self.snap
        self.write_json(s.json("timeline", lambda: s["timeline"]))


class Dag(Api):
    async def get(self) -> None:
        status, ctype, body = await self.dash.dag_svg()
        self.set_status(status)
        self.set_header("Content-Type", ctype)
        self.finish(body)


class Metrics(Api):
    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.dash.metrics.render())


def _log_request(handler: RequestHandler) -> None:
    """Access log without query strings (a ``?token=`` must never reach a log)."""
    status = handler.get_status()
    if status < 400 or status in (401, 404):
        return
    logger.warning("%d %s %s (%s) %.1f ms", status, handler.request.method,
                   handler.request.path, handler.request.remote_ip,
                   1000.0 * handler.request.request_time())


class VettingHTTPServer(HTTPServer):
    """An HTTPServer that reads each connection's first line itself and
    answers 400 and closes when it is not an HTTP request line (Tornado would
    wait for a blank line that a garbage peer may never send)."""

    def handle_stream(self, stream: Any, address: tuple) -> None:
        asyncio.ensure_future(self._vet(stream, address))

    async def _vet(self, stream: Any, address: tuple) -> None:
        data = bytearray()
        deadline = time.monotonic() + HEADER_TIMEOUT
        try:
            while True:
                first = bytes(data).lstrip(b"\r\n")  # RFC 9112 2.2: ignore leading CRLFs
                if b"\n" in first or len(data) > 8192:
                    break
                data += await asyncio.wait_for(stream.read_bytes(8192, partial=True),
                                               max(0.01, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - silence or a hang-up before a whole line
            await _bad_request(stream)
            return
        line = first.partition(b"\n")[0] + b"\n"
        if not REQUEST_LINE.match(line) or not hasattr(stream, "_read_buffer"):
            logger.info("dashboard: %s sent no HTTP request line: answered 400",
                        address[0] if address else "?")
            await _bad_request(stream)
            return
        # hand the bytes back to the stream, then serve as usual
        stream._read_buffer[0:0] = data
        stream._read_buffer_size += len(data)
        super().handle_stream(stream, address)


async def _bad_request(stream: Any) -> None:
    try:
        if not stream.closed():
            await asyncio.wait_for(stream.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 34\r\nConnection: close\r\n\r\n"
                b"400: not an HTTP/1.x request line\n"), 5.0)
    except Exception:  # noqa: BLE001 - the peer is gone
        pass
    stream.close()


class Dashboard:
    """The dashboard and /metrics of a head, on the head's event loop.

    ``port`` 0 picks a free port; :meth:`start` returns the URL (without the
    token); :attr:`login_url` carries the token.
    """

    def __init__(self, head: Any, token: bytes, host: str = "127.0.0.1", port: int = 8265,
                 *, interval: float = 1.0, token_hint: str | None = None):
        self.head = head
        self.state = head.state
        self.token = token
        self.host = host
        self.port = port
        self.token_hint = token_hint
        self.head_info = {"version": __version__, "address": getattr(head, "address", ""),
                          "started": getattr(head, "started", time.time())}
        self.cache = SnapshotCache(self.state, head=self.head_info, interval=interval)
        self.metrics = HeadMetrics(self.state, self.cache.get)
        self.server: HTTPServer | None = None
        self.url = ""
        self._dag: tuple[float, tuple[int, str, bytes]] | None = None  # (valid until, answer)
        self._dag_cost = 0.0
        self._dag_busy: asyncio.Future | None = None
        self.jobs = manager_for(head, token)  # submitted jobs (None: no state dir)
        self.app = Application(self._routes(), cookie_secret=cookie_secret(token),
                               xsrf_cookies=True, template_path=TEMPLATES,
                               login_url="/login", log_function=_log_request,
                               autoreload=False, compress_response=True)

    def _routes(self) -> list:
        d = {"dash": self}
        return [
            (r"/", Page, d),
            (r"/login", Login, d),
            (r"/logout", Logout, d),
            (r"/static/(.*)", Static, dict(d, path=STATIC)),
            (r"/api/summary", Summary, d),
            (r"/api/nodes", Nodes, d),
            (r"/api/tasks", Tasks, d),
            (r"/api/tasks/([0-9a-fA-F]+)", TaskDetail, d),
            (r"/api/actors", Actors, d),
            (r"/api/objects", Objects, d),
            (r"/api/timeline", Timeline, d),
            (r"/api/dag.svg", Dag, d),
            (r"/metrics", Metrics, d),
            *jobs_routes(d),
            *library_routes(d),
        ]

    async def start(self, sockets: list | None = None, url: str | None = None) -> str:
        """Serve on ``sockets`` bound by :func:`flowcore.dashboard.listen`
        (binding ``host``/``port`` here if not given); returns the URL."""
        if sockets is None:
            from . import listen
            sockets, url = listen(self.host, self.port)
        self.port = sockets[0].getsockname()[1]
        self.server = VettingHTTPServer(self.app, xheaders=False,
                                        idle_connection_timeout=HEADER_TIMEOUT)
        self.server.add_sockets(sockets)
        self.url = url or f"http://{self.host}:{self.port}"
        if hasattr(self.head, "dashboard_url"):
            self.head.dashboard_url = self.url
        logger.info("dashboard at %s (log in with the cluster token)", self.url)
        return self.url

    @property
    def login_url(self) -> str:
        return f"{self.url}/?token={quote(self.token.decode(), safe='')}"

    async def stop(self) -> None:
        if self.jobs is not None:  # the jobs this head started end with it
            await asyncio.get_running_loop().run_in_executor(None, self.jobs.stop_all)
        if self.server is not None:
            self.server.stop()
            try:
                await asyncio.wait_for(self.server.close_all_connections(), 2.0)
            except asyncio.TimeoutError:
                pass
            self.server = None

    # ------------------------------------------------------------ DAG
    async def dag_svg(self) -> tuple[int, str, bytes]:
        """The futures DAG as SVG (status, content type, body); a plain-text
        explanation instead when it cannot be drawn.  Exported at most every
        ``DAG_INTERVAL`` s, and less often when exporting takes long (the
        export walks the tables on the loop; the drawing runs on a thread)."""
        now = time.monotonic()
        if self._dag is not None and now < self._dag[0]:
            return self._dag[1]
        if self._dag_busy is not None:
            return await asyncio.shield(self._dag_busy)
        fut = asyncio.get_running_loop().create_future()
        self._dag_busy = fut
        result: tuple[int, str, bytes] = (500, "text/plain; charset=utf-8",
                                          b"drawing the DAG was interrupted")
        self._dag_cost = 0.0
        try:
            result = await self._render_dag()
        except Exception as e:  # never let a picture break the head
            logger.exception("dashboard: drawing the DAG failed")
            result = (500, "text/plain; charset=utf-8", f"drawing the DAG failed: {e}".encode())
        finally:
            wait = max(DAG_INTERVAL, self._dag_cost / self.cache.budget)
            self._dag = (time.monotonic() + wait, result)
            self._dag_busy = None
            fut.set_result(result)
        return result

    async def _render_dag(self) -> tuple[int, str, bytes]:
        text = "text/plain; charset=utf-8"
        try:
            from ..scheduler.export import export_graph
        except ImportError:
            return (501, text, b"The DAG view needs the head's graph export "
                               b"(flowcore.scheduler.export), which this version lacks.")
        t0 = time.monotonic()
        exported = export_graph(self.state, None, None, DAG_EXPORT_LIMIT)  # reads the tables
        self._dag_cost = time.monotonic() - t0
        nodes, edges = list(exported["nodes"]), list(exported["edges"])
        if not nodes:
            return (404, text, b"The graph is empty: the head tracks no task, actor or put "
                               b"object right now (finished tasks whose results nobody holds "
                               b"are pruned).")
        from ..graph import draw
        if draw.find_renderer("svg") is None:
            return (501, text, b"Drawing the DAG needs the Graphviz 'dot' program or "
                               b"graphviz-pure: pip install 'flowcore[graph]' (no system "
                               b"install) or apt-get install graphviz (conda/brew install "
                               b"graphviz), then reload. flowcore.visualize(filename="
                               b"'dag.dot') writes the DOT source without either.")
        omitted = exported.get("omitted", 0)
        title = f"{len(nodes)} graph nodes" + (f" (the oldest; {omitted} newer not shown)"
                                               if omitted else "")
        graph = draw.to_digraph(nodes, edges, max_nodes=DAG_DRAW_LIMIT, title=title)
        svg = await asyncio.get_running_loop().run_in_executor(
            None, lambda: draw.render(graph, "svg"))
        if svg is None:
            return (501, text, b"Drawing the DAG failed: the renderer could not be run.")
        return (200, "image/svg+xml", svg)
