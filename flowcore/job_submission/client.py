"""``JobSubmissionClient``: the job API of a cluster's dashboard, from Python.

Method names, arguments and return values follow Ray's
``ray.job_submission.JobSubmissionClient``.  Every request carries the
cluster token (``Authorization: Bearer``).  A ``working_dir`` or
``py_modules`` given as a local path is zipped here (the same packing as
``runtime_env`` for tasks) and uploaded before the job is submitted.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, AsyncIterator

from .. import runtime_env as renv
from .. import session
from ..exceptions import AuthenticationError
from ..protocol.tls import resolve
from ..runtime_env import package_hash
from .models import JobDetails, JobStatus

#: seconds between log polls in ``tail_job_logs``
TAIL_INTERVAL = 0.2


def _state_dir() -> str:
    return os.environ.get("FLOWCORE_STATE_DIR") or os.path.expanduser("~/.flowcore")


def _head_dashboard(head: str, token: str) -> str:
    """The dashboard URL of the head at ``head`` (its tcp:// address), asked over
    the cluster protocol."""
    from ..client.core import CoreClient
    probe = CoreClient(head if "://" in head else f"tcp://{head}", token.encode(), None,
                       tls=resolve(None))
    probe.start()
    try:
        url = probe.dashboard_url
    finally:
        probe.close()
    if not url:
        raise ConnectionError(f"the head at {head} serves no dashboard, so it takes no jobs "
                              f"(start it without --dashboard-port -1)")
    return url


def resolve_address(address: str | None, token: str | None) -> tuple[str, str]:
    """The dashboard URL and token to talk to.

    ``address``: the dashboard's ``http(s)://host:port``, or the head's
    ``tcp://host:port`` (its dashboard is looked up).  None: the cluster
    this process is connected to, else ``FLOWCORE_ADDRESS``, else the head
    recorded by ``flowcore-scheduler`` in the state directory.  The token:
    ``token``, else the connected cluster's, else ``FLOWCORE_TOKEN``, else
    the state directory's ``token`` file.
    """
    connected_url = connected_token = None
    try:
        connected_token = session.session_token()
        if connected_token is not None:
            connected_url = session.session_info().get("dashboard_url")
    except Exception:  # noqa: BLE001 - not connected
        pass
    if address is None and connected_url:
        address, token = connected_url, token or connected_token
    token = token or connected_token or os.environ.get("FLOWCORE_TOKEN")
    address = address or os.environ.get("FLOWCORE_ADDRESS")
    if not address:
        try:
            with open(os.path.join(_state_dir(), "address")) as f:
                address = f.read().strip()
        except OSError:
            raise ConnectionError("no cluster to submit to: pass the dashboard's address "
                                  "'http://HOST:PORT' (or the head's tcp:// address) as "
                                  "address= (flowcore job: --address), set FLOWCORE_ADDRESS, "
                                  "or connect with flowcore.init() first") from None
    if not token:
        try:
            with open(os.path.join(_state_dir(), "token")) as f:
                token = f.read().strip() or None
        except OSError:
            pass
    if not token:
        raise ValueError("the job API needs the cluster token: pass token=... (flowcore "
                         "job: --token-file FILE), or set FLOWCORE_TOKEN")
    if not address.startswith(("http://", "https://")):
        address = _head_dashboard(address, token)
    return address.rstrip("/"), token


class JobSubmissionClient:
    """Submit and manage jobs on a cluster through its dashboard's HTTP API.

    ``address``: the dashboard (``http://host:port``) or the head
    (``tcp://host:port``); None means the cluster this process is connected
    to, else ``FLOWCORE_ADDRESS``.  ``token``: the cluster token (default:
    the connected cluster's, else ``FLOWCORE_TOKEN``).  ``headers`` are sent
    with every request; ``verify`` is passed to TLS verification for https.
    """

    def __init__(self, address: str | None = None, create_cluster_if_needed: bool = False,
                 cookies: dict | None = None, metadata: dict | None = None,
                 headers: dict | None = None, verify: Any = True, *,
                 token: str | None = None, timeout: float = 60.0) -> None:
        if create_cluster_if_needed:
            raise ValueError("create_cluster_if_needed=True is not supported: start a "
                             "cluster first (flowcore-scheduler, or flowcore.init())")
        self._address, self._token = resolve_address(address, token)
        self._headers = dict(headers or {})
        if cookies:
            self._headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        self._default_metadata = dict(metadata or {})
        self._timeout = timeout
        self._context = None
        if self._address.startswith("https://") and verify is not True:
            import ssl
            self._context = ssl.create_default_context(
                cafile=verify if isinstance(verify, str) else None)
            if verify is False:
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE

    def get_address(self) -> str:
        return self._address

    # ------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, body: Any = None, *,
                 raw: bytes | None = None) -> Any:
        data = raw if raw is not None else (
            None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self._address + path, data=data, method=method)
        for k, v in self._headers.items():
            req.add_header(k, v)
        req.add_header("Authorization", f"Bearer {self._token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/octet-stream" if raw is not None
                           else "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self._timeout,
                                        context=self._context) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error") or e.reason
            except ValueError:
                message = e.reason
            if e.code == 401:
                raise AuthenticationError(f"the dashboard at {self._address} refused the "
                                          f"token: {message}") from None
            raise RuntimeError(f"Request failed with status code {e.code}: {message}") \
                from None
        except urllib.error.URLError as e:
            raise ConnectionError(f"cannot reach the dashboard at {self._address}: "
                                  f"{e.reason}") from None

    def _upload(self, blob: bytes) -> str:
        h = package_hash(blob)
        if not self._request("GET", f"/api/packages/{h}").get("known"):
            self._request("PUT", f"/api/packages/{h}", raw=blob)
        return h

    def _prepare_runtime_env(self, runtime_env: dict | None) -> dict:
        if runtime_env is None:
            return {}
        renv.check(runtime_env)
        out: dict[str, Any] = {}
        wd = runtime_env.get("working_dir")
        if wd is not None:
            out["working_dir"] = "pkg://" + self._upload(renv.pack_directory(os.fspath(wd)))
        mods = runtime_env.get("py_modules")
        if mods is not None:
            out["py_modules"] = []
            for i, m in enumerate(mods):
                path = renv._module_path(m, f"runtime_env['py_modules'][{i}]")
                name = os.path.basename(path.rstrip(os.sep))
                blob = (renv.pack_directory(path, prefix=name + os.sep) if os.path.isdir(path)
                        else renv.pack_file(path))
                out["py_modules"].append(f"pkg://{self._upload(blob)}/{name}")
        if runtime_env.get("env_vars") is not None:
            out["env_vars"] = dict(runtime_env["env_vars"])
        return out

    # ------------------------------------------------------------ the API
    def submit_job(self, *, entrypoint: str, job_id: str | None = None,
                   runtime_env: dict[str, Any] | None = None,
                   metadata: dict[str, str] | None = None,
                   submission_id: str | None = None,
                   entrypoint_num_cpus: float | None = None,
                   entrypoint_num_gpus: float | None = None,
                   entrypoint_memory: int | None = None,
                   entrypoint_resources: dict[str, float] | None = None) -> str:
        """Start ``entrypoint`` (a shell command) as a job; returns its
        submission id.  ``runtime_env``: ``working_dir`` (a local directory,
        uploaded; the entrypoint runs in it), ``py_modules``, ``env_vars``.

        ``entrypoint_num_cpus`` / ``entrypoint_num_gpus`` / ``entrypoint_memory``
        (bytes) / ``entrypoint_resources`` (custom resources): reserved for
        the entrypoint itself, separately from the tasks and actors it starts,
        for as long as the job runs; the entrypoint then runs on a node that
        has them (the job stays PENDING until one has them free).  Without
        any (the default, 0), it runs on the head's node, reserving nothing."""
        for name, value in (("entrypoint_num_cpus", entrypoint_num_cpus),
                            ("entrypoint_num_gpus", entrypoint_num_gpus)):
            if value is not None and (not isinstance(value, (int, float))
                                      or isinstance(value, bool)):
                raise TypeError(f"{name} must be a number, got {type(value)}")
            if value is not None and value < 0:
                raise ValueError(f"{name}={value!r}: must be >= 0")
        if entrypoint_memory is not None and (not isinstance(entrypoint_memory, int)
                                              or isinstance(entrypoint_memory, bool)):
            raise TypeError(f"entrypoint_memory must be an integer, got "
                            f"{type(entrypoint_memory)}")
        if entrypoint_memory is not None and entrypoint_memory < 0:
            raise ValueError(f"entrypoint_memory={entrypoint_memory!r}: must be >= 0 (bytes)")
        if entrypoint_resources is not None:
            if not isinstance(entrypoint_resources, dict):
                raise TypeError(f"entrypoint_resources must be a dict, got "
                                f"{type(entrypoint_resources)}")
            for k, v in entrypoint_resources.items():
                if not isinstance(k, str):
                    raise TypeError(f"entrypoint_resources keys must be strings, got {type(k)}")
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise TypeError(f"entrypoint_resources values must be numbers, got "
                                    f"{type(v)}")
        if not isinstance(entrypoint, str) or not entrypoint.strip():
            raise ValueError("submit_job(entrypoint=...) must be a non-empty shell command, "
                             "e.g. 'python script.py'")
        if job_id is not None and submission_id is not None and job_id != submission_id:
            raise ValueError("job_id is the old name of submission_id: pass only one")
        body = {"entrypoint": entrypoint, "submission_id": submission_id or job_id,
                "runtime_env": self._prepare_runtime_env(runtime_env),
                "metadata": {**self._default_metadata, **(metadata or {})},
                "entrypoint_num_cpus": entrypoint_num_cpus,
                "entrypoint_num_gpus": entrypoint_num_gpus,
                "entrypoint_memory": entrypoint_memory,
                "entrypoint_resources": entrypoint_resources}
        return self._request("POST", "/api/jobs/", body)["submission_id"]

    def get_job_info(self, job_id: str) -> JobDetails:
        """The job's details (status, times, exit code, message...)."""
        return JobDetails.from_dict(self._request("GET", f"/api/jobs/{_quote(job_id)}"))

    def get_job_status(self, job_id: str) -> JobStatus:
        return self.get_job_info(job_id).status

    def list_jobs(self) -> list[JobDetails]:
        """Every job the head knows (kept in its state directory)."""
        return [JobDetails.from_dict(d) for d in self._request("GET", "/api/jobs/")["jobs"]]

    def stop_job(self, job_id: str) -> bool:
        """Stop a running job (SIGTERM, then SIGKILL); False if it had ended."""
        return bool(self._request("POST", f"/api/jobs/{_quote(job_id)}/stop", {})["stopped"])

    def delete_job(self, job_id: str) -> bool:
        """Forget an ended job and remove its logs."""
        return bool(self._request("DELETE", f"/api/jobs/{_quote(job_id)}")["deleted"])

    def get_job_logs(self, job_id: str) -> str:
        """Everything the job printed so far."""
        parts, offset = [], 0
        while True:
            r = self._request("GET", f"/api/jobs/{_quote(job_id)}/logs?offset={offset}")
            parts.append(r["logs"])
            offset = r["offset"]
            if not r.get("more"):
                return "".join(parts)

    async def tail_job_logs(self, job_id: str) -> AsyncIterator[str]:
        """Yield the job's output as it is written, until the job ends."""
        loop = asyncio.get_running_loop()
        offset = 0
        while True:
            r = await loop.run_in_executor(
                None, self._request, "GET", f"/api/jobs/{_quote(job_id)}/logs?offset={offset}")
            offset = r["offset"]
            if r["logs"]:
                yield r["logs"]
            if r.get("more"):
                continue
            if r["terminal"]:
                return
            await asyncio.sleep(TAIL_INTERVAL)

    def wait_until_finish(self, job_id: str, timeout: float | None = None) -> JobStatus:
        """Block until the job ends; returns its final status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.get_job_status(job_id)
            if status.is_terminal():
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {status} after {timeout} s")
            time.sleep(TAIL_INTERVAL)


def _quote(job_id: str) -> str:
    if not isinstance(job_id, str) or not job_id:
        raise TypeError(f"a job id is a non-empty string, got {job_id!r}")
    return urllib.parse.quote(job_id, safe="")
