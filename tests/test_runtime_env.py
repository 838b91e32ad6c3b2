"""Runtime environments (working_dir, py_modules, env_vars) and code shipped
by value, on a LocalCluster whose workers cannot import the driver's files."""
from __future__ import annotations

import io
import os
import sys
import textwrap
import zipfile

import pytest

import flowcore
from flowcore.cluster import LocalCluster
from flowcore.node.pool import WorkerPool
from flowcore.runtime_env import combine, pack_directory, package_hash


@pytest.fixture(scope="module")
def lc(tmp_path_factory):
    flowcore.shutdown()
    cluster = LocalCluster(nodes=1, cpus_per_node=2, object_store_memory=64 << 20,
                           session_dir=str(tmp_path_factory.mktemp("rtenv-session")))
    yield cluster
    flowcore.shutdown()
    cluster.shutdown()


@pytest.fixture
def job(lc):
    """``job(runtime_env=...)``: connect this process as a driver (a job) of ``lc``."""
    def start(**kw):
        flowcore.shutdown()
        return flowcore.init(address=lc.address, token=lc.token, **kw)
    yield start
    flowcore.shutdown()


def _write(path, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))


@flowcore.remote
def read_env(name):
    return os.environ.get(name)


@flowcore.remote
def cwd_and_data():
    import rtenv_helper_wd  # lives in the working_dir only
    with open("data/input.txt") as f:
        return os.getcwd(), f.read(), rtenv_helper_wd.triple(3)


@flowcore.remote
class EnvActor:
    def get(self, name):
        return os.environ.get(name)

    def cwd(self):
        return os.getcwd()


# ------------------------------------------------------------ working_dir, py_modules
def test_working_dir_is_cwd_and_importable(job, tmp_path, lc):
    wd = tmp_path / "project"
    _write(str(wd / "data" / "input.txt"), "hello from the driver")
    _write(str(wd / "rtenv_helper_wd.py"), "def triple(x):\n    return 3 * x\n")
    _write(str(wd / ".git" / "HEAD"), "ref: refs/heads/main\n")
    job(runtime_env={"working_dir": str(wd)})
    cwd, data, nine = flowcore.get(cwd_and_data.remote(), timeout=60)
    assert data == "hello from the driver" and nine == 9
    assert cwd.startswith(os.path.join(lc.session_dir, "runtime_env")) and cwd != str(wd)
    assert os.path.exists(os.path.join(cwd, "data", "input.txt"))
    assert not os.path.exists(os.path.join(cwd, ".git"))
    # an actor of the job runs there too
    a = EnvActor.remote()
    assert flowcore.get(a.cwd.remote(), timeout=60) == cwd


def test_py_modules_are_importable(job, tmp_path):
    pkg = tmp_path / "mods" / "rtenv_pkg"
    _write(str(pkg / "__init__.py"), "from .inner import VALUE\n")
    _write(str(pkg / "inner.py"), "VALUE = 'from the package'\n")
    single = tmp_path / "mods" / "rtenv_single.py"
    _write(str(single), "def hi():\n    return 'from the file'\n")
    job(runtime_env={"py_modules": [str(pkg), str(single)]})

    @flowcore.remote
    def use():
        import rtenv_pkg
        import rtenv_single
        return rtenv_pkg.VALUE, rtenv_single.hi()
    assert flowcore.get(use.remote(), timeout=60) == ("from the package", "from the file")

    @flowcore.remote
    def plain():
        try:
            import rtenv_pkg  # noqa: F401
        except ImportError:
            return "not importable"
        return "importable"
    # a task that replaces py_modules runs in another worker, without them
    assert flowcore.get(plain.options(runtime_env={"py_modules": []}).remote(),
                        timeout=60) == "not importable"


# ------------------------------------------------------------ env_vars
def test_env_vars_in_tasks_and_actors_do_not_leak(job):
    job(runtime_env={"env_vars": {"RTENV_JOB": "job-1"}})
    assert flowcore.get(read_env.remote("RTENV_JOB"), timeout=60) == "job-1"
    a = EnvActor.remote()
    assert flowcore.get(a.get.remote("RTENV_JOB"), timeout=60) == "job-1"
    # per task: merged over the job's
    t = read_env.options(runtime_env={"env_vars": {"RTENV_TASK": "t"}})
    assert flowcore.get(t.remote("RTENV_TASK"), timeout=60) == "t"
    # per actor
    b = EnvActor.options(runtime_env={"env_vars": {"RTENV_ACTOR": "b"}}).remote()
    assert flowcore.get([b.get.remote("RTENV_ACTOR"), b.get.remote("RTENV_JOB")],
                        timeout=60) == ["b", "job-1"]
    # nested tasks inherit the running task's environment
    @flowcore.remote
    def nested():
        return flowcore.get(read_env.remote("RTENV_TASK"))
    assert flowcore.get(t_nested(nested).remote(), timeout=60) == "t"
    # the job's own tasks never see the per-task variable
    assert flowcore.get([read_env.remote("RTENV_TASK") for _ in range(4)],
                        timeout=60) == [None] * 4
    flowcore.kill(a)
    flowcore.kill(b)

    # a second job without runtime_env sees none of it, on the same workers' node
    job()
    assert flowcore.get([read_env.remote("RTENV_JOB") for _ in range(4)],
                        timeout=60) == [None] * 4
    assert flowcore.get(EnvActor.remote().get.remote("RTENV_ACTOR"), timeout=60) is None


def t_nested(fn):
    return fn.options(runtime_env={"env_vars": {"RTENV_TASK": "t"}})


# ------------------------------------------------------------ upload once
def test_same_content_is_uploaded_and_fetched_once(job, tmp_path):
    for name in ("a", "b"):  # two directories, same content
        _write(str(tmp_path / name / "same.txt"), "identical\n")
    job(runtime_env={"working_dir": str(tmp_path / "a")})
    assert flowcore.get(read_file.remote(), timeout=60) == "identical\n"
    job(runtime_env={"working_dir": str(tmp_path / "b")})
    assert flowcore.get(read_file.remote(), timeout=60) == "identical\n"
    h = package_hash(pack_directory(str(tmp_path / "a")))
    rows = [p for p in flowcore.state.list_packages() if p["hash"] == h]
    assert rows and rows[0]["uploads"] == 1 and rows[0]["fetches"] == 1


@flowcore.remote
def read_file():
    with open("same.txt") as f:
        return f.read()


# ------------------------------------------------------------ bad input
def test_bad_runtime_env_is_refused_with_the_allowed_keys(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key 'pip'.*env_vars, py_modules, working_dir"):
        flowcore.init(runtime_env={"pip": ["numpy"]})
    with pytest.raises(TypeError, match=r"env_vars.*str -> str"):
        flowcore.init(runtime_env={"env_vars": {"A": 1}})
    with pytest.raises(ValueError, match="is not a directory"):
        flowcore.init(runtime_env={"working_dir": str(tmp_path / "missing")})
    with pytest.raises(TypeError, match="must be a dict"):
        flowcore.init(runtime_env=["working_dir"])
    with pytest.raises(TypeError, match=r"py_modules.*must be a list"):
        read_env.options(runtime_env={"py_modules": "mod.py"})
    with pytest.raises(ValueError, match=r"read_env.options\(\): runtime_env: unknown "
                                         r"key 'conda'"):
        read_env.options(runtime_env={"conda": "env"})
    with pytest.raises(ValueError, match="FLOWCORE_TOKEN.*reserved"):
        EnvActor.options(runtime_env={"env_vars": {"FLOWCORE_TOKEN": "x"}})
    assert not flowcore.is_initialized()


def test_too_large_working_dir_is_refused(job, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWCORE_RUNTIME_ENV_MAX_BYTES", "1000")
    _write(str(tmp_path / "big" / "blob.txt"), "x" * 2000)
    with pytest.raises(ValueError, match=r"more than 1000 bytes.*FLOWCORE_RUNTIME_ENV_MAX_BYTES"):
        job(runtime_env={"working_dir": str(tmp_path / "big")})
    assert not flowcore.is_initialized()
    # the same limit applies per task
    job()
    with pytest.raises(ValueError, match="FLOWCORE_RUNTIME_ENV_MAX_BYTES"):
        read_env.options(runtime_env={"working_dir": str(tmp_path / "big")}).remote("X")


# ------------------------------------------------------------ code by value
def test_functions_and_classes_from_driver_only_modules_run_on_nodes(job, tmp_path):
    _write(str(tmp_path / "driveronly" / "rtenv_driver_only.py"), """
        import flowcore

        @flowcore.remote
        def shout(s):
            return s.upper() + helper()

        def helper():
            return "!"

        @flowcore.remote
        class Counter:
            def __init__(self):
                self.n = 0

            def add(self, k):
                self.n += k
                return self.n
        """)
    job()

    @flowcore.remote
    def can_import():
        try:
            import rtenv_driver_only  # noqa: F401
        except ImportError:
            return False
        return True
    sys.path.insert(0, str(tmp_path / "driveronly"))
    try:
        import rtenv_driver_only as m
        assert flowcore.get(can_import.remote(), timeout=60) is False  # the node cannot
        assert flowcore.get(m.shout.remote("hi"), timeout=60) == "HI!"
        c = m.Counter.remote()
        assert flowcore.get([c.add.remote(2), c.add.remote(3)], timeout=60) == [2, 5]
    finally:
        sys.path.remove(str(tmp_path / "driveronly"))
        sys.modules.pop("rtenv_driver_only", None)


# ------------------------------------------------------------ pure parts
def test_packing_is_deterministic_and_skips_caches(tmp_path):
    _write(str(tmp_path / "p" / "a.py"), "A = 1\n")
    _write(str(tmp_path / "p" / "__pycache__" / "a.cpython-311.pyc"), "junk")
    _write(str(tmp_path / "p" / ".git" / "config"), "[core]\n")
    blob = pack_directory(str(tmp_path / "p"))
    assert zipfile.ZipFile(io.BytesIO(blob)).namelist() == ["a.py"]
    os.utime(str(tmp_path / "p" / "a.py"), (1, 1))
    assert pack_directory(str(tmp_path / "p")) == blob
    assert pack_directory(str(tmp_path / "p"), prefix="p/") != blob


def test_combine_merges_env_vars_and_replaces_packages():
    job = combine(None, {"working_dir": "w1", "env_vars": {"A": "1", "B": "2"}})
    task = combine(job, {"env_vars": {"B": "3"}, "py_modules": ["m1"]})
    assert task["working_dir"] == "w1" and task["py_modules"] == ["m1"]
    assert task["env_vars"] == {"A": "1", "B": "3"} and task["key"] != job["key"]
    assert combine(job, {})["key"] == job["key"]
    assert combine(None, {"env_vars": {}}) is None


def test_pool_dedicates_workers_per_environment():
    pool = WorkerPool({"CPU": 2.0})
    w1, w2 = [a[1] for a in pool.startup()]
    pool.worker_ready(w1, 1)
    pool.worker_ready(w2, 2)
    env = combine(None, {"env_vars": {"X": "1"}})
    actions = pool.task_arrived({"tid": b"t1", "res": {"CPU": 1.0}, "renv": env})
    # no idle worker has that environment: an idle plain one makes way for one that has
    assert [a[0] for a in actions] == ["retire", "spawn"]
    new = actions[1][1]
    assert pool.workers[new].renv == env
    run = pool.worker_ready(new, 3)
    assert run == [("run", new, run[0][2])] and run[0][2]["tid"] == b"t1"
    # a plain task never goes to the environment's worker
    actions = pool.task_arrived({"tid": b"t2", "res": {"CPU": 1.0}})
    assert [a[0] for a in actions] == ["run"] and actions[0][1] != new
    # a failed setup fails the tasks waiting for that environment only
    env2 = combine(None, {"env_vars": {"X": "2"}})
    pool.worker_idle(new)
    actions = pool.task_arrived({"tid": b"t3", "res": {"CPU": 1.0}, "renv": env2})
    (spawn,) = [a[1] for a in actions if a[0] == "spawn"]
    failed = pool.env_failed(spawn)
    assert [a[1]["tid"] for a in failed if a[0] == "env_failed"] == [b"t3"]
    assert spawn not in pool.workers and not pool.queue


def test_an_environment_that_cannot_be_set_up_fails_its_work_only(job):
    job()
    client = flowcore.context.current_client()
    # a descriptor naming a package the head does not have
    client.runtime_env = combine(None, {"working_dir": "0" * 32})
    ref = read_env.remote("X")
    actor = EnvActor.remote()
    call = actor.get.remote("X")
    client.runtime_env = None
    with pytest.raises(flowcore.exceptions.RuntimeEnvSetupError, match="could not be set up"):
        flowcore.get(ref, timeout=60)
    with pytest.raises(flowcore.exceptions.ActorDiedError, match="could not be set up"):
        flowcore.get(call, timeout=60)
    # the node goes on running everything else
    assert flowcore.get([read_env.remote("X") for _ in range(3)], timeout=60) == [None] * 3


def test_embedded_cluster_with_runtime_env(tmp_path, monkeypatch):
    flowcore.shutdown()
    _write(str(tmp_path / "wd" / "big.txt"), "y" * 5000)
    monkeypatch.setenv("FLOWCORE_RUNTIME_ENV_MAX_BYTES", "4096")
    with pytest.raises(ValueError, match="more than 4096 bytes"):
        flowcore.init(num_cpus=1, object_store_memory=64 << 20,
                      session_dir=str(tmp_path / "s0"),
                      runtime_env={"working_dir": str(tmp_path / "wd")})
    assert not flowcore.is_initialized()  # and its cluster is stopped (conftest checks)
    monkeypatch.delenv("FLOWCORE_RUNTIME_ENV_MAX_BYTES")
    try:
        flowcore.init(num_cpus=1, object_store_memory=64 << 20, session_dir=str(tmp_path / "s1"),
                      runtime_env={"working_dir": str(tmp_path / "wd"),
                                   "env_vars": {"RTENV_EMBEDDED": "yes"}})
        assert flowcore.get(read_env.remote("RTENV_EMBEDDED"), timeout=60) == "yes"

        @flowcore.remote
        def size():
            return os.path.getsize("big.txt")
        assert flowcore.get(size.remote(), timeout=60) == 5000
    finally:
        flowcore.shutdown()


def test_head_refuses_a_package_that_does_not_match_its_hash():
    from flowcore.scheduler.packages import PackageTable
    table = PackageTable()
    assert "do not match" in table.add("0" * 32, b"not a zip")
    blob = b"some bytes"
    h = package_hash(blob)
    assert table.add(h, blob) is None and table.add(h, blob) is None
    assert table.get(h) == blob and table.get("missing") is None
    assert table.listing() == [{"hash": h, "size": len(blob), "uploads": 2, "fetches": 1}]
