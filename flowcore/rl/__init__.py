"""flowcore.rl: parallel rollouts of Gymnasium environments on actors.

``EnvRunnerGroup`` starts ``EnvRunner`` actors that step environments with
the current policy weights and return sampled episode fragments as NumPy
arrays; ``examples/ppo_cartpole.py`` trains PPO on it. Importable without
gymnasium; using it without raises ImportError naming ``flowcore[rl]``.
"""
from __future__ import annotations

from .env_runner import EnvContext, EnvRunner, EnvRunnerGroup
from .policy import Policy, RandomPolicy, TorchCategoricalPolicy

__all__ = ["EnvRunnerGroup", "EnvRunner", "EnvContext", "Policy", "RandomPolicy",
           "TorchCategoricalPolicy"]
