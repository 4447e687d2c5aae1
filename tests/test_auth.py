"""Access control with ``auth=jwt`` against the real server: grants, identities, admin, bad tokens.

Tokens are minted here with PyJWT (``signal_srv.tokens.mint`` for the good ones), exactly as
an application's backend would; the server runs with an HS256 secret unless a test gives it
a PEM public key. JWKS key sources are in ``test_jwks.py``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import time
import warnings
from pathlib import Path
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from signal_srv.client import ApiError, SignalingClient
from signal_srv.config import Config
from signal_srv.tokens import mint
from tests.conftest import TIMEOUT

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
JWT = {"auth": "jwt", "jwt_secret": SECRET}
ALL_GRANTS = ("create", "join", "list", "admin")


def token(*grants: str, sub: str = "alice", **claims: Any) -> str:
    return mint(SECRET, sub, grants=grants, **claims)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


async def status_of(client: SignalingClient, method: str, path: str, access: str | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    return await client.request(method, path, headers=bearer(access) if access is not None else None)


# Grants ---------------------------------------------------------------------------------


@pytest.mark.settings(**JWT)
async def test_each_operation_needs_its_grant(client: SignalingClient) -> None:
    with pytest.raises(ApiError) as refused:
        await client.create_call(access_token=token("join", "list", "admin"))
    assert (refused.value.status, refused.value.code) == (403, "forbidden")
    assert "create" in refused.value.message

    host = await client.create_call(access_token=token("create", name="Alice"))
    assert (host["identity"], host["name"]) == ("alice", "Alice")
    call_id = host["call_id"]

    for method, path, grants in (("GET", "/apiv2/calls", ("create", "join")),
                                 ("POST", f"/apiv2/calls/{call_id}/join", ("create", "list"))):
        status, body, headers = await status_of(client, method, path, token(*grants))
        assert (status, body["error"]["code"]) == (403, "forbidden"), (path, body)
        assert headers["Www-Authenticate"] == 'Bearer error="insufficient_scope"'

    guest = await client.join(call_id, access_token=token("join", sub="bob"))
    assert (guest["identity"], guest["name"]) == ("bob", None)
    assert [c["call_id"] for c in await client.list_calls(access_token=token("list"))] == [call_id]
    assert (await client.get_call(call_id, access_token=token()))["status"] == "active"  # any valid token


@pytest.mark.settings(**JWT)
async def test_a_missing_token_and_a_bad_token_get_401_with_a_bearer_challenge(client: SignalingClient) -> None:
    status, body, headers = await status_of(client, "POST", "/apiv2/calls")
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    assert headers["Www-Authenticate"] == "Bearer"  # RFC 6750 3.1: no error code without credentials
    status, body, headers = await status_of(client, "POST", "/apiv2/calls", "nonsense")
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    assert headers["Www-Authenticate"] == 'Bearer error="invalid_token"'


@pytest.mark.settings(**JWT)
async def test_a_token_for_one_call_joins_that_call_only(client: SignalingClient) -> None:
    one = await client.create_call(access_token=token("create"))
    two = await client.create_call(access_token=token("create"))
    guest_token = token("join", "create", "list", sub="bob", call_id=two["call_id"])
    for method, path in (("POST", f"/apiv2/calls/{one['call_id']}/join"), ("GET", f"/apiv2/calls/{one['call_id']}")):
        status, body, _ = await status_of(client, method, path, guest_token)
        assert (status, body["error"]["message"]) == (403, "the token is for another call")
    for method, path in (("POST", "/apiv2/calls"), ("GET", "/apiv2/calls")):
        status, body, _ = await status_of(client, method, path, guest_token)
        assert (status, body["error"]["message"]) == (403, "the token is restricted to one call")
    joined = await client.join(two["call_id"], access_token=guest_token)
    assert (joined["call_id"], joined["identity"]) == (two["call_id"], "bob")
    assert (await client.get_call(one["call_id"], access_token=token()))["participants"]["count"] == 1


@pytest.mark.settings(**JWT)
async def test_reuse_last_needs_create_list_and_join(client: SignalingClient) -> None:
    waiting = await client.create_call(access_token=token("create"))
    for grants in (("create", "join"), ("create", "list"), ("list", "join")):
        with pytest.raises(ApiError) as refused:
            await client.create_call(reuse_last=True, access_token=token(*grants))
        assert refused.value.status == 403
    reused = await client.create_call(reuse_last=True, access_token=token("create", "list", "join"))
    assert (reused["call_id"], reused["reused"]) == (waiting["call_id"], True)
    assert "peers" not in reused


@pytest.mark.settings(**JWT)
async def test_listings_show_who_is_in_a_call_only_to_admin(client: SignalingClient) -> None:
    host = await client.create_call(access_token=token("create", name="Alice"))
    guest = await client.join(host["call_id"], access_token=token("join", sub="bob", name="Bob"))
    for plain in (await client.list_calls(access_token=token("list")))[0], await client.get_call(
            host["call_id"], access_token=token("list")):
        assert "peers" not in plain and "alice" not in json.dumps(plain)
    admin = token("list", "admin", sub="ops")
    for listed in (await client.list_calls(access_token=admin))[0], await client.get_call(host["call_id"], access_token=admin):
        assert listed["peers"] == [
            {"peer_id": host["peer_id"], "identity": "alice", "name": "Alice", "role": "host", "connected": False},
            {"peer_id": guest["peer_id"], "identity": "bob", "name": "Bob", "role": "guest", "connected": False},
        ]
        assert host["peer_token"] not in json.dumps(listed)


# Identities reach the other side --------------------------------------------------------


@pytest.mark.settings(**JWT)
async def test_state_frames_tell_each_participant_who_the_other_is(client: SignalingClient) -> None:
    host = await client.create_call(access_token=token("create", name="Alice"))
    a = await client.connect_as(host)
    alone = await a.wait_for("state")
    assert alone["peer_id"] == host["peer_id"] and "peer" not in alone
    guest = await client.join(host["call_id"], access_token=token("join", sub="bob", name="Bob"))
    joined = await a.wait_for("state", event="joined")
    assert (joined["peer_id"], joined["subject"]) == (host["peer_id"], guest["peer_id"])
    assert joined["peer"] == {"peer_id": guest["peer_id"], "identity": "bob", "name": "Bob", "connected": False}
    b = await client.connect_as(guest)
    mine = await b.wait_for("state")
    assert mine["peer_id"] == guest["peer_id"]
    assert mine["peer"] == {"peer_id": host["peer_id"], "identity": "alice", "name": "Alice", "connected": True}
    assert (await a.wait_for("state", event="connected"))["peer"]["connected"] is True


async def test_without_access_control_the_peer_has_no_identity(client: SignalingClient) -> None:
    host = await client.create_call()
    assert "identity" not in host and "name" not in host
    guest = await client.join(host["call_id"])
    b = await client.connect_as(guest)
    assert (await b.wait_for("state"))["peer"] == {
        "peer_id": host["peer_id"], "identity": None, "name": None, "connected": False}
    status, body, _ = await status_of(client, "POST", f"/apiv2/calls/{host['call_id']}/participants/{guest['peer_id']}/remove",
                                      host["peer_token"])
    assert (status, body["error"]["code"]) == (403, "forbidden")


# Administration -------------------------------------------------------------------------


@pytest.mark.settings(**JWT)
async def test_admin_removes_a_participant_who_is_told_why(client: SignalingClient) -> None:
    host = await client.create_call(access_token=token("create"))
    guest = await client.join(host["call_id"], access_token=token("join", sub="bob"))
    a, b = await client.connect_as(host), await client.connect_as(guest)
    await a.wait_for("state", event="connected", subject=guest["peer_id"])
    with pytest.raises(ApiError) as refused:
        await client.remove(host["call_id"], guest["peer_id"], token("list", "join", "create"))
    assert refused.value.status == 403
    with pytest.raises(ApiError) as unknown:
        await client.remove(host["call_id"], host["call_id"], token("admin"))
    assert (unknown.value.status, unknown.value.code) == (404, "participant_not_found")

    summary = await client.remove(host["call_id"], guest["peer_id"], token("admin", sub="ops"))
    assert (summary["status"], summary["participants"]["count"]) == ("waiting", 1)
    ended = await b.wait_for("call_ended")
    assert ended["reason"] == "removed"
    assert await b.wait_closed() == (1000, "removed")
    left = await a.wait_for("state", event="left")
    assert (left["subject"], left["reason"], left["peer_id"]) == (guest["peer_id"], "removed", host["peer_id"])
    again = await client.connect_as(guest)
    assert (await again.wait_closed())[0] == 4401


@pytest.mark.settings(**JWT)
async def test_admin_ends_any_call_and_participants_still_use_their_peer_tokens(client: SignalingClient) -> None:
    one = await client.create_call(access_token=token("create"))
    two = await client.create_call(access_token=token("create"))
    guest = await client.join(two["call_id"], access_token=token("join"))
    with pytest.raises(ApiError) as refused:
        await client.end(one["call_id"], token("create", "join", "list"))
    assert refused.value.status == 403
    with pytest.raises(ApiError) as other_call:
        await client.end(one["call_id"], token("admin", call_id=two["call_id"]))
    assert other_call.value.status == 403
    a = await client.connect_as(one)
    assert (await client.end(one["call_id"], token("admin")))["status"] == "ended"
    assert (await a.wait_for("call_ended"))["reason"] == "ended"
    await client.leave(two["call_id"], guest["peer_token"])  # leave and end keep using the peer token
    assert (await client.end(two["call_id"], two["peer_token"]))["status"] == "ended"


# Bad tokens (issue section 5) -------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(payload: dict[str, Any], alg: str = "none") -> str:
    header = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(payload).encode())}."


def _hs512(claims: dict[str, Any]) -> str:
    """HS512 with the right secret (PyJWT warns that it is short for SHA-512; so is the point)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        return jwt.encode(claims, SECRET, algorithm="HS512")


NOW = int(time.time())
GOOD = {"sub": "alice", "exp": NOW + 600, "grants": list(ALL_GRANTS)}
BAD_TOKENS = {
    "expired": jwt.encode({**GOOD, "exp": NOW - 60}, SECRET, algorithm="HS256"),
    "not yet valid": jwt.encode({**GOOD, "nbf": NOW + 600}, SECRET, algorithm="HS256"),
    "issued in the future": jwt.encode({**GOOD, "iat": NOW + 600}, SECRET, algorithm="HS256"),
    "wrong audience": jwt.encode({**GOOD, "aud": "another-app"}, SECRET, algorithm="HS256"),
    "no audience": jwt.encode(GOOD, SECRET, algorithm="HS256"),
    "wrong issuer": jwt.encode({**GOOD, "aud": "calls", "iss": "https://evil.example"}, SECRET, algorithm="HS256"),
    "another secret": jwt.encode({**GOOD, "aud": "calls", "iss": "https://app.example"}, SECRET + "x",
                                 algorithm="HS256"),
    "HS512": _hs512({**GOOD, "aud": "calls", "iss": "https://app.example"}),
    "alg none": _unsigned({**GOOD, "aud": "calls", "iss": "https://app.example"}),
    "alg None": _unsigned({**GOOD, "aud": "calls", "iss": "https://app.example"}, "None"),
    "truncated": mint(SECRET, "alice", audience="calls", issuer="https://app.example")[:-10],
    "no signature": mint(SECRET, "alice", audience="calls", issuer="https://app.example").rsplit(".", 1)[0] + ".",
    "no sub": jwt.encode({"exp": NOW + 600, "aud": "calls", "iss": "https://app.example"}, SECRET, algorithm="HS256"),
    "no exp": jwt.encode({"sub": "alice", "aud": "calls", "iss": "https://app.example"}, SECRET, algorithm="HS256"),
    "sub not a string": jwt.encode({**GOOD, "sub": 7, "aud": "calls", "iss": "https://app.example"}, SECRET,
                                   algorithm="HS256"),
    "grants not a list": jwt.encode({**GOOD, "grants": "create", "aud": "calls", "iss": "https://app.example"}, SECRET,
                                    algorithm="HS256"),
    "name not a string": mint(SECRET, "alice", audience="calls", issuer="https://app.example", name=["x"]),
    "payload not JSON": "eyJhbGciOiJIUzI1NiJ9." + _b64(b"\xff\xfe not json") + ".c2ln",
    "header not JSON": _b64(b"{{{") + ".e30.c2ln",
    "not base64": "!!!.???.***",
    "two parts": "abc.def",
    "empty parts": "..",
    "unicode": "é.ü.ß",
}


@pytest.mark.settings(**JWT, jwt_audience="calls", jwt_issuer="https://app.example")
@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_bad_tokens_get_401_and_change_nothing(kind: str, client: SignalingClient, debug_logs: list[str]) -> None:
    bad = BAD_TOKENS[kind]
    status, body, headers = await status_of(client, "POST", "/apiv2/calls", bad)
    assert (status, body["error"]["code"]) == (401, "unauthorized"), (kind, body)
    assert headers["Www-Authenticate"] == 'Bearer error="invalid_token"'
    assert SECRET not in body["error"]["message"] and bad not in body["error"]["message"]
    assert not any(SECRET in line or (len(bad) > 8 and bad in line) for line in debug_logs)
    good = mint(SECRET, "alice", grants=["create"], audience="calls", issuer="https://app.example")
    assert (await client.create_call(access_token=good))["identity"] == "alice"


@pytest.mark.settings(**JWT, jwt_leeway=30.0)
async def test_leeway_allows_clock_skew_and_no_more(client: SignalingClient) -> None:
    within = jwt.encode({"sub": "a", "exp": int(time.time()) - 10, "grants": ["create"]}, SECRET, algorithm="HS256")
    assert (await client.create_call(access_token=within))["identity"] == "a"
    beyond = jwt.encode({"sub": "a", "exp": int(time.time()) - 60, "grants": ["create"]}, SECRET, algorithm="HS256")
    with pytest.raises(ApiError) as refused:
        await client.create_call(access_token=beyond)
    assert (refused.value.status, refused.value.message) == (401, "the token has expired")


@pytest.mark.settings(**JWT)
async def test_an_oversized_token_is_refused_without_parsing(client: SignalingClient) -> None:
    # Validly signed, but over 4096 bytes: refused on its length alone.
    big = token("create", name="x" * 5000)
    with pytest.raises(ApiError) as refused:
        await client.create_call(access_token=big)
    assert (refused.value.status, refused.value.message) == (401, "the token is over 4096 bytes")
    status, _, _ = await status_of(client, "POST", "/apiv2/calls", "e" * 60000)
    assert status == 401


@pytest.mark.settings(**JWT)
async def test_unknown_grants_are_ignored(client: SignalingClient) -> None:
    assert (await client.create_call(access_token=token("create", "teleport")))["identity"] == "alice"


# Public keys: RS256 / ES256 from a PEM file, and algorithm confusion -------------------------


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {"rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec": ec.generate_private_key(ec.SECP256R1())}


def public_pem(key: Any) -> bytes:
    return bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo))


@pytest.fixture
def config(config: Config, keys: dict[str, Any], tmp_path: Path) -> Config:
    """The conftest ``config``; ``jwt_public_key="<rsa>"`` or ``"<ec>"`` is the public half of that test key."""
    kind = config.jwt_public_key.strip("<>")
    if kind in keys:
        path = tmp_path / f"{kind}.pem"
        path.write_bytes(public_pem(keys[kind]))
        return dataclasses.replace(config, jwt_public_key=str(path))
    return config


def _hs256_with(secret: bytes, claims: dict[str, Any]) -> str:
    """HS256 signed with ``secret`` by hand: PyJWT itself refuses a PEM key as an HMAC secret."""
    signing_input = f"{_b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


@pytest.mark.parametrize("kind", [
    pytest.param("rsa", marks=pytest.mark.settings(auth="jwt", jwt_public_key="<rsa>")),
    pytest.param("ec", marks=pytest.mark.settings(auth="jwt", jwt_public_key="<ec>")),
])
async def test_public_key_tokens_verify_and_algorithm_confusion_is_refused(
    kind: str, keys: dict[str, Any], client: SignalingClient
) -> None:
    key, algorithm = keys[kind], {"rsa": "RS256", "ec": "ES256"}[kind]
    claims = {"sub": "alice", "exp": int(time.time()) + 600, "grants": ["create"]}
    assert (await client.create_call(access_token=jwt.encode(claims, key, algorithm=algorithm)))["identity"] == "alice"
    another = rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa" else ec.generate_private_key(ec.SECP256R1())
    bad_tokens = [
        jwt.encode(claims, another, algorithm=algorithm),  # another key
        _hs256_with(public_pem(key), claims),  # HS/RS confusion: the public key as an HMAC secret
        jwt.encode(claims, SECRET, algorithm="HS256"),
        _unsigned(claims),
    ]
    if kind == "rsa":
        bad_tokens.append(jwt.encode(claims, key, algorithm="PS256"))  # the same key, another algorithm
    for bad in bad_tokens:
        with pytest.raises(ApiError) as refused:
            await client.create_call(access_token=bad)
        assert refused.value.status == 401


# Fuzz: whatever arrives as a bearer token, verification answers 401 or accepts, never crashes --


_segment = st.one_of(
    st.binary(max_size=64).map(_b64),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                 max_leaves=8).map(lambda value: _b64(json.dumps(value).encode())),
    st.text(max_size=20),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(parts=st.lists(_segment, min_size=1, max_size=4), header=st.sampled_from([None, "HS256", "none", "RS256", 7]))
def test_random_tokens_are_refused_with_invalid_token_only(parts: list[str], header: Any) -> None:
    from signal_srv.auth import Verifier
    from signal_srv.errors import InvalidToken

    if header is not None:
        parts = [_b64(json.dumps({"alg": header, "typ": "JWT"}).encode()), *parts[1:]]
    verifier = Verifier(SECRET.encode(), "HS256")
    try:
        asyncio.run(verifier.verify(".".join(parts)))
    except InvalidToken as refused:
        assert refused.status == 401 and SECRET not in refused.message
    else:
        raise AssertionError("a random token was accepted")
