"""``OptunaSearch``: Optuna's samplers (TPE by default) as a Tune searcher.

Needs the ``tune`` extra (``pip install 'flowcore[tune]'``).  The tune
search space (``tune.uniform``, ``tune.loguniform``, ``tune.randint``,
``tune.choice``, ... nested dicts allowed) is translated to Optuna
distributions; a dict of Optuna distributions works too.  Each suggestion
is an Optuna ``ask``; each completed trial a ``tell``.
"""
from __future__ import annotations

from typing import Any

from .sample import Categorical, Domain, Float, Integer
from .searcher import Searcher
from .variant_generator import flatten, is_grid

__all__ = ["OptunaSearch"]


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ImportError("OptunaSearch needs optuna: pip install 'flowcore[tune]'") from None
    return optuna


def _unflatten(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        cur = out
        parts = key.split("/")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
    return out


def _to_distribution(optuna: Any, key: str, dom: Any) -> Any:
    d = optuna.distributions
    if isinstance(dom, d.BaseDistribution):
        return dom
    if isinstance(dom, Categorical):
        return d.CategoricalDistribution(dom.categories)
    if isinstance(dom, Float) and dom.sampler in ("uniform", "loguniform"):
        log = dom.sampler == "loguniform"
        if dom.q is not None and not log:
            return d.FloatDistribution(dom.lower, dom.upper, step=dom.q)
        return d.FloatDistribution(dom.lower, dom.upper, log=log)
    if isinstance(dom, Integer):
        log = dom.sampler == "loguniform"
        if dom.q is not None:  # tune's quantized ints include the upper bound
            return d.IntDistribution(dom.lower, dom.upper, log=log,
                                     step=1 if log else dom.q)
        return d.IntDistribution(dom.lower, dom.upper - 1, log=log)
    raise ValueError(f"OptunaSearch cannot translate param_space[{key!r}] = {dom!r}; use "
                     f"tune.uniform/loguniform/quniform/randint/qrandint/choice")


class OptunaSearch(Searcher):
    """Suggest configs with an Optuna sampler (``TPESampler(seed=seed)`` by default)."""

    def __init__(self, space: dict | None = None, metric: str | list[str] | None = None,
                 mode: str | list[str] | None = None, points_to_evaluate: list[dict] | None = None,
                 sampler: Any = None, seed: int | None = None,
                 evaluated_rewards: list | None = None):
        optuna = _optuna()
        if isinstance(metric, list) or isinstance(mode, list):
            raise NotImplementedError("OptunaSearch: multi-objective metric lists are not "
                                      "supported; pass one metric")
        super().__init__(metric=metric, mode=mode)
        if space is not None and not isinstance(space, dict):
            raise TypeError("OptunaSearch(space=...) must be a dict (define-by-run functions "
                            "are not supported)")
        if evaluated_rewards is not None and (points_to_evaluate is None or
                                              len(points_to_evaluate) != len(evaluated_rewards)):
            raise ValueError("OptunaSearch(evaluated_rewards=...) needs one reward per point of "
                             "points_to_evaluate")
        self._space_arg = space
        self._points = list(points_to_evaluate or [])
        self._rewards = list(evaluated_rewards) if evaluated_rewards is not None else None
        self._sampler = sampler if sampler is not None else optuna.samplers.TPESampler(seed=seed)
        self._space: dict[str, Any] | None = None
        self._study: Any = None
        self._ot_trials: dict[str, int] = {}
        if space:
            self._setup(space)

    def _setup(self, space: dict) -> None:
        optuna = _optuna()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        flat = flatten(space)
        for k, v in flat.items():
            if is_grid(v) or k.endswith("grid_search"):
                raise ValueError(f"OptunaSearch cannot expand tune.grid_search (at {k!r}); use "
                                 f"tune.choice([...])")
        self._space = {k: _to_distribution(optuna, k, v) for k, v in flat.items()
                       if isinstance(v, (Domain, optuna.distributions.BaseDistribution))}
        if self._mode is not None:
            self._make_study()

    def _make_study(self) -> None:
        optuna = _optuna()
        if self._study is not None:
            return
        direction = "minimize" if self._mode == "min" else "maximize"
        self._study = optuna.create_study(sampler=self._sampler, direction=direction)
        if self._rewards is not None:
            for point, reward in zip(self._points, self._rewards):
                self._study.add_trial(optuna.trial.create_trial(
                    params=flatten(point), distributions={k: self._space[k]  # type: ignore
                                                          for k in flatten(point)},
                    value=reward))
            self._points = []
        for point in self._points:
            self._study.enqueue_trial(flatten(point))

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        super().set_search_properties(metric, mode, config, **spec)
        if self._space is None:
            if not config:
                raise ValueError("OptunaSearch has no search space: pass param_space to the "
                                 "Tuner or space= to OptunaSearch")
            self._setup(config)
        self._make_study()
        return True

    def suggest(self, trial_id: str) -> dict | None | str:
        if self._study is None:
            raise RuntimeError("OptunaSearch was not set up: use it through tune.Tuner, or "
                               "pass space, metric and mode")
        ot = self._study.ask(fixed_distributions=self._space)
        self._ot_trials[trial_id] = ot.number
        return _unflatten(dict(ot.params))

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        number = self._ot_trials.pop(trial_id, None)
        if number is None:
            return
        optuna = _optuna()
        value = (result or {}).get(self._metric) if not error else None
        if value is None:
            self._study.tell(number, state=optuna.trial.TrialState.FAIL)
        else:
            self._study.tell(number, float(value))

    def get_state(self) -> dict:
        return {"study": self._study, "ot_trials": dict(self._ot_trials),
                "space": self._space, "metric": self._metric, "mode": self._mode}

    def set_state(self, state: dict) -> None:
        self._study = state["study"]
        self._ot_trials = state["ot_trials"]
        self._space = state["space"]
        self._metric, self._mode = state["metric"], state["mode"]
