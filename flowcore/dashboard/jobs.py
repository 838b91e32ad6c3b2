"""The head's job manager and its HTTP API on the dashboard port.

``POST /api/jobs/`` starts a submitted entrypoint as a supervised process
on the head's node (``flowcore/job_submission/supervisor.py``), or, when it
reserves ``entrypoint_num_cpus`` / ``_num_gpus`` / ``_memory`` /
``_resources``, on a node that has them (``job_submission/runner.py``), with the
job's runtime_env: its ``working_dir`` (uploaded first with ``PUT
/api/packages/<hash>``) unpacked as the entrypoint's working directory, its
``py_modules`` on ``PYTHONPATH``, its ``env_vars`` set, and
``FLOWCORE_ADDRESS``/``FLOWCORE_TOKEN`` pointing at this cluster so a bare
``flowcore.init()`` inside joins it (with the same runtime_env for its
tasks).  Every route sits behind the dashboard's token check: no token, no
job.  Job records live in the state directory (see ``job_submission.models``),
so ``GET /api/jobs/`` still lists them after a head restart.

Routes: ``GET /api/jobs/`` (list), ``POST /api/jobs/`` (submit),
``GET|DELETE /api/jobs/<id>``, ``POST /api/jobs/<id>/stop``,
``GET /api/jobs/<id>/logs?offset=N``, ``PUT /api/packages/<hash>``.
"""
from __future__ import annotations

import asyncio
import builtins  # JobManager.list() hides the builtin in the class body
import io
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from typing import Any, TypeGuard

from tornado.web import HTTPError, stream_request_body

from ..job_submission.models import (RESOURCE_FIELDS, JobStatus, job_dir, jobs_root,
                                     pending_message, read_json, write_json)
from ..job_submission.supervisor import STOP_FILE
from ..runtime_env import max_package_bytes
from .auth import bearer
from .handlers import Api

logger = logging.getLogger("flowcore.dashboard.jobs")

#: most bytes of log one request returns
LOG_CHUNK = 1 << 20
#: a package name: the hex hash runtime_env gives it
PKG_SCHEME = "pkg://"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _alive(pid: object) -> TypeGuard[int]:
    """Whether ``pid`` is the id of a live process."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and v == v \
        and v != float("inf")


def _entrypoint_resources(req: dict[str, Any]) -> dict[str, Any]:
    """The checked ``entrypoint_*`` fields of a submission (None when not given)."""
    out: dict[str, Any] = {}
    for name in ("entrypoint_num_cpus", "entrypoint_num_gpus"):
        v = req.get(name)
        if v is not None and not _number(v):
            raise HTTPError(400, f"{name} must be a number >= 0, got {v!r}")
        out[name] = v
    v = req.get("entrypoint_memory")
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
        raise HTTPError(400, f"entrypoint_memory must be an integer number of bytes >= 0, "
                             f"got {v!r}")
    out["entrypoint_memory"] = v
    res = req.get("entrypoint_resources")
    if res is not None:
        if not isinstance(res, dict) or not all(
                isinstance(k, str) and k and _number(x) for k, x in res.items()):
            raise HTTPError(400, f"entrypoint_resources must be a dict of resource name -> "
                                 f"number >= 0, got {res!r}")
        for k in ("CPU", "GPU", "memory"):
            if k in res:
                field = {"CPU": "entrypoint_num_cpus", "GPU": "entrypoint_num_gpus",
                         "memory": "entrypoint_memory"}[k]
                raise HTTPError(400, f"entrypoint_resources: use {field} for {k!r}")
    out["entrypoint_resources"] = res
    return out


class JobManager:
    """Starts, stops and reports the jobs of one head."""

    def __init__(self, head: Any, token: bytes, state_dir: str):
        self.head = head
        self.token = token
        self.state_dir = state_dir
        self.root = jobs_root(state_dir)
        self.procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------ reading
    def info(self, sid: str) -> dict[str, Any] | None:
        try:
            jdir = job_dir(self.state_dir, sid)
        except ValueError:
            return None
        job = read_json(os.path.join(jdir, "job.json"))
        if job is None:
            return None
        st = read_json(os.path.join(jdir, "status.json")) or {}
        out = {k: job.get(k) for k in ("submission_id", "entrypoint", "metadata",
                                       "runtime_env") + RESOURCE_FIELDS}
        out.update(type="SUBMISSION", job_id=None, status=st.get("status", "PENDING"),
                   message=st.get("message", "Job has not started yet."),
                   error_type=st.get("error_type"),
                   start_time=st.get("start_time", job.get("submit_time")),
                   end_time=st.get("end_time"), driver_exit_code=st.get("driver_exit_code"),
                   driver_node_id=st.get("driver_node_id", job.get("node_id")))
        if not JobStatus(out["status"]).is_terminal() and \
                not _alive(st.get("supervisor_pid", job.get("supervisor_pid"))):
            proc = self.procs.get(sid)
            if proc is None or proc.poll() is not None:
                # the supervisor is gone without a last word (killed with its node)
                out.update(status="FAILED", error_type="JOB_SUPERVISOR_ACTOR_DIED",
                           message="The job's supervisor process died before the job ended.")
        return out

    def list(self) -> list[dict[str, Any]]:
        try:
            names = sorted(os.listdir(self.root))
        except OSError:
            return []
        rows = [r for n in names if (r := self.info(n)) is not None]
        rows.sort(key=lambda r: r.get("start_time") or 0)
        return rows

    def logs(self, sid: str, offset: int) -> dict[str, Any]:
        info = self.info(sid)
        if info is None:
            raise HTTPError(404, f"Job {sid} does not exist")
        path = os.path.join(job_dir(self.state_dir, sid), "logs")
        data = b""
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(LOG_CHUNK)
        except OSError:
            pass
        terminal = JobStatus(info["status"]).is_terminal()
        return {"logs": data.decode(errors="replace"), "offset": offset + len(data),
                "terminal": terminal, "more": len(data) == LOG_CHUNK,
                "status": info["status"]}

    # ------------------------------------------------------------ submitting
    async def submit(self, req: dict[str, Any]) -> str:
        entrypoint = req.get("entrypoint")
        if not isinstance(entrypoint, str) or not entrypoint.strip():
            raise HTTPError(400, "entrypoint must be a non-empty shell command, e.g. "
                                 "'python script.py'")
        sid = req.get("submission_id") or f"flowcoresubmit_{secrets.token_hex(8)}"
        if not isinstance(sid, str):
            raise HTTPError(400, "submission_id must be a string")
        try:
            jdir = job_dir(self.state_dir, sid)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        metadata = req.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise HTTPError(400, "metadata must be a dict of str -> str")
        renv = req.get("runtime_env") or {}
        if not isinstance(renv, dict):
            raise HTTPError(400, "runtime_env must be a dict")
        unknown = set(renv) - {"working_dir", "py_modules", "env_vars"}
        if unknown:
            raise HTTPError(400, f"runtime_env: unknown key(s) {sorted(unknown)}; allowed: "
                                 f"working_dir, py_modules, env_vars")
        env_vars = renv.get("env_vars") or {}
        if not isinstance(env_vars, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()):
            raise HTTPError(400, "runtime_env['env_vars'] must be a dict of str -> str")
        if any(k.startswith("FLOWCORE_") for k in env_vars):
            raise HTTPError(400, "runtime_env['env_vars']: FLOWCORE_* variables are reserved")
        reserve = _entrypoint_resources(req)
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        try:
            os.mkdir(jdir, 0o700)
        except FileExistsError:
            raise HTTPError(400, f"Job with submission_id {sid} already exists. Please use "
                                 f"a different submission_id.") from None
        try:
            cwd, job_renv, pypath = await asyncio.get_running_loop().run_in_executor(
                None, self._unpack, jdir, renv)
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            shutil.rmtree(jdir, ignore_errors=True)
            raise HTTPError(400, f"runtime_env: {e}") from None
        env = self._environment(sid, env_vars, job_renv, pypath)
        job = {"submission_id": sid, "entrypoint": entrypoint, "metadata": metadata,
               "runtime_env": renv, "submit_time": _now_ms(), "cwd": cwd, "env": env,
               "node_id": None, "job_runtime_env": job_renv,
               "user_pythonpath": os.environ.get("PYTHONPATH"), **reserve}
        write_json(os.path.join(jdir, "job.json"), job)
        fd = os.open(os.path.join(jdir, "logs"), os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        write_json(os.path.join(jdir, "status.json"),
                   {"status": "PENDING", "message": pending_message(job)})
        errfd = os.open(os.path.join(jdir, "supervisor.log"),
                        os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = subprocess.Popen([sys.executable, "-m", "flowcore.job_submission.supervisor",
                                     jdir], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=errfd, start_new_session=True, close_fds=True)
        finally:
            os.close(errfd)
        job["supervisor_pid"] = proc.pid
        write_json(os.path.join(jdir, "job.json"), job)
        self.procs[sid] = proc
        threading.Thread(target=proc.wait, name=f"flowcore-job-{sid}", daemon=True).start()
        logger.info("job %s started: %s", sid, entrypoint)
        return sid

    def _unpack(self, jdir: str, renv: dict) -> tuple[str, dict, builtins.list[str]]:
        """Unpack the job's packages; returns its cwd, the runtime_env its
        driver runs with (local paths) and the PYTHONPATH entries."""
        job_renv: dict[str, Any] = {}
        cwd = jdir
        wd = renv.get("working_dir")
        if wd is not None:
            cwd = self._extract(wd, os.path.join(jdir, "working_dir"))
            job_renv["working_dir"] = cwd
        pypath: list[str] = []
        mods = renv.get("py_modules") or []
        if not isinstance(mods, list):
            raise ValueError("py_modules must be a list of uploaded packages")
        for i, m in enumerate(mods):
            if not isinstance(m, str) or not m.startswith(PKG_SCHEME):
                raise ValueError(f"py_modules[{i}]={m!r} is not an uploaded package "
                                 f"('{PKG_SCHEME}<hash>/<name>')")
            h, _, name = m[len(PKG_SCHEME):].partition("/")
            base = self._extract(PKG_SCHEME + h, os.path.join(jdir, "py_modules", h))
            pypath.append(base)
            job_renv.setdefault("py_modules", []).append(os.path.join(base, name))
        if renv.get("env_vars"):
            job_renv["env_vars"] = dict(renv["env_vars"])
        return cwd, job_renv, pypath

    def _extract(self, ref: Any, dest: str) -> str:
        if not isinstance(ref, str) or not ref.startswith(PKG_SCHEME):
            raise ValueError(f"{ref!r} is not an uploaded package: the client uploads a local "
                             f"directory first and passes '{PKG_SCHEME}<hash>'")
        h = ref[len(PKG_SCHEME):]
        blob = self.head.packages.get(h)
        if blob is None:
            raise ValueError(f"package {h} was not uploaded (PUT /api/packages/{h})")
        os.makedirs(dest, mode=0o700, exist_ok=True)
        real = os.path.realpath(dest)
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            for info in z.infolist():
                target = os.path.realpath(os.path.join(dest, info.filename))
                if not target.startswith(real + os.sep):
                    raise ValueError(f"package {h}: entry {info.filename!r} leaves its directory")
                z.extract(info, dest)
                if not info.is_dir():  # private, keeping the owner's execute bit
                    os.chmod(target, ((info.external_attr >> 16) & 0o700) | 0o600)
        for root, dirs, _files in os.walk(dest):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o700)
        os.chmod(dest, 0o700)
        return dest

    def _environment(self, sid: str, env_vars: dict, job_renv: dict,
                     pypath: builtins.list[str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWCORE_")}
        env.update(env_vars)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        if pypath:
            env["PYTHONPATH"] = os.pathsep.join(pypath + [p for p in [env.get("PYTHONPATH")]
                                                          if p])
        env["PYTHONUNBUFFERED"] = "1"
        env["FLOWCORE_ADDRESS"] = self.head.address
        env["FLOWCORE_TOKEN"] = self.token.decode()
        env["FLOWCORE_JOB_SUBMISSION_ID"] = sid
        if job_renv:
            env["FLOWCORE_JOB_RUNTIME_ENV"] = json.dumps(job_renv)
        tls = getattr(self.head, "tls", None)
        if tls is not None:
            env.update(FLOWCORE_TLS_CERT=tls.cert, FLOWCORE_TLS_KEY=tls.key,
                       FLOWCORE_TLS_CA=tls.ca)
        return env

    # ------------------------------------------------------------ stopping
    def stop(self, sid: str) -> bool:
        """Ask the job's supervisor to stop it; False if it already ended."""
        info = self.info(sid)
        if info is None:
            raise HTTPError(404, f"Job {sid} does not exist")
        if JobStatus(info["status"]).is_terminal():
            return False
        jdir = job_dir(self.state_dir, sid)
        job = read_json(os.path.join(jdir, "job.json")) or {}
        pid = job.get("supervisor_pid")
        if not _alive(pid):
            return False
        # the marker reaches a supervisor still starting up; the signal, one waiting
        fd = os.open(os.path.join(jdir, STOP_FILE), os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        if info["status"] == "RUNNING":
            os.kill(pid, signal.SIGTERM)
        return True

    def delete(self, sid: str) -> bool:
        info = self.info(sid)
        if info is None:
            raise HTTPError(404, f"Job {sid} does not exist")
        if not JobStatus(info["status"]).is_terminal():
            raise HTTPError(400, f"Job {sid} is {info['status']}: stop it before deleting it")
        shutil.rmtree(job_dir(self.state_dir, sid), ignore_errors=True)
        self.procs.pop(sid, None)
        return True

    def stop_all(self, timeout: float = 5.0) -> None:
        """The head stops: end the jobs still running (also those a crashed
        earlier head started); their records stay."""
        pids = []
        for row in self.list():
            if JobStatus(row["status"]).is_terminal():
                continue
            job = read_json(os.path.join(job_dir(self.state_dir, row["submission_id"]),
                                         "job.json")) or {}
            try:
                if self.stop(row["submission_id"]):
                    pids.append(job.get("supervisor_pid"))
            except Exception:  # noqa: BLE001 - the head is going down anyway
                pass
        deadline = time.monotonic() + timeout
        while any(_alive(p) and not self._reaped(p) for p in pids) and \
                time.monotonic() < deadline:
            time.sleep(0.05)

    def _reaped(self, pid: int) -> bool:
        """Our own child that exited (a zombie until its waiting thread reaps it)."""
        for p in self.procs.values():
            if p.pid == pid:
                return p.poll() is not None
        return False


# ------------------------------------------------------------ HTTP handlers
class JobsApi(Api):
    """Token-protected like every API route; a script authenticated by its
    bearer token needs no XSRF cookie (a browser's cookie session does)."""

    def check_xsrf_cookie(self) -> None:
        if bearer(self.request.headers.get("Authorization")) is not None:
            return  # the token itself is checked in prepare()
        if not self.current_user:
            return  # prepare() answers 401
        super().check_xsrf_cookie()

    @property
    def jobs(self) -> JobManager:
        jm = self.dash.jobs
        if jm is None:
            raise HTTPError(503, "this head has no state directory: job submission is off")
        return jm

    def body_json(self) -> dict[str, Any]:
        try:
            data = json.loads(self.request.body or b"{}")
        except ValueError:
            raise HTTPError(400, "the request body is not JSON") from None
        if not isinstance(data, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        return data


class JobList(JobsApi):
    def get(self) -> None:
        self.write_json({"jobs": self.jobs.list()})

    async def post(self) -> None:
        sid = await self.jobs.submit(self.body_json())
        self.write_json({"submission_id": sid, "job_id": None})


class JobItem(JobsApi):
    def get(self, sid: str) -> None:
        info = self.jobs.info(sid)
        if info is None:
            raise HTTPError(404, f"Job {sid} does not exist")
        self.write_json(info)

    def delete(self, sid: str) -> None:
        self.write_json({"deleted": self.jobs.delete(sid)})


class JobStop(JobsApi):
    def post(self, sid: str) -> None:
        self.write_json({"stopped": self.jobs.stop(sid)})


class JobLogs(JobsApi):
    def get(self, sid: str) -> None:
        raw = self.get_query_argument("offset", "0")
        try:
            offset = max(0, int(raw))
        except ValueError:
            raise HTTPError(400, f"offset={raw!r} is not a number") from None
        self.write_json(self.jobs.logs(sid, offset))


@stream_request_body
class PackageUpload(JobsApi):
    """Streams the body, so the token is checked (in ``prepare``) before any
    of it is read: without the token the connection closes unread."""

    def prepare(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        super().prepare()
        if self._finished:
            return
        self._limit = max_package_bytes() + (1 << 20)
        conn = getattr(self.request, "connection", None)
        if conn is not None and hasattr(conn, "set_max_body_size"):
            conn.set_max_body_size(self._limit)

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._limit:
            raise HTTPError(413, "the package is larger than the runtime_env limit "
                                 "(FLOWCORE_RUNTIME_ENV_MAX_BYTES)")
        self._chunks.append(chunk)

    def put(self, h: str) -> None:
        error = self.dash.head.packages.add(h, b"".join(self._chunks))
        self._chunks = []
        if error is not None:
            raise HTTPError(400, error)
        self.write_json({"ok": True})

    def get(self, h: str) -> None:
        self.write_json({"known": self.dash.head.packages.has(h)})


def routes(d: dict) -> list:
    return [
        (r"/api/jobs/?", JobList, d),
        (r"/api/jobs/([A-Za-z0-9_.-]+)", JobItem, d),
        (r"/api/jobs/([A-Za-z0-9_.-]+)/stop", JobStop, d),
        (r"/api/jobs/([A-Za-z0-9_.-]+)/logs", JobLogs, d),
        (r"/api/packages/([0-9a-f]+)", PackageUpload, d),
    ]


def manager_for(head: Any, token: bytes) -> JobManager | None:
    """The job manager of a head with a state directory (None without one)."""
    state_dir = getattr(head, "persist_dir", None) or getattr(head, "session_dir", None)
    if not state_dir or not hasattr(head, "packages"):
        return None
    return JobManager(head, token, state_dir)
