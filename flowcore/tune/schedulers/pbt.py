"""Population Based Training (``PopulationBasedTraining``).

Every ``perturbation_interval`` (in ``time_attr`` units) a trial in the
bottom ``quantile_fraction`` of the population is restarted from the
checkpoint of a trial in the top quantile (exploit) with that trial's
config perturbed (explore): each key of ``hyperparam_mutations`` is, with
probability ``resample_probability``, drawn anew, else multiplied by one of
``perturbation_factors`` (numbers) or moved to a neighbouring value (lists).
"""
from __future__ import annotations

import copy
import logging
import math
import random
from typing import Any, Callable

from ..search.sample import Categorical, Domain, Float, Integer
from .trial_scheduler import TrialScheduler

__all__ = ["PopulationBasedTraining"]

logger = logging.getLogger(__name__)


def _explore(config: dict, mutations: dict, resample_probability: float,
             factors: tuple[float, float], rng: random.Random,
             custom_explore_fn: Callable[[dict], dict] | None) -> dict:
    new = copy.deepcopy(config)
    for key, spec in mutations.items():
        if isinstance(spec, dict):
            new[key] = _explore(config.get(key, {}), spec, resample_probability, factors, rng,
                                None)
            continue
        cur = config.get(key)
        if isinstance(spec, (list, tuple)) or isinstance(spec, Categorical):
            values = list(spec.categories if isinstance(spec, Categorical) else spec)
            if rng.random() < resample_probability or cur not in values:
                new[key] = rng.choice(values)
            else:
                i = values.index(cur) + rng.choice([-1, 1])
                new[key] = values[min(max(i, 0), len(values) - 1)]
        elif isinstance(spec, Domain) or callable(spec):
            draw = (lambda: spec.sample(random_state=None)) if isinstance(spec, Domain) \
                else spec
            if rng.random() < resample_probability or cur is None:
                new[key] = draw()
            else:
                v = cur * rng.choice(list(factors))
                if isinstance(spec, Integer) or isinstance(cur, int):
                    v = int(round(v))
                if isinstance(spec, (Float, Integer)) and spec.lower is not None:
                    v = min(max(v, spec.lower), spec.upper)
                new[key] = v
        else:
            raise TypeError(f"PopulationBasedTraining(hyperparam_mutations={{{key!r}: ...}}): "
                            f"expected a list of values, a tune search space (tune.uniform...) "
                            f"or a function, got {type(spec).__name__}")
    if custom_explore_fn is not None:
        out = custom_explore_fn(new)
        if not isinstance(out, dict):
            raise TypeError("custom_explore_fn must return the new config dict")
        new = out
    return new


class PopulationBasedTraining(TrialScheduler):
    """Exploit the best trials' checkpoints, explore around their configs."""

    _needs_metric = True
    _replay_on_restore = False

    def __init__(self, time_attr: str = "time_total_s", metric: str | None = None,
                 mode: str | None = None, perturbation_interval: float = 60.0,
                 burn_in_period: float = 0.0, hyperparam_mutations: dict | None = None,
                 quantile_fraction: float = 0.25, resample_probability: float = 0.25,
                 perturbation_factors: tuple[float, float] = (1.2, 0.8),
                 custom_explore_fn: Callable[[dict], dict] | None = None,
                 log_config: bool = True, require_attrs: bool = True, synch: bool = False,
                 seed: int | None = None):
        if not hyperparam_mutations and custom_explore_fn is None:
            raise ValueError("PopulationBasedTraining needs hyperparam_mutations (or "
                             "custom_explore_fn) saying which config keys to explore")
        if hyperparam_mutations is not None and not isinstance(hyperparam_mutations, dict):
            raise TypeError("PopulationBasedTraining(hyperparam_mutations=...) must be a dict")
        if not 0 <= quantile_fraction <= 0.5:
            raise ValueError(f"PopulationBasedTraining(quantile_fraction={quantile_fraction}): "
                             f"must be between 0 and 0.5")
        if perturbation_interval <= 0:
            raise ValueError(f"PopulationBasedTraining(perturbation_interval="
                             f"{perturbation_interval}): must be > 0")
        if synch:
            raise NotImplementedError("PopulationBasedTraining(synch=True) is not supported; "
                                      "use the default synch=False")
        self._init_metric_mode(metric, mode)
        self._time_attr = time_attr
        self._perturbation_interval = perturbation_interval
        self._burn_in_period = burn_in_period
        self._hyperparam_mutations = hyperparam_mutations or {}
        self._quantile_fraction = quantile_fraction
        self._resample_probability = resample_probability
        low, high = perturbation_factors
        self._perturbation_factors = (low, high)
        self._custom_explore_fn = custom_explore_fn
        self._log_config = log_config
        self._require_attrs = require_attrs
        self._rng = random.Random(seed)
        self._state: dict[str, dict[str, Any]] = {}
        self._num_perturbations = 0
        self._num_checkpoints_missing = 0

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._state.setdefault(trial.trial_id, {"last_perturbation_time": 0, "score": None,
                                                "last_result": None, "trial": trial})

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if self._time_attr not in result or self._metric not in result:
            if self._require_attrs:
                missing = self._time_attr if self._time_attr not in result else self._metric
                raise ValueError(f"PopulationBasedTraining: the result has no {missing!r}; "
                                 f"reported keys: {sorted(result)}")
            return self.CONTINUE
        self.on_trial_add(tune_controller, trial)
        state = self._state[trial.trial_id]
        state["trial"] = trial
        t = result[self._time_attr]
        state["score"] = self._score(result)
        state["last_result"] = result
        if t < self._burn_in_period:
            return self.CONTINUE
        if t - state["last_perturbation_time"] < self._perturbation_interval:
            return self.CONTINUE
        state["last_perturbation_time"] = t
        lower, upper = self._quantiles()
        if trial.trial_id in lower and upper:
            donor_id = self._rng.choice(upper)
            donor = self._state[donor_id]["trial"]
            checkpoint = tune_controller.checkpoint_for_exploit(donor)
            if checkpoint is None:
                self._num_checkpoints_missing += 1
                logger.warning("PBT: trial %s has no checkpoint to copy; report checkpoints "
                               "(tune.report(..., checkpoint=...)) for PBT to exploit", donor)
                return self.CONTINUE
            new_config = _explore(donor.config, self._hyperparam_mutations,
                                  self._resample_probability, self._perturbation_factors,
                                  self._rng, self._custom_explore_fn)
            if self._log_config:
                logger.info("PBT: %s exploits %s; new config %s", trial, donor, new_config)
            self._num_perturbations += 1
            tune_controller.exploit(trial, donor, new_config, checkpoint)
            # the donor's last time counts for the restarted trial
            donor_result = self._state[donor_id]["last_result"] or {}
            state["last_perturbation_time"] = donor_result.get(self._time_attr, t)
        return self.CONTINUE

    def _quantiles(self) -> tuple[list[str], list[str]]:
        scored = [(s["score"], tid) for tid, s in self._state.items()
                  if s["score"] is not None and s["trial"].status in ("RUNNING", "PAUSED",
                                                                      "PENDING")]
        scored.sort()
        if len(scored) <= 1:
            return [], []
        # as Ray: ceil(population x quantile_fraction), at most half of it, so
        # 5 trials at 0.25 exploit 2 and quantile_fraction=0 exploits none
        n = min(math.ceil(len(scored) * self._quantile_fraction), len(scored) // 2)
        if n == 0:
            return [], []
        return [tid for _, tid in scored[:n]], [tid for _, tid in scored[-n:]]

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if trial.trial_id in self._state:
            self._state[trial.trial_id]["score"] = None

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._state.pop(trial.trial_id, None)

    def debug_string(self) -> str:
        return f"PopulationBasedTraining: {self._num_perturbations} perturbs"
