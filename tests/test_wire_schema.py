"""The wire schema (protocol/messages.py) against the receivers that dispatch
through it, and docs/architecture.md's message list generated from it."""
from __future__ import annotations

import os

from flowcore.node import server as node_server
from flowcore.node.worker import Worker
from flowcore.protocol import messages
from flowcore.scheduler import server as head_server
from flowcore.scheduler.machine import SchedulerState

DOCS = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "architecture.md")


def test_architecture_message_list_is_generated_from_the_schema():
    with open(DOCS) as f:
        text = f.read()
    assert messages.docs_section(text) == messages.markdown(), (
        "docs/architecture.md's message list differs from protocol/messages.py: "
        "paste the output of `python -m flowcore.protocol.messages` between its markers")


def test_every_op_the_head_takes_has_exactly_one_handler():
    ops = {op.name for (to, _), op in messages.SCHEMA.items() if to == messages.HEAD}
    server_ops = set(head_server.HeadServer._op_table(
        object.__new__(head_server.HeadServer)))
    state_ops = set(SchedulerState().ops)  # the core's handlers and its components' ops
    assert ops == server_ops | state_ops, (ops ^ (server_ops | state_ops))
    # registration goes to the state machine too; nothing else is handled twice
    assert server_ops & state_ops == {"register_function"}


def test_every_op_a_node_takes_has_a_handler():
    bare = object.__new__(node_server.NodeServer)
    assert set(node_server.NodeServer._head_op_table(bare)) == node_server.HEAD_OPS
    port_ops = set().union(*node_server.CLIENT_ROLE_OPS.values())
    assert set(node_server.NodeServer._client_op_table(bare)) == port_ops


def test_a_worker_handles_what_its_node_and_callers_send():
    worker = Worker(client=None, wid="w-test")
    assert set(worker._ops) == messages.ops_for(messages.CLIENT, messages.NODE)
    assert messages.ops_for(messages.ACTOR, messages.CALLER) <= set(worker._ops)


def test_roles_are_disjoint_where_it_matters():
    node = messages.ops_for(messages.HEAD, "node")
    driver = messages.ops_for(messages.HEAD, messages.DRIVER)
    worker = messages.ops_for(messages.HEAD, messages.WORKER)
    assert "submit" not in node and "heartbeat" not in driver | worker
    assert "task_done" in worker and "task_done" not in driver
    assert {"register_worker", "register_client"} == \
        messages.ops_for(messages.NODE, messages.PEER) - {"fetch_chunk", "bulk_port", "stats"}


def _wire(msg: dict) -> dict:
    """``msg`` as the receiver decodes it."""
    from flowcore.protocol import frames
    data = b"".join(bytes(b) for b in frames.encode([msg]))
    msgs, _ = frames.decode(data)
    return msgs[0]


def test_a_direct_run_task_leaves_its_defaults_out_and_the_receiver_puts_them_back():
    import os
    full = {"op": "run_task", "tid": os.urandom(16), "fid": os.urandom(16), "name": "f",
            "args": b"\x80\x05N.", "args_dep": None, "deps": [], "nret": 1,
            "res": {"CPU": 1.0}, "retry_exc": False, "owner": "c1", "attempt": 1,
            "lease": os.urandom(16)}
    lean = messages.lean_run_task(dict(full))
    for key in ("args_dep", "deps", "nret", "retry_exc", "attempt"):
        assert key not in lean
    assert lean["res"] == {"CPU": 1.0}  # not a default: kept
    got = messages.with_run_defaults(_wire(lean))
    assert got == dict(full, cgroup=None)
    # the defaults put back are fresh objects, never shared between messages
    a = messages.with_run_defaults({"op": "run_task"})
    b = messages.with_run_defaults({"op": "run_task"})
    assert a["deps"] == [] and a["res"] == {} and a["deps"] is not b["deps"] \
        and a["res"] is not b["res"]


def test_values_other_than_the_defaults_travel():
    odd = {"op": "run_task", "tid": b"t" * 16, "args_dep": 0, "deps": [{"oid": b"o" * 16}],
           "nret": 2, "res": {}, "retry_exc": True, "attempt": 2, "cgroup": "io"}
    lean = messages.lean_run_task(dict(odd))
    assert set(lean) == set(odd) - {"res"}  # (True is not the default False, 0 not None)
    assert messages.with_run_defaults(_wire(lean)) == odd
    # an actor call written straight to its actor
    spec = {"tid": b"t" * 16, "actor": b"a" * 16, "method": "m", "name": "A.m",
            "args": b"x", "nret": 1}
    call = messages.direct_call(spec, [], "c1")
    assert not set(messages.RUN_TASK_DEFAULTS) & set(call)
    got = messages.with_run_defaults(_wire(call))
    assert got["deps"] == [] and got["nret"] == 1 and got["attempt"] == 1 \
        and got["args_dep"] is None and got["cgroup"] is None and got["owner"] == "c1"
    call = messages.direct_call(dict(spec, nret=3, args_dep=0, cgroup="g"),
                                [{"oid": b"o" * 16}], "c1")
    got = messages.with_run_defaults(_wire(call))
    assert got["nret"] == 3 and got["args_dep"] == 0 and got["cgroup"] == "g" \
        and got["deps"] == [{"oid": b"o" * 16}]
