"""Submit jobs to a flowcore cluster: ``JobSubmissionClient`` (Ray's method
names) and the ``flowcore job`` command line.

A job is a shell command (its *entrypoint*, e.g. ``python train.py``) that
the head runs as a supervised process on its node, with the job's
``runtime_env``; a bare ``flowcore.init()`` inside it joins the cluster.
The API is the dashboard's HTTP port, behind the cluster token.
"""
from .client import JobSubmissionClient
from .models import JobDetails, JobStatus

JobInfo = JobDetails

__all__ = ["JobSubmissionClient", "JobStatus", "JobDetails", "JobInfo"]
