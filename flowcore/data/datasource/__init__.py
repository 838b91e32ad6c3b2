"""Readers and writers of files (parquet, CSV, JSON lines, NumPy, text,
binary, images) on any filesystem ``pyarrow.fs`` knows, and the
path-based partitions of their directories."""
from .file_based import (FileDatasink, SaveMode, file_read_tasks, partition_values,
                         resolve_paths)
from .partitioning import (PartitionStyle, Partitioning, PathPartitionFilter,
                           PathPartitionParser)

__all__ = ["FileDatasink", "SaveMode", "file_read_tasks", "partition_values", "resolve_paths",
           "PartitionStyle", "Partitioning", "PathPartitionFilter", "PathPartitionParser"]
