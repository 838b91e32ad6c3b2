"""Ray semantics that need a cluster of their own (started and stopped by
the test): init(namespace=), auto-init by get_runtime_context(), worker
environment and worker reuse."""
from __future__ import annotations

import pytest

import flowcore

pytestmark = pytest.mark.timeout(60)


def test_runtime_context_starts_the_cluster_and_init_namespace(tmp_path):
    flowcore.shutdown()
    try:
        ctx = flowcore.get_runtime_context()  # no init(): starts the embedded cluster
        assert flowcore.is_initialized() and ctx.get_node_id()
    finally:
        flowcore.shutdown()
    with pytest.raises(TypeError, match="namespace"):
        flowcore.init(namespace=3)
    flowcore.init(num_cpus=1, namespace="team-a", session_dir=str(tmp_path / "s"))
    try:
        assert flowcore.get_runtime_context().namespace == "team-a"

        @flowcore.remote(num_cpus=0)
        class Named:
            def ns(self):
                return flowcore.get_runtime_context().namespace

        a = Named.options(name="svc").remote()
        assert flowcore.get(a.ns.remote()) == "team-a"
        assert flowcore.get_actor("svc") == a          # looked up in the job's namespace
        with pytest.raises(ValueError, match="'default'"):
            flowcore.get_actor("svc", namespace="default")

        @flowcore.remote(num_cpus=0)
        def lookup():  # tasks inherit the job's namespace
            h = flowcore.get_actor("svc")
            return flowcore.get_runtime_context().namespace, flowcore.get(h.ns.remote())

        assert flowcore.get(lookup.remote()) == ("team-a", "team-a")
        actors = flowcore.state.list_actors()
        assert [r["namespace"] for r in actors if r["name"] == "svc"] == ["team-a"]
    finally:
        flowcore.shutdown()
