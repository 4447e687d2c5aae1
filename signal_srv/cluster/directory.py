"""``Directory``: who owns each call (owner and epoch), the node leases, and the cluster-wide index.

Keys of one call share its hash tag (``sig:call:{<id>}`` with its owner, epoch and
snapshot, and ``sig:call:{<id>}:log``), so the call's scripts run on one slot of a Redis
Cluster. The cluster-wide keys (node leases, the index of waiting and active calls with
their summaries, each node's set of calls) share the tag ``{calls}``. Every write of an
owner goes through a fenced script that refuses it once the call's epoch has moved on.

A "node" here is one process (``ClusterPlacement.member``: its ``node_id`` and a random
suffix), so that a node restarted under the same ``node_id`` is a new owner, and the calls
of its previous run are taken over like those of any node that went away.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from signal_srv.actor import CallSummary
from signal_srv.call import Status
from signal_srv.cluster.link import RedisLink
from signal_srv.cluster.wire import decode_summary, encode_summary
from signal_srv.errors import CallNotFound

__all__ = ["Command", "Directory", "Heartbeat", "Owner", "Taken", "call_key", "inbox_key", "log_key"]

PREFIX = "sig:"
NODES = PREFIX + "{calls}:nodes"
SUMMARIES = PREFIX + "{calls}:summaries"
INDEX = {Status.WAITING: PREFIX + "{calls}:waiting", Status.ACTIVE: PREFIX + "{calls}:active"}
ORDER = PREFIX + "{calls}:order"
OWNED = PREFIX + "{calls}:owned:"  # + node: the calls the index lists for that node
WALK_BUDGET = 5000  # index entries one listing may walk past (entries of lapsed nodes are skipped)

Owner = tuple[str, int]
Command = tuple[str, list[str], list[Any]]  # a script's name, keys and arguments, to run in a pipeline


def call_key(call_id: str) -> str:
    return f"{PREFIX}call:{{{call_id}}}"


def log_key(call_id: str) -> str:
    return f"{PREFIX}call:{{{call_id}}}:log"


def inbox_key(node_id: str) -> str:
    return f"{PREFIX}node:{{{node_id}}}:inbox"


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat:
    """What a lease renewal learned: live nodes (with seconds left on their leases), nodes
    gone with calls still theirs, and whether this node's own lease had run out."""

    live: dict[str, float]
    orphaned: list[str]
    lapsed: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Taken:
    """A call taken over: its new epoch, its last snapshot and the log entries after it."""

    epoch: int
    snapshot: dict[str, Any]
    entries: list[dict[str, Any]]


class Directory:
    """The Redis records of ownership, liveness and listing; all methods may raise ``Unavailable``."""

    def __init__(self, link: RedisLink, node_id: str, key_ttl: float, lease: float) -> None:
        self.link = link
        self.node_id = node_id
        self.call_ttl_ms = int(key_ttl * 1000)
        self.lease_ms = int(lease * 1000)

    async def claim(self, call_id: str) -> bool:
        """Own a new call at epoch 1; False if the id is already taken."""
        return bool(await self.link.script("claim", [call_key(call_id)], [self.node_id, self.call_ttl_ms]))

    async def owner(self, call_id: str) -> Owner | None:
        owner, epoch = await self.link.run(lambda r: r.hmget(call_key(call_id), ["owner", "epoch"]))
        return None if owner is None or epoch is None else (str(owner), int(epoch))

    def fenced(self, call_id: str, epoch: int, op: str, new_owner: str = "") -> Command:
        """``touch`` (renew the TTLs), ``delete`` (with its log) or ``move`` (compare-and-set to ``new_owner``).

        Its result is 0 when the call is no longer this node's at ``epoch``; else 1, or the new epoch for a move.
        """
        return "fenced", [call_key(call_id), log_key(call_id)], [self.node_id, epoch, op, self.call_ttl_ms, new_owner]

    async def take(self, call_id: str, owner: Owner) -> Taken | None:
        """Take the call over from ``owner`` (whose lease ran out); None if someone else moved it first.

        Raises ``CallNotFound`` for a call that is gone, or whose creator died before it was ever written whole.
        """
        reply = await self.link.script("take", [call_key(call_id), log_key(call_id)],
                                       [owner[0], owner[1], self.node_id, self.call_ttl_ms])
        if int(reply[0]) == -1:
            raise CallNotFound()
        if int(reply[0]) == 0:
            return None
        return Taken(int(reply[0]), json.loads(reply[1]), [json.loads(entry) for entry in reply[2:]])

    def publish(self, summary: CallSummary, epoch: int) -> Command:
        """Put the call's summary in the index (refused if a newer epoch published it)."""
        keys = [SUMMARIES, INDEX[Status.WAITING], INDEX[Status.ACTIVE], ORDER, OWNED + self.node_id]
        entry = json.dumps(encode_summary(summary), separators=(",", ":"))
        return "index_put", keys, [summary.call_id, epoch, summary.status, entry, self.node_id, OWNED]

    def unpublish(self, call_id: str, epoch: int) -> Command:
        """Take an ended call out of the index (refused if a newer epoch owns the entry)."""
        return "index_drop", [SUMMARIES, INDEX[Status.WAITING], INDEX[Status.ACTIVE]], [call_id, epoch, OWNED]

    async def forget_entry(self, call_id: str, node: str) -> None:
        """Drop the index entry of a call whose records are gone (it expired with a node that died)."""
        keys = [SUMMARIES, INDEX[Status.WAITING], INDEX[Status.ACTIVE]]
        await self.link.script("index_drop", keys, [call_id, 2**53, OWNED])
        await self.link.run(lambda r: r.srem(OWNED + node, call_id))

    async def owned_by(self, node: str, cursor: int = 0) -> tuple[int, list[str]]:
        """A chunk of the calls the index lists for ``node``, and the cursor of the next chunk (0: done)."""
        cursor, calls = await self.link.run(lambda r: r.sscan(OWNED + node, cursor, count=200))
        return int(cursor), [str(call) for call in calls]

    async def listing(self, status: Status | None, limit: int, peers: bool) -> list[CallSummary]:
        """Newest first; the published entries carry the participants, shown only with ``peers``."""
        statuses = [status] if status is not None else [Status.WAITING, Status.ACTIVE]
        keys = [NODES, SUMMARIES, *(INDEX[s] for s in statuses)]
        entries = await self.link.script("listing", keys, [limit, WALK_BUDGET])
        summaries = [decode_summary(json.loads(entry)) for entry in entries]
        return summaries if peers else [dataclasses.replace(s, peers=None) for s in summaries]

    async def heartbeat(self, cursor: str, forget_after: float) -> tuple[str, Heartbeat]:
        """Renew this node's lease; returns the index sweep's next cursor and what the renewal learned."""
        keys = [NODES, SUMMARIES, INDEX[Status.WAITING], INDEX[Status.ACTIVE]]
        args = [self.node_id, self.lease_ms, int(forget_after * 1000), cursor, OWNED]
        next_cursor, live, ends, orphaned, lapsed = await self.link.script("heartbeat", keys, args)
        left = {node: int(end) / 1000 for node, end in zip(live, ends)}
        return str(next_cursor), Heartbeat(left, list(orphaned), bool(int(lapsed)))

    async def live_nodes(self) -> set[str]:
        return set(await self.link.script("live", [NODES], []))

    async def resign(self) -> None:
        """End this node's lease now (a clean shutdown), so that nobody waits for it to lapse: the
        other nodes take its calls over at once (and forget it once it owns none)."""
        await self.link.run(lambda r: r.zadd(NODES, {self.node_id: 0}))
