"""PPO on CartPole-v1 with flowcore.rl: two env runner actors sample with
the current policy, the driver updates a small torch actor-critic and
broadcasts the new weights once per iteration through the object store.

    python examples/ppo_cartpole.py            # until mean return >= 150

Needs ``pip install 'flowcore[train,rl]'`` (torch and gymnasium).
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

import flowcore
from flowcore.rl import EnvRunnerGroup, TorchCategoricalPolicy


class ActorCritic(nn.Module):
    """Two small MLPs: action logits and the state value."""

    def __init__(self, obs_dim: int = 4, num_actions: int = 2, hidden: int = 64):
        super().__init__()
        self.pi = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(),
                                nn.Linear(hidden, hidden), nn.Tanh(),
                                nn.Linear(hidden, num_actions))
        self.vf = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(),
                                nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pi(obs), self.vf(obs).squeeze(-1)


def make_policy(observation_space: Any, action_space: Any, seed: Optional[int]) -> Any:
    return TorchCategoricalPolicy(observation_space, action_space, seed, model_fn=ActorCritic)


def compute_gae(fragments: list[dict], model: ActorCritic, gamma: float,
                lam: float) -> dict[str, np.ndarray]:
    """One training batch: advantages by GAE per fragment, bootstrapped with
    V(last_obs) where the fragment ends without termination."""
    last = np.stack([f["last_obs"] for f in fragments]).astype(np.float32)
    with torch.no_grad():
        boot = model(torch.as_tensor(last))[1].numpy()
    cols: dict[str, list] = {"obs": [], "actions": [], "logp": [], "adv": [], "ret": []}
    for f, v_last in zip(fragments, boot):
        rewards, values = f["rewards"], f["vf_preds"]
        nxt = 0.0 if f["terminated"] else float(v_last)
        adv = np.zeros_like(rewards)
        running = 0.0
        for t in range(len(rewards) - 1, -1, -1):
            delta = rewards[t] + gamma * nxt - values[t]
            running = delta + gamma * lam * running
            adv[t] = running
            nxt = values[t]
        cols["obs"].append(f["obs"])
        cols["actions"].append(f["actions"])
        cols["logp"].append(f["action_logp"])
        cols["adv"].append(adv)
        cols["ret"].append(adv + values)
    return {k: np.concatenate(v) for k, v in cols.items()}


def ppo_update(model: ActorCritic, opt: torch.optim.Optimizer, batch: dict, epochs: int,
               minibatch: int, clip: float, gen: torch.Generator) -> float:
    obs = torch.as_tensor(batch["obs"], dtype=torch.float32)
    actions = torch.as_tensor(batch["actions"], dtype=torch.int64)
    old_logp = torch.as_tensor(batch["logp"], dtype=torch.float32)
    adv = torch.as_tensor(batch["adv"], dtype=torch.float32)
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    ret = torch.as_tensor(batch["ret"], dtype=torch.float32)
    n = len(obs)
    loss = torch.zeros(())
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, minibatch):
            idx = perm[start:start + minibatch]
            logits, value = model(obs[idx])
            logp_all = torch.log_softmax(logits, -1)
            logp = logp_all.gather(-1, actions[idx].unsqueeze(-1)).squeeze(-1)
            ratio = torch.exp(logp - old_logp[idx])
            pg = -torch.min(ratio * adv[idx],
                            torch.clamp(ratio, 1 - clip, 1 + clip) * adv[idx]).mean()
            vf = ((value - ret[idx]) ** 2).mean()
            entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
            loss = pg + 0.5 * vf - 0.01 * entropy
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
    return float(loss.detach())


def train(iterations: int = 100, steps_per_iteration: int = 4000, target: float = 150.0,
          seed: int = 0, num_env_runners: int = 2, num_envs_per_env_runner: int = 4,
          lr: float = 1e-3, epochs: int = 8, minibatch: int = 256, gamma: float = 0.99,
          lam: float = 0.95, clip: float = 0.2,
          on_iteration: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Run PPO until the mean return of the episodes finished in an
    iteration reaches ``target`` (or ``iterations`` run out); return one
    dict per iteration (``iteration``, ``mean_return``, ``episodes``,
    ``steps``, ``time``)."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(seed)
    model = ActorCritic()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history: list[dict] = []
    t0 = time.monotonic()
    total = 0
    with EnvRunnerGroup("CartPole-v1", num_env_runners=num_env_runners,
                        num_envs_per_env_runner=num_envs_per_env_runner, policy=make_policy,
                        seed=seed) as group:
        for it in range(iterations):
            group.sync_weights({k: v.numpy() for k, v in model.state_dict().items()})
            fragments = group.sample(steps_per_iteration)
            returns = [f["episode_return"] for f in fragments if "episode_return" in f]
            batch = compute_gae(fragments, model, gamma, lam)
            total += len(batch["obs"])
            loss = ppo_update(model, opt, batch, epochs, minibatch, clip, gen)
            row = {"iteration": it, "mean_return": float(np.mean(returns)) if returns else 0.0,
                   "episodes": len(returns), "steps": total, "loss": loss,
                   "time": time.monotonic() - t0}
            history.append(row)
            if on_iteration:
                on_iteration(row)
            if returns and row["mean_return"] >= target:
                break
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", type=float, default=150.0)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    flowcore.init()
    try:
        history = train(iterations=args.iterations, target=args.target, seed=args.seed,
                        on_iteration=lambda r: print(
                            f"iter {r['iteration']:3d}  mean return {r['mean_return']:7.1f}  "
                            f"episodes {r['episodes']:4d}  steps {r['steps']:7d}  "
                            f"{r['time']:6.1f}s", flush=True))
        last = history[-1]
        print(f"done: mean return {last['mean_return']:.1f} after {last['steps']} steps "
              f"in {last['time']:.1f}s")
    finally:
        flowcore.shutdown()


if __name__ == "__main__":
    main()
