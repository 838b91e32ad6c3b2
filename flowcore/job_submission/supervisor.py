"""The supervisor of one submitted job: ``python -m
flowcore.job_submission.supervisor JOB_DIR``.

The head starts one per job, in a session of its own, so a job outlives a
head that crashed (and is found again by the restarted head).  It runs the
entrypoint with a shell in the job's working directory and environment
(prepared by the head in ``job.json``), writes its output to ``logs`` and
its state to ``status.json``: RUNNING with the pids, then SUCCEEDED, FAILED
(with the exit code) or STOPPED.  SIGTERM stops the job: the entrypoint's
process group gets SIGTERM, then SIGKILL after ``STOP_GRACE`` seconds.

A job that asked for entrypoint resources runs on a node that has them
instead, through an actor holding them (``runner.py``); this process then
follows it from the head's node and keeps the job's records the same way.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from .models import read_json, resources_requested, write_json

STOP_GRACE = 3.0
#: created in the job directory by the head to stop the job
STOP_FILE = "stop"
#: the umask the supervisor started with, which the entrypoint keeps
_USER_UMASK = [0o022]


def _now_ms() -> int:
    return int(time.time() * 1000)


def main(argv: list[str] | None = None) -> int:
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m flowcore.job_submission.supervisor JOB_DIR", file=sys.stderr)
        return 2
    jdir = argv[0]
    job = read_json(os.path.join(jdir, "job.json"))
    status_path = os.path.join(jdir, "status.json")
    if job is None:
        print(f"no readable job.json in {jdir}", file=sys.stderr)
        return 2
    _USER_UMASK[0] = os.umask(0o077)  # our files are private; the job keeps the user's umask
    state: dict = {"status": "PENDING", "supervisor_pid": os.getpid()}
    stop_file = os.path.join(jdir, STOP_FILE)  # the head asks a starting job to stop here
    if os.path.exists(stop_file):
        write_json(status_path, dict(state, status="STOPPED", end_time=_now_ms(),
                                     message="Job was intentionally stopped."))
        return 0
    log = open(os.path.join(jdir, "logs"), "ab", buffering=0)
    try:
        try:
            if resources_requested(job):
                from . import runner  # joins the cluster: flowcore is imported only here
                end = runner.run(job, jdir, state, stopping,
                                 lambda: os.path.exists(stop_file), STOP_GRACE, log)
            else:
                end = _run_here(job, status_path, state, stopping, stop_file, log)
        except Exception as e:  # noqa: BLE001 - the job ends with the reason, not silently
            log.write(f"the job's supervisor failed: {e!r}\n".encode())
            end = {"status": "FAILED", "error_type": "JOB_SUPERVISOR_ACTOR_UNKNOWN_FAILURE",
                   "message": f"Unexpected error occurred: {e!r}"}
        if "status" not in end:
            code = end["driver_exit_code"]
            if stopping.is_set():
                end.update(status="STOPPED", message="Job was intentionally stopped.")
            elif code == 0:
                end.update(status="SUCCEEDED", message="Job finished successfully.")
            else:
                end.update(status="FAILED", error_type="JOB_ENTRYPOINT_COMMAND_ERROR",
                           message=f"Job entrypoint command failed with exit code {code}, "
                                   f"last available logs (truncated to 20,000 chars):\n"
                                   f"{_tail(os.path.join(jdir, 'logs'))}")
        write_json(status_path, dict(state, end_time=_now_ms(), **end))
    finally:
        log.close()
    return 0


def _run_here(job: dict, status_path: str, state: dict, stopping: threading.Event,
              stop_file: str, log: Any) -> dict:
    """Run the entrypoint as this process's child (no resources asked)."""
    try:
        proc = subprocess.Popen(job["entrypoint"], shell=True, cwd=job["cwd"], env=job["env"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, umask=_USER_UMASK[0])
    except OSError as e:
        log.write(f"cannot start the entrypoint: {e}\n".encode())
        return {"status": "FAILED", "message": f"the entrypoint could not start: {e}"}
    state.update(status="RUNNING", pid=proc.pid, start_time=_now_ms(),
                 message="Job is currently running.")
    write_json(status_path, state)
    stop_sent = 0.0
    while True:
        try:
            code = proc.wait(0.1)
            break
        except subprocess.TimeoutExpired:
            pass
        if stopping.is_set() or os.path.exists(stop_file):
            stopping.set()
            now = time.monotonic()
            if not stop_sent:
                stop_sent = now
                _signal_group(proc.pid, signal.SIGTERM)
            elif now - stop_sent > STOP_GRACE:
                _signal_group(proc.pid, signal.SIGKILL)
    _signal_group(proc.pid, signal.SIGKILL)  # whatever the entrypoint left running
    return {"driver_exit_code": code}


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: str, limit: int = 20_000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
