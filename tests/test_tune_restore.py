"""Tuner.restore after the driver is SIGKILLed mid-experiment."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import flowcore
from flowcore import tune

pytestmark = pytest.mark.timeout(180)

# Trials x < 3 finish at once; trials x >= 3 report a checkpoint, then wait
# for the gate file, which exists only once the test restores.
TRAINABLE = textwrap.dedent('''
    import os, time
    from flowcore import tune

    def objective(config):
        work = os.environ["TUNE_TEST_DIR"]
        start = 0
        ckpt = tune.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                start = int(open(os.path.join(d, "it")).read()) + 1
        with open(os.path.join(work, "runs.log"), "a") as f:
            f.write(f"{config['x']} {start}\\n")
        for it in range(start, 3):
            d = os.path.join(work, "ck", f"{config['x']}-{it}")
            os.makedirs(d, exist_ok=True)
            open(os.path.join(d, "it"), "w").write(str(it))
            tune.report({"loss": (config["x"] - 3) ** 2 + 0.1 * it},
                        checkpoint=tune.Checkpoint.from_directory(d))
            if config["x"] >= 3:
                while not os.path.exists(os.path.join(work, "gate")):
                    time.sleep(0.02)
''')

DRIVER = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, os.environ["TUNE_TEST_DIR"])
    import flowcore
    from flowcore import tune
    from objective_mod import objective
    flowcore.init(num_cpus=2, session_dir=os.path.join(os.environ["TUNE_TEST_DIR"], "session"))
    tune.Tuner(objective, param_space={"x": tune.grid_search([0, 1, 2, 3, 4, 5])},
               tune_config=tune.TuneConfig(metric="loss", mode="min"),
               run_config=tune.RunConfig(name="exp", storage_path=os.environ["TUNE_TEST_DIR"],
                                         verbose=0)).fit()
''')


def _journal(path: str) -> list[dict]:
    try:
        with open(os.path.join(path, "experiment_journal.jsonl")) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def test_restore_after_driver_sigkill(tmp_path, monkeypatch):
    flowcore.shutdown()
    work = str(tmp_path)
    (tmp_path / "objective_mod.py").write_text(TRAINABLE)
    (tmp_path / "driver.py").write_text(DRIVER)
    env = dict(os.environ, TUNE_TEST_DIR=work, FLOWCORE_QUIET="1")
    exp = os.path.join(work, "exp")
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # wait until x=0,1,2 are done and two gated trials have checkpointed
        deadline = time.monotonic() + 90
        while True:
            recs = _journal(exp)
            done = {r["trial_id"] for r in recs if r.get("status") == "TERMINATED"}
            ckpts = {r["trial_id"] for r in recs if r["t"] == "checkpoint"} - done
            if len(done) >= 3 and len(ckpts) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, recs
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stderr.close()
    runs_before = open(os.path.join(work, "runs.log")).read().split("\n")
    finished_x = sorted(int(line.split()[0]) for line in runs_before if line
                        and int(line.split()[0]) < 3)
    assert finished_x == [0, 1, 2]

    (tmp_path / "gate").write_text("open")
    monkeypatch.setenv("TUNE_TEST_DIR", work)
    monkeypatch.syspath_prepend(work)
    from objective_mod import objective  # type: ignore[import-not-found]
    assert tune.Tuner.can_restore(exp)
    flowcore.init(num_cpus=2, session_dir=str(tmp_path / "session2"))
    try:
        rg = tune.Tuner.restore(exp, objective).fit()
    finally:
        flowcore.shutdown()
    assert len(rg) == 6 and rg.num_terminated == 6 and rg.num_errors == 0
    assert rg.get_best_result().config == {"x": 3}
    runs = [tuple(map(int, line.split())) for line in
            open(os.path.join(work, "runs.log")).read().splitlines()]
    # finished trials were not run again
    assert sorted(x for x, _ in runs if x < 3) == [0, 1, 2]
    # the trials cut off mid-run resumed from their checkpoints
    resumed = [(x, start) for x, start in runs if start > 0]
    assert len(resumed) >= 2 and all(x >= 3 for x, _ in resumed), runs
    assert all(r.metrics["training_iteration"] == 3 for r in rg)
