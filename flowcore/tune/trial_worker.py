"""The actor that runs trials.

One ``TrialWorker`` runs one trial at a time and is reused for the next
trial with the same resources (``TuneConfig(reuse_actors=True)``), so an
experiment pays for a process start per worker, not per trial.  The
controller steps it: ``start`` begins a trial and returns its first event,
``next`` lets it run to its next report; the trial thread waits inside
``tune.report`` in between, so schedulers decide on every result.
"""
from __future__ import annotations

import os
import pickle
import queue
import shutil
import tempfile
import threading
import time
from typing import Any

from . import session, storage
from .checkpoint import Checkpoint
from .trainable import ResultClock, Trainable, is_class_trainable

_DICT_CHECKPOINT = "_dict_checkpoint.pkl"


class _TrialStopped(BaseException):
    """Raised inside the trial thread's tune.report() to end a stopped trial."""


class _Persister:
    """Copies checkpoints into the trial's directory on storage."""

    def __init__(self, spec: dict):
        self.fs = spec["filesystem"]
        self.trial_dir = spec["trial_dir"]
        self.index = spec.get("checkpoint_index", 0)

    def persist(self, local_dir: str, iteration: int) -> dict:
        name = f"checkpoint_{self.index:06d}"
        dest = storage.join(self.trial_dir, name)
        storage.upload_dir(local_dir, self.fs, dest)
        self.index += 1
        return {"path": dest, "name": name, "index": self.index - 1, "iteration": iteration}


_BATCH_LINGER_S = 0.01  # free-running: how long a batch waits for more results
_MAX_BUFFERED = 1000     # free-running: report() blocks when this many are unread


class _FunctionRun:
    """A function trainable on its own thread, paused in each report().

    When no decision can depend on a single result (``free_run``: FIFO
    scheduling, no stopper, no time budget) report() does not pause: the
    trial runs on while its results are collected, and ``next`` returns
    them in batches."""

    def __init__(self, fn: Any, spec: dict, checkpoint: Checkpoint | None):
        self.fn = fn
        self.config = spec["config"]
        self.clock = ResultClock(spec.get("iteration", 0), spec.get("time_total", 0.0))
        self.persister = _Persister(spec)
        self.free_run = bool(spec.get("free_run"))
        self.events: queue.Queue = queue.Queue(maxsize=_MAX_BUFFERED if self.free_run else 0)
        self.pending_error: BaseException | None = None
        self.resume = threading.Event()
        self.stopping = False
        self.session = session._TrialSession(spec["info"], checkpoint, self.report)
        self.thread = threading.Thread(target=self._main, daemon=True,
                                       name=f"trial-{spec['info']['trial_id']}")

    def _main(self) -> None:
        session._set(self.session)
        try:
            out = self.fn(self.config)
            if isinstance(out, dict) and not self.stopping:
                self.report(out, None)
            self._put(("done", None))
        except _TrialStopped:
            if not self.free_run:  # (a free-running stop is not waited for)
                self.events.put(("stopped", None))
        except BaseException as e:  # the trial's error, with its traceback
            try:
                self._put(("error", e))
            except _TrialStopped:
                pass

    def _put(self, item: tuple) -> None:
        while True:
            try:
                self.events.put(item, timeout=0.1)
                return
            except queue.Full:
                if self.stopping:
                    raise _TrialStopped() from None

    def report(self, metrics: dict, checkpoint: Checkpoint | None) -> None:
        if self.stopping:
            raise _TrialStopped()
        saved = None
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                saved = self.persister.persist(d, self.clock.iteration + 1)
        result = self.clock.stamp(metrics, saved["name"] if saved else None)
        taken = threading.Event() if (self.free_run and saved) else None
        self._put(("result", (result, saved, taken)))
        if self.free_run:
            # a checkpoint is handed to the controller before the trial goes on,
            # so a crash right after cannot lose its registration
            while taken is not None and not taken.wait(0.1):
                if self.stopping:
                    raise _TrialStopped()
            return
        self.resume.wait()
        self.resume.clear()
        if self.stopping:
            raise _TrialStopped()

    def start(self) -> dict:
        self.thread.start()
        return self._batch() if self.free_run else self._event()

    def next(self) -> dict:
        if self.free_run:
            return self._batch()
        self.resume.set()
        return self._event()

    def _batch(self) -> dict:
        """The results reported since the last call (at least one event)."""
        if self.pending_error is not None:
            err, self.pending_error = self.pending_error, None
            raise err
        items = [self.events.get()]
        deadline = time.monotonic() + _BATCH_LINGER_S
        while items[-1][0] == "result" and items[-1][1][2] is None:
            left = deadline - time.monotonic()
            try:
                items.append(self.events.get(timeout=left) if left > 0
                             else self.events.get_nowait())
            except queue.Empty:
                break
        batch = [{"result": p[0], "checkpoint": p[1]} for k, p in items if k == "result"]
        for k, p in items:
            if k == "result" and p[2] is not None:
                p[2].set()
        last_kind, last = items[-1]
        if last_kind == "error":
            if not batch:
                raise last
            self.pending_error = last  # raised by the next call, after these results
        return {"batch": batch, "done": last_kind in ("done", "stopped")}

    def _event(self) -> dict:
        kind, payload = self.events.get()
        if kind == "result":
            result, saved, _ = payload
            return {"result": result, "checkpoint": saved, "done": False}
        if kind == "error":
            raise payload
        return {"result": None, "checkpoint": None, "done": True}

    def stop(self, save: bool, timeout: float = 10.0) -> dict:
        self.stopping = True
        self.resume.set()
        self.thread.join(timeout)
        return {"checkpoint": None, "stuck": self.thread.is_alive()}


class _ClassRun:
    """A ``tune.Trainable`` subclass instance stepped with ``train()``."""

    def __init__(self, cls: type, spec: dict, checkpoint: Checkpoint | None,
                 reuse: Trainable | None):
        self.persister = _Persister(spec)
        self.freq = spec.get("checkpoint_frequency") or 0
        info = dict(spec["info"], iteration=spec.get("iteration", 0),
                    time_total=spec.get("time_total", 0.0))
        self.obj: Trainable | None = None
        if reuse is not None and type(reuse) is cls and reuse.reset_config(spec["config"]):
            reuse.config = spec["config"]
            reuse._trial_info = info
            reuse._clock = ResultClock(info["iteration"], info["time_total"])
            self.obj = reuse
        else:
            if reuse is not None:
                reuse.stop()
            self.obj = cls(spec["config"], trial_info=info)
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                p = os.path.join(d, _DICT_CHECKPOINT)
                if os.path.exists(p):
                    with open(p, "rb") as f:
                        self.obj.load_checkpoint(pickle.load(f))
                else:
                    self.obj.load_checkpoint(d)

    def start(self) -> dict:
        return self.next()

    def next(self) -> dict:
        assert self.obj is not None
        result = self.obj.train()
        saved = None
        if self.freq and result["training_iteration"] % self.freq == 0:
            saved = self.save()
            result["checkpoint_dir_name"] = saved["name"]
        return {"result": result, "checkpoint": saved, "done": bool(result.get("done"))}

    def save(self) -> dict:
        assert self.obj is not None
        tmp = tempfile.mkdtemp(prefix="tune-ckpt-")
        try:
            out = self.obj.save_checkpoint(tmp)
            if isinstance(out, dict):
                with open(os.path.join(tmp, _DICT_CHECKPOINT), "wb") as f:
                    pickle.dump(out, f)
            elif out is not None and os.path.abspath(out) != os.path.abspath(tmp):
                if not os.path.isdir(out):
                    raise TypeError(f"{type(self.obj).__name__}.save_checkpoint() must return "
                                    f"None, a dict or the checkpoint directory, got {out!r}")
                shutil.copytree(out, tmp, dirs_exist_ok=True)
            return self.persister.persist(tmp, self.obj.iteration)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def stop(self, save: bool, timeout: float = 10.0) -> dict:
        saved = self.save() if save else None
        return {"checkpoint": saved, "stuck": False}


class TrialWorker:
    """Runs the trials of one experiment, one at a time."""

    def __init__(self, trainable: Any):
        self.trainable = trainable
        self.run: _FunctionRun | _ClassRun | None = None
        self.idle: Trainable | None = None  # a stopped class trainable kept for reuse
        self.trials = 0

    def ping(self) -> int:
        return os.getpid()

    def start(self, spec: dict) -> dict:
        """Begin the trial described by ``spec`` and return its first event."""
        if self.run is not None:
            self.stop()
        reuse, self.idle = self.idle, None
        ckpt = spec.get("checkpoint")
        checkpoint = Checkpoint(ckpt["path"], spec["filesystem"]) if ckpt else None
        self.trials += 1
        if is_class_trainable(self.trainable):
            self.run = _ClassRun(self.trainable, spec, checkpoint, reuse)
        else:
            self.run = _FunctionRun(self.trainable, spec, checkpoint)
        return self.run.start()

    def next(self) -> dict:
        if self.run is None:
            raise RuntimeError("no trial is running on this worker")
        return self.run.next()

    def save(self) -> dict | None:
        """A checkpoint of the running class trainable now."""
        if isinstance(self.run, _ClassRun):
            return self.run.save()
        return None

    def stop(self, save: bool = False) -> dict:
        """End the running trial (``save``: checkpoint a class trainable first)."""
        run, self.run = self.run, None
        if run is None:
            return {"checkpoint": None, "stuck": False}
        out = run.stop(save)
        if isinstance(run, _ClassRun) and run.obj is not None:
            if type(run.obj).reset_config is not Trainable.reset_config:
                self.idle = run.obj  # reset_config() may reuse it for the next trial
            else:
                run.obj.stop()
        session._set(None)
        return out
