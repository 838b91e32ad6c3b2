"""Helpers used inside a torch training function: ``get_device``,
``prepare_model`` (device placement and DistributedDataParallel) and
``prepare_data_loader`` (a DistributedSampler so each rank reads its own
part of the data)."""
from __future__ import annotations

from typing import Any, Optional

from ..context import _get_session
from .config import require_torch


def get_device() -> Any:
    """The ``torch.device`` of this worker (its GPU, else the CPU)."""
    torch = require_torch()
    s = _get_session("torch.get_device")
    return s.device if s.device is not None else torch.device("cpu")


def prepare_model(model: Any, move_to_device: Any = True, parallel_strategy: Optional[str] = "ddp",
                  parallel_strategy_kwargs: Optional[dict] = None) -> Any:
    """Move ``model`` to this worker's device and, with more than one
    worker, wrap it in ``DistributedDataParallel`` (``parallel_strategy``
    ``"ddp"``; ``"fsdp"`` for FullyShardedDataParallel; ``None`` leaves it
    unwrapped)."""
    require_torch()
    s = _get_session("torch.prepare_model")
    if parallel_strategy not in ("ddp", "fsdp", None):
        raise ValueError(f"prepare_model(parallel_strategy={parallel_strategy!r}): expected "
                         f"'ddp', 'fsdp' or None")
    device = get_device()
    if move_to_device is True:
        model = model.to(device)
    elif move_to_device:
        model = model.to(move_to_device)
    if s.world_size <= 1 or parallel_strategy is None:
        return model
    kwargs = dict(parallel_strategy_kwargs or {})
    if parallel_strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        if device.type == "cuda":
            kwargs.setdefault("device_ids", [device])
            kwargs.setdefault("output_device", device)
        return DistributedDataParallel(model, **kwargs)
    from torch.distributed.fsdp import FullyShardedDataParallel
    return FullyShardedDataParallel(model, **kwargs)


class _DeviceDataLoader:
    """Iterates a DataLoader, moving every batch to a device."""

    def __init__(self, loader: Any, device: Any, non_blocking: bool):
        self._loader = loader
        self._device = device
        self._non_blocking = non_blocking

    def _move(self, item: Any) -> Any:
        if hasattr(item, "to"):
            return item.to(self._device, non_blocking=self._non_blocking)
        if isinstance(item, (list, tuple)):
            return type(item)(self._move(i) for i in item)
        if isinstance(item, dict):
            return {k: self._move(v) for k, v in item.items()}
        return item

    def __iter__(self) -> Any:
        for batch in self._loader:
            yield self._move(batch)

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def prepare_data_loader(data_loader: Any, add_dist_sampler: bool = True,
                        move_to_device: bool = True, auto_transfer: bool = False) -> Any:
    """Give ``data_loader`` a ``DistributedSampler`` (with more than one
    worker; it shuffles when the loader did) and, on a GPU, move its batches
    to the device. Call ``loader.sampler.set_epoch(epoch)`` each epoch when
    shuffling."""
    require_torch()
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
    s = _get_session("torch.prepare_data_loader")
    if not isinstance(data_loader, DataLoader):
        raise TypeError(f"prepare_data_loader: expected a torch DataLoader, got "
                        f"{type(data_loader).__name__}")
    loader = data_loader
    if (add_dist_sampler and s.world_size > 1
            and not isinstance(loader.sampler, DistributedSampler)):
        if loader.batch_size is None:
            raise ValueError("prepare_data_loader: the DataLoader uses a custom batch_sampler; "
                             "give it a batch_size instead, or pass add_dist_sampler=False and "
                             "split the data yourself")
        shuffle = isinstance(loader.sampler, RandomSampler)
        sampler: Any = DistributedSampler(loader.dataset, num_replicas=s.world_size,
                                     rank=s.world_rank, shuffle=shuffle)
        loader = DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                            num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                            pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                            timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                            persistent_workers=loader.persistent_workers
                            if loader.num_workers > 0 else False)
    device = get_device()
    if move_to_device and device.type != "cpu":
        return _DeviceDataLoader(loader, device, non_blocking=auto_transfer)
    return loader
