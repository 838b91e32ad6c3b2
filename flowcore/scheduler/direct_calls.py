"""Direct actor calls: a component of the head's state machine (``DirectCalls``).

An actor's process listens for callers (``direct_port`` in ``actor_ready``).
A caller that holds a connection to it sends a call two ways at once: to
the actor itself, and to the head as a submission marked ``direct_epoch=<epoch>``
(the actor's restart count when the caller looked it up).  The head
records the call like any other (the DAG, references, lineage, event log)
but does not dispatch it: it is RUNNING on the actor at once.  The actor
answers the caller straight away and reports ``task_done`` to the head as
for any call.

Ordering: a caller sends a call directly only while none of its calls to
that actor goes through the head; and the head holds back the calls a
caller sends through it while one of that caller's direct calls to the
actor is unfinished.  Calls from one caller therefore start in submission
order whichever way each one travels.

The submission and the actor's ``task_done`` travel on different
connections, so a ``task_done`` may come first: it waits in a bounded table
until its submission comes.  A submission for an actor that restarted (or
is restarting) since the caller looked it up fails with ``ActorError``:
the old process may or may not have run it, so it is not run again.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

from ..exceptions import ActorError
from ..protocol import messages as wire
from .records import TaskRecord

if TYPE_CHECKING:  # pragma: no cover
    from .actors import ActorRecord
    from .machine import SchedulerState

EARLY_LIMIT = 10_000  # task_done messages held for direct submissions not yet seen


class DirectCalls:
    """Owns the ``task_done`` reports that came before their submission."""

    def __init__(self, state: "SchedulerState"):
        self.s = state
        self.early: OrderedDict[bytes, tuple[str, dict]] = OrderedDict()

    def ops(self) -> dict[str, Callable[[str, dict], None]]:
        return {"actor_direct": self.handle_actor_direct}

    def handle_actor_direct(self, source: str, msg: dict) -> None:
        """A caller asks where to send calls to an actor directly.  No address
        while the actor is not alive, is being killed, retries calls
        (``max_task_retries``: those go through the head), or does not listen."""
        actor = self.s.actors.get(msg["aid"])
        reply = wire.reply(msg.get("rid"), address=None)
        if actor is not None and actor.state == "ALIVE" and not actor.killing \
                and actor.direct_port and actor.max_task_retries == 0:
            node = self.s.nodes.get(actor.node or "")
            if node is not None and node.alive:
                host = _host_of(node.address)
                reply.update(address=f"tcp://{host}:{actor.direct_port}",
                             epoch=actor.restarts, node=actor.node)
        self.s._send(source, reply)

    def start(self, t: TaskRecord, epoch: int) -> None:
        """``t`` (already registered with its actor) was sent to the actor by
        its caller: it is running there now."""
        s = self.s
        actor: "ActorRecord" = s.actors[t.actor or b""]
        q = actor.queues.get(t.owner)
        if q and q[-1] == t.tid:
            q.pop()  # not dispatched by the head
        if actor.state != "ALIVE" or actor.restarts != epoch:
            s.failures.fail_task(t, s.error_payload(ActorError(
                f"actor {actor.class_name} restarted while the call {t.name} was on its way "
                f"to it ({actor.cause or 'its process exited'}); the call is not retried "
                f"(max_task_retries=0)")), "actor restarted before a direct call was recorded")
            old = self.early.pop(t.tid, None)  # the old process's report, if any
            if old is not None:
                self.s._release_early(old[1])
            return
        t.missing.clear()  # the caller had every argument; the actor reads them itself
        actor.direct.setdefault(t.owner, set()).add(t.tid)
        s.counts["direct_calls"] = s.counts.get("direct_calls", 0) + 1
        s.tx.start_call(t, actor, f"called directly by its caller on actor {actor.class_name}")
        done = self.early.pop(t.tid, None)
        if done is not None:
            s.handle_task_done(*done)
            s._release_early(done[1])

    def early_done(self, source: str, msg: dict) -> None:
        """A ``task_done`` of a direct call whose submission has not arrived."""
        if msg.get("answered_direct") and msg["tid"] not in self.s.tasks:
            self.s._hold_early(msg)
            self.early[msg["tid"]] = (source, msg)
            while len(self.early) > EARLY_LIMIT:
                self.s._release_early(self.early.popitem(last=False)[1][1])

    @staticmethod
    def call_done(actor: "ActorRecord", t: TaskRecord) -> bool:
        """Forget a finished direct call; True when it was its caller's last
        one (calls that caller sent through the head may go now)."""
        mine = actor.direct.get(t.owner)
        if not mine or t.tid not in mine:
            return False
        mine.discard(t.tid)
        if not mine:
            del actor.direct[t.owner]
            return True
        return False


def _host_of(address: str) -> str:
    rest = address.split("://", 1)[-1]
    return rest.rsplit(":", 1)[0] if ":" in rest else rest
