"""flowcore.train: distributed training with Ray Train 2.60's API.

``from flowcore import train`` then ``train.report``, ``train.get_context``,
``train.get_checkpoint``, ``train.get_dataset_shard``, ``train.Checkpoint``,
``train.ScalingConfig``, ``train.RunConfig``, ``train.CheckpointConfig``,
``train.FailureConfig``, ``train.Result``; trainers live in
``flowcore.train.torch`` (``TorchTrainer``) and here (``DataParallelTrainer``).
"""
from __future__ import annotations

from .checkpoint import Checkpoint
from .config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from .context import TrainContext, get_checkpoint, get_context, get_dataset_shard, report
from .result import Result, TrainingFailedError, WorkerGroupError
from .trainer import BackendConfig, DataParallelTrainer

__all__ = ["Checkpoint", "CheckpointConfig", "FailureConfig", "RunConfig", "ScalingConfig",
           "TrainContext", "get_checkpoint", "get_context", "get_dataset_shard", "report",
           "Result", "TrainingFailedError", "WorkerGroupError", "BackendConfig",
           "DataParallelTrainer"]
