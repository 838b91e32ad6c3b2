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
