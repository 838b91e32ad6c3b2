"""Tune's error types."""
from __future__ import annotations

from flowcore.exceptions import FlowcoreError

__all__ = ["TuneError"]


class TuneError(FlowcoreError):
    """An experiment-level failure (bad setup, a failed trial with
    ``fail_fast='raise'``, a directory that cannot be restored)."""
