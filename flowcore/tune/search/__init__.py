"""Search algorithms and search-space primitives."""
from __future__ import annotations

from typing import Any

from .basic_variant import BasicVariantGenerator
from .concurrency_limiter import ConcurrencyLimiter
from .searcher import SearchAlgorithm, SearchGenerator, Searcher

__all__ = ["BasicVariantGenerator", "ConcurrencyLimiter", "Searcher", "SearchAlgorithm",
           "SearchGenerator"]


def __getattr__(name: str) -> Any:
    if name == "optuna":
        from . import optuna as mod
        return mod
    raise AttributeError(f"module 'flowcore.tune.search' has no attribute {name!r}")
