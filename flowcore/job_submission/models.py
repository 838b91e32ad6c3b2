"""Job records as the job manager, the HTTP API and the client see them.

``JobStatus`` and ``JobDetails`` keep Ray's names and fields (times are
milliseconds since the epoch).  On disk, a job is a private directory
``<state dir>/jobs/<submission id>/`` holding ``job.json`` (what was
submitted, written by the head), ``status.json`` (written by the job's
supervisor process as the job runs), ``logs`` (the entrypoint's output) and
the unpacked ``working_dir``; the head reads them back after a restart.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
from typing import Any

SUBMISSION_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,96}$")


class JobStatus(str, enum.Enum):
    """The state of a job."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    def __str__(self) -> str:
        return self.value

    def is_terminal(self) -> bool:
        """Whether the job has ended (it will not change state again)."""
        return self in (JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED)


@dataclasses.dataclass
class JobDetails:
    """One job, as ``get_job_info`` and ``list_jobs`` return it."""

    submission_id: str
    entrypoint: str
    status: JobStatus
    type: str = "SUBMISSION"
    job_id: str | None = None
    message: str | None = None
    error_type: str | None = None
    start_time: int | None = None
    end_time: int | None = None
    metadata: dict[str, str] | None = None
    runtime_env: dict[str, Any] | None = None
    driver_exit_code: int | None = None
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    entrypoint_memory: int | None = None
    entrypoint_resources: dict[str, float] | None = None
    driver_node_id: str | None = None
    driver_agent_http_address: str | None = None
    driver_info: Any = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobDetails":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["status"] = JobStatus(kw["status"])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["status"] = self.status.value
        return d


def jobs_root(state_dir: str) -> str:
    return os.path.join(state_dir, "jobs")


def job_dir(state_dir: str, submission_id: str) -> str:
    if not SUBMISSION_ID_RE.match(submission_id):
        raise ValueError(f"submission_id {submission_id!r} is not valid: use 1-96 letters, "
                         f"digits, '_', '-' or '.'")
    return os.path.join(jobs_root(state_dir), submission_id)


def write_json(path: str, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically with ``data`` as JSON, readable by the owner only."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


#: what a job may reserve for its entrypoint (Ray's names)
RESOURCE_FIELDS = ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory",
                   "entrypoint_resources")


def resources_requested(job: dict[str, Any]) -> bool:
    """Whether a job reserves anything for its entrypoint (then it runs on a
    node that has it; else on the head's node without a reservation)."""
    return any(job.get(f) for f in RESOURCE_FIELDS)


def describe_resources(job: dict[str, Any]) -> str:
    """A job's entrypoint reservation in words, e.g. ``CPU=1, special=1``."""
    res = {"CPU": job.get("entrypoint_num_cpus"), "GPU": job.get("entrypoint_num_gpus"),
           "memory": job.get("entrypoint_memory"), **(job.get("entrypoint_resources") or {})}
    return ", ".join(f"{k}={v:g}" for k, v in res.items() if v)


def pending_message(job: dict[str, Any]) -> str:
    """What a job that has not started yet says."""
    if resources_requested(job):
        return (f"Job has not started yet: it waits for a node with "
                f"{describe_resources(job)} free for its entrypoint.")
    return "Job has not started yet."
