"""flowcore.tune through its public API on a real 2-CPU local cluster."""
from __future__ import annotations

import os
import stat
import time

import numpy as np
import pytest

import flowcore
from flowcore import tune
from flowcore.tune.schedulers import ASHAScheduler, MedianStoppingRule, PopulationBasedTraining
from flowcore.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher

pytestmark = pytest.mark.timeout(120)


def quadratic(config):
    for i in range(3):
        tune.report({"loss": (config["x"] - 3) ** 2 + 1.0 / (i + 1)})


def _need_pandas():
    import importlib.util
    if importlib.util.find_spec("pandas") is None:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("pandas is not installed (pip install 'flowcore[tune]')")


def run(trainable, tmp_path, space=None, name="exp", **tc):
    tmp_path = tmp_path / "results"  # created by tune, so its mode is tune's
    stop = tc.pop("stop", None)
    failure = tc.pop("failure_config", None)
    ckpt = tc.pop("checkpoint_config", None)
    callbacks = tc.pop("callbacks", None)
    tuner = tune.Tuner(trainable, param_space=space or {},
                       tune_config=tune.TuneConfig(**tc),
                       run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0,
                                                 stop=stop, failure_config=failure,
                                                 checkpoint_config=ckpt, callbacks=callbacks))
    return tuner.fit()


def test_grid_finds_best_and_writes_results(cluster, tmp_path):
    rg = run(quadratic, tmp_path, {"x": tune.grid_search([0, 1, 2, 3, 4])},
             metric="loss", mode="min")
    assert len(rg) == 5 and rg.num_terminated == 5 and rg.num_errors == 0
    best = rg.get_best_result()
    assert best.config == {"x": 3}
    assert best.metrics["training_iteration"] == 3 and best.metrics["done"] is True
    assert rg.get_best_result(metric="loss", mode="max").config == {"x": 0}
    _need_pandas()
    df = rg.get_dataframe()
    for col in ("loss", "training_iteration", "config/x", "trial_id", "done", "time_total_s",
                "time_this_iter_s", "timestamp", "date", "pid", "hostname", "node_ip",
                "iterations_since_restore", "checkpoint_dir_name", "logdir"):
        assert col in df.columns, col
    assert sorted(df["config/x"]) == [0, 1, 2, 3, 4]
    # filtered to each trial's best (first? no: min) result
    best_rows = rg.get_dataframe(filter_metric="loss", filter_mode="min")
    assert (best_rows["training_iteration"] == 3).all()
    assert len(best.metrics_dataframe) == 3
    # files: per-trial params/result, the journal; all private to the user
    results = os.path.join(str(tmp_path), "results")
    exp = os.path.join(results, "exp")
    assert tune.Tuner.can_restore(exp)
    for name in ("tuner.pkl", "experiment_journal.jsonl"):
        assert stat.S_IMODE(os.stat(os.path.join(exp, name)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(best.path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(exp).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(results).st_mode) == 0o700
    with open(os.path.join(best.path, "result.json")) as f:
        assert len(f.read().splitlines()) == 3
    assert os.path.exists(os.path.join(best.path, "params.json"))


def test_sampling_num_samples_and_nested_space(cluster, tmp_path):
    seen = []
    space = {"x": tune.grid_search(["a", "b"]), "lr": tune.loguniform(1e-4, 1e-1),
             "nested": {"n": tune.randint(0, 3), "q": tune.qrandint(2, 10, 2)},
             "derived": tune.sample_from(lambda spec: spec.config.nested.n * 10),
             "const": 7}

    def f(config):
        tune.report({"v": 1.0, "cfg": repr(config)})
    rg = run(f, tmp_path, space, num_samples=3)
    configs = [r.config for r in rg]
    assert len(configs) == 6 and sorted(c["x"] for c in configs) == ["a"] * 3 + ["b"] * 3
    for c in configs:
        seen.append(c)
        assert 1e-4 <= c["lr"] < 1e-1 and c["const"] == 7
        assert c["nested"]["n"] in (0, 1, 2) and c["nested"]["q"] in (2, 4, 6, 8, 10)
        assert c["derived"] == c["nested"]["n"] * 10
    assert len({c["lr"] for c in configs}) == 6  # drawn anew per trial


def test_variant_generator_is_seeded_and_orders_the_grid():
    def configs(seed, **kw):
        gen = BasicVariantGenerator(random_state=seed, **kw)
        gen.set_search_properties(None, None, {"a": tune.grid_search([1, 2]),
                                               "b": tune.grid_search([3, 4]),
                                               "u": tune.uniform(0, 1)}, num_samples=2)
        out = []
        while (c := gen.next_config(str(len(out)))) != Searcher.FINISHED:
            out.append(c)
        return out
    one, two = configs(1), configs(1)
    assert one == two and len(one) == 8
    assert [(c["a"], c["b"]) for c in one[:4]] == [(1, 3), (2, 3), (1, 4), (2, 4)]
    const = configs(2, constant_grid_search=True)
    assert len({c["u"] for c in const[:4]}) == 1 and const[0]["u"] != const[4]["u"]
    pts = BasicVariantGenerator(points_to_evaluate=[{"u": 0.5}])
    pts.set_search_properties(None, None, {"u": tune.uniform(0, 1)}, num_samples=1)
    assert pts.next_config("a")["u"] == 0.5 and pts.next_config("b")["u"] != 0.5
    assert pts.next_config("c") == Searcher.FINISHED


def test_searcher_suggesting_a_non_dict_gets_a_clear_error():
    from flowcore.tune.search.searcher import SearchGenerator

    class Bad(Searcher):
        def suggest(self, trial_id):
            return "lr=0.1"

    gen = SearchGenerator(Bad())
    gen.set_search_properties(None, None, {"x": 1}, num_samples=2)
    with pytest.raises(TypeError, match=r"Bad.suggest\(\) returned 'lr=0.1'; it must return"):
        gen.next_config("t0")


def test_bad_input_fails_before_trials_start(cluster, tmp_path):
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        tune.TuneConfig(metric="loss", mode="minimize")
    with pytest.raises(TypeError, match="param_space must be a dict"):
        tune.Tuner(quadratic, param_space=[1, 2])
    with pytest.raises(TypeError, match="grid_search"):
        tune.Tuner(quadratic, param_space={"x": {"grid_search": 3}})
    with pytest.raises(TypeError, match=r"tune.uniform was passed without calling it"):
        tune.Tuner(quadratic, param_space={"x": tune.uniform})
    with pytest.raises(ValueError, match="lower must be below upper"):
        tune.uniform(2, 1)
    with pytest.raises(ValueError, match="AsyncHyperBandScheduler needs a metric"):
        tune.Tuner(quadratic, tune_config=tune.TuneConfig(scheduler=ASHAScheduler()))
    with pytest.raises(TypeError, match="must take the trial's config"):
        tune.Tuner(lambda: None)
    with pytest.raises(TypeError, match="stop"):
        tune.RunConfig(stop="soon")
    with pytest.raises(ValueError, match="fit on no node"):
        tune.Tuner(tune.with_resources(quadratic, {"cpu": 64}),
                   run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0)).fit()
    # a metric the trainable never reports: named, with the keys it did report
    with pytest.raises(ValueError, match=r"'accuracy'.*\['loss'\]"):
        run(quadratic, tmp_path, {"x": 1}, name="nometric", metric="accuracy", mode="max")
    with pytest.raises(RuntimeError, match="outside a Tune trial"):
        tune.report({"x": 1})


def test_failing_trial_is_an_error_while_others_finish(cluster, tmp_path):
    def f(config):
        tune.report({"loss": float(config["x"])})
        if config["x"] == 2:
            raise ValueError("bad x")
        tune.report({"loss": float(config["x"])})
    rg = run(f, tmp_path, {"x": tune.grid_search([1, 2, 3])}, metric="loss", mode="min")
    assert rg.num_errors == 1 and rg.num_terminated == 2
    err = rg.errors[0]
    assert isinstance(err, ValueError) and "bad x" in str(err)
    failed = [r for r in rg if r.error is not None][0]
    assert failed.config == {"x": 2}
    with open(os.path.join(failed.path, "error.txt")) as fh:
        text = fh.read()
    assert "ValueError: bad x" in text and "in f" in text
    assert rg.get_best_result().config == {"x": 1}


def test_max_failures_retries_from_the_last_checkpoint(cluster, tmp_path):
    marker = tmp_path / "failed-once"

    def f(config):
        start = 0
        ckpt = tune.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                start = int(open(os.path.join(d, "step")).read()) + 1
        for step in range(start, 5):
            d = os.path.join(str(tmp_path), f"c{step}")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "step"), "w") as fh:
                fh.write(str(step))
            tune.report({"step": step, "start": start},
                        checkpoint=tune.Checkpoint.from_directory(d))
            if step == 2 and not marker.exists():
                marker.write_text("x")
                raise RuntimeError("crash once")
    rg = run(f, tmp_path, failure_config=tune.FailureConfig(max_failures=1),
             checkpoint_config=tune.CheckpointConfig(num_to_keep=2))
    r = rg[0]
    assert r.error is None and r.metrics["step"] == 4 and r.metrics["start"] == 3
    assert r.metrics["training_iteration"] == 5  # counted on from the checkpoint
    kept = sorted(n for n in os.listdir(r.path) if n.startswith("checkpoint_"))
    assert len(kept) == 2 and r.checkpoint.path.endswith(kept[-1])
    again = tune.Result.from_path(r.path)
    assert again.metrics["step"] == 4 and again.checkpoint == r.checkpoint
    assert len(again.best_checkpoints) == 2 and again.error is None
    # without retries the same failure is an error
    marker.unlink()
    rg = run(f, tmp_path, name="noretry")
    assert rg.num_errors == 1 and isinstance(rg.errors[0], RuntimeError)


def _iters(rg) -> int:
    return sum(r.metrics["training_iteration"] for r in rg)


def test_asha_stops_poor_trials_early(cluster, tmp_path):
    def f(config):
        for i in range(8):
            tune.report({"loss": config["x"] + 1.0 / (i + 1)})
    space = {"x": tune.grid_search(list(range(8)))}  # good trials come first
    fifo = run(f, tmp_path, space, name="fifo", metric="loss", mode="min")
    asha = run(f, tmp_path, space, name="asha", metric="loss", mode="min",
               scheduler=ASHAScheduler(max_t=8, grace_period=1, reduction_factor=2))
    assert _iters(fifo) == 64
    assert _iters(asha) < _iters(fifo)
    assert asha.get_best_result().config == {"x": 0}
    assert asha.get_best_result().metrics["training_iteration"] == 8
    median = run(f, tmp_path, space, name="median",
                 scheduler=MedianStoppingRule(metric="loss", mode="min", time_attr=
                                              "training_iteration", grace_period=2,
                                              min_samples_required=2))
    assert _iters(median) < 64
    # hard_stop=False pauses poor trials; they resume (from the start: no
    # checkpoints here) once the others are done, and all finish
    soft = run(f, tmp_path, space, name="soft",
               scheduler=MedianStoppingRule(metric="loss", mode="min", time_attr=
                                            "training_iteration", grace_period=2,
                                            min_samples_required=2, hard_stop=False))
    assert soft.num_terminated == 8 and all(r.metrics["training_iteration"] == 8 for r in soft)


class Linear(tune.Trainable):
    """loss falls with iterations; x sets how good a trial is."""

    def setup(self, config):
        self.t = 0

    def step(self):
        self.t += 1
        return {"loss": self.config["x"] + 1.0 / self.t}

    def save_checkpoint(self, checkpoint_dir):
        return {"t": self.t}

    def load_checkpoint(self, checkpoint):
        self.t = checkpoint["t"]


def test_hyperband_halves_brackets(cluster, tmp_path):
    from flowcore.tune.schedulers import HyperBandScheduler
    hb = HyperBandScheduler(max_t=9, reduction_factor=3)
    rg = run(Linear, tmp_path, {"x": tune.grid_search(list(range(9)))}, name="hb",
             metric="loss", mode="min", scheduler=hb)
    assert rg.num_terminated == 9 and rg.num_errors == 0
    assert _iters(rg) < 9 * 9
    best = rg.get_best_result()
    assert best.config == {"x": 0} and best.metrics["training_iteration"] == 9


def test_free_running_trial_delivers_every_result_in_order(cluster, tmp_path):
    def f(config):
        for i in range(300):
            tune.report({"i": i})
        raise ValueError("after 300 reports")
    rg = run(f, tmp_path, {"x": 1})
    r = rg[0]
    assert isinstance(r.error, ValueError)
    assert list(r.metrics_dataframe["i"]) == list(range(300))
    assert list(r.metrics_dataframe["training_iteration"]) == list(range(1, 301))


class Growth(tune.Trainable):
    """value grows by lr each step; PBT should spread the best lr."""

    def setup(self, config):
        self.value = 0.0

    def step(self):
        self.value += self.config["lr"]
        return {"value": self.value, "lr": self.config["lr"]}

    def save_checkpoint(self, checkpoint_dir):
        return {"value": self.value}

    def load_checkpoint(self, checkpoint):
        self.value = checkpoint["value"]

    def reset_config(self, new_config):
        self.config = new_config
        self.value = 0.0
        return True


class GrowthTogether(Growth):
    """Growth whose population starts together and takes its first two steps
    in lockstep (file barriers), as PBT expects: every trial has a score by
    the first perturbation point, so PBT has a population to rank (a trial
    that ran ahead alone would leave it nobody to compare with). The third
    step waits until the driver has the slowest learner's result at that
    point (``_BottomRanked``): a trial starved on a loaded machine could else
    reach it after the others had ended, alone, and PBT perturbed nobody.
    (It waits for that result's arrival, not for PBT's decision: PBT saves
    the leader then, and a save waits for the leader's step to end.)"""

    def setup(self, config):
        super().setup(config)
        open(os.path.join(config["barrier"], self.trial_id), "w").close()

    def step(self):
        barrier = self.config["barrier"]
        it = self.iteration + 1
        if it <= 2:   # up to the first perturbation (interval 2)
            open(os.path.join(barrier, f"step{it}.{self.trial_id}"), "w").close()
            while sum(1 for f in os.listdir(barrier) if f.startswith(f"step{it}.")) < 4:
                time.sleep(0.005)
        elif it == 3:
            while not os.path.exists(os.path.join(barrier, "bottom-ranked")):
                time.sleep(0.005)
        return super().step()


class _BottomRanked(tune.Callback):
    """Marks (in the driver, just before PBT decides on it) the arrival of
    the lowest lr's result at the first perturbation point."""

    def __init__(self, barrier, lr):
        self.barrier, self.lr = barrier, lr

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if trial.config["lr"] == self.lr and result["training_iteration"] == 2:
            open(os.path.join(self.barrier, "bottom-ranked"), "w").close()


def test_pbt_exploits_checkpoints_and_improves(cluster, tmp_path):
    lrs = [0.01, 0.02, 0.03, 1.0]
    (tmp_path / "barrier").mkdir()
    pbt = PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=2,
                                  hyperparam_mutations={"lr": [0.01, 0.02, 0.03, 1.0]},
                                  quantile_fraction=0.25, resample_probability=0.0, seed=0)
    rg = run(tune.with_resources(GrowthTogether, {"cpu": 0.5}), tmp_path,
             {"lr": tune.grid_search(lrs), "barrier": str(tmp_path / "barrier")},
             metric="value", mode="max", scheduler=pbt, stop={"training_iteration": 12},
             callbacks=[_BottomRanked(str(tmp_path / "barrier"), min(lrs))])
    assert rg.num_terminated == 4
    without_pbt = sorted(lr * 12 for lr in lrs)
    final = sorted(r.metrics["value"] for r in rg)
    # an exploited trial copied the leader's value from its checkpoint, so the
    # population ends better than the same lrs trained alone
    assert pbt._num_perturbations >= 1
    assert sum(final) > sum(without_pbt)
    assert final[0] > without_pbt[0]


def test_pbt_with_a_function_trainable_copies_checkpoints(cluster, tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    log = tmp_path / "starts"

    def f(config):
        value, it = 0.0, 0
        ckpt = tune.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                value, it = map(float, open(os.path.join(d, "state")).read().split())
        trial_id = tune.get_context().get_trial_id()
        with open(log, "a") as fh:
            fh.write(f"{trial_id} {value}\n")
        for _ in range(int(it), 100):
            value += config["lr"]
            it += 1
            if it <= 3:
                # the population reports its first three results in lockstep
                # (file barriers; report() returns once the scheduler has
                # decided on the result): every trial has a score when the first
                # reaches the perturbation point (interval 2), and none runs on
                # past it before all were ranked there. Without it a trial
                # starved on a loaded machine reached its perturbation point
                # after the others had ended, alone in the population, and PBT
                # (as Ray's) perturbed nobody. (A trial restarted from another's
                # checkpoint finds the earlier markers already there.)
                open(barrier / f"step{int(it)}.{trial_id}", "w").close()
                while sum(1 for n in os.listdir(barrier)
                          if n.startswith(f"step{int(it)}.")) < 4:
                    time.sleep(0.005)
            d = tmp_path / f"ck-{trial_id}-{int(it)}-{value}"
            d.mkdir(exist_ok=True)
            (d / "state").write_text(f"{value} {it}")
            tune.report({"value": value}, checkpoint=tune.Checkpoint.from_directory(str(d)))
    lrs = [0.01, 0.02, 0.03, 1.0]
    pbt = PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=2,
                                  hyperparam_mutations={"lr": lrs}, resample_probability=0.0,
                                  seed=0)
    rg = run(tune.with_resources(f, {"cpu": 0.5}), tmp_path, {"lr": tune.grid_search(lrs)},
             metric="value", mode="max", scheduler=pbt, stop={"training_iteration": 10})
    assert rg.num_terminated == 4 and pbt._num_perturbations >= 1
    # an exploited trial restarted from another trial's checkpoint (value > 0)
    restarts = [float(line.split()[1]) for line in log.read_text().splitlines()]
    assert any(v > 0 for v in restarts)
    assert sum(r.metrics["value"] for r in rg) > sum(lr * 10 for lr in lrs)


class _PBTTrial:
    def __init__(self, i):
        self.trial_id, self.status, self.config = f"t{i}", "RUNNING", {"lr": 0.1}


class _PBTController:
    """What PopulationBasedTraining asks of the experiment loop, recorded."""

    def __init__(self):
        self.exploits = []

    def checkpoint_for_exploit(self, donor):
        return {"path": f"ck-{donor.trial_id}", "iteration": 1}

    def exploit(self, trial, donor, new_config, checkpoint):
        self.exploits.append((trial.trial_id, donor.trial_id))


@pytest.mark.parametrize("fraction,exploited", [(0.25, {"t0", "t1"}), (0.5, {"t0", "t1"}),
                                                (0.0, set())])
def test_pbt_quantiles_are_sized_as_ray(fraction, exploited):
    # Ray: ceil(population x quantile_fraction) trials per quantile, at most
    # half the population: of 5 trials at 0.25 the 2 worst copy the 2 best
    # (1 and 1 before), and quantile_fraction=0 copies none (1 before)
    pbt = PopulationBasedTraining(time_attr="training_iteration", metric="score", mode="max",
                                  perturbation_interval=2, quantile_fraction=fraction,
                                  hyperparam_mutations={"lr": [0.1, 0.2]}, seed=0)
    ctl = _PBTController()
    trials = [_PBTTrial(i) for i in range(5)]
    for t in trials:
        pbt.on_trial_add(ctl, t)
    for it in (1, 2):  # everyone has a score before anyone's perturbation point
        for i, t in enumerate(trials):
            assert pbt.on_trial_result(ctl, t, {"training_iteration": it, "score": i}) == \
                "CONTINUE"
    assert {trial for trial, _ in ctl.exploits} == exploited
    assert {donor for _, donor in ctl.exploits} <= {"t3", "t4"}
    assert pbt._num_perturbations == len(exploited)


def test_class_trainable_checkpoints_and_reuse(cluster, tmp_path):
    rg = run(Growth, tmp_path, {"lr": tune.grid_search([1.0, 2.0, 3.0, 4.0])},
             metric="value", mode="max", stop={"training_iteration": 3},
             checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_frequency=1,
                                                     checkpoint_at_end=True))
    best = rg.get_best_result()
    assert best.config == {"lr": 4.0} and best.metrics["value"] == 12.0
    ckpts = [n for n in os.listdir(best.path) if n.startswith("checkpoint_")]
    assert len(ckpts) == 1
    import pickle
    with best.checkpoint.as_directory() as d:
        with open(os.path.join(d, "_dict_checkpoint.pkl"), "rb") as fh:
            assert pickle.load(fh) == {"value": 12.0}
    # four trials on two CPUs used two reused worker processes
    assert len({r.metrics["pid"] for r in rg}) <= 2
    # the workers were named after the experiment (and have ended)
    def workers():
        return [a for a in flowcore.state.list_actors() if a.get("namespace") == "tune"
                and str(a.get("name", "")).startswith("exp/")]
    assert workers()
    deadline = time.monotonic() + 30
    while not all(a["state"] == "DEAD" for a in workers()):  # kill() is asynchronous
        assert time.monotonic() < deadline, workers()
        time.sleep(0.05)


def test_reuse_actors_off_starts_a_worker_per_trial(cluster, tmp_path):
    def f(config):
        tune.report({"pid": os.getpid()})
    on = run(f, tmp_path, {"x": tune.grid_search([1, 2, 3, 4])}, name="on")
    off = run(f, tmp_path, {"x": tune.grid_search([1, 2, 3])}, name="off", reuse_actors=False)
    assert len({r.metrics["pid"] for r in on}) <= 2
    assert len({r.metrics["pid"] for r in off}) == 3


def test_stoppers_and_waiting_reason(cluster, tmp_path):
    def f(config):
        for i in range(100):
            tune.report({"i": i})
    rg = run(f, tmp_path, {"x": tune.grid_search([1, 2])}, stop={"training_iteration": 3})
    assert [r.metrics["training_iteration"] for r in rg] == [3, 3]
    rg = run(f, tmp_path, {"x": tune.grid_search([1, 2])}, name="fn",
             stop=lambda trial_id, result: result["i"] >= 4)
    assert [r.metrics["i"] for r in rg] == [4, 4]

    class AllStop(tune.Stopper):
        def __init__(self):
            self.n = 0

        def __call__(self, trial_id, result):
            self.n += 1
            return False

        def stop_all(self):
            return self.n >= 5
    rg = run(f, tmp_path, {"x": tune.grid_search([1, 2])}, name="all", stop=AllStop())
    assert all(r.metrics["training_iteration"] < 100 for r in rg)

    def slow(config):
        for i in range(1000):
            tune.report({"i": i})
            time.sleep(0.01)
    rg = run(slow, tmp_path, {"x": tune.grid_search([1, 2, 3])}, name="budget",
             time_budget_s=0.5)
    assert all(r.metrics["training_iteration"] < 1000 for r in rg if r.metrics)

    reasons = []
    calls = []

    class Watch(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            calls.append(("start", trial.trial_id))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            reasons.extend(t.explain() for t in trials if t.status == "PENDING")

        def on_trial_complete(self, iteration, trials, trial, **info):
            calls.append(("complete", trial.trial_id))

        def on_experiment_end(self, trials, **info):
            calls.append(("end", len(trials)))
    run(f, tmp_path, {"x": tune.grid_search([1, 2, 3])}, name="wait", max_concurrent_trials=1,
        stop={"training_iteration": 2}, callbacks=[Watch()])
    assert any("max_concurrent_trials=1" in r for r in reasons), reasons
    kinds = [c[0] for c in calls]
    assert kinds == ["start", "complete"] * 3 + ["end"] and calls[-1] == ("end", 3)


def test_concurrency_limiter_and_custom_searcher(cluster, tmp_path):
    class Counting(Searcher):
        def __init__(self):
            super().__init__()
            self.n = 0
            self.live = 0
            self.peak = 0

        def suggest(self, trial_id):
            self.n += 1
            self.live += 1
            self.peak = max(self.peak, self.live)
            return {"x": self.n}

        def on_trial_complete(self, trial_id, result=None, error=False):
            self.live -= 1
    s = Counting()
    rg = run(lambda c: tune.report({"loss": c["x"]}), tmp_path, name="lim",
             search_alg=ConcurrencyLimiter(s, max_concurrent=1), num_samples=4,
             metric="loss", mode="min")
    assert sorted(r.config["x"] for r in rg) == [1, 2, 3, 4] and s.peak == 1


def test_with_parameters_puts_the_array_once(cluster, tmp_path, monkeypatch):
    import cloudpickle
    data = np.ones(50 * 1024 * 1024 // 8)
    puts = []
    real_put = flowcore.put
    monkeypatch.setattr(flowcore, "put", lambda v: puts.append(1) or real_put(v))

    def f(config, data=None):
        tune.report({"total": float(data.sum()) * config["k"], "nbytes": data.nbytes})
    wrapped = tune.with_parameters(f, data=data)
    assert len(cloudpickle.dumps(wrapped)) < 1 << 20  # the array is not in the pickle
    rg = run(wrapped, tmp_path, {"k": tune.grid_search([1, 2, 3])})
    assert len(puts) == 1
    assert sorted(r.metrics["total"] for r in rg) == [data.size * k for k in (1, 2, 3)]
    assert all(r.metrics["nbytes"] == data.nbytes for r in rg)


def test_with_resources_and_placement_group_factory(cluster, tmp_path):
    def f(config):
        tune.report({"res": tune.get_context().get_trial_resources()})
    rg = run(tune.with_resources(f, {"cpu": 2}), tmp_path, {"x": tune.grid_search([1, 2])})
    assert all(r.metrics["res"] == {"CPU": 2.0} for r in rg)
    pgf = tune.PlacementGroupFactory([{"CPU": 1}, {"CPU": 1}])
    rg = run(tune.with_resources(f, pgf), tmp_path, {"x": 1}, name="pg")
    assert rg[0].metrics["res"] == {"CPU": 2.0} and rg.num_errors == 0


def test_checkpoint_directory_round_trip(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.txt").write_text("weights")
    ck = tune.Checkpoint.from_directory(str(src))
    ck.set_metadata({"epoch": 3})
    ck.update_metadata({"loss": 0.5})
    assert ck.get_metadata() == {"epoch": 3, "loss": 0.5}
    out = ck.to_directory(str(tmp_path / "dst"))
    assert open(os.path.join(out, "w.txt")).read() == "weights"
    with ck.as_directory() as d:
        assert open(os.path.join(d, "w.txt")).read() == "weights"
    with pytest.raises(ValueError, match="not a directory"):
        tune.Checkpoint.from_directory(str(tmp_path / "missing"))


def test_pyarrow_filesystem_storage_and_restore(cluster, tmp_path):
    import pyarrow.fs as pafs
    base = tmp_path / "bucket"
    base.mkdir()
    fs = pafs.SubTreeFileSystem(str(base), pafs.LocalFileSystem())

    def f(config):
        d = os.path.join(str(tmp_path), f"ck{config['x']}")
        os.makedirs(d, exist_ok=True)
        open(os.path.join(d, "x"), "w").write(str(config["x"]))
        tune.report({"loss": (config["x"] - 2) ** 2}, checkpoint=tune.Checkpoint.from_directory(d))
    tuner = tune.Tuner(f, param_space={"x": tune.grid_search([1, 2, 3])},
                       tune_config=tune.TuneConfig(metric="loss", mode="min"),
                       run_config=tune.RunConfig(name="remote", storage_path="exps",
                                                 storage_filesystem=fs, verbose=0))
    rg = tuner.fit()
    best = rg.get_best_result()
    assert best.config == {"x": 2}
    with best.checkpoint.as_directory() as d:
        assert open(os.path.join(d, "x")).read() == "2"
    names = os.listdir(base / "exps" / "remote")
    assert any(n.startswith("experiment_journal-") for n in names)
    assert tune.Tuner.can_restore("exps/remote", storage_filesystem=fs)
    again = tune.Tuner.restore("exps/remote", f, storage_filesystem=fs).fit()
    assert again.num_terminated == 3 and again.get_best_result().config == {"x": 2}
    assert not tune.Tuner.can_restore(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="no experiment there"):
        tune.Tuner.restore(str(tmp_path / "nothing"), f)


def test_progress_table_prints(cluster, tmp_path, capsys):
    tuner = tune.Tuner(quadratic, param_space={"x": tune.grid_search([2, 3])},
                       tune_config=tune.TuneConfig(metric="loss", mode="min"),
                       run_config=tune.RunConfig(name="table", storage_path=str(tmp_path)))
    tuner.fit()
    out = capsys.readouterr().out
    assert "Trial status: 2 TERMINATED" in out
    assert "Current best trial" in out and "loss" in out and "iter" in out


def test_optuna_search_beats_random(cluster, tmp_path):
    import importlib.util
    if importlib.util.find_spec("optuna") is None and os.environ.get("CI") != "true":
        pytest.skip("optuna is not installed (pip install 'flowcore[tune]')")
    from flowcore.tune.search.optuna import OptunaSearch

    def f(config):
        tune.report({"loss": (config["x"] - 0.7) ** 2 + (config["y"] + 0.2) ** 2})
    space = {"x": tune.uniform(-5, 5), "y": tune.uniform(-5, 5)}

    def first_hit(rg, threshold=0.05):
        losses = [r.metrics["loss"] for r in sorted(rg, key=lambda r: r.metrics["trial_id"])]
        return next((i for i, v in enumerate(losses) if v < threshold), len(losses))
    opt = run(f, tmp_path, space, name="optuna", metric="loss", mode="min", num_samples=40,
              search_alg=ConcurrencyLimiter(OptunaSearch(seed=3), max_concurrent=1))
    rnd = run(f, tmp_path, space, name="random", metric="loss", mode="min", num_samples=40,
              search_alg=BasicVariantGenerator(random_state=3))
    assert opt.get_best_result().metrics["loss"] < rnd.get_best_result().metrics["loss"]
    assert first_hit(opt) < first_hit(rnd)


def test_trial_waiting_for_a_busy_cluster_says_why(cluster, tmp_path):
    @flowcore.remote
    class Holder:
        def ping(self):
            return 1
    # the cluster has custom=2; this actor holds one, so one trial worker queues
    holder = Holder.options(num_cpus=0, resources={"custom": 1}).remote()
    assert flowcore.get(holder.ping.remote(), timeout=30) == 1
    flag = tmp_path / "flag"
    reasons = []

    def f(config):
        while not flag.exists():
            tune.report({"v": 1})
            time.sleep(0.02)
        tune.report({"v": 2})

    class Watch:
        def on_trial_result(self, iteration, trials, trial, result, **info):
            waiting = [t.pending_reason for t in trials if t is not trial and
                       t.pending_reason.startswith("worker not started")]
            if waiting and not reasons:
                reasons.extend(waiting)
                flag.write_text("go")
                flowcore.kill(holder)
    try:
        rg = run(tune.with_resources(f, {"cpu": 0, "custom": 1}), tmp_path,
                 {"x": tune.grid_search([1, 2])}, callbacks=[Watch()])
    finally:
        flag.write_text("go")
        flowcore.kill(holder)
    assert rg.num_terminated == 2
    assert reasons and "custom" in reasons[0] and "PENDING" in reasons[0], reasons


def test_restore_resumes_or_restarts_errored_trials(cluster, tmp_path):
    fail = tmp_path / "fail"
    fail.write_text("1")
    runs = tmp_path / "runs"

    def f(config):
        start = 0
        ckpt = tune.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                start = int(open(os.path.join(d, "it")).read()) + 1
        with open(runs, "a") as fh:
            fh.write(f"{config['x']} {start}\n")
        for it in range(start, 3):
            d = os.path.join(str(tmp_path), f"c{config['x']}-{it}")
            os.makedirs(d, exist_ok=True)
            open(os.path.join(d, "it"), "w").write(str(it))
            tune.report({"it": it}, checkpoint=tune.Checkpoint.from_directory(d))
            if config["x"] == 1 and it == 1 and fail.exists():
                raise RuntimeError("flaky")
    space = {"x": tune.grid_search([0, 1])}
    rg = run(f, tmp_path, space, name="err")
    assert rg.num_errors == 1
    exp = str(tmp_path / "results" / "err")
    # without resume_errored the failed trial stays failed and nothing reruns
    again = tune.Tuner.restore(exp, f).fit()
    assert again.num_errors == 1 and len(runs.read_text().splitlines()) == 2
    fail.unlink()
    resumed = tune.Tuner.restore(exp, f, resume_errored=True).fit()
    assert resumed.num_errors == 0 and resumed.num_terminated == 2
    assert runs.read_text().splitlines()[-1] == "1 2"  # from the checkpoint of it=1
    rg = run(f, tmp_path, space, name="err2")  # no failure now: a clean run...
    fail.write_text("1")
    rg = run(f, tmp_path, space, name="err3")
    assert rg.num_errors == 1
    fail.unlink()
    restarted = tune.Tuner.restore(str(tmp_path / "results" / "err3"), f, restart_errored=True).fit()
    assert restarted.num_errors == 0
    assert runs.read_text().splitlines()[-1] == "1 0"  # from scratch
    assert [r.metrics["training_iteration"] for r in restarted] == [3, 3]


def test_fail_fast_raise(cluster, tmp_path):
    def f(config):
        raise KeyError("boom")
    with pytest.raises(tune.TuneError, match="fail_fast"):
        run(f, tmp_path, {"x": tune.grid_search([1, 2, 3])},
            failure_config=tune.FailureConfig(fail_fast="raise"))


def test_worker_process_death_is_retried(cluster, tmp_path):
    marker = tmp_path / "died"

    def f(config):
        tune.report({"pid": os.getpid(), "attempt": 1 if not marker.exists() else 2})
        if not marker.exists():
            marker.write_text("x")
            os._exit(1)  # the worker process dies mid-trial
        tune.report({"pid": os.getpid(), "attempt": 2})
    rg = run(f, tmp_path, {"x": 1}, failure_config=tune.FailureConfig(max_failures=1))
    assert rg.num_errors == 0 and rg[0].metrics["attempt"] == 2
    marker.unlink()
    rg = run(f, tmp_path, {"x": 1}, name="nodie")
    assert rg.num_errors == 1
    assert isinstance(rg.errors[0], flowcore.exceptions.ActorError)


def test_checkpoint_copies_are_private(tmp_path):
    import stat
    from flowcore import train
    from flowcore.tune import Checkpoint
    # one class for both libraries, as ray.train.Checkpoint is ray.tune.Checkpoint
    assert train.Checkpoint is Checkpoint
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.txt").write_text("beta")
    os.chmod(src / "a.txt", 0o644)
    out = Checkpoint.from_directory(str(src)).to_directory(str(tmp_path / "out"))
    assert open(os.path.join(out, "sub", "b.txt")).read() == "beta"
    assert stat.S_IMODE(os.stat(os.path.join(out, "a.txt")).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.join(out, "sub")).st_mode) == 0o700
