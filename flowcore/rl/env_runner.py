"""``EnvRunner`` actors stepping Gymnasium environments, and the
``EnvRunnerGroup`` that drives them.

Each runner owns ``num_envs_per_env_runner`` environments and keeps them
between ``sample`` calls, so an episode may span several calls (its pieces
share an ``episode_id``). Weights are put in the object store once per
``sync_weights`` and every runner reads that one copy. A runner whose
process dies is replaced (``restart_failed_env_runners``): the new one gets
the current weights and the dead one's share of the steps, so ``sample``
still returns the requested number of steps.
"""
from __future__ import annotations

import math
import os
import uuid
from typing import Any, Callable, Optional, Union

import numpy as np

import flowcore
from flowcore.exceptions import ActorError

from .policy import RandomPolicy


def require_gymnasium() -> Any:
    try:
        import gymnasium
    except ImportError as e:
        raise ImportError("flowcore.rl needs Gymnasium: pip install 'flowcore[rl]'") from e
    return gymnasium


class EnvContext(dict):
    """The ``env_config`` dict passed to an environment creator, with the
    runner's ``worker_index`` (1-based), ``num_workers``, ``vector_index``
    and ``recreated_worker`` (True in a replacement runner)."""

    def __init__(self, config: dict, worker_index: int, num_workers: int, vector_index: int = 0,
                 recreated_worker: bool = False):
        super().__init__(config)
        self.worker_index = worker_index
        self.num_workers = num_workers
        self.vector_index = vector_index
        self.recreated_worker = recreated_worker


class EnvRunner:
    """Steps its environments with its policy; runs as an actor."""

    def __init__(self, env: Union[str, Callable], env_config: dict, num_envs: int,
                 policy_fn: Optional[Callable], seed: Optional[int], worker_index: int,
                 num_workers: int, recreated: bool):
        gym = require_gymnasium()
        self.worker_index = worker_index
        self.envs = []
        for v in range(num_envs):
            ctx = EnvContext(env_config, worker_index, num_workers, v, recreated)
            self.envs.append(gym.make(env, **env_config) if isinstance(env, str) else env(ctx))
        base = None if seed is None else seed * 10_007 + worker_index * 101
        self.seeds = [None if base is None else base + v for v in range(num_envs)]
        space_o, space_a = self.envs[0].observation_space, self.envs[0].action_space
        factory = policy_fn or (lambda o, a, s: RandomPolicy(o, a, s))
        self.policy = factory(space_o, space_a, base)
        self.weights_version = -1
        self.obs = [None] * num_envs
        self.episodes: list[dict] = [{} for _ in range(num_envs)]
        self.total_steps = 0

    def pid(self) -> int:
        return os.getpid()

    def set_weights(self, weights: Any, version: int) -> None:
        self.policy.set_weights(weights)
        self.weights_version = version

    def get_weights_version(self) -> int:
        return self.weights_version

    def apply(self, fn: Callable) -> Any:
        return fn(self)

    def _reset(self, v: int) -> None:
        seed = self.seeds[v]
        obs, _ = self.envs[v].reset(seed=seed)
        self.seeds[v] = None        # seed only the first reset; later ones follow the env's rng
        self.obs[v] = obs
        self.episodes[v] = {"id": uuid.uuid4().hex, "return": 0.0, "len": 0}

    def sample(self, num_timesteps: int) -> list[dict]:
        """Step the environments for ``num_timesteps`` steps in total;
        return episode fragments (NumPy arrays)."""
        n = len(self.envs)
        buf: list[dict[str, list]] = [self._new_buffer() for _ in range(n)]
        out: list[dict] = []
        steps = 0
        while steps < num_timesteps:
            for v in range(n):
                if self.obs[v] is None:
                    self._reset(v)
            obs = np.stack([np.asarray(o) for o in self.obs])
            actions, extras = self.policy.compute_actions(obs)
            for v in range(n):
                a = actions[v]
                nxt, r, term, trunc, _ = self.envs[v].step(a.item() if hasattr(a, "item") else a)
                b = buf[v]
                b["obs"].append(obs[v])
                b["actions"].append(a)
                b["rewards"].append(float(r))
                for k, arr in extras.items():
                    b.setdefault(k, []).append(arr[v])
                ep = self.episodes[v]
                ep["return"] += float(r)
                ep["len"] += 1
                steps += 1
                self.obs[v] = nxt
                if term or trunc:
                    out.append(self._fragment(v, b, bool(term), bool(trunc), nxt))
                    buf[v] = self._new_buffer()
                    self.obs[v] = None
                if steps >= num_timesteps:
                    break
        for v in range(n):
            if buf[v]["obs"]:
                out.append(self._fragment(v, buf[v], False, False, self.obs[v]))
        self.total_steps += steps
        return out

    @staticmethod
    def _new_buffer() -> dict[str, list]:
        return {"obs": [], "actions": [], "rewards": []}

    def _fragment(self, v: int, b: dict, term: bool, trunc: bool, last_obs: Any) -> dict:
        ep = self.episodes[v]
        # arrays per step, then the episode's scalars
        frag: dict[str, Any] = {k: np.asarray(vals) for k, vals in b.items()}
        frag["rewards"] = frag["rewards"].astype(np.float32)
        frag.update({"episode_id": ep["id"], "terminated": term, "truncated": trunc,
                     "last_obs": np.asarray(last_obs), "env_runner_index": self.worker_index,
                     "pid": os.getpid()})
        if term or trunc:
            frag["episode_return"] = ep["return"]
            frag["episode_len"] = ep["len"]
        return frag


class EnvRunnerGroup:
    """``num_env_runners`` ``EnvRunner`` actors (each holding
    ``num_cpus_per_env_runner`` CPUs) sampling in parallel.

    ``env`` is a registered Gymnasium id (``"CartPole-v1"``) or a creator
    ``env(env_config: EnvContext) -> gymnasium.Env``. ``policy`` is a
    factory ``policy(observation_space, action_space, seed)`` (default: a
    random policy).
    """

    def __init__(self, env: Union[str, Callable], *, env_config: Optional[dict] = None,
                 num_env_runners: int = 2, num_envs_per_env_runner: int = 1,
                 policy: Optional[Callable] = None, seed: Optional[int] = None,
                 num_cpus_per_env_runner: float = 1,
                 restart_failed_env_runners: bool = True,
                 max_num_env_runner_restarts: int = 1000):
        require_gymnasium()
        if not isinstance(num_env_runners, int) or isinstance(num_env_runners, bool) \
                or num_env_runners < 1:
            raise ValueError(f"EnvRunnerGroup(num_env_runners={num_env_runners!r}): expected an "
                             f"integer >= 1")
        if not isinstance(num_envs_per_env_runner, int) or num_envs_per_env_runner < 1:
            raise ValueError(f"EnvRunnerGroup(num_envs_per_env_runner="
                             f"{num_envs_per_env_runner!r}): expected an integer >= 1")
        if not (isinstance(env, str) or callable(env)):
            raise TypeError("EnvRunnerGroup(env=...): expected a Gymnasium id such as "
                            "'CartPole-v1' or a function env_config -> gymnasium.Env")
        if isinstance(env, str):
            gym = require_gymnasium()
            if env not in gym.registry:
                raise ValueError(f"EnvRunnerGroup(env={env!r}): no Gymnasium environment of that "
                                 f"id is registered (e.g. 'CartPole-v1')")
        if not flowcore.is_initialized():
            flowcore.init()
        self._args = dict(env=env, env_config=dict(env_config or {}),
                          num_envs=num_envs_per_env_runner, policy_fn=policy, seed=seed)
        self._cls = flowcore.remote(EnvRunner).options(num_cpus=num_cpus_per_env_runner)
        self.num_env_runners = num_env_runners
        self.restart_failed_env_runners = restart_failed_env_runners
        self.max_num_env_runner_restarts = max_num_env_runner_restarts
        self.num_restarts = 0
        self._weights_ref: Any = None
        self._weights_version = -1
        self._runners = [self._make(i + 1, recreated=False) for i in range(num_env_runners)]

    def _make(self, index: int, recreated: bool) -> Any:
        runner = self._cls.remote(worker_index=index, num_workers=self.num_env_runners,
                                  recreated=recreated, **self._args)
        if self._weights_ref is not None:
            runner.set_weights.remote(self._weights_ref, self._weights_version)
        return runner

    def sync_weights(self, weights: Any) -> None:
        """Put ``weights`` in the object store once and send every runner
        the reference; later ``sample`` calls use them."""
        self._weights_version += 1
        self._weights_ref = flowcore.put(weights)
        for r in self._runners:
            r.set_weights.remote(self._weights_ref, self._weights_version)

    def sample(self, num_timesteps: int) -> list[dict]:
        """Sample at least ``num_timesteps`` steps split among the runners;
        return their episode fragments, in runner order. A runner that dies meanwhile is
        replaced and its share sampled again by the new one."""
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"sample(num_timesteps={num_timesteps!r}): expected an integer >= 1")
        share = math.ceil(num_timesteps / len(self._runners))
        pending = {r.sample.remote(share): i for i, r in enumerate(self._runners)}
        results: list[list[dict]] = [[] for _ in self._runners]
        while pending:
            ready, _ = flowcore.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    results[i] = flowcore.get(ref)
                except ActorError as e:
                    self._replace(i, e)
                    pending[self._runners[i].sample.remote(share)] = i
        return [frag for part in results for frag in part]     # in runner order

    def _replace(self, i: int, error: BaseException) -> None:
        if not self.restart_failed_env_runners or (
                self.num_restarts >= self.max_num_env_runner_restarts):
            raise error
        self.num_restarts += 1
        try:
            flowcore.kill(self._runners[i])
        except Exception:
            pass
        self._runners[i] = self._make(i + 1, recreated=True)

    def foreach_env_runner(self, fn: Callable[[EnvRunner], Any]) -> list:
        """``fn(runner)`` in every runner; the results in runner order."""
        return flowcore.get([r.apply.remote(fn) for r in self._runners])

    def runner_pids(self) -> list[int]:
        """The process id of every runner."""
        return flowcore.get([r.pid.remote() for r in self._runners])

    def stop(self) -> None:
        """Kill every runner."""
        for r in self._runners:
            try:
                flowcore.kill(r)
            except Exception:
                pass
        self._runners = []

    def __enter__(self) -> "EnvRunnerGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
