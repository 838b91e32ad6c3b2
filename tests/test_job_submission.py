"""Job submission: the HTTP API on the dashboard port (behind the token),
JobSubmissionClient and the ``flowcore job`` command line."""
from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import pytest

import flowcore
from flowcore.cluster import LocalCluster
from flowcore.exceptions import AuthenticationError
from flowcore.job_submission import JobStatus, JobSubmissionClient

pytestmark = pytest.mark.timeout(120)

SCRIPT = textwrap.dedent("""
    import os
    import flowcore
    import helper

    flowcore.init()

    @flowcore.remote
    def compute(x):
        import helper  # shipped to the workers with the job's working_dir
        return helper.BASE + x

    print("cwd-is-working-dir", os.path.exists("helper.py"), flush=True)
    print("answer", flowcore.get(compute.remote(2)), os.environ["GREETING"], flush=True)
""")


@pytest.fixture(scope="module")
def jobs_cluster(tmp_path_factory):
    flowcore.shutdown()
    info = flowcore.init(num_cpus=2, object_store_memory=128 << 20,
                         session_dir=str(tmp_path_factory.mktemp("jobs")))
    yield info
    flowcore.shutdown()


@pytest.fixture
def workdir(tmp_path):
    d = tmp_path / "project"
    (d / "pkg").mkdir(parents=True)
    (d / "main.py").write_text(SCRIPT)
    (d / "helper.py").write_text("BASE = 40\n")
    (d / "pkg" / "data.txt").write_text("x")
    return d


def test_submit_with_working_dir_and_follow_logs(jobs_cluster, workdir):
    client = JobSubmissionClient()  # the cluster this process is connected to
    assert client.get_address() == jobs_cluster["dashboard_url"]
    sid = client.submit_job(entrypoint="python main.py", submission_id="first-job",
                            runtime_env={"working_dir": str(workdir),
                                         "env_vars": {"GREETING": "hello"}},
                            metadata={"owner": "tests"})
    assert sid == "first-job"

    async def follow():
        return "".join([chunk async for chunk in client.tail_job_logs(sid)])

    logs = asyncio.run(follow())
    assert "cwd-is-working-dir True" in logs
    assert "answer 42 hello" in logs
    info = client.get_job_info(sid)
    assert info.status == JobStatus.SUCCEEDED and info.status.is_terminal()
    assert info.driver_exit_code == 0 and info.metadata == {"owner": "tests"}
    assert info.end_time >= info.start_time
    assert client.get_job_logs(sid) == logs
    with pytest.raises(RuntimeError, match="already exists"):
        client.submit_job(entrypoint="true", submission_id="first-job")
    # what the head keeps is private to its user
    jdir = os.path.join(jobs_cluster["session_dir"], "jobs", sid)
    assert stat.S_IMODE(os.stat(jdir).st_mode) == 0o700
    for root, dirs, files in os.walk(jdir):
        dirs[:] = [d for d in dirs if d != "__pycache__"]  # written by the job's Python
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o700, d
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) & 0o077 == 0, f
    for name in ("logs", "job.json", "status.json", "working_dir/helper.py"):
        assert stat.S_IMODE(os.stat(os.path.join(jdir, name)).st_mode) == 0o600


def test_failing_and_stopped_jobs(jobs_cluster, tmp_path):
    client = JobSubmissionClient()
    failing = client.submit_job(entrypoint="python -c 'import sys; print(\"bye\"); sys.exit(3)'")
    assert client.wait_until_finish(failing, 60) == JobStatus.FAILED
    info = client.get_job_info(failing)
    assert info.driver_exit_code == 3 and "exit code 3" in info.message
    started = tmp_path / "started"
    long = client.submit_job(entrypoint=f"touch {started}; exec sleep 300")

    async def stop_once_running():
        async for _ in _poll(lambda: started.exists()):
            pass
        assert client.get_job_status(long) == JobStatus.RUNNING
        assert client.stop_job(long) is True

    asyncio.run(stop_once_running())
    assert client.wait_until_finish(long, 60) == JobStatus.STOPPED
    assert client.stop_job(long) is False
    with pytest.raises(RuntimeError, match="does not exist"):
        client.get_job_status("no-such-job")
    ids = [j.submission_id for j in client.list_jobs()]
    assert failing in ids and long in ids
    assert client.delete_job(failing) and failing not in \
        [j.submission_id for j in client.list_jobs()]


async def _poll(done, timeout=60.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not done():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.05)
        yield


def test_unauthenticated_submit_is_refused_and_runs_nothing(jobs_cluster, tmp_path):
    url = jobs_cluster["dashboard_url"]
    marker = tmp_path / "ran"
    body = json.dumps({"entrypoint": f"touch {marker}", "submission_id": "intruder"}).encode()
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        req = urllib.request.Request(url + "/api/jobs/", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(req, timeout=30)
        assert ei.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(url + "/api/jobs/", timeout=30)
    assert ei.value.code == 401
    blob = b"PK" + b"\0" * 1000  # nor can a package be uploaded without the token
    from flowcore.runtime_env import package_hash
    req = urllib.request.Request(f"{url}/api/packages/{package_hash(blob)}", data=blob,
                                 method="PUT")
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req, timeout=30)
    assert ei.value.code == 401
    asked = urllib.request.Request(
        f"{url}/api/packages/{package_hash(blob)}",
        headers={"Authorization": f"Bearer {flowcore.session._cluster.token}"})
    assert json.loads(urllib.request.urlopen(asked, timeout=30).read()) == {"known": False}
    with pytest.raises(AuthenticationError):
        JobSubmissionClient(url, token="wrong").list_jobs()
    client = JobSubmissionClient()
    assert "intruder" not in [j.submission_id for j in client.list_jobs()]
    assert not os.path.exists(os.path.join(jobs_cluster["session_dir"], "jobs", "intruder"))
    assert not marker.exists()


def test_cli_submit_status_logs_list(jobs_cluster, workdir):
    env = dict(os.environ, FLOWCORE_TOKEN=flowcore.session._cluster.token,
               FLOWCORE_ADDRESS=jobs_cluster["address"])  # the head's tcp:// address
    cli = [sys.executable, "-m", "flowcore.job_submission.cli", "job"]

    def run(*args):
        return subprocess.run(cli + list(args), env=env, capture_output=True, text=True,
                              timeout=90)

    out = run("submit", "--working-dir", str(workdir), "--submission-id", "cli-job",
              "--runtime-env-json", '{"env_vars": {"GREETING": "hi"}}', "--",
              "python", "main.py")
    assert out.returncode == 0, out.stderr
    assert "Job 'cli-job' submitted successfully" in out.stdout
    assert "answer 42 hi" in out.stdout and "Job 'cli-job' succeeded" in out.stdout
    status = run("status", "cli-job")
    assert "SUCCEEDED" in status.stdout
    assert "answer 42 hi" in run("logs", "cli-job").stdout
    assert "cli-job" in run("list").stdout
    nowait = run("submit", "--address", jobs_cluster["dashboard_url"], "--no-wait", "--",
              "false")
    assert nowait.returncode == 0 and "flowcore job status" in nowait.stdout
    failing = run("submit", "--", "python", "-c", "raise SystemExit(5)")
    assert failing.returncode == 1 and "failed" in failing.stdout
    env["FLOWCORE_TOKEN"] = "wrong"
    refused = run("list")
    assert refused.returncode == 1 and "refused the token" in refused.stderr


def test_job_records_survive_a_head_restart(tmp_path):
    with LocalCluster(nodes=1, cpus_per_node=1, object_store_memory=64 << 20,
                      session_dir=str(tmp_path / "c")) as cluster:
        client = JobSubmissionClient(cluster.address, token=cluster.token)
        done = client.submit_job(entrypoint="echo before-restart", submission_id="done")
        assert client.wait_until_finish(done, 60) == JobStatus.SUCCEEDED
        release = tmp_path / "release"
        wait = f"echo started; while [ ! -e {release} ]; do sleep 0.05; done; echo released"
        waiting = client.submit_job(entrypoint=wait, submission_id="across")
        assert client.get_job_status(waiting) in (JobStatus.PENDING, JobStatus.RUNNING)
        # one run on another node, by its supervisor's actor, survives it too
        cluster.add_node(num_cpus=1, resources={"special": 1}, object_store_memory=64 << 20)
        client.submit_job(entrypoint=wait, submission_id="placed-across",
                          entrypoint_resources={"special": 1})
        deadline = time.monotonic() + 60
        while "started" not in client.get_job_logs("placed-across"):
            assert time.monotonic() < deadline, client.get_job_info("placed-across")
            time.sleep(0.1)
        cluster.kill_head()
        cluster.restart_head()
        release.touch()
        client = JobSubmissionClient(cluster.address, token=cluster.token)  # new dashboard port
        assert client.wait_until_finish("across", 60) == JobStatus.SUCCEEDED
        assert client.wait_until_finish("placed-across", 90) == JobStatus.SUCCEEDED, \
            client.get_job_info("placed-across").message
        assert client.get_job_logs("placed-across") == "started\nreleased\n"
        jobs = {j.submission_id: j for j in client.list_jobs()}
        assert jobs["done"].status == JobStatus.SUCCEEDED
        assert "before-restart" in client.get_job_logs("done")
        assert "released" in client.get_job_logs("across")


def test_dashboard_jobs_tab_and_cookie_sessions_need_xsrf(jobs_cluster):
    import http.cookiejar
    import urllib.parse
    url = jobs_cluster["dashboard_url"]
    token = flowcore.session._cluster.token
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(f"{url}/?token={urllib.parse.quote(token)}", timeout=30).read().decode()
    assert 'data-page="jobs"' in page and 'id="jobs-table"' in page
    listed = json.loads(opener.open(url + "/api/jobs/", timeout=30).read())
    assert isinstance(listed["jobs"], list)
    # a logged-in browser cannot be made to submit by another site (no XSRF token)
    req = urllib.request.Request(url + "/api/jobs/", method="POST",
                                 data=json.dumps({"entrypoint": "true"}).encode())
    with pytest.raises(urllib.error.HTTPError) as ei:
        opener.open(req, timeout=30)
    assert ei.value.code == 403
    assert len(json.loads(opener.open(url + "/api/jobs/", timeout=30).read())["jobs"]) == \
        len(listed["jobs"])


def test_a_job_stopped_right_after_submission_never_runs(jobs_cluster, tmp_path):
    client = JobSubmissionClient()
    marker = tmp_path / "ran"
    sid = client.submit_job(entrypoint=f"sleep 2; touch {marker}")
    assert client.stop_job(sid) is True  # while its supervisor may still be starting
    assert client.wait_until_finish(sid, 60) == JobStatus.STOPPED
    assert not marker.exists()


def test_py_modules_reach_the_entrypoint_and_its_tasks(jobs_cluster, tmp_path):
    pkg = tmp_path / "mylib"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("MAGIC = 7\n")
    single = tmp_path / "tool.py"
    single.write_text("def twice(x):\n    return 2 * x\n")
    script = ("import flowcore, mylib, tool; flowcore.init(); "
              "f = flowcore.remote(lambda: __import__('mylib').MAGIC + "
              "__import__('tool').twice(1)); print('sum', flowcore.get(f.remote()))")
    client = JobSubmissionClient()
    sid = client.submit_job(entrypoint=f'python -c "{script}"',
                            runtime_env={"py_modules": [str(pkg), str(single)]})
    assert client.wait_until_finish(sid, 60) == JobStatus.SUCCEEDED, client.get_job_logs(sid)
    assert "sum 9" in client.get_job_logs(sid)


def test_bad_submissions_are_refused_with_the_reason(jobs_cluster, tmp_path):
    client = JobSubmissionClient()
    with pytest.raises(ValueError, match="entrypoint"):
        client.submit_job(entrypoint=" ")
    with pytest.raises(TypeError, match="entrypoint_num_cpus must be a number"):
        client.submit_job(entrypoint="true", entrypoint_num_cpus="1")
    with pytest.raises(TypeError, match="entrypoint_resources values must be numbers"):
        client.submit_job(entrypoint="true", entrypoint_resources={"special": "1"})
    with pytest.raises(ValueError, match="unknown key 'pip'"):
        client.submit_job(entrypoint="true", runtime_env={"pip": ["requests"]})
    url = jobs_cluster["dashboard_url"] + "/api/jobs/"
    auth = {"Authorization": f"Bearer {flowcore.session._cluster.token}",
            "Content-Type": "application/json"}
    for body, reason in (({"entrypoint": "true", "submission_id": "../escape"}, "not valid"),
                         ({"entrypoint": "true", "submission_id": 7}, "must be a string"),
                         ({"entrypoint": "true", "runtime_env": {"working_dir": "/etc"}},
                          "not an uploaded package"),
                         ({"entrypoint": "true", "metadata": {"a": 1}}, "metadata"),
                         ({"entrypoint": "true", "entrypoint_num_gpus": -1},
                          "entrypoint_num_gpus must be a number >= 0"),
                         ({"entrypoint": "true", "entrypoint_resources": {"CPU": 1}},
                          "use entrypoint_num_cpus")):
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers=auth)
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(req, timeout=30)
        assert ei.value.code == 400
        assert reason in json.loads(ei.value.read())["error"]


@pytest.mark.timeout(180)
def test_browser_jobs_tab_lists_jobs_and_shows_output(jobs_cluster, browser):
    client = JobSubmissionClient()
    sid = client.submit_job(entrypoint="echo hello-from-the-jobs-tab",
                            submission_id="tab-job")
    assert client.wait_until_finish(sid, 60) == JobStatus.SUCCEEDED
    token = flowcore.session._cluster.token
    errors: list[str] = []
    page = browser.new_page()
    try:
        page.set_default_timeout(30_000)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(jobs_cluster["dashboard_url"] + "/?token=" + token)
        page.click("#tabs a[data-page=jobs]")
        row = page.locator("#jobs-table tbody tr", has_text="tab-job")
        row.wait_for()
        assert "SUCCEEDED" in row.inner_text()
        row.click()
        page.locator("#job-detail pre.logs", has_text="hello-from-the-jobs-tab").wait_for()
        page.locator("#job-detail .job-placement", has_text="head's node").wait_for()
    finally:
        page.close()
    assert not errors, errors


PLACED = textwrap.dedent("""
    import os, sys, time
    import flowcore
    import helper

    flowcore.init()
    print("node", flowcore.get_runtime_context().get_node_id(), helper.BASE, flush=True)
    print("task", flowcore.get(flowcore.remote(lambda: 1).remote()), flush=True)
    release = sys.argv[1] if len(sys.argv) > 1 else None
    while release and not os.path.exists(release):
        time.sleep(0.05)
""")


@pytest.mark.timeout(180)
def test_entrypoint_resources_choose_the_node_and_are_held(tmp_path, monkeypatch, workdir):
    """A job reserving a custom resource only the second node has runs there
    (its driver on that node), holds it while it runs, stops, and gives it
    back; one asking for what no node has stays PENDING saying why, then
    fails after the start timeout (Ray's semantics)."""
    flowcore.shutdown()
    monkeypatch.setenv("FLOWCORE_JOB_START_TIMEOUT_SECONDS", "20")  # read by the head's jobs
    (workdir / "placed.py").write_text(PLACED)
    with LocalCluster(nodes=1, cpus_per_node=1, object_store_memory=64 << 20,
                      session_dir=str(tmp_path / "c")) as cluster:
        second = cluster.add_node(num_cpus=1, num_gpus=1, resources={"special": 1},
                                  object_store_memory=64 << 20)
        monkeypatch.delenv("FLOWCORE_JOB_START_TIMEOUT_SECONDS")
        flowcore.init(address=cluster.address, token=cluster.token)
        try:
            client = JobSubmissionClient(cluster.address, token=cluster.token)
            nowhere = client.submit_job(entrypoint="echo never", submission_id="nowhere",
                                        entrypoint_resources={"nowhere": 1})
            release = tmp_path / "release"
            first = client.submit_job(entrypoint=f"python placed.py {release}",
                                      submission_id="placed",
                                      runtime_env={"working_dir": str(workdir)},
                                      entrypoint_resources={"special": 1})

            def until(cond, what, timeout=60.0):
                end = time.monotonic() + timeout
                while not cond():
                    assert time.monotonic() < end, f"timed out waiting for {what}"
                    time.sleep(0.1)

            until(lambda: "task 1" in client.get_job_logs(first), "the placed job's output")
            assert f"node {second} 40" in client.get_job_logs(first)
            info = client.get_job_info(first)
            assert info.status == JobStatus.RUNNING and info.driver_node_id == second
            assert info.entrypoint_resources == {"special": 1}
            assert flowcore.available_resources().get("special", 0) == 0  # held
            # a second one waits for the first to give the resource back (CLI flags)
            env = dict(os.environ, FLOWCORE_TOKEN=cluster.token,
                       FLOWCORE_ADDRESS=cluster.address)
            out = subprocess.run([sys.executable, "-m", "flowcore.job_submission.cli", "job",
                                  "submit", "--no-wait", "--submission-id", "queued",
                                  "--entrypoint-resources", '{"special": 1}',
                                  "--entrypoint-num-cpus", "0.5",
                                  "--entrypoint-num-gpus", "1", "--",
                                  "python", "-c", "import os; print('on', os.environ["
                                  "'FLOWCORE_NODE_ID'], os.environ['CUDA_VISIBLE_DEVICES'])"],
                                 env=env, capture_output=True, text=True, timeout=90)
            assert out.returncode == 0, out.stderr
            waiting = client.get_job_info("queued")
            assert waiting.status == JobStatus.PENDING and "special=1" in waiting.message
            assert waiting.entrypoint_num_cpus == 0.5 and waiting.entrypoint_num_gpus == 1
            pending = client.get_job_info(nowhere)
            assert pending.status == JobStatus.PENDING and "nowhere=1" in pending.message
            assert client.stop_job(first) is True
            assert client.wait_until_finish(first, 60) == JobStatus.STOPPED
            assert client.wait_until_finish("queued", 60) == JobStatus.SUCCEEDED
            assert f"on {second} 0" in client.get_job_logs("queued")  # its GPU
            assert client.get_job_info("queued").driver_node_id == second
            until(lambda: flowcore.available_resources().get("special") == 1,
                  "the resource to be given back")
            assert client.wait_until_finish(nowhere, 60) == JobStatus.FAILED
            failed = client.get_job_info(nowhere)
            assert failed.error_type == "JOB_SUPERVISOR_ACTOR_START_TIMEOUT"
            assert "FLOWCORE_JOB_START_TIMEOUT_SECONDS" in failed.message
            assert "never" not in client.get_job_logs(nowhere)
            assert not [a for a in flowcore.state.list_actors() if a["state"] != "DEAD"]
        finally:
            flowcore.shutdown()
