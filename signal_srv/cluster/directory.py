"""``Directory``: who owns each call (owner and epoch), the node leases, and the cluster-wide index.

Keys of one call share its hash tag (``sig:call:{<id>}``), so the call's scripts run on
one slot of a Redis Cluster. The cluster-wide keys (node leases, the index of waiting and
active calls with their summaries) share the tag ``{calls}``. Every write of an owner goes
through a fenced script that refuses it once the call's epoch has moved on.
"""

from __future__ import annotations

import dataclasses
import json
from signal_srv.actor import CallSummary
from signal_srv.call import Status
from signal_srv.cluster.link import RedisLink
from signal_srv.cluster.wire import decode_summary, encode_summary

__all__ = ["Directory", "Owner", "call_key", "inbox_key"]

PREFIX = "sig:"
NODES = PREFIX + "{calls}:nodes"
SUMMARIES = PREFIX + "{calls}:summaries"
INDEX = {Status.WAITING: PREFIX + "{calls}:waiting", Status.ACTIVE: PREFIX + "{calls}:active"}
ORDER = PREFIX + "{calls}:order"
WALK_BUDGET = 5000  # index entries one listing may walk past (entries of lapsed nodes are skipped)

Owner = tuple[str, int]


def call_key(call_id: str) -> str:
    return f"{PREFIX}call:{{{call_id}}}"


def inbox_key(node_id: str) -> str:
    return f"{PREFIX}node:{{{node_id}}}:inbox"


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

    async def fenced(self, call_id: str, epoch: int, op: str, new_owner: str = "") -> int:
        """``touch`` (renew the TTL), ``delete`` or ``move`` (compare-and-set to ``new_owner``).

        Returns 0 when the call is no longer this node's at ``epoch``; else 1, or the new epoch for a move.
        """
        args = [self.node_id, epoch, op, self.call_ttl_ms, new_owner]
        return int(await self.link.script("fenced", [call_key(call_id)], args))

    async def publish(self, summary: CallSummary, epoch: int) -> bool:
        keys = [SUMMARIES, INDEX[Status.WAITING], INDEX[Status.ACTIVE], ORDER]
        entry = json.dumps(encode_summary(summary), separators=(",", ":"))
        args = [summary.call_id, epoch, summary.status, entry, self.node_id]
        return bool(await self.link.script("index_put", keys, args))

    async def unpublish(self, call_id: str, epoch: int) -> bool:
        keys = [SUMMARIES, INDEX[Status.WAITING], INDEX[Status.ACTIVE]]
        return bool(await self.link.script("index_drop", keys, [call_id, epoch]))

    async def listing(self, status: Status | None, limit: int, peers: bool) -> list[CallSummary]:
        """Newest first; the published entries carry the participants, shown only with ``peers``."""
        statuses = [status] if status is not None else [Status.WAITING, Status.ACTIVE]
        keys = [NODES, SUMMARIES, *(INDEX[s] for s in statuses)]
        entries = await self.link.script("listing", keys, [limit, WALK_BUDGET])
        summaries = [decode_summary(json.loads(entry)) for entry in entries]
        return summaries if peers else [dataclasses.replace(s, peers=None) for s in summaries]

    async def heartbeat(self, cursor: str, forget_after: float) -> tuple[str, set[str]]:
        """Renew this node's lease; returns the index sweep's next cursor and the live nodes."""
        keys = [NODES, SUMMARIES, INDEX[Status.WAITING], INDEX[Status.ACTIVE]]
        args = [self.node_id, self.lease_ms, int(forget_after * 1000), cursor]
        next_cursor, live = await self.link.script("heartbeat", keys, args)
        return str(next_cursor), set(live)

    async def live_nodes(self) -> set[str]:
        return set(await self.link.script("live", [NODES], []))

    async def resign(self) -> None:
        """Drop this node's lease at a clean shutdown, so that nobody waits for it to lapse."""
        await self.link.run(lambda r: r.zrem(NODES, self.node_id))
