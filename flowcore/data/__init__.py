"""flowcore.data: Ray Data's API on flowcore.

Datasets of Arrow blocks in flowcore's object store, built lazily
(``range``, ``from_*``, ``read_*``, then ``map``/``map_batches``/``filter``/
``groupby``/``sort``...) and executed by a streaming executor when
consumed.  Switching from Ray is changing ``import ray`` /
``ray.data`` to ``flowcore`` / ``flowcore.data``.
"""
from __future__ import annotations

from .aggregate import AbsMax, AggregateFn, Count, Max, Mean, Min, Std, Sum, Unique
from .compute import ActorPoolStrategy, TaskPoolStrategy
from .context import DataContext
from .dataset import Dataset, MaterializedDataset, Schema
from .datasource import SaveMode
from .grouped import GroupedData
from .iterator import DataIterator
from .read_api import (from_arrow, from_arrow_refs, from_blocks, from_items, from_numpy,
                       from_numpy_refs, from_torch,
                       from_pandas, from_pandas_refs, range, range_tensor, read_binary_files,
                       read_csv, read_images, read_json, read_numpy, read_parquet, read_text)

__all__ = [
    "ActorPoolStrategy", "TaskPoolStrategy", "Dataset", "MaterializedDataset", "Schema",
    "GroupedData", "DataIterator", "DataContext", "SaveMode",
    "AggregateFn", "Count", "Sum", "Min", "Max", "Mean", "Std", "AbsMax", "Unique",
    "range", "range_tensor", "from_items", "from_numpy", "from_pandas", "from_arrow",
    "from_arrow_refs", "from_pandas_refs", "from_numpy_refs", "from_blocks", "from_torch",
    "read_parquet", "read_csv",
    "read_json", "read_numpy", "read_text", "read_binary_files", "read_images",
]
