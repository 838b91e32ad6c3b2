"""The wire schema: every message flowcore's processes exchange, in one place.

A message is a msgpack map ``{"op": NAME, ...}``.  This module declares, for
each op, who receives it, which roles may send it, its keys and what it means
(``SCHEMA``); the per-role op tables every receiver dispatches through are
derived from it (``ops_for``), and so is the message list of
docs/architecture.md (``markdown``; ``python -m flowcore.protocol.messages``
prints it, a test compares).

The builders below make the hot messages.  They are plain functions
returning dicts with fixed keys: measured, one costs the same as a dict
literal, while a slotted frozen dataclass turned into the dict msgpack writes
costs about 3.5 times that and ``dataclasses.asdict`` about 30 times; the
receivers read dicts anyway (docs/architecture.md, *Messages*).

One meaning per key: a call an actor's caller sends straight to the actor
carries ``direct_epoch`` in its submission to the head (the actor's restart
count when the caller looked it up); the actor's ``task_done`` for it carries
``answered_direct`` (the caller already has the inline returns); the
``object_ready`` entries a caller makes from the actor's answer carry
``via_direct``; and a call read from a caller's connection carries
``reply_conn`` (the connection to answer on) inside the actor's process,
never on the wire.
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple

logger = logging.getLogger("flowcore.protocol")

# ------------------------------------------------------------------ roles
#: receivers (one op table each) and the roles that may send to them
HEAD = "head"          # the scheduler process, from nodes, drivers and workers
NODE = "node"          # a node: from its head, and on its port from local clients
CLIENT = "client"      # a driver or worker process, from the head and its node
ACTOR = "actor"        # an actor's process, on its listener, from callers
CALLER = "caller"      # a caller, on its connection to an actor, from the actor

DRIVER = "driver"
WORKER = "worker"
PEER = "peer"          # a connection on a node's port that did not register (another node)

CLIENTS = (DRIVER, WORKER)


class Op(NamedTuple):
    name: str
    to: str                   # the receiver
    senders: tuple[str, ...]  # roles allowed to send it there
    keys: str                 # its keys besides op (``?`` marks optional ones)
    doc: str


def _ops(*rows: tuple) -> dict[tuple[str, str], Op]:
    table: dict[tuple[str, str], Op] = {}
    for name, to, senders, keys, doc in rows:
        senders = (senders,) if isinstance(senders, str) else tuple(senders)
        key = (to, name)
        if key in table:  # pragma: no cover - a mistake in the table below
            raise ValueError(f"op {name!r} to {to} declared twice")
        table[key] = Op(name, to, senders, keys, doc)
    return table


_Q = "rid"  # requests carry a reply id; the answer is a ``reply`` with it
_ALL = (DRIVER, WORKER, "node")

#: every op, by (receiver, name)
SCHEMA: dict[tuple[str, str], Op] = _ops(
    # ---------------------------------------------------------- to the head
    ("register_node", HEAD, "node", "rid node_id address name resources labels version ...",
     "a node joins (its first message)"),
    ("heartbeat", HEAD, "node", "stats", "a node is alive; its store and pool figures"),
    ("node_warning", HEAD, "node", "text", "a node's warning, forwarded to every driver"),
    ("node_leaving", HEAD, "node", "", "a node stops on purpose (its connection closes next)"),
    ("worker_died", HEAD, "node", "tid how pid", "the worker running ``tid`` exited"),
    ("lease_lost", HEAD, "node", "wid how pid",
     "a leased worker exited: the tasks its lease holder sent it are retried or fail"),
    ("local_verdict", HEAD, "node", "tid started",
     "whether a task offered to the node (local-first) was started there"),
    ("object_location", HEAD, "node", "oid node add", "a node now holds a copy of ``oid``"),
    ("actor_died", HEAD, "node", "aid how pid", "an actor's process exited"),
    ("register_client", HEAD, CLIENTS, "rid kind pid ...",
     "a driver or worker joins (its first message)"),
    ("register_function", HEAD, CLIENTS, "fid blob name", "a pickled function, once per client"),
    ("get_function", HEAD, CLIENTS, "rid fid", "a worker fetches a function by hash"),
    ("submit", HEAD, CLIENTS, "tasks",
     "task specs (see ``task_spec``); a call sent to the actor directly has ``direct_epoch``"),
    ("put", HEAD, CLIENTS, "oid size nested inline|node", "a client made an object"),
    ("incref", HEAD, CLIENTS, "oids", "the client holds references"),
    ("decref", HEAD, CLIENTS, "oids", "the client dropped references"),
    ("subscribe", HEAD, CLIENTS, "oids ack?", "send ``object_ready`` for these objects"),
    ("cancel", HEAD, CLIENTS, "oid force recursive", "cancel the task making ``oid``"),
    ("log", HEAD, WORKER, "lines stream name tid pid", "a worker's output, for the drivers"),
    ("task_done", HEAD, (WORKER, "node"),
     "tid status results retryable pid? wid? started? error_text? local? answered_direct?",
     "a task ended (from its worker; from the node when it never started)"),
    ("lease_unrun", HEAD, CLIENTS, "tids",
     "tasks a leased worker refused (its lease had ended), or queued at their owner with "
     "no lease left to run them: the head places them"),
    ("lease_start", HEAD, CLIENTS, "lease tids busy?",
     "tasks queued at their owner were sent to leased worker ``lease`` ([node, worker])"),
    ("task_blocked", HEAD, WORKER, "tid", "a running task waits in get (its CPU goes back)"),
    ("task_unblocked", HEAD, WORKER, "tid", "the waiting task runs again"),
    ("task_yield", HEAD, WORKER, "tid result push", "a generator task yielded a value"),
    ("actor_ready", HEAD, WORKER, "aid pid direct_port? ...", "an actor's constructor returned"),
    ("actor_failed", HEAD, (WORKER, "node"), "aid error payload", "an actor could not start"),
    ("actor_exit", HEAD, WORKER, "aid cause", "an actor exits on purpose"),
    ("create_actor", HEAD, CLIENTS, "rid aid ...", "make an actor"),
    ("kill_actor", HEAD, CLIENTS, "aid no_restart?", "kill an actor"),
    ("actor_direct", HEAD, CLIENTS, "rid aid", "where an actor listens for direct calls"),
    ("create_placement_group", HEAD, CLIENTS, "rid pgid bundles strategy ...",
     "reserve bundles"),
    ("remove_placement_group", HEAD, CLIENTS, "rid pgid", "release a placement group"),
    ("has_package", HEAD, CLIENTS, "rid hash", "is a runtime_env archive known"),
    ("upload_package", HEAD, CLIENTS, "rid hash blob", "store a runtime_env archive"),
    ("get_package", HEAD, _ALL, "rid hash", "fetch a runtime_env archive"),
    ("shutdown_cluster", HEAD, CLIENTS, "rid", "stop the head and its nodes"),
    ("kv_put", HEAD, CLIENTS, "rid? ns key value overwrite?", "internal_kv: store a value"),
    ("kv_get", HEAD, CLIENTS, "rid ns key", "internal_kv: read a value"),
    ("kv_exists", HEAD, CLIENTS, "rid ns key", "internal_kv: is a key there"),
    ("kv_del", HEAD, CLIENTS, "rid? ns key by_prefix?", "internal_kv: delete a key (or a prefix)"),
    ("kv_list", HEAD, CLIENTS, "rid ns key", "internal_kv: the keys under a prefix"),
    # queries: answered at once with ``result``
    ("explain", HEAD, _ALL, "rid oid", "query: why an object is not ready"),
    ("cluster_resources", HEAD, _ALL, "rid", "query: total resources"),
    ("available_resources", HEAD, _ALL, "rid", "query: free resources"),
    ("list_nodes", HEAD, _ALL, "rid", "query: the nodes"),
    ("list_tasks", HEAD, _ALL, "rid state? limit?", "query: tasks"),
    ("list_objects", HEAD, _ALL, "rid limit?", "query: objects"),
    ("task_info", HEAD, _ALL, "rid tid", "query: one task"),
    ("event_log", HEAD, _ALL, "rid n?", "query: the task event log"),
    ("counts", HEAD, _ALL, "rid", "query: counters"),
    ("list_actors", HEAD, _ALL, "rid state?", "query: actors"),
    ("get_actor", HEAD, _ALL, "rid name namespace?", "query: a named actor"),
    ("graph", HEAD, _ALL, "rid roots? limit?", "query: the futures DAG (``visualize()``)"),
    ("history", HEAD, _ALL, "rid", "query: finished tasks (``timeline()``)"),
    ("list_placement_groups", HEAD, _ALL, "rid state?", "query: placement groups"),
    ("get_placement_group", HEAD, _ALL, "rid name? pgid?", "query: a placement group"),
    ("list_packages", HEAD, _ALL, "rid", "query: runtime_env archives"),
    # ---------------------------------------------------------- to a node
    ("run_task", NODE, HEAD, "task spec + deps attempt owner ...", "run a task (or actor call)"),
    ("start_actor", NODE, HEAD, "aid ...", "start a process for an actor"),
    ("kill_actor", NODE, HEAD, "aid", "kill an actor's process"),
    ("cancel_task", NODE, HEAD, "tid force local? lease?",
     "cancel a queued or running task (``lease``: the leased worker it was sent to)"),
    ("delete_objects", NODE, HEAD, "oids", "free store objects"),
    ("prefetch", NODE, (HEAD, DRIVER, WORKER), "objects", "pull copies of objects"),
    ("local_query", NODE, HEAD, "tids", "repeat the verdicts of local-first offers"),
    ("reserve_bundle", NODE, HEAD, "bundle res", "hold a placement group bundle"),
    ("release_bundle", NODE, HEAD, "bundle", "free a placement group bundle"),
    ("lease_reclaim", NODE, HEAD, "",
     "work waits at the head for room this node's leased workers hold: ask the leases back"),
    ("shutdown", NODE, HEAD, "", "stop the node"),
    ("register_client", NODE, PEER, "rid pid", "a driver joins its node (then role driver)"),
    ("register_worker", NODE, PEER, "rid wid pid", "a worker joins its node (then role worker)"),
    ("create", NODE, CLIENTS, "rid oid size", "allocate a store object"),
    ("write_chunk", NODE, CLIENTS, "rid oid start", "fill an object (client mode)"),
    ("seal", NODE, CLIENTS, "oid pin?",
     "the object is written (``pin``: and pinned for the writer, a held pin)"),
    ("abort", NODE, CLIENTS, "oid", "drop an object being written"),
    ("pin", NODE, CLIENTS, "rid oid cache? sources? size?",
     "map an object for reading (``cache``: the reader holds the pin between its gets "
     "and gives it back when asked)"),
    ("unpin", NODE, CLIENTS, "oids", "done reading"),
    ("submit_local", NODE, CLIENTS, "task", "local-first: start a task here if it fits"),
    ("worker_idle", NODE, WORKER, "tid retire?",
     "the worker finished its task (or, ``tid`` a lease id, its lease's tasks)"),
    ("lease_request", NODE, CLIENTS, "rid res env? spill?",
     "a client asks for an idle worker for tasks of shape ``res`` (the reply: ``lease`` "
     "``address`` ``wid``, or none: ``starting`` when it has room but no idle worker yet; "
     "with ``spill``, a shape this node cannot fit is answered ``try`` [node, address], "
     "a node the head's view says can)"),
    ("lease_return", NODE, CLIENTS, "lease idle?",
     "the holder gives a lease back (``idle``: every task sent on it was answered: the "
     "worker goes back to the pool now)"),
    ("lease_listening", NODE, WORKER, "lease port", "a leased worker listens for its holder"),
    ("worker_blocked", NODE, WORKER, "blocked", "the worker's task waits (or runs again)"),
    ("fetch_chunk", NODE, (PEER, DRIVER, WORKER), "rid oid start size", "read part of an object"),
    ("bulk_port", NODE, (PEER, DRIVER, WORKER), "rid", "the port of the bulk transfer socket"),
    ("stats", NODE, (PEER, DRIVER, WORKER), "rid", "store, pool and transfer figures"),
    # ---------------------------------------------------------- to a client
    ("object_ready", CLIENT, HEAD, "oid size error inline|nodes addrs? nested? via_direct?",
     "an object is ready (inline value, or the nodes holding it)"),
    ("subscribed", CLIENT, HEAD, "ack pending", "how many subscribed objects are still pending"),
    ("warning", CLIENT, HEAD, "text", "a warning for the user"),
    ("lease_cancel", CLIENT, HEAD, "tid",
     "a task queued at this owner for a leased worker was cancelled: drop it unsent"),
    ("lease_spill", CLIENT, HEAD, "tids",
     "tasks queued at this owner that another node has room for: hand back those not sent "
     "yet (``lease_unrun``)"),
    ("log", CLIENT, HEAD, "lines stream name pid", "a worker's output"),
    ("run_task", CLIENT, (HEAD, NODE), "task spec + deps ...",
     "run a task (from the node) or an actor call (from the head or the node)"),
    ("create_actor", CLIENT, NODE, "aid ...", "construct the actor this worker hosts"),
    ("cancel", CLIENT, NODE, "tid", "cancel the running (or queued) task"),
    ("exit", CLIENT, NODE, "", "the worker exits"),
    ("lease_open", CLIENT, NODE, "lease", "this worker is leased: listen for the holder"),
    ("lease_end", CLIENT, NODE, "lease",
     "the lease ended: run what was sent, then tell the node (``worker_idle``)"),
    ("lease_revoke", CLIENT, NODE, "lease", "give this lease back once its tasks are done"),
    ("release_cached", CLIENT, NODE, "rid oids",
     "give back the held pins of these objects (now, or as their last view goes)"),
    # ---------------------------------------------------------- direct calls
    ("run_task", ACTOR, CALLER,
     "tid actor|lease method|fid name args owner args_dep? deps? nret? res? retry_exc? "
     "attempt? cgroup? fblob? ...",
     "an actor call sent straight to the actor's process, or a task to a leased worker "
     "(a key at its default is left out: ``RUN_TASK_DEFAULTS``)"),
    ("call_result", CALLER, ACTOR, "tid actor results", "the actor's inline returns"),
    ("lease_refused", CALLER, ACTOR, "tid lease",
     "a leased worker no longer holds that lease: the task was not run"),
    ("lease_end", ACTOR, CALLER, "lease",
     "the holder's task ended: after the tasks sent before this, the lease ends (the worker "
     "tells its node, ``worker_idle``)"),
    ("lease_handback", CALLER, ACTOR, "tids lease",
     "a leased worker's running task blocks in get: the tasks queued behind it there are "
     "not run (the holder has the head place them)"),
)


#: the keys of a task spec (the entries of ``submit``'s ``tasks``; the head
#: adds deps' readiness, ``attempt`` and ``owner`` when it sends ``run_task``)
TASK_SPEC: dict[str, str] = {
    "tid": "task id (16 bytes)",
    "fid": "function hash (empty for an actor call)",
    "name": "the task's name",
    "nret": "number of returns (0 with xopts.stream: a generator)",
    "res": "resources it takes while running",
    "deps": "object ids it waits for",
    "args": "serialized arguments, or None when they travel as the last dep",
    "args_dep": "index in deps of the stored arguments (absent when inline)",
    "retries": "retries left for system failures (None: the actor's max_task_retries)",
    "retry_exc": "which application errors are retried",
    "strategy?": "scheduling strategy (node affinity, spread, placement group bundle)",
    "job?": "the submitting job",
    "xopts?": "extra options: max_calls, stream",
    "renv?": "runtime_env descriptor",
    "local?": "offered to the submitter's node first (local-first)",
    "actor?": "an actor call: the actor's id (with method, cgroup?)",
    "direct_epoch?": "an actor call also sent to the actor directly: its restart count then",
    "lease?": "[node id, worker id, busy?]: sent by its submitter to a worker leased from that "
              "node (``busy``: tasks ahead of it there)",
    "lease_q?": "node id: queued at its submitter for a worker it leases from that node "
                "(``lease_start`` follows when it is sent)",
    "kind?": "create (an actor's constructor: aid, class_name, methods, ...) or absent",
}


def ops_for(receiver: str, role: str) -> frozenset[str]:
    """The ops ``receiver`` takes from a peer of ``role``."""
    return frozenset(op.name for (to, _), op in SCHEMA.items()
                     if to == receiver and role in op.senders)


def refuse(where: str, role: str, op: Any, peer: Any) -> None:
    """Log a message refused because its op is not in the sender's role table
    (the connection stays up)."""
    logger.warning("%s: refused op %r from %s %s: not an op a %s may send", where, op, role,
                   peer, role)


def markdown() -> str:
    """The message list of docs/architecture.md, generated from ``SCHEMA``."""
    names = {HEAD: "To the head", NODE: "To a node", CLIENT: "To a client (driver or worker)",
             ACTOR: "To an actor's process (its listener)", CALLER: "To a direct caller"}
    out = ["**Task spec** (an entry of `submit`'s `tasks`)\n", "| key | meaning |", "|---|---|"]
    out += [f"| `{k}` | {v} |" for k, v in TASK_SPEC.items()]
    out.append("")
    for to in (HEAD, NODE, CLIENT, ACTOR, CALLER):
        out.append(f"**{names[to]}**\n")
        out.append("| op | from | keys | meaning |")
        out.append("|---|---|---|---|")
        for (dest, _), op in SCHEMA.items():
            if dest == to:
                keys = op.keys.replace("|", " or ")
                out.append(f"| `{op.name}` | {', '.join(op.senders)} | {keys} | {op.doc} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


BEGIN = "<!-- messages: generated by `python -m flowcore.protocol.messages`, do not edit -->"
END = "<!-- end of messages -->"


def docs_section(text: str) -> str:
    """The generated part of docs/architecture.md in ``text``."""
    start = text.index(BEGIN) + len(BEGIN)
    return text[start:text.index(END, start)].strip("\n") + "\n"


# ------------------------------------------------------------------ builders
def object_ready_inline(oid: bytes, data: bytes, error: bool = False,
                        nested: bool = False) -> dict:
    """An object whose value travels in the message."""
    return {"op": "object_ready", "oid": oid, "inline": data, "size": len(data),
            "error": error, "nested": nested}


def object_ready_stored(oid: bytes, nodes: list[str], size: int, nested: bool = False) -> dict:
    """An object in the stores of ``nodes``."""
    return {"op": "object_ready", "oid": oid, "nodes": nodes, "size": size, "error": False,
            "nested": nested}


def object_ready_direct(r: dict) -> dict:
    """An inline return read from an actor's direct answer (``call_result``)."""
    return {"op": "object_ready", "oid": r["oid"], "inline": r["inline"],
            "size": r.get("size", len(r["inline"])), "error": bool(r.get("error")),
            "via_direct": True, "nested": bool(r.get("nested"))}


def run_task(task: dict) -> dict:
    """The ``run_task`` a node sends its worker: the task as the node holds it."""
    msg = dict(task)
    msg["op"] = "run_task"
    return msg


#: marks a default that is an empty list (``deps``) or dict (``res``)
EMPTY = ()
#: the keys a direct ``run_task`` (caller to actor, holder to leased worker)
#: leaves out when they hold these values; the receiver puts them back
#: (``with_run_defaults``).  For calls one after another the encoding of
#: these constants was a good part of the message's cost
RUN_TASK_DEFAULTS: dict[str, Any] = {
    "args_dep": None, "deps": EMPTY, "nret": 1, "res": EMPTY, "retry_exc": False,
    "attempt": 1, "cgroup": None}
_EMPTY_OF = {"deps": list, "res": dict}


def lean_run_task(msg: dict) -> dict:
    """Drop from a direct ``run_task`` (in place) the keys holding their
    default (``RUN_TASK_DEFAULTS``); returns it."""
    for key, default in RUN_TASK_DEFAULTS.items():
        if key not in msg:
            continue
        v = msg[key]
        if default is EMPTY:
            drop = isinstance(v, (list, tuple, dict)) and not v
        else:
            drop = v is default or (type(v) is type(default) and v == default)
        if drop:
            del msg[key]
    return msg


def with_run_defaults(msg: dict) -> dict:
    """A direct ``run_task`` as received, with the keys the sender left out
    (``lean_run_task``) put back; returns it (changed in place)."""
    for key, default in RUN_TASK_DEFAULTS.items():
        if key not in msg:
            msg[key] = _EMPTY_OF[key]() if default is EMPTY else default
    return msg


def direct_call(spec: dict, deps: list[dict], owner: str) -> dict:
    """The ``run_task`` a caller sends straight to an actor's process (the
    keys at their defaults left out: see ``RUN_TASK_DEFAULTS``)."""
    msg = {"op": "run_task", "tid": spec["tid"], "actor": spec["actor"],
           "method": spec["method"], "name": spec.get("name", "?"),
           "args": spec.get("args"), "owner": owner}
    if deps:
        msg["deps"] = deps
    if spec.get("args_dep") is not None:
        msg["args_dep"] = spec["args_dep"]
    nret = spec.get("nret", 1)
    if nret != 1:
        msg["nret"] = nret
    if spec.get("cgroup") is not None:
        msg["cgroup"] = spec["cgroup"]
    return msg


#: a value up to this size (serialized) travels inline in messages; a larger
#: one goes to the object store
INLINE_MAX = 100 * 1024


def answered_directly(r: dict) -> bool:
    """Whether a return goes back in a direct answer: inline, and holding
    no ref.  A value with refs inside is announced by the head once it knows
    them (their puts and submissions travel on the worker's head connection),
    so the caller's incref of an inner ref never reaches the head first."""
    return r.get("inline") is not None and not r.get("nested")


def direct_answer(task: dict, results: list[dict]) -> dict:
    """The direct answer to a call or leased task: its inline returns without
    refs inside (the others are announced by the head)."""
    return call_result(task, [r for r in results if answered_directly(r)])


def mark_sent(results: list[dict]) -> list[dict]:
    """The returns as reported to the head: those in the direct answer marked
    as already delivered to the caller (the head does not send them again)."""
    return [dict(r, sent=True) if answered_directly(r) else r for r in results]


def call_result(task: dict, results: list[dict]) -> dict:
    """The actor's direct answer to a call: its inline returns."""
    return {"op": "call_result", "tid": task["tid"], "actor": task.get("actor"),
            "results": [{"oid": r["oid"], "inline": r["inline"], "size": r.get("size"),
                         "error": bool(r.get("error")), "nested": bool(r.get("nested"))}
                        for r in results if r.get("inline") is not None]}


def task_done(tid: bytes, status: str, results: list, retryable: bool, **extra: Any) -> dict:
    """A task's end, for the head (``extra``: pid, wid, started, error_text,
    local, answered_direct)."""
    msg = {"op": "task_done", "tid": tid, "status": status, "results": results,
           "retryable": retryable}
    if extra:
        msg.update(extra)
    return msg


def submit(*specs: dict) -> dict:
    return {"op": "submit", "tasks": list(specs)}


def put_inline(oid: bytes, data: bytes, nested: list) -> dict:
    return {"op": "put", "oid": oid, "inline": data, "size": len(data), "nested": nested}


def put_stored(oid: bytes, node: str | None, size: int, nested: list) -> dict:
    return {"op": "put", "oid": oid, "node": node, "size": size, "nested": nested}


def worker_idle(tid: bytes, retire: bool = False) -> dict:
    msg: dict[str, Any] = {"op": "worker_idle", "tid": tid}
    if retire:
        msg["retire"] = True
    return msg


def local_verdict(tid: bytes, started: bool) -> dict:
    return {"op": "local_verdict", "tid": tid, "started": started}


def worker_died(tid: bytes, how: str, pid: int) -> dict:
    return {"op": "worker_died", "tid": tid, "how": how, "pid": pid}


def cancel(tid: bytes) -> dict:
    """Node to worker: cancel ``tid``."""
    return {"op": "cancel", "tid": tid}


def cancel_object(oid: bytes, force: bool, recursive: bool) -> dict:
    """Client to head: cancel the task making ``oid``."""
    return {"op": "cancel", "oid": oid, "force": force, "recursive": recursive}


def oids(op: str, oids: list) -> dict:
    """``incref``, ``decref``, ``unpin`` or ``subscribe``: a list of object ids."""
    return {"op": op, "oids": oids}


def oid_op(op: str, oid: bytes) -> dict:
    """``seal``, ``abort`` or ``pin``: one object id."""
    return {"op": op, "oid": oid}


def create(oid: bytes, size: int) -> dict:
    return {"op": "create", "oid": oid, "size": size}


def heartbeat(stats: dict) -> dict:
    return {"op": "heartbeat", "stats": stats}


def node_warning(text: str) -> dict:
    return {"op": "node_warning", "text": text}


def actor_failed(aid: bytes, error: str, payload: bytes) -> dict:
    return {"op": "actor_failed", "aid": aid, "error": error, "payload": payload}


def actor_died(aid: bytes, how: str, pid: int) -> dict:
    return {"op": "actor_died", "aid": aid, "how": how, "pid": pid}


def actor_ready(aid: bytes, pid: int, direct_port: int | None) -> dict:
    msg: dict[str, Any] = {"op": "actor_ready", "aid": aid, "pid": pid}
    if direct_port is not None:
        msg["direct_port"] = direct_port
    return msg


def actor_exit(aid: bytes | None, cause: str) -> dict:
    return {"op": "actor_exit", "aid": aid, "cause": cause}


def task_yield(tid: bytes, result: dict, push: bool) -> dict:
    return {"op": "task_yield", "tid": tid, "result": result, "push": push}


def object_location(oid: bytes, node: str) -> dict:
    return {"op": "object_location", "oid": oid, "node": node, "add": True}


def register_function(fid: bytes, blob: bytes, name: str) -> dict:
    return {"op": "register_function", "fid": fid, "blob": blob, "name": name}


def worker_blocked(blocked: bool) -> dict:
    return {"op": "worker_blocked", "blocked": blocked}


def submit_local(task: dict) -> dict:
    return {"op": "submit_local", "task": task}


def exit_worker() -> dict:
    return {"op": "exit"}


def create_actor_in_worker(spec: dict) -> dict:
    """Node to the worker hosting an actor: its ``start_actor`` spec."""
    msg = dict(spec)
    msg["op"] = "create_actor"
    return msg


# ------------------------------------------------------------------ the head's builders
def reply(rid: Any, **fields: Any) -> dict:
    """The answer to a request (``rid``: the request's reply id)."""
    return {"op": "reply", "rid": rid, **fields}


def object_ready(oid: bytes, size: int, error: bool, inline: bytes | None = None,
                 nodes: list[str] | None = None, addrs: list[str] | None = None) -> dict:
    """Head to client: ``oid`` is ready, its value inline, or in the stores of
    ``nodes`` (at ``addrs``)."""
    msg: dict[str, Any] = {"op": "object_ready", "oid": oid, "size": size, "error": error}
    if inline is not None:
        msg["inline"] = inline
    else:
        msg["nodes"] = nodes
        if addrs is not None:
            msg["addrs"] = addrs
    return msg


def object_error(oid: bytes, payload: bytes) -> dict:
    """Head to client: ``oid``'s value is the error ``payload``."""
    return {"op": "object_ready", "oid": oid, "size": len(payload), "error": True,
            "inline": payload}


def subscribed(ack: Any, pending: int) -> dict:
    return {"op": "subscribed", "ack": ack, "pending": pending}


def warning(text: str) -> dict:
    return {"op": "warning", "text": text}


def head_run_task(tid: bytes, fid: bytes, name: str, args: bytes | None,
                  args_dep: int | None, deps: list[dict], nret: int, res: dict,
                  retry_exc: Any, owner: str, attempt: int, bundle: str | None = None,
                  pg_capture: bytes | None = None, renv: dict | None = None,
                  job: list | None = None, xopts: dict | None = None) -> dict:
    """Head to node: run a task (``deps``: the readiness of its arguments)."""
    msg = {"op": "run_task", "tid": tid, "fid": fid, "name": name, "args": args,
           "args_dep": args_dep, "deps": deps, "nret": nret, "res": res,
           "retry_exc": retry_exc, "owner": owner, "attempt": attempt}
    if bundle:
        msg["bundle"] = bundle
        if pg_capture is not None:
            msg["pg_capture"] = pg_capture
    if renv is not None:
        msg["renv"] = renv
    if job is not None:
        msg["job"] = job
    if xopts is not None:
        msg["xopts"] = xopts
    return msg


def actor_call(tid: bytes, aid: bytes, method: str | None, name: str, args: bytes | None,
               args_dep: int | None, deps: list[dict], nret: int, owner: str, attempt: int,
               bundle: str | None, retry_exc: Any, cgroup: str | None,
               xopts: dict | None) -> dict:
    """Head to an actor's process (or its node): run a call."""
    return {"op": "run_task", "tid": tid, "actor": aid, "method": method, "name": name,
            "args": args, "args_dep": args_dep, "deps": deps, "nret": nret, "res": {},
            "owner": owner, "attempt": attempt, "bundle": bundle, "retry_exc": retry_exc,
            "cgroup": cgroup, "xopts": xopts}


def start_actor(aid: bytes, tid: bytes, fid: bytes, name: str, args: bytes | None,
                args_dep: int | None, deps: list[dict], hold: dict,
                max_concurrency: int | None, is_async: bool, restart: int,
                bundle: str | None, renv: dict | None, job: list | None,
                actor_name: str | None, concurrency_groups: dict) -> dict:
    """Head to node: start a process for an actor (``restart``: how many
    times it restarted before)."""
    return {"op": "start_actor", "aid": aid, "tid": tid, "fid": fid, "name": name,
            "args": args, "args_dep": args_dep, "deps": deps, "hold": hold,
            "max_concurrency": max_concurrency, "is_async": is_async, "restart": restart,
            "bundle": bundle, "renv": renv, "job": job, "actor_name": actor_name,
            "concurrency_groups": concurrency_groups}


def kill_actor(aid: bytes) -> dict:
    """Head to node: kill an actor's process."""
    return {"op": "kill_actor", "aid": aid}


def cancel_task(tid: bytes, force: bool, local: bool = False, lease: Any = None) -> dict:
    """Head to node: cancel a task (``local``: one offered to it local-first;
    ``lease``: the leased worker it was sent to)."""
    msg: dict[str, Any] = {"op": "cancel_task", "tid": tid, "force": force}
    if local:
        msg["local"] = True
    if lease is not None:
        msg["lease"] = lease
    return msg


def delete_objects(oids: list[bytes]) -> dict:
    return {"op": "delete_objects", "oids": oids}


def prefetch(objects: list) -> dict:
    """Pull copies: ``[oid, size, [[node id, address], ...]]`` per object."""
    return {"op": "prefetch", "objects": objects}


def local_query(tids: list[bytes]) -> dict:
    return {"op": "local_query", "tids": tids}


def reserve_bundle(bundle: str, res: dict[str, float]) -> dict:
    return {"op": "reserve_bundle", "bundle": bundle, "res": res}


def release_bundle(bundle: str) -> dict:
    return {"op": "release_bundle", "bundle": bundle}


def write_docs(path: str) -> None:
    """Replace the generated message list in the markdown file at ``path``."""
    with open(path) as f:
        text = f.read()
    start = text.index(BEGIN) + len(BEGIN)
    end = text.index(END, start)
    with open(path, "w") as f:
        f.write(text[:start] + "\n" + markdown() + text[end:])


if __name__ == "__main__":  # pragma: no cover
    import sys
    if len(sys.argv) > 2 and sys.argv[1] == "--write":
        write_docs(sys.argv[2])  # python -m flowcore.protocol.messages --write docs/architecture.md
    else:
        print(markdown(), end="")
