"""A job whose entrypoint asked for resources (``entrypoint_num_cpus``,
``entrypoint_num_gpus``, ``entrypoint_memory``, ``entrypoint_resources``).

Its supervisor process (on the head's node, see ``supervisor.py``) joins the
cluster as a driver and creates a ``JobRunner`` actor holding exactly those
resources, so the cluster places it on a node that has them free and keeps
them reserved for as long as the job runs.  The actor starts the entrypoint
there, as a subprocess in a session of its own, with the job's environment:
the job's ``working_dir`` is the actor's runtime_env working_dir (shipped to
that node like any task's) and the entrypoint's working directory, its
``py_modules`` are on ``PYTHONPATH``, and ``FLOWCORE_NODE_ID`` makes a bare
``flowcore.init()`` inside attach to that node.  The supervisor polls the
actor for the entrypoint's output and appends it to the job's ``logs`` on
the head, then kills the actor when the entrypoint has ended, which gives
the resources back.

While no node has the resources free the job stays PENDING, its message
saying what it waits for (``flowcore.explain``); after
``FLOWCORE_JOB_START_TIMEOUT_SECONDS`` (900 by default, as Ray) it FAILS.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import flowcore
from flowcore.exceptions import ObjectLostError

from .models import describe_resources, pending_message, write_json

#: most bytes of output one poll returns
POLL_CHUNK = 1 << 20
#: seconds between polls of the runner
POLL_INTERVAL = 0.1
#: default of FLOWCORE_JOB_START_TIMEOUT_SECONDS (Ray's default too)
DEFAULT_START_TIMEOUT = 900.0

def requested(job: dict[str, Any]) -> dict[str, Any]:
    """The actor options of a job's entrypoint resources."""
    opts: dict[str, Any] = {}
    for field, option in (("entrypoint_num_cpus", "num_cpus"), ("entrypoint_num_gpus",
                          "num_gpus"), ("entrypoint_memory", "memory")):
        if job.get(field):
            opts[option] = job[field]
    if job.get("entrypoint_resources"):
        opts["resources"] = dict(job["entrypoint_resources"])
    return opts


def start_timeout() -> float:
    raw = os.environ.get("FLOWCORE_JOB_START_TIMEOUT_SECONDS")
    try:
        return float(raw) if raw else DEFAULT_START_TIMEOUT
    except ValueError:
        return DEFAULT_START_TIMEOUT


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_PRCTL: Any
try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def _die_with_parent() -> None:
    """In the entrypoint's shell, before it starts: killed if the runner's
    worker dies (nothing imported here: this runs between fork and exec)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class JobRunner:
    """The entrypoint of one job, on the node the cluster placed this actor on."""

    def __init__(self, entrypoint: str, env: dict[str, str], renv: dict[str, Any],
                 user_pythonpath: str | None) -> None:
        self.entrypoint = entrypoint
        self.env = dict(env)
        self.renv = renv
        self.user_pythonpath = user_pythonpath
        self.proc: subprocess.Popen | None = None
        self.dir = tempfile.mkdtemp(prefix="flowcore-job-")  # 0700
        self.log_path = os.path.join(self.dir, "logs")

    def _environment(self) -> tuple[dict[str, str], str]:
        env = dict(self.env)
        node_id = flowcore.get_runtime_context().get_node_id()
        if node_id:
            env["FLOWCORE_NODE_ID"] = node_id
        cwd = self.dir
        job_renv: dict[str, Any] = {}
        if self.renv.get("working_dir"):
            cwd = os.getcwd()  # the working_dir as unpacked on this node
            job_renv["working_dir"] = cwd
        pypath: list[str] = []
        for mod in self.renv.get("py_modules") or []:
            name = os.path.basename(mod.rstrip(os.sep))
            base = next((p for p in sys.path
                         if p and os.path.exists(os.path.join(p, name))), None)
            if base is None:
                raise RuntimeError(f"py_module {name} did not reach node {node_id}")
            pypath.append(base)
            job_renv.setdefault("py_modules", []).append(os.path.join(base, name))
        if pypath or self.user_pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(pypath + [p for p in [self.user_pythonpath]
                                                          if p])
        else:
            env.pop("PYTHONPATH", None)
        if self.renv.get("env_vars"):
            job_renv["env_vars"] = dict(self.renv["env_vars"])
        if job_renv:
            env["FLOWCORE_JOB_RUNTIME_ENV"] = json.dumps(job_renv)
        else:
            env.pop("FLOWCORE_JOB_RUNTIME_ENV", None)
        gpus = flowcore.get_runtime_context().get_accelerator_ids()["GPU"]
        if gpus:  # the GPUs this actor holds are the entrypoint's
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        return env, cwd

    def start(self) -> dict[str, Any]:
        """Start the entrypoint; its node and pid."""
        env, cwd = self._environment()
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.proc = subprocess.Popen(self.entrypoint, shell=True, cwd=cwd, env=env,
                                         stdin=subprocess.DEVNULL, stdout=fd,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        finally:
            os.close(fd)
        return {"node_id": env.get("FLOWCORE_NODE_ID"), "pid": self.proc.pid}

    def poll(self, offset: int) -> dict[str, Any]:
        """Output from ``offset`` on, and the exit code once the entrypoint ended
        (read after the code, so the last output is never missed)."""
        code = self.proc.poll() if self.proc is not None else None
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                data = f.read(POLL_CHUNK)
        except OSError:
            data = b""
        return {"data": data, "exit_code": code, "more": len(data) == POLL_CHUNK}

    def stop(self, grace: float) -> None:
        """SIGTERM to the entrypoint's process group, SIGKILL after ``grace`` s."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        _signal_group(proc.pid, signal.SIGTERM)

        def kill() -> None:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
        threading.Thread(target=kill, daemon=True).start()

    def cleanup(self) -> None:
        """Whatever the entrypoint left running ends; its files go."""
        if self.proc is not None:
            _signal_group(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


def run(job: dict[str, Any], jdir: str, state: dict[str, Any], stopping: threading.Event,
        stop_requested: Callable[[], bool], grace: float, log: Any) -> dict[str, Any]:
    """Run the job on a node with its resources; returns its final status fields."""
    status_path = os.path.join(jdir, "status.json")
    opts = requested(job)
    res = describe_resources(job)
    env = job["env"]
    tls = {k[len("FLOWCORE_TLS_"):].lower(): v for k, v in env.items()
           if k.startswith("FLOWCORE_TLS_")}
    pending = pending_message(job)
    state["message"] = pending
    write_json(status_path, state)
    os.environ.pop("FLOWCORE_JOB_RUNTIME_ENV", None)
    os.environ["FLOWCORE_QUIET"] = "1"
    flowcore.init(address=env["FLOWCORE_ADDRESS"], token=env["FLOWCORE_TOKEN"],
                  tls=tls or None, log_to_driver=False, namespace="_flowcore_jobs")
    runner = None
    try:
        renv = job.get("job_runtime_env") or {}
        actor_renv = {k: renv[k] for k in ("working_dir", "py_modules") if renv.get(k)}
        cls = flowcore.remote(JobRunner)
        opts.setdefault("num_cpus", 0)
        # named, so a restarted head restores it (and this driver finds it again)
        runner = cls.options(runtime_env=actor_renv or None,
                             name=f"_flowcore_job_{job['submission_id']}", **opts).remote(
            job["entrypoint"], env, renv, job.get("user_pythonpath"))
        started = runner.start.remote()
        deadline = time.monotonic() + start_timeout()
        last_explained = 0.0
        while True:
            ready, _ = flowcore.wait([started], timeout=POLL_INTERVAL)
            if ready:
                break
            if stopping.is_set() or stop_requested():
                return {"status": "STOPPED", "message": "Job was intentionally stopped."}
            if time.monotonic() > deadline:
                return {"status": "FAILED", "error_type": "JOB_SUPERVISOR_ACTOR_START_TIMEOUT",
                        "message": (
                            f"Job supervisor actor failed to start within {start_timeout():g} "
                            f"seconds. This timeout can be configured by setting the "
                            f"environment variable FLOWCORE_JOB_START_TIMEOUT_SECONDS. This may "
                            f"be because the job entrypoint's specified resources ({res}) "
                            f"aren't available on the cluster: check them with "
                            f"flowcore.available_resources() and ask for fewer.")}
            if time.monotonic() - last_explained > 1.0:
                last_explained = time.monotonic()
                why = _why(started)
                message = f"{pending} {why}" if why else pending
                if message != state.get("message"):
                    state["message"] = message
                    write_json(status_path, state)
        try:
            where = flowcore.get(started)
        except Exception as e:  # noqa: BLE001 - the actor or its runtime_env failed
            text = f"the job's entrypoint could not start on its node: {e}"
            log.write((text + "\n").encode())
            return {"status": "FAILED", "error_type": "JOB_SUPERVISOR_ACTOR_START_FAILURE",
                    "message": text}
        state.update(status="RUNNING", pid=where["pid"], driver_node_id=where["node_id"],
                     start_time=int(time.time() * 1000), message="Job is currently running.")
        write_json(status_path, state)
        return _follow(runner, stopping, stop_requested, grace, log)
    finally:
        if runner is not None:
            try:
                flowcore.get(runner.cleanup.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - its node may be gone
                pass
            flowcore.kill(runner)  # gives the entrypoint's resources back
        flowcore.shutdown()


def _why(ref: Any) -> str:
    try:
        text = flowcore.explain(ref).get("text") or ""
    except Exception:  # noqa: BLE001 - an explanation is a courtesy
        return ""
    return text[:1].upper() + text[1:] + ("." if text and not text.endswith(".") else "")


def _follow(runner: Any, stopping: threading.Event, stop_requested: Callable[[], bool],
            grace: float, log: Any) -> dict[str, Any]:
    offset = 0
    stop_sent = False
    while True:
        try:
            r = flowcore.get(runner.poll.remote(offset))
        except Exception as e:  # noqa: BLE001 - the runner's node or worker died
            if isinstance(e, ObjectLostError) and e.reason == "head_restart":
                continue  # a poll in flight when the head restarted: polls only read
            if stopping.is_set() or stop_requested():  # e.g. the whole cluster is stopping
                return {"status": "STOPPED", "message": "Job was intentionally stopped."}
            text = f"Job supervisor actor died: {e}"
            log.write((text + "\n").encode())
            return {"status": "FAILED", "error_type": "JOB_SUPERVISOR_ACTOR_DIED",
                    "message": text}
        if r["data"]:
            log.write(r["data"])
            offset += len(r["data"])
        if r["more"]:
            continue
        if r["exit_code"] is not None:
            code = r["exit_code"]
            break
        if not stop_sent and (stopping.is_set() or stop_requested()):
            stopping.set()
            stop_sent = True
            runner.stop.remote(grace)
        time.sleep(POLL_INTERVAL)
    return {"driver_exit_code": code}
