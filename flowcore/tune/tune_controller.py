"""The experiment loop, run in the driver (it holds no CPU).

It creates trials from the search algorithm, starts them on trial worker
actors (reused between trials), feeds each result to the stopper, the
scheduler and the search algorithm, writes results, checkpoints and state
changes to storage and the journal as they happen, retries failed trials
and explains why a waiting trial waits.  Completions arrive through the
refs' futures on a queue: the loop sleeps until something happens (or the
progress table is due).
"""
from __future__ import annotations

import logging
import os
import queue
import time
import traceback
import uuid
from typing import Any

import cloudpickle

import flowcore
from flowcore.exceptions import ActorError, TaskError, WorkerCrashedError
from flowcore.scheduling import PlacementGroupSchedulingStrategy

from . import resources as res_mod
from . import storage
from .checkpoint_manager import CheckpointManager
from .config import CheckpointConfig, FailureConfig, RunConfig, TuneConfig
from .error import TuneError
from .experiment_journal import ExperimentJournal, encode_obj, to_json
from .progress import ProgressTable
from .status_feed import TuneFeed
from .schedulers.trial_scheduler import FIFOScheduler, TrialScheduler
from .search.searcher import SearchAlgorithm, Searcher
from .search.variant_generator import experiment_tag
from .stopper import Stopper
from .trainable import is_class_trainable, resource_request
from .trial import Trial
from .trial_worker import TrialWorker

logger = logging.getLogger(__name__)

SEARCH_STATE_FILE = "search_state.pkl"


class _Worker:
    """A trial worker actor and the trial it runs."""

    def __init__(self, handle: Any, key: Any, pg: Any, request: Any):
        self.handle = handle
        self.key = key
        self.pg = pg
        self.request = request
        self.trial: Trial | None = None
        self.started = False  # has answered at least once (so it is placed)


class TuneController:
    """Drives one experiment to completion; ``run()`` returns its trials."""

    def __init__(self, *, trainable: Any, search_alg: SearchAlgorithm,
                 scheduler: TrialScheduler, stopper: Stopper | None, tune_config: TuneConfig,
                 run_config: RunConfig, fs: Any, experiment_path: str, experiment_name: str,
                 journal: ExperimentJournal, trials: list[Trial], experiment_uid: str,
                 metric: str | None, trainable_name: str, searched_space: dict,
                 mode: str | None = None):
        self.trainable = trainable
        self.search_alg = search_alg
        self.scheduler = scheduler
        self.stopper = stopper
        self.tune_config = tune_config
        self.run_config = run_config
        self.fs = fs
        self.experiment_path = experiment_path
        self.experiment_name = experiment_name
        self.journal = journal
        self.trials = trials
        self.uid = experiment_uid
        self.metric = metric
        self.mode = mode
        self.trainable_name = trainable_name
        self.space = searched_space
        # RunConfig.__post_init__ fills both in; the defaults only narrow the type
        self.failure_config = run_config.failure_config or FailureConfig()
        self.checkpoint_config = run_config.checkpoint_config or CheckpointConfig()
        self.events: queue.Queue = queue.Queue()
        self.calls: dict[Trial, Any] = {}  # trial -> outstanding ref
        self.workers: dict[Trial, _Worker] = {}
        self.idle: dict[Any, list[_Worker]] = {}
        self.all_workers: list[_Worker] = []
        self.search_finished = search_alg.is_finished()
        self.stopping_all = False
        self.start_time = time.monotonic()
        self.capacity_cache: tuple[float, dict] = (0.0, {})
        self.pending_exploits: dict[Trial, tuple[dict, dict]] = {}
        self.actor_cls = flowcore.remote(TrialWorker)
        self.progress = ProgressTable(self, run_config.verbose, metric)
        self.is_class = is_class_trainable(trainable)
        self.next_index = max((t.index for t in trials), default=-1) + 1
        self.callbacks = run_config.callbacks or []
        self._search_saved = 0.0
        self._next_explain = 0.0
        self._worker_count = 0
        self._iteration = 0  # loop steps, the `iteration` callbacks get
        self.writer = storage.BackgroundWriter()
        # no decision can depend on one result: trials need not pause in report()
        self.free_run = (type(scheduler) is FIFOScheduler and stopper is None
                         and tune_config.time_budget_s is None
                         and not self.failure_config.fail_fast
                         and os.environ.get("FLOWCORE_TUNE_STEPPED") != "1")
        self._run_tag = uuid.uuid4().hex[:6]  # this fit() (a restore gets another)
        self.feed = TuneFeed(self)  # the dashboard's Tune tab
        self._fail_fast_error: BaseException | None = None  # set by a fail_fast="raise" error
        self._write_error: BaseException | None = None

    # -- views used by schedulers ----------------------------------------
    def get_trials(self) -> list[Trial]:
        return self.trials

    def get_live_trials(self) -> list[Trial]:
        return [t for t in self.trials if not t.is_finished()]

    def can_start(self, trial: Trial) -> bool:
        return not self.stopping_all

    # -- capacity ----------------------------------------------------------
    def _cluster(self) -> dict:
        now = time.monotonic()
        if now - self.capacity_cache[0] > 2.0:
            self.capacity_cache = (now, {"total": flowcore.cluster_resources(),
                                         "nodes": flowcore.nodes()})
        return self.capacity_cache[1]

    def _slots(self, request: Any) -> int:
        """How many trials of ``request`` may run at once."""
        total = self._cluster()["total"]
        need = res_mod.total(request)
        fits = [int(total.get(k, 0.0) // v) for k, v in need.items() if v > 0]
        capacity = min(fits) if fits else max(int(total.get("CPU", 1)), 1)
        limit = self.tune_config.max_concurrent_trials
        return min(capacity, limit) if limit else capacity

    def check_resources(self, request: Any) -> None:
        """Fail before any trial starts when no node could ever run one."""
        need = res_mod.head(request)
        nodes = self._cluster()["nodes"]
        if isinstance(request, res_mod.PlacementGroupFactory):
            total = self._cluster()["total"]
            short = {k: v for k, v in request.required_resources.items()
                     if total.get(k, 0.0) < v}
            if short:
                raise ValueError(f"trial resources {request} need {short} but the cluster has "
                                 f"{ {k: total.get(k, 0.0) for k in short} }; lower the request "
                                 f"(tune.with_resources) or add nodes")
            return
        for node in nodes:
            if not node.get("alive", True):
                continue
            have = node.get("resources_total") or {}
            if all(have.get(k, 0.0) >= v for k, v in need.items() if v > 0):
                return
        if nodes:
            raise ValueError(f"trial resources {need} fit on no node of the cluster (nodes have "
                             f"{[n.get('resources_total') for n in nodes]}); lower "
                             f"the request with tune.with_resources(trainable, {{...}}) or add "
                             f"a node that has them")

    # -- trials -----------------------------------------------------------
    def _new_trial(self, config: dict, trial_id: str) -> Trial:
        index = self.next_index
        self.next_index += 1
        tag = experiment_tag(index, self.space, config)
        request = resource_request(self.trainable, config)
        t = Trial(trial_id, config, trainable_name=self.trainable_name, experiment_tag=tag,
                  path="", filesystem=self.fs, resources=request, index=index, dirname="")
        if self.tune_config.trial_name_creator is not None:
            t.custom_trial_name = str(self.tune_config.trial_name_creator(t))
        if self.tune_config.trial_dirname_creator is not None:
            dirname = str(self.tune_config.trial_dirname_creator(t))
        else:
            dirname = _safe(f"{self.trainable_name}_{trial_id}_{tag}")[:120]
        t.dirname = dirname
        t.path = storage.join(self.experiment_path, dirname)
        t.checkpoint_manager = CheckpointManager(self.checkpoint_config, self.fs)
        self.writer.submit(_write_trial_files, self.fs, t.path, config)
        self.journal.append("trial", trial_id=trial_id, index=index, tag=tag, dirname=dirname,
                            config=encode_obj(config), name=t.custom_trial_name)
        self.trials.append(t)
        self.scheduler.on_trial_add(self, t)
        self._save_search_state(force=False)
        return t

    def _save_search_state(self, force: bool = True) -> None:
        """Snapshot the search algorithm (at most once a second while
        running; a restore replays the journal's newer trials on top)."""
        now = time.monotonic()
        if not force and now - self._search_saved < 1.0:
            return
        self._search_saved = now
        try:
            blob = cloudpickle.dumps({"num_trials": len(self.trials),
                                                    "state": self.search_alg.get_state()})
        except Exception as e:  # noqa: BLE001 - the journal still has every trial
            logger.debug("search state not saved: %s", e)
            return
        storage.write_bytes(self.fs, storage.join(self.experiment_path, SEARCH_STATE_FILE),
                            blob)

    def _add_trials(self) -> None:
        """Create trials while there is room for them to start."""
        if self.search_finished or self.stopping_all:
            return
        request = resource_request(self.trainable, {})
        room = self._slots(request) - len(self.workers)
        pending = sum(1 for t in self.trials if t.status == Trial.PENDING)
        while pending < max(room, 1):
            trial_id = f"{self.uid}_{self.next_index:05d}"
            config = self.search_alg.next_config(trial_id)
            if config == Searcher.FINISHED:
                self.search_finished = True
                return
            if not isinstance(config, dict):  # None: the searcher waits for results
                return
            self._new_trial(config, trial_id)
            pending += 1

    def _move_unplaced(self) -> None:
        """A trial whose worker is still queued in the cluster moves to an
        idle worker with the same resources (the queued one is ended)."""
        for trial, worker in list(self.workers.items()):
            if worker.started:
                continue
            pool = [w for w in self.idle.get(worker.key, []) if w.started]
            if not pool or not self._still_queued(trial):
                continue
            spare = pool[0]
            self.idle[worker.key].remove(spare)
            self.workers.pop(trial)
            self.calls.pop(trial, None)
            self._end_worker(worker)
            spare.trial = trial
            self.workers[trial] = spare
            self._call(trial, spare.handle.start.remote(self._spec(trial, trial.start_entry)))

    def _still_queued(self, trial: Trial) -> bool:
        """Whether the trial's worker actor is certainly not placed yet."""
        ref = self.calls.get(trial)
        if ref is None or time.monotonic() - getattr(trial, "_start_time", 0.0) < 0.5:
            return False
        try:
            e = flowcore.explain(ref)
        except Exception:  # noqa: BLE001 - when unsure, wait for it
            return False
        return e.get("state") == "QUEUED" and "actor is PENDING" in str(e.get("text"))

    def _start_trials(self) -> None:
        self._move_unplaced()
        while not self.stopping_all:
            trial = self.scheduler.choose_trial_to_run(self)
            if trial is None:
                return
            request = trial.placement_group_factory
            running = [t for t in self.workers]
            slots = self._slots(request)
            if len(running) >= slots:
                limit = self.tune_config.max_concurrent_trials
                why = (f"max_concurrent_trials={limit}" if limit and limit <= slots else
                       f"the cluster's {self._describe_total(request)} fit {slots} trial(s) of "
                       f"{res_mod.total(request)}")
                for t in self.trials:
                    if t.status in (Trial.PENDING, Trial.PAUSED):
                        t.pending_reason = (f"waiting for a trial slot: {len(running)} "
                                            f"running, {why}")
                return
            self._start(trial)

    def _describe_total(self, request: Any) -> str:
        total = self._cluster()["total"]
        return ", ".join(f"{total.get(k, 0):g} {k}" for k in res_mod.total(request))

    def _worker_for(self, trial: Trial) -> _Worker:
        key = res_mod.key(trial.placement_group_factory)
        pool = self.idle.get(key)
        if pool:
            return pool.pop()
        request = trial.placement_group_factory
        opts = res_mod.actor_options(res_mod.head(request))
        pg = None
        if isinstance(request, res_mod.PlacementGroupFactory):
            pg = flowcore.placement_group(request.bundles, strategy=request.strategy)
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, 0)
        # named after the experiment, so the dashboard's and state.list_actors()'s
        # actor lists show which experiment each trial worker serves
        self._worker_count += 1
        opts.update(namespace="tune",
                    name=f"{self.experiment_name}/{self._run_tag}/worker-{self._worker_count}")
        handle = self.actor_cls.options(**opts).remote(self.trainable)
        w = _Worker(handle, key, pg, request)
        self.all_workers.append(w)
        return w

    def _spec(self, trial: Trial, entry: dict | None) -> dict:
        info = {"trial_id": trial.trial_id, "trial_name": str(trial),
                "trial_dir": trial.path, "experiment_name": self.experiment_name,
                "resources": res_mod.total(trial.placement_group_factory),
                "filesystem": self.fs}
        mgr = trial.checkpoint_manager
        next_index = max([e["index"] for e in mgr.entries], default=-1) + 1
        next_index = max(next_index, getattr(trial, "_next_ckpt_index", 0))
        return {"info": info, "config": trial.config, "filesystem": self.fs,
                "trial_dir": trial.path, "checkpoint": entry,
                "iteration": entry["iteration"] if entry else 0,
                "time_total": entry.get("time_total", 0.0) if entry else 0.0,
                "checkpoint_index": next_index,
                "checkpoint_frequency": self.checkpoint_config.checkpoint_frequency,
                "free_run": self.free_run}

    def _start(self, trial: Trial, entry: dict | None = None) -> None:
        worker = self._worker_for(trial)
        worker.trial = trial
        self.workers[trial] = worker
        if entry is None:
            entry = trial.restore_from
        trial.restore_from = None
        trial.start_entry = entry
        if entry is not None:
            # results past the checkpoint are redone
            trial.results = [r for r in trial.results
                             if r.get("training_iteration", 0) <= entry["iteration"]]
        else:
            trial.results = []
        trial.status = Trial.RUNNING
        trial.pending_reason = ""
        trial._start_time = time.monotonic()  # type: ignore[attr-defined]
        self.journal.append("status", trial_id=trial.trial_id, status=Trial.RUNNING)
        self._call(trial, worker.handle.start.remote(self._spec(trial, entry)))
        self._hook("on_trial_start", trial)

    def _call(self, trial: Trial, ref: Any) -> None:
        self.calls[trial] = ref
        ref.future().add_done_callback(lambda fut, t=trial, r=ref: self.events.put((t, r, fut)))

    def _release(self, trial: Trial, *, save: bool = False, dead: bool = False) -> dict | None:
        """Stop the trial's run and return its worker to the pool (or end it)."""
        worker = self.workers.pop(trial, None)
        self.calls.pop(trial, None)
        if worker is None:
            return None
        worker.trial = None
        out = None
        if dead:
            self._end_worker(worker)
            return None
        try:
            if save:
                out = flowcore.get(worker.handle.stop.remote(save=True), timeout=300)
            elif self.is_class or not self.tune_config.reuse_actors:
                worker.handle.stop.remote(save=False)
            # (a reused function-trainable worker ends the old run in its next start())
        except (ActorError, WorkerCrashedError):
            self._end_worker(worker)
            return None
        except TaskError as e:
            logger.warning("saving trial %s at its end failed: %s", trial, e)
        if out and out.get("stuck"):
            self._end_worker(worker)
        elif self.tune_config.reuse_actors and not self.stopping_all:
            self.idle.setdefault(worker.key, []).append(worker)
        else:
            self._end_worker(worker)
        return out.get("checkpoint") if out else None

    def _end_worker(self, worker: _Worker) -> None:
        try:
            flowcore.kill(worker.handle)
        except Exception:  # noqa: BLE001 - already gone
            pass
        if worker.pg is not None:
            try:
                flowcore.remove_placement_group(worker.pg)
            except Exception:  # noqa: BLE001
                pass
        if worker in self.all_workers:
            self.all_workers.remove(worker)

    # -- results ----------------------------------------------------------
    def _register_checkpoint(self, trial: Trial, saved: dict, result: dict | None) -> None:
        metrics = dict(result or trial.last_result or {})
        entry = dict(saved, time_total=metrics.get("time_total_s", 0.0),
                     metrics={k: v for k, v in metrics.items() if k != "config"})
        trial._next_ckpt_index = entry["index"] + 1  # type: ignore[attr-defined]
        trial.resume_entry = entry
        dropped = trial.checkpoint_manager.register(entry)
        self.journal.append("checkpoint", trial_id=trial.trial_id, entry=entry,
                            dropped=[e["path"] for e in dropped])

    def _on_result(self, trial: Trial, result: dict) -> str:
        result["trial_id"] = trial.trial_id
        result["config"] = trial.config
        trial.last_result = result
        trial.results.append(result)
        self.journal.append("result", trial_id=trial.trial_id,
                            result={k: v for k, v in result.items() if k != "config"})
        if storage.is_local(self.fs):
            self.writer.submit(_append_line, os.path.join(trial.path, "result.json"),
                               to_json(result) + "\n")
        self._check_metric(trial, result)
        self._hook("on_trial_result", trial, result=result)
        if self.progress.verbose >= 3:
            self.progress.trial_line(trial, "reported", result)
        if self.stopper is not None and self.stopper(trial.trial_id, result):
            return TrialScheduler.STOP
        decision = self.scheduler.on_trial_result(self, trial, result)
        self.search_alg.on_trial_result(trial.trial_id, result)
        return decision

    def _check_metric(self, trial: Trial, result: dict) -> None:
        if self.metric is None or self.metric in result:
            return
        if os.environ.get("TUNE_DISABLE_STRICT_METRIC_CHECKING") == "1":
            return
        reported = sorted(k for k in result if k not in _AUTO_KEYS)
        raise ValueError(f"trial {trial} reported a result without the metric "
                         f"{self.metric!r} (TuneConfig/scheduler/search_alg metric); it "
                         f"reported {reported}. Report it with tune.report({{"
                         f"{self.metric!r}: value}}) or set metric= to one of those keys")

    def _complete(self, trial: Trial, *, stopped: bool) -> None:
        """The trial ended without error (finished, or stopped early)."""
        if trial.last_result:
            trial.last_result["done"] = True
        save = (self.is_class and self.checkpoint_config.checkpoint_at_end is not False
                and bool(self.checkpoint_config.checkpoint_at_end))
        saved = self._release(trial, save=save)
        if saved:
            self._register_checkpoint(trial, saved, trial.last_result)
        trial.status = Trial.TERMINATED
        self.journal.append("status", trial_id=trial.trial_id, status=Trial.TERMINATED)
        self._write_results(trial)
        self.scheduler.on_trial_complete(self, trial, trial.last_result)
        self.search_alg.on_trial_complete(trial.trial_id, result=trial.last_result)
        self._hook("on_trial_complete", trial)
        if self.progress.verbose >= 2:
            self.progress.trial_line(trial, "completed", trial.last_result)

    def _write_results(self, trial: Trial) -> None:
        if not storage.is_local(self.fs) and trial.results:
            self.writer.submit(storage.write_bytes, self.fs,
                               storage.join(trial.path, "result.json"),
                               "".join(to_json(r) + "\n" for r in trial.results).encode())

    def _pause(self, trial: Trial) -> None:
        saved = self._release(trial, save=self.is_class)
        if saved:
            self._register_checkpoint(trial, saved, trial.last_result)
        trial.restore_from = trial.resume_entry
        trial.status = Trial.PAUSED
        self.journal.append("status", trial_id=trial.trial_id, status=Trial.PAUSED)

    def _on_error(self, trial: Trial, err: BaseException, *, dead: bool) -> None:
        self._release(trial, dead=dead)
        trial.num_failures += 1
        text = getattr(err, "remote_traceback", "") or "".join(
            traceback.format_exception(type(err), err, err.__traceback__))
        mf = self.failure_config.max_failures
        if (mf == -1 or trial.num_failures <= mf) and not self.stopping_all:
            logger.warning("trial %s failed (%d of %s allowed); retrying from %s", trial,
                           trial.num_failures, "unlimited" if mf == -1 else mf,
                           "its last checkpoint" if trial.resume_entry
                           else "the start")
            trial.status = Trial.PENDING
            trial.restore_from = trial.resume_entry
            trial.pending_reason = f"retry {trial.num_failures} after: {err.__class__.__name__}"
            self.journal.append("retry", trial_id=trial.trial_id,
                                num_failures=trial.num_failures)
            return
        self.writer.flush()  # the trial directory exists
        trial.status = Trial.ERROR
        trial.error = err
        trial.error_msg = text
        trial.error_file = storage.join(trial.path, "error.txt")
        storage.write_bytes(self.fs, trial.error_file, text.encode())
        try:
            storage.write_bytes(self.fs, storage.join(trial.path, "error.pkl"),
                                cloudpickle.dumps(err))
        except Exception:  # noqa: BLE001 - error.txt has the text
            pass
        self.journal.append("status", trial_id=trial.trial_id, status=Trial.ERROR,
                            num_failures=trial.num_failures, error=text[-4000:])
        self._write_results(trial)
        self.scheduler.on_trial_error(self, trial)
        self._hook("on_trial_error", trial)
        if self.progress.verbose >= 1:
            self.progress.trial_line(trial, f"errored: {type(err).__name__}: "
                                            f"{str(err).splitlines()[0] if str(err) else ''}"
                                            f" (see {trial.error_file})")
        self.search_alg.on_trial_complete(trial.trial_id, result=trial.last_result or None,
                                          error=True)
        if self.failure_config.fail_fast:
            self.stopping_all = True
            if self.failure_config.fail_fast == "raise":
                self._fail_fast_error = err

    def stop_paused_trial(self, trial: Trial) -> None:
        """End a PAUSED trial for good (a scheduler decided it will not resume)."""
        if trial.status != Trial.PAUSED:
            return
        if trial.last_result:
            trial.last_result["done"] = True
        trial.status = Trial.TERMINATED
        trial.restore_from = None
        self.journal.append("status", trial_id=trial.trial_id, status=Trial.TERMINATED)
        self._write_results(trial)
        self.search_alg.on_trial_complete(trial.trial_id, result=trial.last_result)
        self._hook("on_trial_complete", trial)

    # -- PBT hooks ----------------------------------------------------------
    def checkpoint_for_exploit(self, donor: Trial) -> dict | None:
        """The donor's checkpoint to copy: a fresh save of a class trainable,
        else its newest reported checkpoint."""
        if self.is_class and donor in self.workers:
            worker = self.workers[donor]
            saved = flowcore.get(worker.handle.save.remote(), timeout=300)
            if saved:
                self._register_checkpoint(donor, saved, donor.last_result)
        return donor.checkpoint_manager.latest

    def exploit(self, trial: Trial, donor: Trial, new_config: dict, entry: dict) -> None:
        self.pending_exploits[trial] = (new_config, entry)

    def _apply_exploit(self, trial: Trial) -> None:
        new_config, entry = self.pending_exploits.pop(trial)
        trial.config = new_config
        trial.resume_entry = entry
        self.journal.append("config", trial_id=trial.trial_id, config=encode_obj(new_config),
                            checkpoint=entry)
        worker = self.workers.get(trial)
        if worker is None:
            return
        trial.results = [r for r in trial.results
                         if r.get("training_iteration", 0) <= entry["iteration"]]
        self._call(trial, worker.handle.start.remote(self._spec(trial, entry)))

    # -- the loop -----------------------------------------------------------
    def _handle(self, trial: Trial, ref: Any, fut: Any) -> None:
        if self.calls.get(trial) is not ref:
            return  # a stale answer (the trial was stopped or restarted)
        worker = self.workers.get(trial)
        if worker is not None:
            worker.started = True
        try:
            ev = fut.result()
        except (ActorError, WorkerCrashedError) as e:
            self._on_error(trial, e, dead=True)
            return
        except BaseException as e:  # the trial raised
            self._on_error(trial, e, dead=False)
            return
        if "batch" in ev:
            self._handle_batch(trial, ev)
            return
        if ev.get("checkpoint"):
            self._register_checkpoint(trial, ev["checkpoint"], ev.get("result"))
        if ev.get("result") is None:  # the function returned
            self._complete(trial, stopped=False)
            return
        decision = self._on_result(trial, ev["result"])
        if trial in self.pending_exploits:
            self._apply_exploit(trial)
            return
        if ev["done"] or ev["result"].get("done"):
            self._complete(trial, stopped=False)
        elif decision == TrialScheduler.STOP or self.stopping_all:
            self._complete(trial, stopped=True)
        elif decision == TrialScheduler.PAUSE:
            self._pause(trial)
        else:
            self._call(trial, worker.handle.next.remote())  # type: ignore[union-attr]

    def _handle_batch(self, trial: Trial, ev: dict) -> None:
        """Results of a free-running trial (FIFO: every decision is CONTINUE)."""
        for item in ev["batch"]:
            if item.get("checkpoint"):
                self._register_checkpoint(trial, item["checkpoint"], item["result"])
            decision = self._on_result(trial, item["result"])
            if item["result"].get("done") or decision == TrialScheduler.STOP:
                self._complete(trial, stopped=not item["result"].get("done"))
                return
        if ev["done"]:
            self._complete(trial, stopped=False)
        elif self.stopping_all:
            self._complete(trial, stopped=True)
        else:
            self._call(trial, self.workers[trial].handle.next.remote())

    def _hook(self, name: str, trial: Trial, **kw: Any) -> None:
        for cb in self.callbacks:
            hook = getattr(cb, name, None)
            if hook is not None:
                hook(iteration=self._iteration, trials=self.trials, trial=trial, **kw)

    def _time_up(self) -> bool:
        budget = self.tune_config.time_budget_s
        if budget is not None and time.monotonic() - self.start_time >= budget:
            return True
        return bool(self.stopper is not None and self.stopper.stop_all())

    def run(self, check: Any = None) -> list[Trial]:
        """Run the experiment (``check``: a resource request that must fit
        somewhere, checked first)."""
        self._fail_fast_error = None
        self._write_error = None
        try:
            if check is not None:
                self.check_resources(check)
            self._loop()
        finally:
            self._shutdown()
        if self._write_error is not None:
            raise OSError(f"writing experiment files under {self.experiment_path} failed: "
                          f"{self._write_error}") from self._write_error
        if self._fail_fast_error is not None:
            raise TuneError(f"a trial failed and FailureConfig(fail_fast='raise') is set: "
                            f"{self._fail_fast_error}") from self._fail_fast_error
        return self.trials

    def _loop(self) -> None:
        while True:
            if not self.stopping_all and self._time_up():
                self.stopping_all = True
                self.search_finished = True
            if not self.stopping_all:
                self._add_trials()
                self._start_trials()
            if not self.calls:
                startable = any(t.status in (Trial.PENDING, Trial.PAUSED) for t in self.trials)
                if self.stopping_all or (self.search_finished and not startable):
                    return
                pending = any(t.status == Trial.PENDING for t in self.trials)
                if self.search_finished and not pending:
                    # only PAUSED trials are left and the scheduler resumes none
                    logger.warning("tune: %s chose none of the paused trials to resume; "
                                   "ending the experiment with them PAUSED",
                                   type(self.scheduler).__name__)
                    return
                if not startable and not self.search_finished:
                    # the searcher waits for results that cannot come
                    raise TuneError("the search algorithm gives no new config while no trial "
                                    "runs (a ConcurrencyLimiter or searcher that never "
                                    "finishes?)")
            if time.monotonic() >= self._next_explain:
                self._next_explain = time.monotonic() + 1.0
                self._explain_waits()
            self.progress.maybe_print()
            self.feed.tick()
            try:
                item = self.events.get(timeout=self.progress.seconds_to_next())
            except queue.Empty:
                continue
            self._iteration += 1
            self._handle(*item)
            while True:  # everything else that is ready
                try:
                    item = self.events.get_nowait()
                except queue.Empty:
                    break
                self._handle(*item)

    def _explain_waits(self) -> None:
        """Say why started trials have not answered yet (their worker may
        wait for resources held by something else)."""
        now = time.monotonic()
        for trial, ref in self.calls.items():
            worker = self.workers.get(trial)
            if worker is None or worker.started:
                continue
            if now - getattr(trial, "_start_time", now) < 0.5:
                continue
            try:
                text = flowcore.explain(ref).get("text")
            except Exception:  # noqa: BLE001 - best effort
                continue
            if isinstance(text, list):
                text = " ".join(text)
            need = res_mod.total(trial.placement_group_factory)
            try:
                free = flowcore.available_resources()
            except Exception:  # noqa: BLE001
                free = {}
            trial.pending_reason = (f"worker not started yet: it needs {need}, the cluster has "
                                    f"{ {k: free.get(k, 0.0) for k in need} } free; {text}")

    def _shutdown(self) -> None:
        self.progress.final()
        for cb in self.callbacks:
            end = getattr(cb, "on_experiment_end", None)
            if end is not None:
                try:
                    end(trials=self.trials)
                except Exception:  # noqa: BLE001 - cleanup goes on
                    logger.exception("callback %r failed in on_experiment_end", cb)
        for w in list(self.all_workers):
            self._end_worker(w)
        self.idle.clear()
        self.workers.clear()
        self.calls.clear()
        self._write_error = self.writer.close(raise_error=False)
        self.journal.append("end", time=time.time())
        self.journal.close()
        self._save_search_state()
        self.feed.finish(failed=self._fail_fast_error is not None)


def _write_trial_files(fs: Any, path: str, config: dict) -> None:
    storage.makedirs(fs, path)
    storage.write_new(fs, storage.join(path, "params.json"), to_json(config).encode())
    try:
        blob = cloudpickle.dumps(config)
    except Exception:  # noqa: BLE001 - an unpicklable value: params.json has its repr
        return
    storage.write_new(fs, storage.join(path, "params.pkl"), blob)


def _append_line(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


_AUTO_KEYS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "date",
              "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip",
              "time_since_restore", "iterations_since_restore", "trial_id", "config"}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-=.," else "_" for c in name)

