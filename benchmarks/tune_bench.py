"""flowcore.tune benchmark: per-trial and per-report overhead.

    python -m benchmarks.tune_bench [--trials 100] [--reports 2000] [--ray-reports 200] [--runs 3]

Rows (median over runs, each engine in a fresh interpreter, 2 CPUs):

* ``100 trivial trials``: wall time of ``Tuner.fit()`` on a running cluster
  for trials that report once (flowcore default ``reuse_actors=True``; Ray
  Tune 2.60 with its default ``reuse_actors=False`` and with ``True``;
  Optuna's in-process ``study.optimize`` loop as the floor, with its
  default sampler (TPE, what ``optuna.create_study()`` gives) and with
  ``RandomSampler`` (the bare loop)).
* ``trials/s``: the same run as a rate (2 trials at once on 2 CPUs).
* ``per report``: overhead of one ``tune.report`` call, from 2 trials that
  report ``--reports`` times each: (wall time - time of one trivial trial)
  / reports per trial.  flowcore lets trials run on between reports when
  nothing can decide on a single result (FIFO, no stopper); the
  ``stepped`` row sets a stopper, so each report waits for the
  controller, as every report does in Ray Tune.

Ray Tune and Optuna are optional: a missing one is skipped with a note.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _trivial(config):  # the trainable: one report
    from flowcore import tune
    tune.report({"loss": config["x"]})


def bench_flowcore(trials: int, reports: int) -> dict:
    os.environ.setdefault("FLOWCORE_QUIET", "1")
    import flowcore
    from flowcore import tune
    flowcore.init(num_cpus=2)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        def fit(trainable, n, name, stop=None):
            t0 = time.perf_counter()
            tune.Tuner(trainable, param_space={"x": tune.grid_search(list(range(n)))},
                       run_config=tune.RunConfig(name=name, storage_path=d, verbose=0,
                                                 stop=stop)).fit()
            return time.perf_counter() - t0

        fit(_trivial, 2, "warmup")  # worker processes started once, as on a warm cluster
        out["trials_s"] = fit(_trivial, trials, "trivial")

        def many(config):
            for i in range(reports):
                tune.report({"i": i})
        one = fit(_trivial, 2, "two")
        out["report_s"] = max(fit(many, 2, "reports") - one, 0.0) / reports
        # a stopper makes every report wait for the controller's decision
        out["report_stepped_s"] = max(fit(many, 2, "stepped", stop=lambda t, r: False) - one,
                                      0.0) / reports
    flowcore.shutdown()
    return out


def bench_ray(trials: int, reports: int) -> dict:
    import ray
    from ray import tune as rtune
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        def trivial(config):
            rtune.report({"loss": config["x"]})

        def fit(trainable, n, name, reuse):
            t0 = time.perf_counter()
            rtune.Tuner(trainable, param_space={"x": rtune.grid_search(list(range(n)))},
                        tune_config=rtune.TuneConfig(reuse_actors=reuse),
                        run_config=rtune.RunConfig(name=name, storage_path=d, verbose=0)).fit()
            return time.perf_counter() - t0
        fit(trivial, 2, "warmup", True)
        out["trials_s"] = fit(trivial, trials, "default", False)
        out["trials_reuse_s"] = fit(trivial, trials, "reuse", True)

        def many(config):
            for i in range(reports):
                rtune.report({"i": i})
        one = fit(trivial, 2, "two", True)
        out["report_s"] = max(fit(many, 2, "reports", True) - one, 0.0) / reports
        out["report_stepped_s"] = out["report_s"]  # Ray always steps
    ray.shutdown()
    return out


def bench_optuna(trials: int, reports: int) -> dict:
    import warnings
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore")
    out = {}
    for key, sampler in (("trials_s", None),  # the default: TPESampler
                         ("trials_random_s", optuna.samplers.RandomSampler(seed=0))):
        study = optuna.create_study(sampler=sampler)
        t0 = time.perf_counter()
        study.optimize(lambda t: t.suggest_int("x", 0, trials), n_trials=trials)
        out[key] = time.perf_counter() - t0
    return out


ENGINES = {"flowcore": bench_flowcore, "ray": bench_ray, "optuna": bench_optuna}
MODULES = {"flowcore": "flowcore", "ray": "ray", "optuna": "optuna"}


def _available(engine: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(MODULES[engine]) is not None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--reports", type=int, default=2000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--ray-reports", type=int, default=200,
                   help="reports per trial in Ray's per-report row (each takes milliseconds)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per engine run")
    p.add_argument("--engines", default="flowcore,ray,optuna")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("@@TUNE " + json.dumps(ENGINES[args.one](args.trials, args.reports)), flush=True)
        return
    results: dict[str, list[dict]] = {}
    for run in range(args.runs):
        for engine in args.engines.split(","):
            if not _available(engine):
                if run == 0:
                    print(f"note: {engine} is not installed; its rows are skipped",
                          file=sys.stderr)
                continue
            env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
            reports = args.ray_reports if engine == "ray" else args.reports
            try:
                proc = subprocess.run([sys.executable, "-m", "benchmarks.tune_bench", "--one",
                                       engine, "--trials", str(args.trials),
                                       "--reports", str(reports)],
                                      cwd=REPO, env=env, capture_output=True, text=True,
                                      timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"note: {engine} run {run + 1} took over {args.timeout:g} s; skipped",
                      file=sys.stderr)
                continue
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@TUNE ")]
            if not lines:
                print(f"note: {engine} run {run + 1} failed:\n{proc.stderr[-2000:]}",
                      file=sys.stderr)
                continue
            results.setdefault(engine, []).append(json.loads(lines[-1][7:]))
            print(f"{engine} run {run + 1}: {lines[-1][7:]}", file=sys.stderr, flush=True)

    def med(engine: str, key: str) -> float | None:
        vals = [r[key] for r in results.get(engine, []) if key in r]
        return statistics.median(vals) if vals else None

    rows = [(f"{args.trials} trivial trials (s)", "trials_s", "trials_s", "trials_reuse_s"),
            ("per report (ms)", "report_s", "report_s", None),
            ("per report, stepped (ms)", "report_stepped_s", "report_stepped_s", None)]
    print(f"{'metric':32} {'flowcore':>10} {'ray':>10} {'ray reuse':>10} {'optuna':>10} "
          f"{'optuna rnd':>10}")
    for label, fkey, rkey, rreuse in rows:
        scale = 1000.0 if "ms" in label else 1.0
        cells = [med("flowcore", fkey), med("ray", rkey),
                 med("ray", rreuse) if rreuse else None,
                 med("optuna", fkey) if fkey == "trials_s" else None,
                 med("optuna", "trials_random_s") if fkey == "trials_s" else None]
        print(f"{label:32} " + " ".join(
            f"{c * scale:10.3f}" if c is not None else f"{'-':>10}" for c in cells))
    f = med("flowcore", "trials_s")
    if f:
        print(f"{'trials/s at 2 concurrent':32} {args.trials / f:10.1f}" + "".join(
            f" {args.trials / v:10.1f}" if v else f" {'-':>10}"
            for v in (med("ray", "trials_s"), med("ray", "trials_reuse_s"),
                      med("optuna", "trials_s"), med("optuna", "trials_random_s"))))


if __name__ == "__main__":
    main()
