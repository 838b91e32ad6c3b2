"""Direct actor calls, the caller's side: which calls go straight to the actor.

A client keeps one ``ActorLink`` per actor it calls.  Once the head has told
it where the actor's process listens (``actor_direct``) and a connection is
open, a call goes directly to the actor when:

* every argument is ready in this client's cache (inline, or in a store the
  actor's node can pull from) and none of them failed;
* no ref is nested in the arguments, in this client's own puts among them or
  in values answered directly by an actor: the actor would look such a ref
  up at the head, which may not have its submission yet (it travels on
  another connection), and the call through the head holds it from
  submission until the call has finished;
* none of this client's calls to that actor that went through the head is
  unfinished (so direct calls never overtake them), and none was dropped
  unfinished (then the head path is kept for that actor: its end would not
  be seen here);
* the connection is open.

Otherwise the call goes through the head as before.  A direct call is also
submitted to the head (marked ``direct_epoch``), which records it without
dispatching it.  The routing decision here does no IO.
"""
from __future__ import annotations

import os
import time
from .. import ids
from ..protocol import messages

#: FLOWCORE_DIRECT_ACTOR_CALLS=0 sends every actor call through the head
ENABLED = os.environ.get("FLOWCORE_DIRECT_ACTOR_CALLS", "1") not in ("0", "")
#: seconds before asking the head again about an actor with no direct address
LOOKUP_RETRY = 0.05


class ActorLink:
    """What one client knows about calling one actor directly."""

    def __init__(self, aid: bytes):
        self.aid = aid
        self.key = "actor:" + aid.hex()   # the outbox destination of direct calls
        self.address: str | None = None
        self.epoch = -1                  # the actor's restart count at lookup
        self.node: str | None = None     # the actor's node
        self.open = False                # a connection is up
        self.looking = False
        self.next_lookup = 0.0
        self.head_calls: set[bytes] = set()        # tids routed through the head, unfinished
        self.sticky = False              # a head-routed call was dropped unfinished
        self.inflight: dict[bytes, int] = {}       # direct tid -> number of returns

    def wants_lookup(self, now: float) -> bool:
        return not self.open and not self.looking and now >= self.next_lookup


class DirectCalls:
    """The per-client table of actor links (no IO)."""

    def __init__(self) -> None:
        self.links: dict[bytes, ActorLink] = {}
        self.by_key: dict[str, ActorLink] = {}
        self.head_call_actor: dict[bytes, bytes] = {}   # head-routed tid -> actor id

    def link(self, aid: bytes) -> ActorLink:
        link = self.links.get(aid)
        if link is None:
            link = self.links[aid] = ActorLink(aid)
            self.by_key[link.key] = link
        return link

    def route(self, link: ActorLink, spec: dict, ready: dict, expected: set,
              owner: str) -> dict | None:
        """The actor's ``run_task`` message when ``spec`` may go directly,
        else None (call with the client's lock held: reads its caches)."""
        if not link.open or link.sticky or spec.get("retries") or spec.get("retry_exc") \
                or (spec.get("xopts") or {}).get("gen"):
            return None  # calls that may be retried, or that yield, go through the head
        if link.head_calls:
            link.head_calls = {tid for tid in link.head_calls
                               if ids.object_id(tid, 0) in expected}
            if link.head_calls:
                return None
        if spec.get("nested"):
            return None  # refs inside the arguments: the head path holds them
        deps = []
        for oid in spec.get("deps") or ():
            info = ready.get(oid)
            if info is None or info.get("error") or info.get("nested"):
                return None
            if info.get("inline") is None and link.node not in info.get("nodes", ()) \
                    and not info.get("addrs"):
                return None  # stored where the actor's node could not find it
            deps.append(info)
        return messages.direct_call(spec, deps, owner)

    def sent_direct(self, link: ActorLink, spec: dict) -> None:
        link.inflight[spec["tid"]] = spec.get("nret", 1)

    def sent_to_head(self, link: ActorLink, tid: bytes) -> None:
        link.head_calls.add(tid)
        self.head_call_actor[tid] = link.aid
        if len(self.head_call_actor) > 100_000:  # settled ones are forgotten lazily
            live = {t for lk in self.links.values() for t in lk.head_calls}
            self.head_call_actor = {t: a for t, a in self.head_call_actor.items() if t in live}

    def dropped(self, oid: bytes) -> None:
        """A return of an unfinished call was dropped by the user."""
        tid = ids.task_of(oid)
        aid = self.head_call_actor.pop(tid, None)
        if aid is not None and ids.index_of(oid) == 0:
            link = self.links.get(aid)
            if link is not None and tid in link.head_calls:
                link.sticky = True  # its end will not be seen: keep the head path

    def answered(self, link: ActorLink, tid: bytes) -> None:
        link.inflight.pop(tid, None)

    def connected(self, link: ActorLink, reply: dict) -> None:
        link.address = reply["address"]
        link.epoch = reply.get("epoch", 0)
        link.node = reply.get("node")
        link.open = True

    def pause(self, aid: bytes) -> None:
        """Send no more calls to ``aid`` directly until it is looked up again
        (its caller is killing it).  Answers on the open connection still
        count."""
        link = self.links.get(aid)
        if link is not None:
            self.no_address(link)

    def no_address(self, link: ActorLink, delay: float = LOOKUP_RETRY) -> None:
        link.open = False
        link.next_lookup = time.monotonic() + delay

    def lost(self, link: ActorLink, current: bool = True) -> list[bytes]:
        """A connection to the actor closed (``current``: the one in use, else
        one already replaced): the returns of calls still unanswered, whose
        outcome the caller now asks the head for."""
        oids = [ids.object_id(tid, i) for tid, n in link.inflight.items() for i in range(n)]
        if current:
            link.open = False
            link.next_lookup = time.monotonic() + LOOKUP_RETRY
            link.inflight.clear()
        return oids


def result_infos(msg: dict) -> list[dict]:
    """``object_ready``-like entries for the inline returns in an actor's
    direct answer (``call_result``)."""
    return [messages.object_ready_direct(r) for r in msg.get("results", ())
            if r.get("inline") is not None]
