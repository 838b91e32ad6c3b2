"""flowcore.train: TorchTrainer with DDP on 2 CPU workers, reports and
checkpoints, restart after a SIGKILLed worker, bad input, dataset shards and
the seed article's PyTorch program."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading

import pytest

import flowcore
from flowcore import train
from flowcore.train import (Checkpoint, CheckpointConfig, DataParallelTrainer, FailureConfig,
                            RunConfig, ScalingConfig, TrainingFailedError)

torch = pytest.importorskip("torch") if os.environ.get("CI") != "true" else __import__("torch")


@pytest.fixture(scope="module")
def tcluster(tmp_path_factory):
    flowcore.shutdown()
    info = flowcore.init(num_cpus=2, object_store_memory=128 << 20,
                         session_dir=str(tmp_path_factory.mktemp("session")))
    yield info
    flowcore.shutdown()


def _results(path: str) -> list[dict]:
    with open(os.path.join(path, "result.json")) as f:
        return [json.loads(line) for line in f]


# -- no cluster ---------------------------------------------------------------

def test_config_bad_input():
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="num_workers"):
            ScalingConfig(num_workers=bad)
    with pytest.raises(ValueError, match="max_failures"):
        FailureConfig(max_failures=-2)
    with pytest.raises(ValueError, match="num_to_keep"):
        CheckpointConfig(num_to_keep=0)
    with pytest.raises(ValueError, match="checkpoint_score_order"):
        CheckpointConfig(checkpoint_score_order="best")
    with pytest.raises(ValueError, match="placement_strategy"):
        ScalingConfig(num_workers=2, placement_strategy="ANY")
    with pytest.raises(TypeError, match="datasets\\['train'\\]"):
        DataParallelTrainer(lambda: None, datasets={"train": [1, 2, 3]})
    with pytest.raises(RuntimeError, match="inside a training function"):
        train.report({"x": 1})
    with pytest.raises(RuntimeError, match="inside a training function"):
        train.get_context()
    sc = ScalingConfig(num_workers=3, use_gpu=True, resources_per_worker={"CPU": 2})
    assert sc.total_resources == {"CPU": 6.0, "GPU": 3.0}


def test_checkpoint_directory_roundtrip(tmp_path):
    import pyarrow.fs as pafs
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.txt").write_text("beta")
    ckpt = Checkpoint.from_directory(str(src))
    ckpt.update_metadata({"epoch": 3})
    assert ckpt.get_metadata() == {"epoch": 3}
    with ckpt.as_directory() as d:
        assert d == str(src)
    out = ckpt.to_directory(str(tmp_path / "out"))
    assert open(os.path.join(out, "sub", "b.txt")).read() == "beta"
    assert stat.S_IMODE(os.stat(os.path.join(out, "a.txt")).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.join(out, "sub")).st_mode) == 0o700
    # a non-local pyarrow filesystem: as_directory makes a temporary copy
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    remote = Checkpoint("src", filesystem=fs)
    assert remote.get_metadata() == {"epoch": 3}
    with remote.as_directory() as d:
        assert d != str(src) and open(os.path.join(d, "a.txt")).read() == "alpha"
    assert not os.path.exists(d)
    with pytest.raises(ValueError, match="not a directory"):
        Checkpoint.from_directory(str(tmp_path / "missing"))


def test_imports_without_torch_and_gymnasium():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['gymnasium'] = None\n"
        "import flowcore.train, flowcore.train.torch, flowcore.rl\n"
        "from flowcore.train.torch import TorchTrainer\n"
        "try:\n    TorchTrainer(lambda: None)\nexcept ImportError as e:\n    print('ERR', e)\n"
        "try:\n    flowcore.rl.EnvRunnerGroup('CartPole-v1')\n"
        "except ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'flowcore[train]'" in out.stdout
    assert "pip install 'flowcore[rl]'" in out.stdout


# -- TorchTrainer -------------------------------------------------------------

def _linear_loop(config):
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from flowcore.train.torch import prepare_data_loader, prepare_model
    ctx = train.get_context()
    torch.manual_seed(ctx.get_world_rank())     # different starts: DDP must sync them
    x = torch.linspace(-1, 1, 64).unsqueeze(1)
    loader = prepare_data_loader(DataLoader(TensorDataset(x, 2 * x + 1), batch_size=8,
                                            shuffle=True))
    model = prepare_model(torch.nn.Linear(1, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for epoch in range(config["epochs"]):
        loader.sampler.set_epoch(epoch)
        for xb, yb in loader:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            opt.step()
        with tempfile.TemporaryDirectory() as d:
            torch.save(model.module.state_dict(),
                       os.path.join(d, f"model_rank{ctx.get_world_rank()}.pt"))
            with open(os.path.join(d, f"info_rank{ctx.get_world_rank()}.json"), "w") as f:
                json.dump({"pid": os.getpid(), "rank": ctx.get_world_rank(),
                           "size": ctx.get_world_size(), "local": ctx.get_local_rank(),
                           "node": ctx.get_node_rank(),
                           "samples": len(loader.sampler)}, f)
            train.report({"epoch": epoch, "loss": loss.item(), "rank": ctx.get_world_rank()},
                         checkpoint=Checkpoint.from_directory(d))


@pytest.mark.timeout(150)
def test_torch_trainer_ddp_fits_line(tcluster, tmp_path):
    from flowcore.train.torch import TorchTrainer
    trainer = TorchTrainer(
        _linear_loop, train_loop_config={"epochs": 12},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="line", storage_path=str(tmp_path),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()
    assert result.error is None
    assert result.metrics["epoch"] == 11 and result.metrics["rank"] == 0
    assert [r["epoch"] for r in _results(result.path)] == list(range(12))
    assert sorted(d for d in os.listdir(result.path) if d.startswith("checkpoint_")) == [
        "checkpoint_000010", "checkpoint_000011"]
    assert stat.S_IMODE(os.stat(result.path).st_mode) == 0o700
    with result.checkpoint.as_directory() as d:
        infos = [json.load(open(os.path.join(d, f"info_rank{r}.json"))) for r in (0, 1)]
        states = [torch.load(os.path.join(d, f"model_rank{r}.pt")) for r in (0, 1)]
    assert infos[0]["pid"] != infos[1]["pid"]
    assert [(i["rank"], i["size"], i["local"], i["node"]) for i in infos] == [
        (0, 2, 0, 0), (1, 2, 1, 0)]
    assert infos[0]["samples"] == 32          # DistributedSampler: half the data each
    for key in states[0]:                      # DDP kept both ranks equal
        assert torch.equal(states[0][key], states[1][key])
    model = torch.nn.Linear(1, 1)
    model.load_state_dict(states[0])           # the checkpoint restores the model
    pred = model(torch.tensor([[0.0], [1.0]])).detach().squeeze(1)
    assert torch.allclose(pred, torch.tensor([1.0, 3.0]), atol=0.05)


@pytest.mark.timeout(150)
def test_sigkilled_worker_restarts_from_checkpoint(tcluster, tmp_path):
    """Rank 1 stops mid-epoch while rank 0 waits in an allreduce; the test
    SIGKILLs rank 1's process. The group is torn down (no hang in the
    collective) and restarts from the newest checkpoint (epoch 2)."""
    from flowcore.testing import Signal
    from flowcore.train.torch import TorchTrainer
    stopped = Signal()
    pid_file = str(tmp_path / "victim.pid")

    def loop(config):
        import torch
        import torch.distributed as dist
        ctx = train.get_context()
        start = 0
        ckpt = train.get_checkpoint()
        if ckpt:
            with ckpt.as_directory() as d:
                start = json.load(open(os.path.join(d, "state.json")))["epoch"] + 1
        for epoch in range(start, 6):
            t = torch.ones(1)
            dist.all_reduce(t)
            if epoch == 3 and start == 0 and ctx.get_world_rank() == 1:
                with open(config["pid_file"], "w") as f:
                    f.write(str(os.getpid()))
                config["stopped"].wait(timeout=120)
            dist.all_reduce(t)                 # rank 0 waits here for rank 1
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, "state.json"), "w") as f:
                    json.dump({"epoch": epoch}, f)
                train.report({"epoch": epoch, "start": start, "sum": t.item()},
                             checkpoint=Checkpoint.from_directory(d))

    def killer():
        stopped.wait_for_waiters(1, timeout=120)
        os.kill(int(open(pid_file).read()), signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = TorchTrainer(
        loop, train_loop_config={"pid_file": pid_file, "stopped": stopped},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="kill", storage_path=str(tmp_path),
                             failure_config=FailureConfig(max_failures=1))).fit()
    thread.join(timeout=10)
    stopped.close()
    assert result.metrics == {"epoch": 5, "start": 3, "sum": 4.0}
    history = _results(result.path)
    assert [r["epoch"] for r in history] == [0, 1, 2, 3, 4, 5]
    assert [r["start"] for r in history] == [0, 0, 0, 3, 3, 3]   # resumed, not from scratch


# -- DataParallelTrainer (no torch in the workers) ------------------------------

def test_report_context_and_resume(tcluster, tmp_path):
    def loop(config):
        ctx = train.get_context()
        ckpt = train.get_checkpoint()
        start = ckpt.get_metadata()["step"] + 1 if ckpt else 0
        for step in range(start, start + config["steps"]):
            c = None
            if ctx.get_world_rank() == 0:
                d = tempfile.mkdtemp()
                c = Checkpoint.from_directory(d)
                c.set_metadata({"step": step})
            train.report({"step": step, "score": -abs(step - 2), "world": ctx.get_world_size(),
                          "name": ctx.get_experiment_name()}, checkpoint=c)

    rc = RunConfig(name="dp", storage_path=str(tmp_path),
                   checkpoint_config=CheckpointConfig(num_to_keep=1,
                                                      checkpoint_score_attribute="score"))
    first = DataParallelTrainer(loop, train_loop_config={"steps": 5},
                                scaling_config=ScalingConfig(num_workers=2),
                                run_config=rc).fit()
    assert first.metrics == {"step": 4, "score": -2, "world": 2, "name": "dp"}
    # num_to_keep=1 by score keeps the best (step 2) and the newest (step 4)
    kept = sorted(c.get_metadata()["step"] for c, _ in first.best_checkpoints)
    assert kept == [2, 4]
    assert first.get_best_checkpoint("score", "max").get_metadata() == {"step": 2}
    assert first.checkpoint.get_metadata() == {"step": 4}
    second = DataParallelTrainer(loop, train_loop_config={"steps": 2},
                                 scaling_config=ScalingConfig(num_workers=1),
                                 run_config=RunConfig(name="dp2", storage_path=str(tmp_path)),
                                 resume_from_checkpoint=first.checkpoint).fit()
    assert second.metrics["step"] == 6 and second.metrics["world"] == 1
    # fit() again under the same name and storage: goes on from that run's newest checkpoint
    third = DataParallelTrainer(loop, train_loop_config={"steps": 1},
                                scaling_config=ScalingConfig(num_workers=1),
                                run_config=RunConfig(name="dp2", storage_path=str(tmp_path))).fit()
    assert third.metrics["step"] == 7
    assert [r["step"] for r in _results(third.path)] == [5, 6, 7]
    assert third.checkpoint.path.endswith("checkpoint_000002")
    again = train.Result.from_path(third.path)
    assert again.metrics == third.metrics and again.checkpoint == third.checkpoint
    with pytest.raises(ValueError, match="no result.json"):
        train.Result.from_path(str(tmp_path))


def test_fit_inside_a_task(tcluster, tmp_path):
    """A trainer started from a task (a coordinator holding no CPU) creates
    its worker actors from inside a worker process."""
    def loop():
        train.report({"rank": train.get_context().get_world_rank(), "pid": os.getpid()})

    @flowcore.remote(num_cpus=0)
    def launch(path):
        result = DataParallelTrainer(loop, scaling_config=ScalingConfig(num_workers=2),
                                     run_config=RunConfig(name="in_task",
                                                          storage_path=path)).fit()
        return result.metrics, os.getpid()

    metrics, task_pid = flowcore.get(launch.remote(str(tmp_path)), timeout=90)
    assert metrics["rank"] == 0 and metrics["pid"] != task_pid

class _FlakySetup(train.BackendConfig):
    """A backend whose setup fails in the first group (a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def _on_worker_start(self, session):
        if session.world_rank == 1 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise OSError("address already in use")


def test_failed_process_group_setup_is_retried(tcluster, tmp_path):
    marker = str(tmp_path / "failed_once")
    result = DataParallelTrainer(lambda: train.report({"ok": 1}),
                                 backend_config=_FlakySetup(marker),
                                 scaling_config=ScalingConfig(num_workers=2),
                                 run_config=RunConfig(storage_path=str(tmp_path))).fit()
    assert os.path.exists(marker) and result.metrics == {"ok": 1}


def test_bad_input_on_cluster(tcluster, tmp_path):
    rc = RunConfig(storage_path=str(tmp_path))
    with pytest.raises(ValueError, match="infeasible.*GPU.*use_gpu=False"):
        DataParallelTrainer(lambda: None, run_config=rc,
                            scaling_config=ScalingConfig(num_workers=2, use_gpu=True)).fit()
    with pytest.raises(ValueError, match="infeasible.*CPU=6"):
        DataParallelTrainer(lambda: None, run_config=rc,
                            scaling_config=ScalingConfig(num_workers=3,
                                                         resources_per_worker={"CPU": 2})).fit()

    class FakeDataset:
        def streaming_split(self, n, equal=False):
            return [iter(range(i, 10, n)) for i in range(n)]

    def wants_eval():
        train.get_dataset_shard("eval")

    with pytest.raises(TrainingFailedError, match="get_dataset_shard\\('eval'\\).*\\['train'\\]"):
        DataParallelTrainer(wants_eval, run_config=rc, datasets={"train": FakeDataset()}).fit()
    with pytest.warns(UserWarning, match="without calling flowcore.train.report"):
        result = DataParallelTrainer(lambda: None, run_config=rc,
                                     scaling_config=ScalingConfig(num_workers=2)).fit()
    assert result.metrics is None and result.checkpoint is None

    def raises():
        raise ZeroDivisionError("boom in the loop")

    with pytest.raises(TrainingFailedError, match="boom in the loop") as err:
        DataParallelTrainer(raises, run_config=rc).fit()
    assert isinstance(err.value.__cause__, train.WorkerGroupError)


def test_dataset_shards_disjoint_and_cover(tcluster, tmp_path):
    try:
        import flowcore.data as fdata
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("flowcore.data is not in this tree yet")

    ds = fdata.range(40)

    def loop_all():
        # only rank 0's metrics reach the result, so each rank writes its ids
        # under the run directory
        shard = train.get_dataset_shard("train")
        ids = [int(row["id"]) for row in shard.iter_rows()]
        path = train.get_context().get_storage().storage_path
        with open(os.path.join(path, f"ids{train.get_context().get_world_rank()}.json"), "w") as f:
            json.dump(ids, f)
        train.report({"n": len(ids)})

    # the workers leave a CPU free for the tasks that read the dataset
    result = DataParallelTrainer(loop_all, datasets={"train": ds},
                                 scaling_config=ScalingConfig(
                                     num_workers=2, resources_per_worker={"CPU": 0.5}),
                                 run_config=RunConfig(name="shards",
                                                      storage_path=str(tmp_path))).fit()
    parts = [set(json.load(open(os.path.join(result.path, f"ids{r}.json")))) for r in (0, 1)]
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    assert parts[0] | parts[1] == set(range(40))


@pytest.mark.timeout(120)
def test_workers_holding_every_cpu_still_get_their_data(tcluster, tmp_path):
    """Default ScalingConfig: 2 workers hold both CPUs of the cluster. The
    dataset's read and map_batches tasks must not wait for those CPUs (they
    run holding none), for two epochs, and the run ends."""
    try:
        import flowcore.data as fdata
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("flowcore.data is not in this tree yet")
    # enough blocks that the plan streams through read and map tasks
    ds = fdata.range(4000, override_num_blocks=8).map_batches(
        lambda b: {"id": b["id"], "twice": b["id"] * 2})

    def loop():
        shard = train.get_dataset_shard("train")
        seen = []
        for epoch in range(2):
            rows = [r for b in shard.iter_batches(batch_size=500) for r in b["twice"]]
            seen.append(len(rows))
        assert flowcore.available_resources().get("CPU", 0.0) < 1.0  # the workers hold them
        train.report({"rows": seen, "sum": int(sum(rows))})

    result = DataParallelTrainer(loop, datasets={"train": ds},
                                 scaling_config=ScalingConfig(num_workers=2),
                                 run_config=RunConfig(name="full",
                                                      storage_path=str(tmp_path))).fit()
    assert result.error is None
    assert result.metrics["rows"] == [2000, 2000]   # equal shards, both epochs


# -- the seed article's PyTorch program ------------------------------------------

class _SimpleModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(10, 1)

    def forward(self, x):
        return self.linear(x)


@flowcore.remote
def _train_epoch(model_weight, dataloader, epoch):
    # the article's task: ray.get of the refs becomes flowcore's argument passing
    model = _SimpleModel()
    model.load_state_dict(model_weight)
    criterion = torch.nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for batch_x, batch_y in dataloader:
        optimizer.zero_grad()
        loss = criterion(model(batch_x), batch_y)
        loss.backward()
        optimizer.step()
    return model.state_dict()


@pytest.mark.timeout(120)
def test_seed_article_pytorch_program(tcluster):
    """002 in shared/seeds: a model trained by a chain of remote tasks, the
    weights and the DataLoader passed through put/ObjectRefs."""
    from torch.utils.data import DataLoader, TensorDataset
    torch.manual_seed(0)
    x = torch.randn(1000, 10)
    y = x @ torch.arange(10, dtype=torch.float32).unsqueeze(1) / 10
    dataloader = DataLoader(TensorDataset(x, y), batch_size=32)
    model = _SimpleModel()
    weight_id = flowcore.put(model.state_dict())
    dataloader_id = flowcore.put(dataloader)
    for epoch in range(5):
        weight_id = _train_epoch.remote(weight_id, dataloader_id, epoch)
    final_weight = flowcore.get(weight_id)
    model.load_state_dict(final_weight)
    before = torch.nn.functional.mse_loss(_SimpleModel()(x), y).item()
    after = torch.nn.functional.mse_loss(model(x), y).item()
    assert after < before / 5


def test_storage_on_a_pyarrow_filesystem(tcluster, tmp_path):
    import pyarrow.fs as pafs
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())

    def loop():
        d = tempfile.mkdtemp()
        with open(os.path.join(d, f"r{train.get_context().get_world_rank()}"), "w") as f:
            f.write("x")
        train.report({"ok": 1}, checkpoint=Checkpoint.from_directory(d))

    result = DataParallelTrainer(loop, scaling_config=ScalingConfig(num_workers=2),
                                 run_config=RunConfig(name="pafs", storage_path="runs",
                                                      storage_filesystem=fs)).fit()
    assert result.checkpoint.filesystem is not None and result.path == "runs/pafs"
    with result.checkpoint.as_directory() as d:
        assert sorted(os.listdir(d)) == ["r0", "r1"]
    assert os.path.isfile(tmp_path / "runs" / "pafs" / "checkpoint_000000" / "r1")
    assert json.loads((tmp_path / "runs" / "pafs" / "result.json").read_text()) == {"ok": 1}


@pytest.mark.timeout(150)
def test_trainer_as_tune_trainable(tcluster, tmp_path):
    """Tuner(trainer, param_space={"train_loop_config": ...}): each trial runs
    the trainer (2 workers) with its config; rank 0's reports reach Tune."""
    from flowcore import tune

    def loop(config):
        for step in range(3):
            d = tempfile.mkdtemp()
            with open(os.path.join(d, "w"), "w") as f:
                f.write(str(config["scale"] * step))
            train.report({"value": config["scale"] * step,
                          "world": train.get_context().get_world_size()},
                         checkpoint=Checkpoint.from_directory(d))

    trainer = DataParallelTrainer(loop, train_loop_config={"scale": 0},
                                  scaling_config=ScalingConfig(num_workers=2))
    grid = tune.Tuner(trainer,
                      param_space={"train_loop_config": {"scale": tune.grid_search([1, 10])}},
                      run_config=tune.RunConfig(name="tt", storage_path=str(tmp_path))).fit()
    values = sorted(r.metrics["value"] for r in grid)
    assert values == [2, 20]
    assert all(r.metrics["world"] == 2 and r.error is None for r in grid)
    for r in grid:
        assert type(r.checkpoint) is Checkpoint is tune.Checkpoint   # one class
        with r.checkpoint.as_directory() as d:
            assert open(os.path.join(d, "w")).read() == str(r.metrics["value"])


@pytest.mark.timeout(120)
def test_gpu_ids_become_cuda_visible_devices(tmp_path):
    """On a node declaring 2 GPUs (none real here), each worker holds one;
    CUDA_VISIBLE_DEVICES lists the node's training GPUs and each rank's
    device index points at its own. Without CUDA the group falls back to
    gloo on the CPU."""
    from flowcore.train.torch import TorchTrainer, get_device
    flowcore.shutdown()
    flowcore.init(num_cpus=2, num_gpus=2, object_store_memory=128 << 20,
                  session_dir=str(tmp_path / "session"))
    try:
        def loop():
            import torch.distributed as dist
            idx = int(os.environ["FLOWCORE_TRAIN_DEVICE_INDEX"])
            os.makedirs(os.path.join(tmp_path, "out"), exist_ok=True)
            with open(os.path.join(tmp_path, "out", str(train.get_context().get_world_rank())),
                      "w") as f:
                json.dump({"visible": os.environ["CUDA_VISIBLE_DEVICES"], "index": idx,
                           "backend": dist.get_backend(),
                           "device": str(get_device())}, f)
            train.report({"done": 1})

        TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=2, use_gpu=True),
                     run_config=RunConfig(storage_path=str(tmp_path / "runs"))).fit()
        seen = [json.load(open(tmp_path / "out" / str(r))) for r in (0, 1)]
        assert seen[0]["visible"] == seen[1]["visible"] == "0,1"
        assert sorted(s["index"] for s in seen) == [0, 1]
        for s in seen:
            assert s["backend"] == "gloo" and s["device"] == "cpu"
    finally:
        flowcore.shutdown()


@pytest.mark.timeout(150)
def test_node_death_tears_down_the_group(private_cluster, tmp_path):
    """Two 1-CPU nodes, one worker each. Rank 0 waits in an allreduce for
    rank 1; rank 1's node is killed. fit() does not hang: the group is torn
    down, and the restart cannot be placed on the one node left, so fit()
    raises naming both."""
    from flowcore.testing import Signal
    from flowcore.train.torch import TorchTrainer
    cluster = private_cluster(nodes=2, cpus_per_node=1)
    stuck = Signal()
    node_file = str(tmp_path / "node")

    def loop(config):
        import torch
        import torch.distributed as dist
        if train.get_context().get_world_rank() == 1:
            with open(config["node_file"], "w") as f:
                f.write(flowcore.get_runtime_context().get_node_id())
            config["stuck"].wait(timeout=120)
        dist.all_reduce(torch.ones(1))
        train.report({"done": 1})

    def killer():
        stuck.wait_for_waiters(1, timeout=120)
        cluster.kill_node(open(node_file).read())

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    with pytest.raises(TrainingFailedError, match="infeasible") as err:
        TorchTrainer(loop, train_loop_config={"node_file": node_file, "stuck": stuck},
                     scaling_config=ScalingConfig(num_workers=2, placement_strategy="SPREAD"),
                     run_config=RunConfig(storage_path=str(tmp_path / "runs"),
                                          failure_config=FailureConfig(max_failures=1))).fit()
    thread.join(timeout=10)
    stuck.close()
    assert "1 failure" in str(err.value)
