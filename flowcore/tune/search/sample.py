"""Search-space primitives: ``uniform``, ``choice``, ``grid_search`` and the rest.

Each sampling function returns a :class:`Domain` that draws values from a
``numpy.random.Generator``; ``grid_search`` returns the marker dict
``{"grid_search": values}`` that the variant generator expands.  The
spelling and bounds follow Ray Tune: ``randint``/``lograndint`` exclude
the upper bound, ``qrandint``/``qlograndint`` include it.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["Domain", "Float", "Integer", "Categorical", "Function", "uniform", "quniform",
           "loguniform", "qloguniform", "choice", "randint", "qrandint", "lograndint",
           "qlograndint", "randn", "qrandn", "sample_from", "grid_search"]


_Number = int | float | np.integer | np.floating


def _number(name: str, v: Any) -> _Number:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(v)):
        raise TypeError(f"{name} must be a finite number, got {v!r}")
    return v


class Domain:
    """A distribution to draw one config value from."""

    sampler: str = "uniform"

    def sample(self, spec: Any = None, size: int = 1,
               random_state: np.random.Generator | None = None) -> Any:
        rng = random_state if random_state is not None else np.random.default_rng()
        values = [self._draw(rng, spec) for _ in range(size)]
        return values[0] if size == 1 else values

    def _draw(self, rng: np.random.Generator, spec: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def is_function(self) -> bool:
        return False

    def domain_str(self) -> str:
        return repr(self)


class Float(Domain):
    """A float between ``lower`` and ``upper``."""

    def __init__(self, lower: float, upper: float, sampler: str = "uniform",
                 base: float = 10, mean: float = 0.0, sd: float = 1.0, q: float | None = None):
        self.lower, self.upper = lower, upper
        self.sampler, self.base, self.mean, self.sd, self.q = sampler, base, mean, sd, q

    def _quantize(self, v: float) -> float:
        if self.q is None:
            return float(v)
        out = float(np.round(v / self.q) * self.q)
        if self.lower is not None:
            out = min(max(out, self.lower), self.upper)
        return out

    def _draw(self, rng: np.random.Generator, spec: Any) -> float:
        if self.sampler == "normal":
            return self._quantize(rng.normal(self.mean, self.sd))
        if self.sampler == "loguniform":
            lo, hi = math.log(self.lower, self.base), math.log(self.upper, self.base)
            return self._quantize(self.base ** rng.uniform(lo, hi))
        return self._quantize(rng.uniform(self.lower, self.upper))

    def __repr__(self) -> str:
        if self.sampler == "normal":
            return f"Float(normal, mean={self.mean}, sd={self.sd}, q={self.q})"
        return f"Float({self.sampler}, {self.lower}, {self.upper}, q={self.q})"


class Integer(Domain):
    """An int in ``[lower, upper)`` (quantized forms include ``upper``)."""

    def __init__(self, lower: int, upper: int, sampler: str = "uniform", base: float = 10,
                 q: int | None = None):
        self.lower, self.upper, self.sampler, self.base, self.q = lower, upper, sampler, base, q

    def _draw(self, rng: np.random.Generator, spec: Any) -> int:
        if self.q is not None:  # upper bound included
            if self.sampler == "loguniform":
                lo, hi = math.log(self.lower, self.base), math.log(self.upper, self.base)
                v = self.base ** rng.uniform(lo, hi)
            else:
                v = rng.uniform(self.lower, self.upper)
            out = int(np.round(v / self.q) * self.q)
            return int(min(max(out, self.lower), self.upper))
        if self.sampler == "loguniform":
            lo, hi = math.log(self.lower, self.base), math.log(self.upper, self.base)
            return int(min(max(math.floor(self.base ** rng.uniform(lo, hi)), self.lower),
                           self.upper - 1))
        return int(rng.integers(self.lower, self.upper))

    def __repr__(self) -> str:
        return f"Integer({self.sampler}, {self.lower}, {self.upper}, q={self.q})"


class Categorical(Domain):
    """One of ``categories``, each equally likely."""

    def __init__(self, categories: Sequence[Any]):
        self.categories = list(categories)

    def _draw(self, rng: np.random.Generator, spec: Any) -> Any:
        return self.categories[int(rng.integers(0, len(self.categories)))]

    def __len__(self) -> int:
        return len(self.categories)

    def __repr__(self) -> str:
        return f"Categorical({self.categories!r})"


class Function(Domain):
    """``sample_from(func)``: ``func(spec)`` computes the value; ``spec.config``
    gives the other values of the same config (resolved first)."""

    sampler = "function"

    def __init__(self, func: Callable[..., Any]):
        self.func = func

    def is_function(self) -> bool:
        return True

    def _draw(self, rng: np.random.Generator, spec: Any) -> Any:
        try:
            return self.func(spec)
        except TypeError as e:
            if "positional argument" not in str(e):
                raise
            return self.func()

    def __repr__(self) -> str:
        return f"Function({getattr(self.func, '__name__', self.func)!r})"


def _range(fn: str, lower: Any, upper: Any, *, positive: bool = False) -> None:
    _number(f"{fn}(lower=...)", lower)
    _number(f"{fn}(upper=...)", upper)
    if not lower < upper:
        raise ValueError(f"{fn}(lower={lower}, upper={upper}): lower must be below upper")
    if positive and lower <= 0:
        raise ValueError(f"{fn}(lower={lower}, ...): a log-scale range needs lower > 0")


def uniform(lower: float, upper: float) -> Float:
    """A float drawn uniformly from ``[lower, upper)``."""
    _range("uniform", lower, upper)
    return Float(lower, upper)


def quniform(lower: float, upper: float, q: float) -> Float:
    """``uniform`` rounded to a multiple of ``q``."""
    _range("quniform", lower, upper)
    _number("quniform(q=...)", q)
    return Float(lower, upper, q=q)


def loguniform(lower: float, upper: float, base: float = 10) -> Float:
    """A float whose logarithm is uniform over ``[log lower, log upper)``."""
    _range("loguniform", lower, upper, positive=True)
    return Float(lower, upper, sampler="loguniform", base=base)


def qloguniform(lower: float, upper: float, q: float, base: float = 10) -> Float:
    _range("qloguniform", lower, upper, positive=True)
    _number("qloguniform(q=...)", q)
    return Float(lower, upper, sampler="loguniform", base=base, q=q)


def choice(categories: Sequence[Any]) -> Categorical:
    """One of ``categories`` (a non-empty list), each equally likely."""
    if isinstance(categories, (str, bytes, dict)) or not hasattr(categories, "__len__"):
        raise TypeError(f"choice() takes a list of options, got {type(categories).__name__}")
    if len(categories) == 0:
        raise ValueError("choice([]): give at least one option")
    return Categorical(categories)


def _int(fn: str, name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{fn}({name}={v!r}): expected an int")
    return int(v)


def randint(lower: int, upper: int) -> Integer:
    """An int in ``[lower, upper)``."""
    _range("randint", _int("randint", "lower", lower), _int("randint", "upper", upper))
    return Integer(lower, upper)


def qrandint(lower: int, upper: int, q: int = 1) -> Integer:
    """An int in ``[lower, upper]`` rounded to a multiple of ``q``."""
    _range("qrandint", _int("qrandint", "lower", lower), _int("qrandint", "upper", upper))
    return Integer(lower, upper, q=_int("qrandint", "q", q))


def lograndint(lower: int, upper: int, base: float = 10) -> Integer:
    """An int in ``[lower, upper)`` drawn on a log scale."""
    _range("lograndint", _int("lograndint", "lower", lower),
           _int("lograndint", "upper", upper), positive=True)
    return Integer(lower, upper, sampler="loguniform", base=base)


def qlograndint(lower: int, upper: int, q: int, base: float = 10) -> Integer:
    _range("qlograndint", _int("qlograndint", "lower", lower),
           _int("qlograndint", "upper", upper), positive=True)
    return Integer(lower, upper, sampler="loguniform", base=base, q=_int("qlograndint", "q", q))


def randn(mean: float = 0.0, sd: float = 1.0) -> Float:
    """A float from the normal distribution N(mean, sd)."""
    _number("randn(mean=...)", mean)
    if _number("randn(sd=...)", sd) <= 0:
        raise ValueError(f"randn(sd={sd}): sd must be > 0")
    return Float(None, None, sampler="normal", mean=mean, sd=sd)  # type: ignore[arg-type]


def qrandn(mean: float, sd: float, q: float) -> Float:
    d = randn(mean, sd)
    _number("qrandn(q=...)", q)
    d.q = q
    return d


def sample_from(func: Callable[..., Any]) -> Function:
    """A value computed by ``func(spec)`` for each trial."""
    if not callable(func):
        raise TypeError(f"sample_from() takes a function, got {type(func).__name__}")
    return Function(func)


def grid_search(values: Sequence[Any]) -> dict[str, list[Any]]:
    """Try every one of ``values`` (each grid point runs ``num_samples`` times)."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise TypeError(f"grid_search() takes a list of values, got {type(values).__name__}")
    values = list(values)
    if not values:
        raise ValueError("grid_search([]): give at least one value")
    return {"grid_search": values}
