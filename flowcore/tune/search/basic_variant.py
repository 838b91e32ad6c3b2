"""``BasicVariantGenerator``: grid search and random sampling (the default).

Every grid point is run ``num_samples`` times; random distributions are
drawn anew for each trial (``constant_grid_search=True`` draws them once per
sample and reuses them across the grid).  Its state is plain data and a
``numpy`` generator, so a restored experiment continues the sequence.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .searcher import SearchAlgorithm, Searcher
from .variant_generator import check_space, grid_points, grid_size, resolve

__all__ = ["BasicVariantGenerator"]


class BasicVariantGenerator(SearchAlgorithm):
    """Expand grid_search axes and sample distributions of param_space."""

    def __init__(self, points_to_evaluate: list[dict] | None = None, max_concurrent: int = 0,
                 constant_grid_search: bool = False,
                 random_state: int | np.random.Generator | None = None):
        if points_to_evaluate is not None and (not isinstance(points_to_evaluate, list) or
                                               not all(isinstance(p, dict)
                                                       for p in points_to_evaluate)):
            raise TypeError("BasicVariantGenerator(points_to_evaluate=...) must be a list of "
                            "(partial) config dicts")
        if not isinstance(max_concurrent, int) or max_concurrent < 0:
            raise ValueError(f"BasicVariantGenerator(max_concurrent={max_concurrent!r}): "
                             f"expected an int >= 0 (0: no limit)")
        self.points_to_evaluate = list(points_to_evaluate or [])
        self.max_concurrent = max_concurrent
        self.constant_grid_search = constant_grid_search
        self.rng = (random_state if isinstance(random_state, np.random.Generator)
                    else np.random.default_rng(random_state))
        self.space: dict = {}
        self.num_samples = 1
        self.index = 0
        self.live: set[str] = set()
        self._constant: Any = None

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        check_space(config)
        self.space = config
        self.num_samples = int(spec.get("num_samples", 1))
        self.points = grid_points(config)
        return True

    def total_samples(self) -> int | None:
        if self.num_samples < 0:
            return None
        n = len(self.points_to_evaluate) * grid_size(self.space)
        return n + self.num_samples * grid_size(self.space)

    def is_finished(self) -> bool:
        total = self.total_samples()
        return total is not None and self.index >= total

    def next_config(self, trial_id: str) -> dict | None | str:
        if self.is_finished():
            return Searcher.FINISHED
        if self.max_concurrent and len(self.live) >= self.max_concurrent:
            return None
        n_grid = len(self.points)
        i = self.index
        fixed = None
        n_points = len(self.points_to_evaluate) * n_grid
        if i < n_points:
            fixed = self.points_to_evaluate[i // n_grid]
            sample = -1
        else:
            sample = (i - n_points) // n_grid
        point = self.points[i % n_grid]
        if self.constant_grid_search and sample >= 0:
            # every grid point of one sample draws the same random values
            if i % n_grid == 0 or self._constant is None:
                self._constant = self.rng.bit_generator.state
            else:
                self.rng.bit_generator.state = self._constant
        config = resolve(self.space, point, self.rng, fixed)
        self.index += 1
        self.live.add(trial_id)
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        self.live.discard(trial_id)
