"""``DataParallelTrainer``: runs one training function on every worker of a
``WorkerGroup`` and turns their reports into a ``Result``.

The coordinator is the process that calls ``fit()``; it holds no CPU. It
waits on every worker's ``run`` call and long poll at once, so a worker
whose process or node dies is noticed when the cluster reports the death
(not after a collective timeout); then every worker of the group is killed
and, within ``FailureConfig.max_failures``, a new group starts from the
newest registered checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import warnings
from datetime import datetime
from typing import Any, Callable, Optional

import pyarrow.fs as pafs

import flowcore
from flowcore import tune
from flowcore.exceptions import FlowcoreError

from .checkpoint import Checkpoint, resolve_filesystem, is_local
from .config import (CheckpointConfig, FailureConfig, RunConfig, ScalingConfig,
                     _default_storage_path)
from .result import (BackendSetupError, CheckpointManager, Result, TrainingFailedError,
                     WorkerGroupError)
from .worker_group import _POLL_SECONDS, WorkerGroup

logger = logging.getLogger(__name__)
_SETUP_RETRIES = 2      # new groups after a failed process-group setup, beyond max_failures


class BackendConfig:
    """What a framework sets up in each worker around the training function
    (a process group for torch). The base sets up nothing."""

    def _on_worker_start(self, session: Any) -> None:
        pass

    def _on_worker_end(self, session: Any) -> None:
        pass

    def _worker_env(self, group: WorkerGroup, slot: Any) -> dict:
        return {}


def _check_datasets(datasets: Optional[dict]) -> dict:
    if datasets is None:
        return {}
    if not isinstance(datasets, dict):
        raise TypeError("datasets=...: expected a dict of name -> dataset, e.g. "
                        "datasets={'train': flowcore.data.from_items(rows)}")
    for name, ds in datasets.items():
        if not isinstance(name, str):
            raise TypeError(f"datasets: names must be strings, got {name!r}")
        if not callable(getattr(ds, "streaming_split", None)):
            try:
                import flowcore.data  # noqa: F401
                hint = "pass a flowcore.data Dataset (e.g. flowcore.data.from_items(rows))"
            except ImportError:
                hint = ("flowcore.data is not installed in this flowcore; pass an object with "
                        "a streaming_split(n) method, or load the data inside the training "
                        "function")
            raise TypeError(f"datasets[{name!r}] is a {type(ds).__name__}, which cannot be split "
                            f"among workers: {hint}")
    return dict(datasets)


class DataParallelTrainer:
    """Run ``train_loop_per_worker`` on ``scaling_config.num_workers``
    workers; ``fit()`` returns a ``Result``."""

    _backend_config_cls: type = BackendConfig
    # as a flowcore.tune trainable the trial itself holds nothing: the
    # trainer's own placement group reserves the workers
    _tune_resources = {"CPU": 0}

    def __init__(self, train_loop_per_worker: Callable, *,
                 train_loop_config: Optional[dict] = None,
                 backend_config: Optional[BackendConfig] = None,
                 scaling_config: Optional[ScalingConfig] = None,
                 run_config: Optional[RunConfig] = None,
                 datasets: Optional[dict] = None,
                 dataset_config: Any = None,
                 resume_from_checkpoint: Optional[Checkpoint] = None,
                 metadata: Optional[dict] = None):
        if not callable(train_loop_per_worker):
            raise TypeError("train_loop_per_worker: expected a function (taking no argument, or "
                            "the train_loop_config dict)")
        if train_loop_config is not None and not isinstance(train_loop_config, dict):
            raise TypeError("train_loop_config: expected a dict (it is passed to "
                            "train_loop_per_worker)")
        if scaling_config is None:
            scaling_config = ScalingConfig()
        if not isinstance(scaling_config, ScalingConfig):
            raise TypeError("scaling_config: expected a flowcore.train.ScalingConfig")
        if run_config is None:
            run_config = RunConfig()
        if not isinstance(run_config, RunConfig):
            raise TypeError("run_config: expected a flowcore.train.RunConfig")
        if resume_from_checkpoint is not None and not isinstance(resume_from_checkpoint,
                                                                 Checkpoint):
            raise TypeError("resume_from_checkpoint: expected a flowcore.train.Checkpoint")
        self.train_loop_per_worker = train_loop_per_worker
        self.train_loop_config = train_loop_config
        self.backend_config = backend_config or self._backend_config_cls()
        self.scaling_config = scaling_config
        self.run_config = run_config
        self.datasets = _check_datasets(datasets)
        self.resume_from_checkpoint = resume_from_checkpoint
        self.metadata = metadata
        self._on_report: Optional[Callable[[dict, Optional[Checkpoint]], None]] = None

    # -- as a Tune trainable -----------------------------------------------------
    def __call__(self, config: dict) -> None:
        """Run as a flowcore.tune function trainable:
        ``Tuner(trainer, param_space={"train_loop_config": {...}})``. The
        trial's ``train_loop_config`` (and ``scaling_config``, if given)
        override the trainer's; every report is passed on to
        ``tune.report``, and a trial restarted by Tune resumes from its
        checkpoint."""
        ctx = tune.get_context()
        trainer = copy.copy(self)
        loop_config = dict(self.train_loop_config or {})
        loop_config.update(config.get("train_loop_config") or {})
        trainer.train_loop_config = loop_config
        if isinstance(config.get("scaling_config"), ScalingConfig):
            trainer.scaling_config = config["scaling_config"]
        resumed = tune.get_checkpoint()     # the same Checkpoint class as train's
        if resumed is not None:
            trainer.resume_from_checkpoint = resumed
        trial_dir = ctx.get_trial_dir()
        trainer.run_config = dataclasses.replace(
            self.run_config, name=ctx.get_trial_name(),
            storage_path=trial_dir if os.path.isdir(trial_dir) else self.run_config.storage_path)

        def forward(metrics: dict, checkpoint: Optional[Checkpoint]) -> None:
            tune.report(metrics, checkpoint=checkpoint)

        trainer._on_report = forward
        trainer.fit()

    # -- fit -----------------------------------------------------------------
    def fit(self) -> Result:
        """Train; return the ``Result``. Raises ``TrainingFailedError``
        (with ``result.error`` as its cause) when the run fails after its
        ``max_failures`` restarts."""
        if not flowcore.is_initialized():
            flowcore.init()
        rc = self.run_config
        name = rc.name or f"{type(self).__name__}_{datetime.now():%Y-%m-%d_%H-%M-%S}"
        # RunConfig.__post_init__ fills these in; the defaults only narrow the types
        storage_path = (rc.storage_path if rc.storage_path is not None
                        else _default_storage_path())
        checkpoint_config = rc.checkpoint_config or CheckpointConfig()
        failure_config = rc.failure_config or FailureConfig()
        fs, root = resolve_filesystem(storage_path, rc.storage_filesystem)
        run_path = f"{root.rstrip('/')}/{name}"
        fs.create_dir(run_path, recursive=True)
        if is_local(fs):
            os.chmod(run_path, 0o700)
        manager = CheckpointManager(checkpoint_config, fs, run_path)
        state = _RunState(manager, self.resume_from_checkpoint, fs, run_path, self._on_report)
        if manager.load() and manager.latest is not None:
            # a run of this name stopped (or ended) before: go on from its newest checkpoint
            logger.warning("run %s: resuming from %s, the newest checkpoint an earlier fit() "
                           "of this run left", name, manager.latest.path)
            state.next_index = manager.next_index
        max_failures = failure_config.max_failures
        failures = 0
        setup_retries = 0
        error: Optional[BaseException] = None
        while True:
            try:
                self._run_attempt(name, fs, run_path, state)
                error = None
                break
            except WorkerGroupError as e:
                error = e
                if e.setup and setup_retries < _SETUP_RETRIES:
                    # not the training function's fault: start the group again
                    setup_retries += 1
                    logger.warning("%s; starting the workers again (%d of %d)", e,
                                   setup_retries, _SETUP_RETRIES)
                    continue
            except ValueError as e:
                if failures == 0:
                    raise           # bad input: the first group cannot be placed
                error = e           # the cluster shrank: a restart cannot be placed
                break
            failures += 1
            if max_failures != -1 and failures > max_failures:
                break
            logger.warning("training worker group failed (%s); restarting (failure %d of %s) "
                           "from %s", error, failures,
                           "unlimited" if max_failures == -1 else max_failures,
                           state.resume_checkpoint() or "the start")
        if state.reports == 0 and error is None:
            warnings.warn("the training function returned without calling "
                          "flowcore.train.report(); Result.metrics is empty. Call "
                          "flowcore.train.report(metrics, checkpoint=...) in the loop",
                          UserWarning, stacklevel=2)
        result = Result(metrics=state.metrics, checkpoint=manager.latest, error=error,
                        path=run_path, filesystem=fs, best_checkpoints=list(manager.kept),
                        _metrics_history=state.history)
        if error is not None:
            raise TrainingFailedError(f"training failed after {failures} failure(s) "
                                      f"(FailureConfig(max_failures={max_failures})): "
                                      f"{error}") from error
        return result

    def _split_datasets(self, n: int) -> list[dict]:
        """Each worker's shards of ``datasets``: one ``streaming_split(n,
        equal=True)`` per dataset.

        The split's coordinator holds no CPU; the tasks that read and
        transform the data ask for CPUs as flowcore.data's tasks do, unless
        the training workers (now placed) leave less than one CPU free in
        the cluster: then they ask for none (``DataContext.default_num_cpus
        = 0``) and run in the CPU time the workers spend waiting for their
        batches, so the workers never wait for reads that wait for the
        workers' CPUs.  An operator given ``num_cpus=`` explicitly keeps it."""
        shards: list[dict] = [{} for _ in range(n)]
        if not self.datasets:
            return shards
        try:
            from flowcore.data import DataContext
            cur: Any = DataContext.get_current()
        except ImportError:     # a tree without flowcore.data: duck-typed datasets only
            cur = None
        old = cur.default_num_cpus if cur is not None else None
        if cur is not None and flowcore.available_resources().get("CPU", 0.0) < 1.0:
            logger.info("the training workers leave no CPU free: datasets=%s are read by "
                        "tasks that hold no CPU", sorted(self.datasets))
            cur.default_num_cpus = 0.0
        try:
            for ds_name, ds in self.datasets.items():
                # streaming_split takes the DataContext as it is now: its
                # coordinator runs the split's tasks with these settings
                parts = ds.streaming_split(n, equal=True)
                for i, shard in enumerate(parts):
                    shards[i][ds_name] = shard
        finally:
            if cur is not None:
                cur.default_num_cpus = old
        return shards

    def _run_attempt(self, name: str, fs: Any, run_path: str, state: "_RunState") -> None:
        group = WorkerGroup(self.scaling_config, self.run_config.worker_runtime_env)
        try:
            try:
                group.start()
            except FlowcoreError as e:
                raise WorkerGroupError(f"the training workers could not start: {e}") from e
            n = len(group.workers)
            shards = self._split_datasets(n)
            checkpoint = state.resume_checkpoint()
            run_refs = {}
            for slot in group.workers:
                kwargs = dict(world_rank=slot.world_rank, world_size=n,
                              local_rank=slot.local_rank,
                              local_world_size=slot.local_world_size,
                              node_rank=slot.node_rank, experiment_name=name,
                              storage_path=run_path, storage_filesystem=fs,
                              checkpoint=checkpoint, dataset_shards=shards[slot.world_rank],
                              next_index=state.next_index)
                env = self.backend_config._worker_env(group, slot)
                run_refs[slot.world_rank] = slot.actor.run.remote(
                    self.train_loop_per_worker, self.train_loop_config, kwargs, env,
                    self.backend_config)
            self._watch(group, run_refs, state)
        except WorkerGroupError:
            state.drop_incomplete()
            raise
        finally:
            group.shutdown()

    def _watch(self, group: WorkerGroup, run_refs: dict, state: "_RunState") -> None:
        """Collect reports until every worker returned; raise
        WorkerGroupError as soon as one fails or dies. Each poll confirms
        (``acked``) the reports the previous one brought."""
        actors = {slot.world_rank: slot.actor for slot in group.workers}
        received = {rank: 0 for rank in actors}
        running = dict(run_refs)
        polling = {rank: a.poll.remote(_POLL_SECONDS, 0) for rank, a in actors.items()}
        while running or polling:
            waiting = list(running.values()) + list(polling.values())
            flowcore.wait(waiting, num_returns=1, timeout=None)
            ready, _ = flowcore.wait(waiting, num_returns=len(waiting), timeout=0)
            failure: Optional[WorkerGroupError] = None
            # reports first: a poll that arrived with a failure still counts
            for rank, ref in [(r, x) for r, x in polling.items() if x in ready]:
                try:
                    items, done = flowcore.get(ref)
                except FlowcoreError as e:
                    failure = failure or WorkerGroupError(f"training worker rank {rank} died: {e}")
                    failure.__cause__ = failure.__cause__ or e
                    del polling[rank]
                    continue
                for item in items:
                    state.add_report(item, len(actors))
                received[rank] += len(items)
                if done:
                    del polling[rank]
                else:
                    polling[rank] = actors[rank].poll.remote(_POLL_SECONDS, received[rank])
            for rank, ref in [(r, x) for r, x in running.items() if x in ready]:
                del running[rank]
                try:
                    flowcore.get(ref)
                except FlowcoreError as e:
                    failure = failure or WorkerGroupError(
                        f"training worker rank {rank} failed: {e}")
                    failure.__cause__ = failure.__cause__ or e
                    failure.setup = isinstance(e, BackendSetupError)
            if failure is not None:
                raise failure
        state.finish_attempt(len(actors))


class _RunState:
    """Reports across attempts: which indexes every rank has made, rank 0's
    metrics history and the next report index."""

    def __init__(self, manager: CheckpointManager, resume: Optional[Checkpoint], fs: Any,
                 run_path: str, on_report: Optional[Callable] = None):
        self.manager = manager
        self.on_report = on_report
        self.fs = fs
        self.results_file = f"{run_path}/result.json"
        self.initial = resume
        self.pending: dict[int, dict[int, dict]] = {}
        self.next_index = 0
        self.reports = 0
        self.metrics: Optional[dict] = None
        self.history: list[dict] = []
        self.counts_differ = False

    def resume_checkpoint(self) -> Optional[Checkpoint]:
        return self.manager.latest or self.initial

    def add_report(self, item: dict, world_size: int) -> None:
        index = item["index"]
        self.next_index = max(self.next_index, index + 1)
        got = self.pending.setdefault(index, {})
        got[item["rank"]] = item
        if len(got) < world_size:
            return
        del self.pending[index]
        rank0 = got.get(0) or next(iter(got.values()))
        metrics = rank0["metrics"]
        self.reports += 1
        self.metrics = metrics
        self.history.append(dict(metrics))
        ckpt_dir = rank0["checkpoint_dir"] or next(
            (it["checkpoint_dir"] for it in got.values() if it["checkpoint_dir"]), None)
        registered = self.manager.register(ckpt_dir, metrics) if ckpt_dir else None
        if registered is not None:
            self.manager.save(self.next_index)
        self._append_result(metrics)
        if self.on_report is not None:
            self.on_report(metrics, registered)

    def _append_result(self, metrics: dict) -> None:
        """One JSON line per registered report in ``result.json`` of the run
        directory (values JSON cannot hold are written as strings)."""
        line = (json.dumps(metrics, default=str) + "\n").encode()
        if is_local(self.fs):
            fd = os.open(self.results_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
            return
        try:
            with self.fs.open_append_stream(self.results_file) as f:
                f.write(line)
        except (NotImplementedError, OSError):
            old = b""
            if self.fs.get_file_info(self.results_file).type != pafs.FileType.NotFound:
                with self.fs.open_input_stream(self.results_file) as f:
                    old = f.read()
            with self.fs.open_output_stream(self.results_file) as f:
                f.write(old + line)

    def finish_attempt(self, world_size: int) -> None:
        if self.pending:
            warnings.warn(f"training workers made different numbers of reports "
                          f"({len(self.pending)} report(s) not made by every rank were "
                          f"dropped); call flowcore.train.report() the same number of times on "
                          f"every worker", UserWarning, stacklevel=4)
            self.drop_incomplete()

    def drop_incomplete(self) -> None:
        for got in self.pending.values():
            for it in got.values():
                path = it.get("checkpoint_dir")
                if path and (self.manager.latest is None or self.manager.latest.path != path):
                    self.manager.delete(path)
        self.pending.clear()

