"""``Tuner``: set up an experiment, run it (``fit``), restore it after a crash.

Experiment files under ``storage_path/name/``: ``tuner.pkl`` (the settings,
written before the first trial), ``experiment_journal.jsonl`` (every state
change, appended as it happens), ``search_state.pkl`` (the search
algorithm's state) and one directory per trial with ``params.json``,
``result.json``, ``checkpoint_NNNNNN/`` and, for a failed trial,
``error.txt``.
"""
from __future__ import annotations

import copy
import datetime
import logging
import os
import uuid
from typing import Any

import cloudpickle

import flowcore

from . import storage
from .checkpoint_manager import CheckpointManager
from .config import CheckpointConfig, RunConfig, TuneConfig
from .error import TuneError
from .experiment_journal import ExperimentJournal, decode_obj, encode_obj, read_journal
from .result_grid import ResultGrid
from .schedulers.trial_scheduler import FIFOScheduler, TrialScheduler
from .search.basic_variant import BasicVariantGenerator
from .search.searcher import SearchAlgorithm, Searcher, SearchGenerator
from .search.variant_generator import check_space
from .stopper import make_stopper
from .trainable import check_trainable, resource_request, trainable_name
from .trial import Trial
from .tune_controller import SEARCH_STATE_FILE, TuneController

__all__ = ["Tuner"]

logger = logging.getLogger(__name__)

TUNER_FILE = "tuner.pkl"


class Tuner:
    """Tune ``trainable`` over ``param_space``.

    ``trainable`` is a function ``f(config)`` that calls ``tune.report``,
    or a ``tune.Trainable`` subclass.  ``fit()`` runs the experiment and
    returns a :class:`ResultGrid`.
    """

    def __init__(self, trainable: Any = None, *, param_space: dict | None = None,
                 tune_config: TuneConfig | None = None, run_config: RunConfig | None = None,
                 _restore: dict | None = None):
        check_trainable(trainable)
        if param_space is None:
            param_space = {}
        check_space(param_space)
        if tune_config is None:
            tune_config = TuneConfig()
        if not isinstance(tune_config, TuneConfig):
            raise TypeError(f"Tuner(tune_config=...) must be a tune.TuneConfig, got "
                            f"{type(tune_config).__name__}")
        if run_config is None:
            run_config = RunConfig()
        if not isinstance(run_config, RunConfig):
            raise TypeError(f"Tuner(run_config=...) must be a tune.RunConfig, got "
                            f"{type(run_config).__name__}")
        self._trainable = trainable
        self._param_space = param_space
        self._tune_config = tune_config
        self._run_config = run_config
        self._restore = _restore
        self._result_grid: ResultGrid | None = None
        self._fs, base = storage.resolve(run_config.storage_path, run_config.storage_filesystem)
        if _restore is not None:
            self._experiment_path = _restore["path"]
            self._name = os.path.basename(self._experiment_path.rstrip("/"))
        else:
            stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
            self._name = run_config.name or f"{trainable_name(trainable)}_{stamp}"
            self._experiment_path = storage.join(base, self._name)
        self._search_alg, self._scheduler, self._metric, self._mode = self._setup_search()
        # resources are checked against the cluster when fit() starts
        resource_request(trainable, {})

    # -- setup ----------------------------------------------------------------
    def _setup_search(self) -> tuple[SearchAlgorithm, TrialScheduler, str | None, str | None]:
        tc = self._tune_config
        search_alg = tc.search_alg if tc.search_alg is not None else BasicVariantGenerator()
        if isinstance(search_alg, Searcher):
            search_alg = SearchGenerator(search_alg)
        elif not isinstance(search_alg, SearchAlgorithm):
            raise TypeError(f"TuneConfig(search_alg=...) must be a tune Searcher (e.g. "
                            f"OptunaSearch()) or BasicVariantGenerator, got "
                            f"{type(search_alg).__name__}")
        scheduler = tc.scheduler if tc.scheduler is not None else FIFOScheduler()
        if not isinstance(scheduler, TrialScheduler):
            raise TypeError(f"TuneConfig(scheduler=...) must be a tune scheduler (e.g. "
                            f"ASHAScheduler()), got {type(scheduler).__name__}")
        metric, mode = tc.metric, tc.mode
        scheduler.set_search_properties(metric, mode)
        metric = metric or scheduler.metric
        mode = mode or scheduler.mode
        searcher = getattr(search_alg, "searcher", None)
        if searcher is not None:
            searcher.set_search_properties(metric, mode, self._param_space,
                                           num_samples=tc.num_samples)
            metric = metric or searcher.metric
            mode = mode or searcher.mode
            if searcher.metric is None or searcher.mode is None:
                raise ValueError(f"{type(searcher).__name__} needs a metric and a mode: pass "
                                 f"TuneConfig(metric='loss', mode='min') or give them to the "
                                 f"searcher")
        search_alg.set_search_properties(metric, mode, self._param_space,
                                         num_samples=tc.num_samples)
        return search_alg, scheduler, metric, mode

    # -- restore --------------------------------------------------------------
    @classmethod
    def can_restore(cls, path: str | os.PathLike, storage_filesystem: Any = None) -> bool:
        """Whether ``path`` holds an experiment that ``Tuner.restore`` can continue."""
        fs, p = storage.resolve(path, storage_filesystem)
        return storage.exists(fs, storage.join(p, TUNER_FILE))

    @classmethod
    def restore(cls, path: str | os.PathLike, trainable: Any, resume_unfinished: bool = True,
                resume_errored: bool = False, restart_errored: bool = False,
                param_space: dict | None = None, storage_filesystem: Any = None) -> "Tuner":
        """Continue the experiment at ``path``: finished trials keep their
        results, unfinished ones resume from their last checkpoint;
        ``resume_errored`` resumes failed trials too, ``restart_errored``
        starts them over."""
        fs, p = storage.resolve(path, storage_filesystem)
        if not storage.exists(fs, storage.join(p, TUNER_FILE)):
            raise ValueError(f"Tuner.restore({os.fspath(path)!r}): no experiment there (no "
                             f"{TUNER_FILE}); pass the experiment directory, "
                             f"storage_path/name (Tuner.can_restore(path) checks it)")
        saved = cloudpickle.loads(storage.read_bytes(fs, storage.join(p, TUNER_FILE)))
        run_config: RunConfig = saved["run_config"]
        run_config.storage_path = os.path.dirname(p.rstrip("/")) or "/"
        run_config.storage_filesystem = storage_filesystem
        run_config.name = os.path.basename(p.rstrip("/"))
        space = param_space if param_space is not None else saved["param_space"]
        return cls(trainable, param_space=space, tune_config=saved["tune_config"],
                   run_config=run_config,
                   _restore={"path": p, "uid": saved["uid"],
                             "resume_unfinished": resume_unfinished,
                             "resume_errored": resume_errored,
                             "restart_errored": restart_errored})

    def _replay(self, records: list[dict]) -> list[Trial]:
        """Rebuild the trials from the journal (the part after its last 'begin')."""
        begins = [i for i, r in enumerate(records) if r.get("t") == "begin"]
        if begins:
            records = records[begins[-1] + 1:]
        trials: dict[str, Trial] = {}
        name = trainable_name(self._trainable)
        ckpt_config = self._run_config.checkpoint_config or CheckpointConfig()
        for rec in records:
            kind = rec.get("t")
            trial = trials.get(rec.get("trial_id", ""))
            if kind == "trial":
                config = decode_obj(rec["config"])
                t = Trial(rec["trial_id"], config, trainable_name=name,
                          experiment_tag=rec["tag"],
                          path=storage.join(self._experiment_path, rec["dirname"]),
                          filesystem=self._fs,
                          resources=resource_request(self._trainable, config),
                          index=rec["index"], dirname=rec["dirname"], name=rec.get("name"))
                t.checkpoint_manager = CheckpointManager(ckpt_config, self._fs)
                trials[t.trial_id] = t
            elif trial is None:
                continue
            elif kind == "result":
                result = dict(rec["result"], config=trial.config)
                trial.results.append(result)
                trial.last_result = result
            elif kind == "checkpoint":
                trial.checkpoint_manager.entries.append(rec["entry"])
                trial.checkpoint_manager.forget(set(rec.get("dropped") or []))
                trial.resume_entry = rec["entry"]
            elif kind == "status":
                trial.status = rec["status"]
                if rec["status"] == Trial.ERROR:
                    trial.error = TuneError(rec.get("error") or "the trial failed")
                    trial.error_msg = rec.get("error")
                    trial.error_file = storage.join(trial.path, "error.txt")
                    trial.num_failures = rec.get("num_failures", trial.num_failures)
            elif kind == "retry":
                trial.num_failures = rec["num_failures"]
            elif kind == "config":
                trial.config = decode_obj(rec["config"])
                if rec.get("checkpoint"):
                    trial.resume_entry = rec["checkpoint"]
        out = sorted(trials.values(), key=lambda t: t.index)
        r = self._restore or {}
        for t in out:
            if t.status == Trial.TERMINATED:
                continue
            if t.status == Trial.ERROR:
                if r.get("restart_errored"):
                    t.status, t.error, t.num_failures = Trial.PENDING, None, 0
                    t.results, t.last_result, t.restore_from = [], {}, None
                    t.checkpoint_manager.entries, t.resume_entry = [], None
                elif r.get("resume_errored"):
                    t.status, t.error, t.num_failures = Trial.PENDING, None, 0
                    t.restore_from = t.resume_entry
                continue
            if r.get("resume_unfinished", True):
                t.status = Trial.PENDING
                t.restore_from = t.resume_entry
                if t.restore_from is None:
                    t.results, t.last_result = [], {}
            else:
                t.status = Trial.TERMINATED
        return out

    def _restore_search_state(self, trials: list[Trial]) -> None:
        path = storage.join(self._experiment_path, SEARCH_STATE_FILE)
        if not storage.exists(self._fs, path):
            lag = len(trials)
        else:
            saved = cloudpickle.loads(storage.read_bytes(self._fs, path))
            self._search_alg.set_state(saved["state"])
            lag = len(trials) - saved["num_trials"]
        if isinstance(self._search_alg, BasicVariantGenerator):
            for t in trials[len(trials) - lag:] if lag > 0 else []:
                self._search_alg.next_config(t.trial_id)  # the journal has these already
        finished_ids = {t.trial_id for t in trials if t.is_finished()}
        if isinstance(self._search_alg, BasicVariantGenerator):
            self._search_alg.live -= finished_ids

    # -- fit -----------------------------------------------------------------
    def fit(self) -> ResultGrid:
        """Run the experiment; returns its results (errors of single trials
        are in the ResultGrid, not raised)."""
        if not flowcore.is_initialized():
            flowcore.init()
        fs, path = self._fs, self._experiment_path
        storage.makedirs(fs, path)
        trials: list[Trial] = []
        if self._restore is not None:
            uid = self._restore["uid"]
            trials = self._replay(read_journal(fs, path))
            self._restore_search_state(trials)
        else:
            uid = uuid.uuid4().hex[:5]
            self._write_tuner_file(uid)
        journal = ExperimentJournal(fs, path)
        journal.append("begin", uid=uid, name=self._name, restored=self._restore is not None)
        if self._restore is not None:
            self._rejournal(journal, trials)
        controller = TuneController(
            trainable=self._trainable, search_alg=self._search_alg, scheduler=self._scheduler,
            stopper=make_stopper(self._run_config.stop), tune_config=self._tune_config,
            run_config=self._run_config, fs=fs, experiment_path=path, experiment_name=self._name,
            journal=journal, trials=trials, experiment_uid=uid, metric=self._metric,
            trainable_name=trainable_name(self._trainable), searched_space=self._param_space,
            mode=self._mode)
        for t in trials:
            self._scheduler.on_trial_add(controller, t)
            if getattr(self._scheduler, "_replay_on_restore", False):
                for r in t.results:
                    try:
                        self._scheduler.on_trial_result(controller, t, r)
                    except (ValueError, KeyError):
                        break
                if t.is_finished():
                    self._scheduler.on_trial_complete(controller, t, t.last_result)
        controller.run(check=resource_request(self._trainable, {}))
        self._result_grid = ResultGrid(controller.trials, metric=self._metric, mode=self._mode,
                                       experiment_path=path, filesystem=fs)
        return self._result_grid

    def _rejournal(self, journal: ExperimentJournal, trials: list[Trial]) -> None:
        """Start the new journal section with the restored state, so the
        next restore reads one section."""
        for t in trials:
            journal.append("trial", trial_id=t.trial_id, index=t.index, tag=t.experiment_tag,
                           dirname=t.dirname, config=encode_obj(t.config),
                           name=t.custom_trial_name)
            for r in t.results:
                journal.append("result", trial_id=t.trial_id,
                               result={k: v for k, v in r.items() if k != "config"})
            for e in t.checkpoint_manager.entries:
                journal.append("checkpoint", trial_id=t.trial_id, entry=e, dropped=[])
            if t.resume_entry is not None and t.resume_entry not in t.checkpoint_manager.entries:
                journal.append("config", trial_id=t.trial_id, config=encode_obj(t.config),
                               checkpoint=t.resume_entry)
            if t.num_failures:
                journal.append("retry", trial_id=t.trial_id, num_failures=t.num_failures)
            if t.status in (Trial.TERMINATED, Trial.ERROR):
                journal.append("status", trial_id=t.trial_id, status=t.status,
                               num_failures=t.num_failures, error=t.error_msg)

    def _write_tuner_file(self, uid: str) -> None:
        state = {"uid": uid, "param_space": self._param_space,
                 "tune_config": self._tune_config, "run_config": self._run_config,
                 "trainable_name": trainable_name(self._trainable), "version": 1}
        try:
            blob = cloudpickle.dumps(copy.copy(state))
        except Exception as e:  # noqa: BLE001
            raise TuneError(f"the experiment settings cannot be saved for restore ({e}); "
                            f"make param_space, TuneConfig and RunConfig picklable") from e
        storage.write_bytes(self._fs, storage.join(self._experiment_path, TUNER_FILE), blob)

    def get_results(self) -> ResultGrid:
        """The ResultGrid of the last ``fit()``."""
        if self._result_grid is None:
            raise RuntimeError("no results yet: call Tuner.fit() first")
        return self._result_grid

