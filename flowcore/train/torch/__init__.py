"""flowcore.train.torch: distributed PyTorch training (Ray Train's
``ray.train.torch`` names). Importable without torch; using it without
torch raises ImportError naming the ``flowcore[train]`` extra."""
from __future__ import annotations

from .config import TorchConfig
from .torch_trainer import TorchTrainer
from .train_loop_utils import get_device, prepare_data_loader, prepare_model

__all__ = ["TorchTrainer", "TorchConfig", "prepare_model", "prepare_data_loader", "get_device"]
