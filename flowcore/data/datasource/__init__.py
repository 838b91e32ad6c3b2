"""Readers and writers of files (parquet, CSV, JSON lines, NumPy, text,
binary, images) on any filesystem ``pyarrow.fs`` knows."""
from .file_based import FileDatasink, SaveMode, file_read_tasks, resolve_paths

__all__ = ["FileDatasink", "SaveMode", "file_read_tasks", "resolve_paths"]
