"""``TorchConfig``: the torch.distributed process group of a run.

Each worker joins a process group (gloo on CPU, nccl when it holds a GPU and
CUDA is present) through ``env://`` rendezvous at the address the
coordinator picked (a free port on rank 0's node). ``timeout_s`` bounds
every collective; flowcore's default is short (60 s, not torch's 30
minutes) because the coordinator also tears the group down as soon as a
worker dies.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

from ..trainer import BackendConfig

_BACKENDS = ("gloo", "nccl")


def require_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError("flowcore.train.torch needs PyTorch: "
                          "pip install 'flowcore[train]'") from e
    return torch


@dataclass
class TorchConfig(BackendConfig):
    """``backend`` (``None``: nccl on GPU workers, else gloo),
    ``init_method`` (``"env"`` or ``"tcp"``), ``timeout_s`` (seconds a
    collective may wait for a peer)."""

    backend: Optional[str] = None
    init_method: str = "env"
    timeout_s: int = 60

    def __post_init__(self) -> None:
        if self.backend is not None and self.backend not in _BACKENDS:
            raise ValueError(f"TorchConfig(backend={self.backend!r}): expected None, 'gloo' or "
                             f"'nccl'")
        if self.init_method not in ("env", "tcp"):
            raise ValueError(f"TorchConfig(init_method={self.init_method!r}): expected 'env' or "
                             f"'tcp'")
        if (isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float))
                or self.timeout_s <= 0):
            raise ValueError(f"TorchConfig(timeout_s={self.timeout_s!r}): expected seconds > 0")

    def _worker_env(self, group: Any, slot: Any) -> dict:
        cpus = max(1, int(group.scaling.num_cpus_per_worker or 1))
        env = {"MASTER_ADDR": group.master_addr, "MASTER_PORT": str(group.master_port),
               "WORLD_SIZE": str(len(group.workers)), "RANK": str(slot.world_rank),
               "LOCAL_RANK": str(slot.local_rank),
               "LOCAL_WORLD_SIZE": str(slot.local_world_size),
               "NODE_RANK": str(slot.node_rank), "OMP_NUM_THREADS": str(cpus)}
        if slot.gpu_ids:
            node_ids = group.node_gpu_ids(slot.node_id)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in node_ids)
            env["FLOWCORE_TRAIN_DEVICE_INDEX"] = str(node_ids.index(slot.gpu_ids[0]))
        return env

    def _on_worker_start(self, session: Any) -> None:
        torch = require_torch()
        import torch.distributed as dist
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        device_index = os.environ.get("FLOWCORE_TRAIN_DEVICE_INDEX")
        if device_index is not None and torch.cuda.is_available():
            session.device = torch.device(f"cuda:{int(device_index)}")
            torch.cuda.set_device(session.device)
        else:
            session.device = torch.device("cpu")
        backend = self.backend or ("nccl" if session.device.type == "cuda" else "gloo")
        if self.init_method == "env":
            init = "env://"
        else:
            init = f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        dist.init_process_group(backend=backend, init_method=init, rank=session.world_rank,
                                world_size=session.world_size,
                                timeout=timedelta(seconds=self.timeout_s))

    def _on_worker_end(self, session: Any) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
