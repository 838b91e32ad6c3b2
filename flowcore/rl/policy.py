"""Policies an env runner steps its environments with.

A policy is made in each runner by a factory called as
``factory(observation_space, action_space, seed)`` and must offer
``set_weights(weights)`` and ``compute_actions(obs_batch) -> (actions,
extras)``, where ``extras`` maps names (e.g. ``"action_logp"``,
``"vf_preds"``) to arrays with one row per observation; runners store the
extras with the sampled steps.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import numpy as np


class Policy(Protocol):
    def set_weights(self, weights: Any) -> None: ...

    def compute_actions(self, obs: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]: ...


class RandomPolicy:
    """Uniformly random actions from the action space (ignores weights)."""

    def __init__(self, observation_space: Any, action_space: Any, seed: Optional[int] = None):
        self.action_space = action_space
        self.action_space.seed(seed)
        self.weights: Any = None

    def set_weights(self, weights: Any) -> None:
        self.weights = weights

    def compute_actions(self, obs: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return np.array([self.action_space.sample() for _ in range(len(obs))]), {}


class TorchCategoricalPolicy:
    """A torch module mapping observations to action logits (or to
    ``(logits, value)``); actions are sampled from the categorical
    distribution. Extras: ``action_logp`` and, with a value head,
    ``vf_preds``. ``set_weights`` takes a ``state_dict`` (tensors or NumPy
    arrays)."""

    def __init__(self, observation_space: Any, action_space: Any, seed: Optional[int] = None, *,
                 model_fn: Callable[[], Any]):
        try:
            import torch
        except ImportError as e:
            raise ImportError("TorchCategoricalPolicy needs PyTorch: "
                              "pip install 'flowcore[train]'") from e
        self.torch = torch
        torch.set_num_threads(1)
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(int(seed))
            torch.manual_seed(int(seed))
        self.model = model_fn()
        self.model.eval()

    def set_weights(self, weights: Any) -> None:
        torch = self.torch
        # a copy: arrays read from the object store are read-only
        state = {k: v if isinstance(v, torch.Tensor) else torch.tensor(np.asarray(v))
                 for k, v in weights.items()}
        self.model.load_state_dict(state)

    def compute_actions(self, obs: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        torch = self.torch
        with torch.no_grad():
            out = self.model(torch.as_tensor(obs, dtype=torch.float32))
            logits, value = (out if isinstance(out, tuple) else (out, None))
            logp_all = torch.log_softmax(logits, dim=-1)
            actions = torch.multinomial(logp_all.exp(), 1, generator=self.generator).squeeze(-1)
            extras = {"action_logp": logp_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
                      .numpy()}
            if value is not None:
                extras["vf_preds"] = value.reshape(-1).numpy()
        return actions.numpy(), extras
