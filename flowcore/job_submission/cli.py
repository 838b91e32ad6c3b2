"""``flowcore job``: submit and manage jobs from the shell.

    flowcore job submit [--address ADDR] [--working-dir DIR] [--runtime-env-json JSON]
                        [--submission-id ID] [--metadata-json JSON] [--no-wait]
                        [--entrypoint-num-cpus N] [--entrypoint-num-gpus N]
                        [--entrypoint-memory BYTES] [--entrypoint-resources JSON]
                        -- python script.py ...
    flowcore job status|logs [--follow]|stop [--no-wait]|delete ID [--address ADDR]
    flowcore job list [--address ADDR]

``--address``: the dashboard's ``http://host:port`` or the head's
``tcp://host:port`` (default ``FLOWCORE_ADDRESS``, else the head recorded in
the state directory).  The token comes from ``--token-file``, else
``FLOWCORE_TOKEN``, else the state directory's ``token`` file.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..exceptions import AuthenticationError

if TYPE_CHECKING:
    from .client import JobSubmissionClient


def _client(args: argparse.Namespace) -> Any:
    from .client import JobSubmissionClient
    token = None
    if args.token_file:
        with open(args.token_file) as f:
            token = f.read().strip()
    return JobSubmissionClient(args.address, token=token)


def _json_arg(text: str | None, flag: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        raise SystemExit(f"flowcore job: {flag} is not valid JSON: {e}") from None


def _follow(client: JobSubmissionClient, sid: str) -> None:
    async def run() -> None:
        async for chunk in client.tail_job_logs(sid):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    asyncio.run(run())


def cmd_submit(args: argparse.Namespace) -> int:
    entry = list(args.entrypoint)
    if entry and entry[0] == "--":
        entry = entry[1:]
    if not entry:
        raise SystemExit("flowcore job submit: give the entrypoint after --, e.g. "
                         "flowcore job submit -- python script.py")
    runtime_env = _json_arg(args.runtime_env_json, "--runtime-env-json") or {}
    if not isinstance(runtime_env, dict):
        raise SystemExit("flowcore job submit: --runtime-env-json must be a JSON object")
    if args.working_dir:
        runtime_env["working_dir"] = args.working_dir
    metadata = _json_arg(args.metadata_json, "--metadata-json")
    client = _client(args)
    entrypoint = entry[0] if len(entry) == 1 else shlex.join(entry)
    resources = _json_arg(args.entrypoint_resources, "--entrypoint-resources")
    if resources is not None and not isinstance(resources, dict):
        raise SystemExit("flowcore job submit: --entrypoint-resources must be a JSON object, "
                         "e.g. '{\"special\": 1}'")
    sid = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env or None,
                            submission_id=args.submission_id, metadata=metadata,
                            entrypoint_num_cpus=args.entrypoint_num_cpus,
                            entrypoint_num_gpus=args.entrypoint_num_gpus,
                            entrypoint_memory=args.entrypoint_memory,
                            entrypoint_resources=resources)
    print(f"Job '{sid}' submitted successfully", flush=True)
    if args.no_wait:
        print(f"Query the status of the job:\n  flowcore job status {sid}\n"
              f"Follow its logs:\n  flowcore job logs {sid} --follow\n"
              f"Stop it:\n  flowcore job stop {sid}")
        return 0
    print("Tailing logs until the job exits (disable with --no-wait):", flush=True)
    _follow(client, sid)
    status = client.get_job_status(sid)
    print(f"Job '{sid}' {status.value.lower()}")
    return 0 if status.value == "SUCCEEDED" else 1


def cmd_status(args: argparse.Namespace) -> int:
    info = _client(args).get_job_info(args.job_id)
    print(f"Status for job '{args.job_id}': {info.status.value}")
    if info.message:
        print(f"Status message: {info.message}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.follow:
        _follow(client, args.job_id)
    else:
        sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    client = _client(args)
    stopped = client.stop_job(args.job_id)
    if not stopped:
        print(f"Job '{args.job_id}' had already ended "
              f"({client.get_job_status(args.job_id).value})")
        return 0
    print(f"Attempting to stop job '{args.job_id}'")
    if args.no_wait:
        return 0
    while not client.get_job_status(args.job_id).is_terminal():
        time.sleep(0.2)
    print(f"Job '{args.job_id}' was stopped")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    _client(args).delete_job(args.job_id)
    print(f"Job '{args.job_id}' deleted successfully")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    jobs = _client(args).list_jobs()
    rows = [("SUBMISSION ID", "STATUS", "EXIT", "STARTED", "ENTRYPOINT")]
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S",
                                time.localtime(j.start_time / 1000)) if j.start_time else "-"
        rows.append((j.submission_id, j.status.value,
                     "-" if j.driver_exit_code is None else str(j.driver_exit_code),
                     started, j.entrypoint))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowcore", description="flowcore command line")
    p.add_argument("--version", action="version", version=f"flowcore {__version__}")
    top = p.add_subparsers(dest="group", required=True)
    job = top.add_parser("job", help="submit and manage jobs",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = job.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--address", default=None,
                        help="the dashboard's http://host:port or the head's tcp://host:port "
                             "(default: $FLOWCORE_ADDRESS)")
        sp.add_argument("--token-file", default=None,
                        help="read the cluster token here (default: $FLOWCORE_TOKEN)")

    s = sub.add_parser("submit", help="run a shell command as a job on the cluster")
    common(s)
    s.add_argument("--working-dir", default=None,
                   help="local directory uploaded as the job's working directory")
    s.add_argument("--runtime-env-json", default=None,
                   help='runtime_env as JSON, e.g. \'{"env_vars": {"A": "1"}}\'')
    s.add_argument("--submission-id", default=None, help="the job's id (default: generated)")
    s.add_argument("--metadata-json", default=None, help="metadata as a JSON object")
    s.add_argument("--entrypoint-num-cpus", type=float, default=None,
                   help="CPUs reserved for the entrypoint (runs it on a node that has them)")
    s.add_argument("--entrypoint-num-gpus", type=float, default=None,
                   help="GPUs reserved for the entrypoint")
    s.add_argument("--entrypoint-memory", type=int, default=None,
                   help="memory (bytes) reserved for the entrypoint")
    s.add_argument("--entrypoint-resources", default=None,
                   help='custom resources reserved for the entrypoint, as JSON, e.g. '
                        '\'{"special": 1}\'')
    s.add_argument("--no-wait", action="store_true", help="do not follow the job's logs")
    s.add_argument("entrypoint", nargs=argparse.REMAINDER,
                   help="-- followed by the command, e.g. -- python script.py")
    s.set_defaults(func=cmd_submit)
    for name, fn, helptext in (("status", cmd_status, "the job's status"),
                               ("logs", cmd_logs, "the job's output"),
                               ("stop", cmd_stop, "stop a running job"),
                               ("delete", cmd_delete, "forget an ended job")):
        sp = sub.add_parser(name, help=helptext)
        common(sp)
        sp.add_argument("job_id")
        if name == "logs":
            sp.add_argument("-f", "--follow", action="store_true",
                            help="keep printing until the job ends")
        if name == "stop":
            sp.add_argument("--no-wait", action="store_true",
                            help="do not wait for the job to end")
        sp.set_defaults(func=fn)
    ls = sub.add_parser("list", help="every job the cluster knows")
    common(ls)
    ls.set_defaults(func=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConnectionError, AuthenticationError, RuntimeError, ValueError, TypeError,
            OSError) as e:
        print(f"flowcore job {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
