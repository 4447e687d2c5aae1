"""What a cluster writes of a call's events and snapshots: token digests, never tokens."""

from __future__ import annotations

import base64
import json

import pytest

from signal_srv.call import Call, CallRules, Connect, End, Event, HeldBudget, Identify, Join, Leave
from signal_srv.cluster.wire import decode_event, encode_event
from signal_srv.peer_tokens import token_digest
from signal_srv.snapshot import call_to_dict, restore

DIGEST = token_digest("secret-token")


@pytest.mark.parametrize("event", [Join("p", DIGEST, "alice", None), Leave(DIGEST), End(DIGEST), End(None),
                                   Connect("p", DIGEST, 3, 7), Identify(DIGEST)], ids=lambda e: type(e).__name__)
def test_events_carry_the_digest_in_base64_and_come_back_equal(event: Event) -> None:
    text = json.dumps(encode_event(event))
    assert "secret-token" not in text
    assert (base64.b64encode(DIGEST).decode() in text) == (getattr(event, "token_digest") is not None)
    assert decode_event(json.loads(text)) == event


def test_a_snapshot_keeps_the_digest_and_restores_it() -> None:
    call = Call("c", 0.0)
    call.handle(Join("p", DIGEST), 0.0)
    data = json.loads(json.dumps(call_to_dict(call, 0.0, 0.0)))
    assert data["participants"][0]["token_digest"] == base64.b64encode(DIGEST).decode()
    restored = restore(data, CallRules(), HeldBudget(1 << 20))
    assert restored.authenticate(DIGEST).peer_id == "p"


def test_entries_written_with_the_token_itself_are_read_as_its_digest() -> None:
    """Log entries and snapshots of the version that kept tokens (a rolling deploy meets them)."""
    assert decode_event({"t": "Connect", "peer_id": "p", "token": "secret-token", "conn": 1, "last_seq": None}) \
        == Connect("p", DIGEST, 1)
    assert decode_event({"t": "End", "token": None}) == End(None)
    call = Call("c", 0.0)
    call.handle(Join("p", DIGEST), 0.0)
    data = call_to_dict(call, 0.0, 0.0)
    old = data["participants"][0]
    del old["token_digest"]
    old["token"] = base64.b64encode(b"secret-token").decode()
    assert restore(data, CallRules(), HeldBudget(1 << 20)).authenticate(DIGEST).peer_id == "p"
