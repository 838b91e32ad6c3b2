"""flowcore.train and flowcore.rl benchmark rows beside torchrun and Ray Train.

    python -m benchmarks.train_bench [--runs 3] [--epochs 20] [--only fit,ppo] [--json FILE]

Each (engine, run) is a fresh interpreter running the same training program:
a 2-parameter model (``nn.Linear(1, 1)`` fitting y = 2x + 1, 64 points,
batch 8) on 2 CPU workers with DDP over gloo, one report per epoch, then 200
timed reports without a checkpoint and 20 with a 1 KiB checkpoint. Rows:

* fit() to first report: from the moment ``fit()`` is called (torchrun: the
  launcher is started) to the first epoch's report, measured in rank 0 with
  ``time.time()`` against the start stamp (same machine).
* N reported epochs: from ``fit()`` / launch to the end of the last epoch.
* report: median time of one ``report(metrics)`` call in rank 0 (torchrun:
  none; the loop without reporting is the floor).  flowcore times 200
  calls, Ray Train 10 (each of its reports takes seconds).
* report with checkpoint: median of ``report(metrics, checkpoint=...)``
  (flowcore 20 calls, Ray Train 5).
* PPO to mean return 150: wall time of ``examples/ppo_cartpole.py``'s
  ``train()`` (flowcore only: RLlib's new API stack is a different program).

Engines: flowcore (``flowcore.init(num_cpus=2)`` is done before the clock
starts), torchrun (``python -m torch.distributed.run --nproc_per_node=2``,
the single-machine floor), Ray Train 2.60 (``ray.init(num_cpus=3)`` before
the clock; skipped with a note when ray is not installed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PREFIX = "@@TRAIN "

LOOP = textwrap.dedent('''
    import json, os, tempfile, time
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    def loop_body(rank, world, report, make_ckpt, prepare_model, prepare_loader, config):
        x = torch.linspace(-1, 1, 64).unsqueeze(1)
        loader = prepare_loader(DataLoader(TensorDataset(x, 2 * x + 1), batch_size=8))
        model = prepare_model(torch.nn.Linear(1, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        first = None
        for epoch in range(config["epochs"]):
            for xb, yb in loader:
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(xb), yb)
                loss.backward()
                opt.step()
            if first is None:
                first = time.time()
            report({"epoch": epoch, "loss": float(loss)})
        end = time.time()
        plain, with_ckpt = [], []
        for i in range(config["reports"]):
            t = time.perf_counter()
            report({"i": i})
            plain.append(time.perf_counter() - t)
        d = tempfile.mkdtemp()
        with open(os.path.join(d, "blob"), "wb") as f:
            f.write(os.urandom(1024))
        for i in range(config["ckpt_reports"]):
            t = time.perf_counter()
            report({"i": i}, **make_ckpt(d))
            with_ckpt.append(time.perf_counter() - t)
        if rank == 0:
            out = {"first": first, "end": end,
                   "report_ms": 1000 * statistics.median(plain) if plain else None,
                   "report_ckpt_ms": 1000 * statistics.median(with_ckpt) if with_ckpt else None}
            with open(config["out"], "w") as f:
                json.dump(out, f)
    import statistics
''')

FLOWCORE = LOOP + textwrap.dedent('''
    import sys
    import flowcore
    from flowcore import train
    from flowcore.train import Checkpoint, RunConfig, ScalingConfig
    from flowcore.train.torch import TorchTrainer, prepare_data_loader, prepare_model

    def loop(config):
        ctx = train.get_context()
        loop_body(ctx.get_world_rank(), ctx.get_world_size(), train.report,
                  lambda d: {"checkpoint": Checkpoint.from_directory(d)},
                  prepare_model, prepare_data_loader, config)

    config = json.loads(sys.argv[1])
    os.environ["FLOWCORE_QUIET"] = "1"
    flowcore.init(num_cpus=2)
    start = time.time()
    TorchTrainer(loop, train_loop_config=config,
                 scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(storage_path=tempfile.mkdtemp(), name="bench")).fit()
    done = time.time()
    flowcore.shutdown()
    print(json.dumps({"start": start, "fit_end": done}))
''')

RAY = LOOP + textwrap.dedent('''
    import sys
    import ray
    from ray import train
    from ray.train import Checkpoint, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer, prepare_data_loader, prepare_model

    def loop(config):
        ctx = train.get_context()
        loop_body(ctx.get_world_rank(), ctx.get_world_size(), train.report,
                  lambda d: {"checkpoint": Checkpoint.from_directory(d)},
                  prepare_model, prepare_data_loader, config)

    config = json.loads(sys.argv[1])
    ray.init(num_cpus=3, include_dashboard=False)
    start = time.time()
    TorchTrainer(loop, train_loop_config=config,
                 scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(storage_path=tempfile.mkdtemp(), name="bench")).fit()
    done = time.time()
    ray.shutdown()
    print(json.dumps({"start": start, "fit_end": done}))
''')

TORCHRUN = LOOP + textwrap.dedent('''
    import sys
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DistributedSampler

    config = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def prepare_loader(loader):
        return DataLoader(loader.dataset, batch_size=loader.batch_size,
                          sampler=DistributedSampler(loader.dataset, world, rank, shuffle=False))

    loop_body(rank, world, lambda metrics, **kw: None, lambda d: {},
              DistributedDataParallel, prepare_loader, config)
    dist.destroy_process_group()
''')


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_script(source: str, args: list[str], launcher: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "prog.py")
        with open(script, "w") as f:
            f.write(source)
        start = time.time()
        proc = subprocess.run(launcher + [script] + args, capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)
        end = time.time()
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        last = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        info = json.loads(last[-1]) if last else {}
        info.setdefault("start", start)
        info.setdefault("fit_end", end)
        return info


# timed report() calls after the epochs: Ray Train's take seconds each, so it gets fewer
REPORTS = {"flowcore": (200, 20), "torchrun": (0, 0), "ray": (10, 5)}


def measure_fit(engine: str, epochs: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        reports, ckpt_reports = REPORTS[engine]
        config = {"epochs": epochs, "reports": reports, "ckpt_reports": ckpt_reports,
                  "out": out}
        args = [json.dumps(config)]
        if engine == "flowcore":
            info = _run_script(FLOWCORE, args, [sys.executable], timeout)
        elif engine == "ray":
            info = _run_script(RAY, args, [sys.executable], timeout)
        else:
            info = _run_script(TORCHRUN, args, [sys.executable, "-m", "torch.distributed.run",
                                                "--nproc_per_node=2",
                                                f"--master_port={_free_port()}"],
                               timeout)
        with open(out) as f:
            rank0 = json.load(f)
    return {"fit_to_first_report_s": rank0["first"] - info["start"],
            "epochs_s": rank0["end"] - info["start"],
            "report_ms": rank0["report_ms"], "report_ckpt_ms": rank0["report_ckpt_ms"]}


PPO = textwrap.dedent('''
    import importlib.util, json, os, sys, time
    os.environ["FLOWCORE_QUIET"] = "1"
    import flowcore
    spec = importlib.util.spec_from_file_location("ppo", os.path.join(sys.argv[1], "examples",
                                                                      "ppo_cartpole.py"))
    ppo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ppo)
    flowcore.init(num_cpus=2)
    t = time.time()
    history = ppo.train(target=150.0, seed=int(sys.argv[2]))
    print(json.dumps({"ppo_s": time.time() - t, "ppo_return": history[-1]["mean_return"],
                      "ppo_steps": history[-1]["steps"]}))
    flowcore.shutdown()
''')


def measure_ppo(seed: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "ppo.py")
        with open(script, "w") as f:
            f.write(PPO)
        proc = subprocess.run([sys.executable, script, REPO, str(seed)], capture_output=True,
                              text=True, timeout=timeout, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


ROWS = [("fit_to_first_report_s", "fit() to first report (s)", "{:.2f}"),
        ("epochs_s", "fit() to end of {epochs} reported epochs (s)", "{:.2f}"),
        ("report_ms", "report(metrics), median (ms)", "{:.3f}"),
        ("report_ckpt_ms", "report(metrics, checkpoint=1 KiB), median (ms)", "{:.2f}"),
        ("ppo_s", "PPO CartPole to mean return 150 (s)", "{:.1f}")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--only", default="fit,ppo", help="fit, ppo or both (comma-separated)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    parts = set(args.only.split(","))
    engines = ["flowcore", "torchrun"]
    notes = []
    try:
        import ray.train  # noqa: F401
        engines.append("ray")
    except ImportError:
        notes.append("Ray Train: not installed (pip install 'ray[train]==2.60.0'); its column "
                     "is skipped")
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for r in range(args.runs):
        if "fit" in parts:
            for engine in engines:          # interleaved, so load drifts hit every engine
                try:
                    runs[engine].append(measure_fit(engine, args.epochs, args.timeout))
                except Exception as e:  # keep going; list it under the table
                    notes.append(f"{engine} run {r + 1}: {str(e).strip().splitlines()[-1]}")
                print(f"{PREFIX}{engine} run {r + 1}: {runs[engine][-1:]}", file=sys.stderr,
                      flush=True)
        if "ppo" in parts:
            try:
                runs["flowcore"].append(measure_ppo(r, args.timeout))
            except Exception as e:
                notes.append(f"ppo run {r + 1}: {str(e).strip().splitlines()[-1]}")

    def median(engine: str, key: str) -> str:
        vals = [x[key] for x in runs.get(engine, []) if x.get(key) is not None]
        return statistics.median(vals) if vals else None

    header = f"{'row':52s}" + "".join(f"{e:>12s}" for e in engines)
    print(header)
    print("-" * len(header))
    for key, label, fmt in ROWS:
        cells = []
        for e in engines:
            v = median(e, key)
            cells.append(f"{fmt.format(v):>12s}" if v is not None else f"{'-':>12s}")
        print(f"{label.format(epochs=args.epochs):52s}" + "".join(cells))
    for n in notes:
        print("note:", n)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "notes": notes}, f, indent=1)


if __name__ == "__main__":
    main()
