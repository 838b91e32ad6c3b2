"""An experiment's view for the dashboard's Tune tab: name, path,
metric/mode and its trials (state, iteration, last metric, config),
published through ``internal_kv`` at most once a second while it runs and
once more when it ends (``flowcore.experimental.dashboard_feed``)."""
from __future__ import annotations

import json
import time
from typing import Any

from ..experimental.dashboard_feed import TUNE_PREFIX, Feed, retire

#: trials listed in one view (the newest); the counts cover all of them
MAX_TRIALS = 500
#: characters of a trial's config shown
CONFIG_CHARS = 300


def _config_text(config: dict) -> str:
    try:
        text = json.dumps(config, default=repr, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(config)
    return text if len(text) <= CONFIG_CHARS else text[:CONFIG_CHARS - 1] + "…"


def _number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None if value is None else str(value)[:60]
    return value if value == value and abs(value) != float("inf") else str(value)


class TuneFeed:
    def __init__(self, ctl: Any) -> None:
        self.ctl = ctl
        self.feed = Feed(TUNE_PREFIX + f"{ctl.experiment_name}-{ctl.uid}-{ctl._run_tag}")
        self.start_time = time.time()

    def tick(self) -> None:
        self.feed.publish(lambda: self.view("RUNNING"))

    def finish(self, failed: bool = False) -> None:
        self.feed.publish(self.view("FAILED" if failed else "FINISHED"), force=True)
        retire(self.feed.key, TUNE_PREFIX)

    def view(self, state: str) -> dict:
        ctl = self.ctl
        metric = ctl.metric
        trials = ctl.trials
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        rows = []
        for t in trials[-MAX_TRIALS:]:
            last = t.last_result or {}
            rows.append({"trial_id": t.trial_id, "name": str(t), "status": t.status,
                         "iteration": last.get("training_iteration", 0),
                         "metric": _number(last.get(metric)) if metric else None,
                         "config": _config_text(t.config),
                         "error": t.error_msg.splitlines()[-1][:300]
                         if t.error_msg else None,
                         "explain": t.pending_reason[:300] if t.pending_reason else None})
        best = None
        if metric and ctl.mode in ("min", "max"):
            scored = [r for r in rows if isinstance(r["metric"], (int, float))]
            if scored:
                pick = min if ctl.mode == "min" else max
                best = pick(scored, key=lambda r: r["metric"])["trial_id"]
        return {"name": ctl.experiment_name, "path": ctl.experiment_path,
                "trainable": ctl.trainable_name, "metric": metric, "mode": ctl.mode,
                "state": state, "start_time": self.start_time,
                "end_time": time.time() if state != "RUNNING" else None,
                "time": time.time(), "num_trials": len(trials), "trial_counts": counts,
                "best_trial_id": best, "trials": rows}
