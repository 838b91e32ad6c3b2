"""Walking a param_space: where its grid axes and distributions are, and
turning one choice of grid point plus random draws into a concrete config."""
from __future__ import annotations

import copy
import itertools
from typing import Any, Iterator

import numpy as np

from .sample import Domain

Path = tuple  # a tuple of dict keys / list indexes


def is_grid(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "grid_search" in value


def check_space(space: Any, where: str = "param_space") -> None:
    """Reject param_space shapes that cannot be expanded, naming the key."""
    if not isinstance(space, dict):
        raise TypeError(f"{where} must be a dict of config keys to values or search-space "
                        f"objects (tune.uniform, tune.grid_search, ...), got "
                        f"{type(space).__name__}")
    for path, value in walk(space):
        if is_grid(value) and not isinstance(value["grid_search"], (list, tuple)):
            raise TypeError(f"{where}[{_fmt(path)}]: grid_search needs a list of values, got "
                            f"{type(value['grid_search']).__name__}; use tune.grid_search([...])")
        if isinstance(value, type) and issubclass(value, Domain):
            raise TypeError(f"{where}[{_fmt(path)}]: {value.__name__} is a class; call a "
                            f"sampling function such as tune.uniform(0, 1)")
        if callable(value) and not isinstance(value, Domain) and getattr(
                value, "__name__", "") in ("uniform", "choice", "randint", "loguniform",
                                           "grid_search", "randn", "quniform", "qrandint"):
            raise TypeError(f"{where}[{_fmt(path)}]: tune.{value.__name__} was passed "
                            f"without calling it; write tune.{value.__name__}(...)")


def _fmt(path: Path) -> str:
    return "][".join(repr(p) for p in path)


def walk(space: Any, prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Yield (path, value) for the leaves: grid markers, domains, constants."""
    if isinstance(space, dict) and not is_grid(space):
        for k, v in space.items():
            yield from walk(v, prefix + (k,))
    elif isinstance(space, list):
        for i, v in enumerate(space):
            yield from walk(v, prefix + (i,))
    else:
        yield prefix, space


def grid_axes(space: dict) -> list[tuple[Path, list[Any]]]:
    return [(p, list(v["grid_search"])) for p, v in walk(space) if is_grid(v)]


def domains(space: dict) -> list[tuple[Path, Domain]]:
    return [(p, v) for p, v in walk(space) if isinstance(v, Domain)]


def has_search(space: dict) -> bool:
    return any(is_grid(v) or isinstance(v, Domain) for _, v in walk(space))


def grid_size(space: dict) -> int:
    n = 1
    for _, values in grid_axes(space):
        n *= len(values)
    return n


def grid_points(space: dict) -> list[list[tuple[Path, Any]]]:
    """Every combination of the grid axes; the first axis changes fastest."""
    axes = grid_axes(space)
    if not axes:
        return [[]]
    rev = [[(p, v) for v in values] for p, values in reversed(axes)]
    return [list(reversed(combo)) for combo in itertools.product(*rev)]


def set_path(config: Any, path: Path, value: Any) -> None:
    for key in path[:-1]:
        config = config[key]
    config[path[-1]] = value


def get_path(config: Any, path: Path) -> Any:
    for key in path:
        config = config[key]
    return config


class _AttrDict(dict):
    def __getattr__(self, name: str) -> Any:
        try:
            v = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return _AttrDict(v) if isinstance(v, dict) else v


class _Spec:
    """What ``sample_from`` functions get: ``spec.config.<key>``."""

    def __init__(self, config: dict):
        self.config = _AttrDict(config)


def resolve(space: dict, grid_point: list[tuple[Path, Any]], rng: np.random.Generator,
            fixed: dict | None = None) -> dict:
    """A concrete config: grid values set, distributions drawn, sample_from
    functions called last (they may read the other values)."""
    config = copy.deepcopy(_strip(space))
    for path, value in grid_point:
        set_path(config, path, value)
    pending: list[tuple[Path, Domain]] = []
    for path, dom in domains(space):
        if dom.is_function():
            pending.append((path, dom))
        else:
            set_path(config, path, dom.sample(random_state=rng))
    for path, dom in pending:
        set_path(config, path, dom.sample(spec=_Spec(config), random_state=rng))
    if fixed:
        _merge(config, fixed)
    return config


def _strip(space: Any) -> Any:
    """A copy of the space with domains and grids as placeholders (deepcopy-safe)."""
    if is_grid(space) or isinstance(space, Domain):
        return None
    if isinstance(space, dict):
        return {k: _strip(v) for k, v in space.items()}
    if isinstance(space, list):
        return [_strip(v) for v in space]
    return space


def _merge(config: dict, fixed: dict) -> None:
    for k, v in fixed.items():
        if isinstance(v, dict) and isinstance(config.get(k), dict):
            _merge(config[k], v)
        else:
            config[k] = v


def flatten(d: dict, prefix: str = "", sep: str = "/") -> dict:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


def experiment_tag(index: int, space: dict, config: dict) -> str:
    """``<index>_<key>=<value>,...`` naming the searched values of a config."""
    parts = []
    for path, _ in grid_axes(space) + domains(space):
        try:
            v = get_path(config, path)
        except (KeyError, IndexError, TypeError):
            continue
        if isinstance(v, float):
            v = f"{v:.4g}"
        parts.append(f"{'/'.join(str(p) for p in path)}={v}")
    return f"{index}_{','.join(parts)}" if parts else str(index)
