"""``TorchTrainer``: a ``DataParallelTrainer`` whose workers form a
torch.distributed process group (``TorchConfig``)."""
from __future__ import annotations

from typing import Any, Callable, Optional

from ..checkpoint import Checkpoint
from ..config import RunConfig, ScalingConfig
from ..trainer import DataParallelTrainer
from .config import TorchConfig


class TorchTrainer(DataParallelTrainer):
    """Run ``train_loop_per_worker`` on ``scaling_config.num_workers``
    workers in one torch process group."""

    _backend_config_cls = TorchConfig

    def __init__(self, train_loop_per_worker: Callable, *,
                 train_loop_config: Optional[dict] = None,
                 torch_config: Optional[TorchConfig] = None,
                 scaling_config: Optional[ScalingConfig] = None,
                 run_config: Optional[RunConfig] = None,
                 datasets: Optional[dict] = None,
                 dataset_config: Any = None,
                 metadata: Optional[dict] = None,
                 resume_from_checkpoint: Optional[Checkpoint] = None):
        try:
            import torch  # noqa: F401
        except ImportError as e:
            raise ImportError("TorchTrainer needs PyTorch: pip install 'flowcore[train]'") from e
        if torch_config is not None and not isinstance(torch_config, TorchConfig):
            raise TypeError("torch_config: expected a flowcore.train.torch.TorchConfig")
        super().__init__(train_loop_per_worker, train_loop_config=train_loop_config,
                         backend_config=torch_config or TorchConfig(),
                         scaling_config=scaling_config, run_config=run_config,
                         datasets=datasets, dataset_config=dataset_config,
                         resume_from_checkpoint=resume_from_checkpoint, metadata=metadata)
