"""Bad input gets a clear error at once: resource amounts, a dashboard port
given as the head address, unpicklable functions, results and exceptions,
get() timeouts."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time

import pytest

import flowcore
from flowcore.exceptions import SerializationError, TaskError
from flowcore.node import cli as node_cli

BIN = os.path.dirname(sys.executable)


@pytest.mark.parametrize("argv, words", [
    (["--num-cpus", "-1"], "--num-cpus: '-1' is not a number >= 0"),
    (["--num-cpus", "nan"], "--num-cpus: 'nan' is not a number >= 0"),
    (["--num-cpus", "inf"], "--num-cpus: 'inf' is not a number >= 0"),
    (["--num-gpus", "-2"], "--num-gpus: '-2' is not an integer >= 0"),
    (["--object-store-memory", "-5"], "--object-store-memory: '-5' is not an integer >= 0"),
    (["--worker-memory-limit", "1.5"], "--worker-memory-limit: '1.5' is not an integer >= 0"),
    (["--max-workers", "0"], "--max-workers: a node needs at least one worker"),
])
def test_worker_cli_refuses_bad_amounts(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        node_cli.main(["tcp://127.0.0.1:1", "--token", "x", *argv])
    assert info.value.code == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("resources", ['{"disk": -1}', '{"disk": Infinity}', '{"disk": NaN}'])
def test_worker_cli_refuses_bad_custom_resources(resources, tmp_path):
    done = subprocess.run([os.path.join(BIN, "flowcore-worker"), "tcp://127.0.0.1:1",
                           "--token", "x", "--state-dir", str(tmp_path), "--resources",
                           resources], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "bad --resources" in done.stderr and "finite numbers >= 0" in done.stderr


@pytest.mark.parametrize("kwargs", [
    {"num_cpus": -1}, {"num_cpus": math.nan}, {"num_cpus": math.inf}, {"num_gpus": -1},
    {"resources": {"disk": -1}}, {"resources": {"disk": math.inf}},
    {"resources": {"disk": math.nan}},
])
def test_init_refuses_bad_amounts(kwargs):
    flowcore.shutdown()
    with pytest.raises(ValueError, match=r">= 0"):
        flowcore.init(**kwargs)
    assert not flowcore.is_initialized()


def test_get_timeout_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match=r"get\(timeout='5'\): expected None or a number"):
        flowcore.get([], timeout="5")
    with pytest.raises(ValueError, match=r">= 0"):
        flowcore.get([], timeout=-1)


# ------------------------------------------------------------- on a cluster
@pytest.fixture(scope="module")
def cluster():
    flowcore.shutdown()
    info = flowcore.init(num_cpus=1)
    yield info
    flowcore.shutdown()


@pytest.mark.timeout(60)
def test_init_with_the_dashboard_port_says_it_is_http_at_once(cluster):
    code = ("import flowcore, time\n"
            "t = time.monotonic()\n"
            "try:\n"
            f"    flowcore.init(address={cluster['dashboard_url'].replace('http', 'tcp')!r},"
            " token='x')\n"
            "except ConnectionError as e:\n"
            "    print(round(time.monotonic() - t, 1), e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=50)
    assert done.returncode == 0, done.stderr
    seconds, _, message = done.stdout.strip().partition(" ")
    assert "speaks HTTP" in message and "web dashboard" in message
    assert f"connect to {cluster['address']}" in message
    assert float(seconds) < 8.0, "must not wait for the 10 s authentication timeout"


def test_closure_capturing_a_lock_names_function_and_path(cluster):
    lock = threading.Lock()

    def make():
        def job(x):
            with lock:
                return x
        return job

    with pytest.raises(SerializationError) as info:
        flowcore.remote(make()).remote(1)
    message = str(info.value)
    assert "remote function" in message and "make.<locals>.job" in message
    assert "_thread.lock" in message and "<closure variable 'lock'>" in message
    assert isinstance(info.value, TypeError)  # as before, and as pickle says


class Unrebuildable:
    def __reduce__(self):
        return (int, ("not a number",))


@flowcore.remote
def makes_unrebuildable():
    return Unrebuildable()


def test_result_that_fails_to_unpickle_names_task_and_class(cluster):
    with pytest.raises(SerializationError) as info:
        flowcore.get(makes_unrebuildable.remote(), timeout=60)
    message = str(info.value)
    assert "the result of task makes_unrebuildable" in message
    assert "while rebuilding builtins.int" in message and "ValueError" in message


class LockedError(Exception):
    def __init__(self):
        super().__init__("disk full on /data")
        self.lock = threading.Lock()


@flowcore.remote
def raises_unpicklable():
    raise LockedError()


def test_unpicklable_exception_reports_type_and_text(cluster):
    with pytest.raises(TaskError) as info:
        flowcore.get(raises_unpicklable.remote(), timeout=60)
    first = str(info.value).splitlines()[0]
    assert first == "task raises_unpicklable() raised LockedError: disk full on /data"
    assert info.value.cause is None and info.value.cause_text.startswith("LockedError")
