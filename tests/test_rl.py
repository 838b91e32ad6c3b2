"""flowcore.rl: EnvRunnerGroup sampling in parallel, weight broadcast, a
runner killed mid-sample replaced, and a short seeded PPO run improving."""
from __future__ import annotations

import importlib.util
import os
import signal
import threading

import numpy as np
import pytest

import flowcore

if os.environ.get("CI") != "true":
    pytest.importorskip("gymnasium")

from flowcore.rl import EnvRunnerGroup  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "ppo_cartpole.py")


@pytest.fixture(scope="module")
def rlcluster(tmp_path_factory):
    flowcore.shutdown()
    info = flowcore.init(num_cpus=2, object_store_memory=128 << 20,
                         session_dir=str(tmp_path_factory.mktemp("session")))
    yield info
    flowcore.shutdown()


class WeightPolicy:
    """Always the action the weights name; remembers the weights."""

    def __init__(self, observation_space, action_space, seed):
        self.weights = {"action": 0}

    def set_weights(self, weights):
        self.weights = weights

    def compute_actions(self, obs):
        return np.full(len(obs), self.weights["action"]), {"seen": np.full(len(obs), 1.0)}


def test_bad_input(rlcluster):
    with pytest.raises(ValueError, match="num_env_runners"):
        EnvRunnerGroup("CartPole-v1", num_env_runners=0)
    with pytest.raises(ValueError, match="no Gymnasium environment"):
        EnvRunnerGroup("NoSuchEnv-v9")


@pytest.mark.timeout(120)
def test_parallel_sample_and_weight_broadcast(rlcluster):
    with EnvRunnerGroup("CartPole-v1", num_env_runners=2, num_envs_per_env_runner=2,
                        policy=WeightPolicy, seed=1) as group:
        weights = {"action": 1, "blob": np.arange(100_000)}
        group.sync_weights(weights)
        frags = group.sample(400)
        assert sum(len(f["rewards"]) for f in frags) == 400
        pids = {f["pid"] for f in frags}
        assert len(pids) == 2 and set(group.runner_pids()) == pids      # two processes
        assert {f["env_runner_index"] for f in frags} == {1, 2}
        assert all((f["actions"] == 1).all() for f in frags)           # the weights were used
        assert group.foreach_env_runner(lambda r: r.get_weights_version()) == [0, 0]
        seen = group.foreach_env_runner(lambda r: int(r.policy.weights["blob"].sum()))
        assert seen == [int(np.arange(100_000).sum())] * 2
        done = [f for f in frags if f["terminated"] or f["truncated"]]
        assert done and all(f["episode_len"] >= len(f["rewards"]) for f in done)
        for f in frags:
            assert f["obs"].shape == (len(f["rewards"]), 4)
            assert f["seen"].shape == f["rewards"].shape


@pytest.mark.timeout(120)
def test_runner_killed_mid_sample_is_replaced(rlcluster, tmp_path):
    from flowcore.testing import Signal
    import gymnasium as gym
    stuck = Signal()
    pid_file = str(tmp_path / "runner.pid")

    def make_env(ctx):
        env = gym.make("CartPole-v1")
        if ctx.worker_index != 2 or ctx.recreated_worker:
            return env

        class Stall(gym.Wrapper):
            steps = 0

            def step(self, action):
                Stall.steps += 1
                if Stall.steps == 50:
                    with open(pid_file, "w") as f:
                        f.write(str(os.getpid()))
                    stuck.wait(timeout=120)
                return self.env.step(action)

        return Stall(env)

    def killer():
        stuck.wait_for_waiters(1, timeout=120)
        os.kill(int(open(pid_file).read()), signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    with EnvRunnerGroup(make_env, num_env_runners=2, policy=WeightPolicy) as group:
        group.sync_weights({"action": 1})
        old = group.runner_pids()
        frags = group.sample(200)
        thread.join(timeout=10)
        stuck.close()
        assert group.num_restarts == 1
        new = group.runner_pids()
        assert new[0] == old[0] and new[1] != old[1]
        assert sum(len(f["rewards"]) for f in frags) == 200
        assert {f["pid"] for f in frags} == {old[0], new[1]}
        assert all((f["actions"] == 1).all() for f in frags)   # the new runner got the weights


@pytest.mark.timeout(150)
def test_seeded_ppo_improves(rlcluster):
    if os.environ.get("CI") != "true":
        pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("ppo_cartpole", EXAMPLE)
    ppo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ppo)
    history = ppo.train(iterations=4, steps_per_iteration=2000, seed=3, target=1e9)
    first, last = history[0]["mean_return"], history[-1]["mean_return"]
    assert first < 40                      # a random-ish start
    assert last > 1.8 * first, [h["mean_return"] for h in history]
