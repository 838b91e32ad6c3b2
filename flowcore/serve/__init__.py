"""flowcore.serve: online serving with Ray Serve 2.60's API on flowcore
actors: deployments of replicas behind an HTTP proxy (uvicorn), handles for
composition, request batching and autoscaling.

    from flowcore import serve

    @serve.deployment(num_replicas=2)
    class Echo:
        async def __call__(self, request):
            return await request.json()

    serve.run(Echo.bind())        # http://127.0.0.1:8000/
"""
from __future__ import annotations

from .api import (ApplicationStatusOverview, DeploymentStatusOverview, ServeStatus, delete,
                  get_app_handle, get_deployment_handle, http_address, run, shutdown,
                  shutdown_async, start, status)
from .batching import batch
from .config import AutoscalingConfig, DeploymentConfig, HTTPOptions
from .deployment import Application, Deployment, deployment, ingress
from .exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from .handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from .replica import ReplicaContext, get_replica_context

__all__ = [
    "deployment", "ingress", "batch", "run", "start", "status", "delete", "shutdown", "shutdown_async",
    "get_app_handle", "get_deployment_handle", "get_replica_context", "http_address",
    "Application", "Deployment", "DeploymentHandle", "DeploymentResponse",
    "DeploymentResponseGenerator", "AutoscalingConfig", "DeploymentConfig", "HTTPOptions",
    "ReplicaContext", "ServeStatus", "ApplicationStatusOverview",
    "DeploymentStatusOverview", "RayServeException", "BackPressureError",
    "DeploymentUnavailableError",
]
