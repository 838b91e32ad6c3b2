"""Errors of flowcore.serve (Ray Serve's names)."""
from __future__ import annotations

from ..exceptions import FlowcoreError


class RayServeException(FlowcoreError):
    """A serve-level error: not running, deployment failed, bad input."""


class BackPressureError(RayServeException):
    """Every replica holds ``max_ongoing_requests`` and the caller's queue
    holds ``max_queued_requests``: the request was dropped (HTTP 503)."""


class DeploymentUnavailableError(RayServeException):
    """The deployment's replicas could not be started."""
