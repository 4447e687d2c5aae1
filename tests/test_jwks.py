"""``jwks_url``: keys fetched from a local JWKS endpoint the test starts, cached, refreshed,
and an endpoint that is down, slow or answers garbage.

Known keys keep working whatever the endpoint does, unknown keys get 401, and no request
waits longer than ``ask_timeout`` for the endpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any, Iterator

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.testing import bind_unused_port
from tornado.web import Application, RequestHandler

from signal_srv.client import ApiError, SignalingClient
from signal_srv.config import Config
from tests.conftest import TIMEOUT

ASK_TIMEOUT = 0.5
JWKS = {"auth": "jwt", "jwks_url": "<jwks>", "ask_timeout": ASK_TIMEOUT, "jwks_refresh_interval": 0.001}
FETCH_FAILED = r"^JWKS fetch from http://127\.0\.0\.1:\d+/jwks\.json failed"


class Jwks:
    """A JWKS endpoint: serves ``body`` with ``status``; with ``hang`` set, never answers."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b'{"keys": []}'
        self.hang = False
        self.requests = 0
        self.release = asyncio.Event()
        self.server: HTTPServer | None = None
        self.url = ""

    def publish(self, *keys: tuple[str, Any]) -> None:
        """Serve the public halves of ``keys`` (kid, private key)."""
        entries = []
        for kid, key in keys:
            algorithm = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else jwt.algorithms.ECAlgorithm
            entries.append({**algorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig"})
        self.status, self.body = 200, json.dumps({"keys": entries}).encode()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


class JwksHandler(RequestHandler):
    def initialize(self, jwks: Jwks) -> None:
        self.jwks = jwks

    async def get(self) -> None:
        self.jwks.requests += 1
        if self.jwks.hang:
            await self.jwks.release.wait()
        self.set_status(self.jwks.status)
        self.finish(self.jwks.body)


@pytest.fixture
def jwks(io_loop: IOLoop) -> Iterator[Jwks]:
    endpoint = Jwks()
    sock, port = bind_unused_port()
    app = Application([(r"/jwks\.json", JwksHandler, {"jwks": endpoint})], log_function=lambda handler: None)
    endpoint.server = HTTPServer(app)
    endpoint.server.add_sockets([sock])
    endpoint.url = f"http://127.0.0.1:{port}/jwks.json"
    yield endpoint
    endpoint.release.set()
    endpoint.stop()
    io_loop.run_sync(endpoint.server.close_all_connections, timeout=TIMEOUT)


@pytest.fixture
def config(config: Config, jwks: Jwks) -> Config:
    return dataclasses.replace(config, jwks_url=jwks.url) if config.jwks_url == "<jwks>" else config


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {"rsa-1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "rsa-2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec-1": ec.generate_private_key(ec.SECP256R1())}


def signed(keys: dict[str, Any], kid: str | None, key: str | None = None, **claims: Any) -> str:
    private = keys[key or kid or "rsa-1"]
    algorithm = "RS256" if isinstance(private, rsa.RSAPrivateKey) else "ES256"
    payload = {"sub": "alice", "exp": int(time.time()) + 600, "grants": ["create"], **claims}
    return jwt.encode(payload, private, algorithm=algorithm, headers={"kid": kid} if kid else None)


async def create(client: SignalingClient, token: str) -> int:
    """The status of a create with ``token`` (201 or the error's)."""
    try:
        await client.create_call(access_token=token)
    except ApiError as exc:
        assert exc.code in ("unauthorized", "forbidden"), exc
        return exc.status
    return 201


@pytest.mark.settings(**JWKS)
async def test_keys_are_fetched_once_and_cached_by_kid(client: SignalingClient, jwks: Jwks, keys: dict[str, Any]) -> None:
    jwks.publish(("rsa-1", keys["rsa-1"]), ("ec-1", keys["ec-1"]))
    results = await asyncio.gather(*(create(client, signed(keys, kid)) for kid in ("rsa-1", "ec-1") * 5))
    assert results == [201] * 10
    assert jwks.requests == 1


@pytest.mark.settings(**JWKS)
async def test_an_unknown_kid_fetches_the_keys_again(client: SignalingClient, jwks: Jwks, keys: dict[str, Any]) -> None:
    jwks.publish(("rsa-1", keys["rsa-1"]))
    assert await create(client, signed(keys, "rsa-1")) == 201
    assert await create(client, signed(keys, "rsa-2")) == 401  # fetched again: still unknown
    assert jwks.requests == 2
    jwks.publish(("rsa-1", keys["rsa-1"]), ("rsa-2", keys["rsa-2"]))  # the application rotates its keys
    assert await create(client, signed(keys, "rsa-2")) == 201
    assert await create(client, signed(keys, "rsa-1")) == 201
    assert jwks.requests == 3


@pytest.mark.settings(**{**JWKS, "jwks_refresh_interval": 60.0})
async def test_unknown_kids_fetch_at_most_once_per_refresh_interval(
    client: SignalingClient, jwks: Jwks, keys: dict[str, Any]
) -> None:
    jwks.publish(("rsa-1", keys["rsa-1"]))
    assert await create(client, signed(keys, "rsa-1")) == 201
    forged = [signed(keys, f"random-{i}", key="rsa-2") for i in range(20)]
    assert await asyncio.gather(*(create(client, t) for t in forged)) == [401] * 20
    assert jwks.requests == 1  # the first fetch was less than 60 s ago
    assert await create(client, signed(keys, "rsa-1")) == 201


@pytest.mark.settings(**JWKS)
async def test_a_token_without_kid_uses_the_only_key(client: SignalingClient, jwks: Jwks, keys: dict[str, Any]) -> None:
    jwks.publish(("rsa-1", keys["rsa-1"]))
    assert await create(client, signed(keys, None)) == 201
    jwks.publish(("rsa-1", keys["rsa-1"]), ("rsa-2", keys["rsa-2"]))
    assert await create(client, signed(keys, "rsa-2")) == 201  # fetched: now two keys
    with pytest.raises(ApiError) as refused:
        await client.create_call(access_token=signed(keys, None))
    assert (refused.value.status, refused.value.message) == (401, "the token names no key (kid)")


@pytest.mark.settings(**JWKS)
async def test_a_down_endpoint_keeps_known_keys_working(
    client: SignalingClient, jwks: Jwks, keys: dict[str, Any], log_guard: Any
) -> None:
    log_guard.expect("signal_srv.auth", FETCH_FAILED + r": connection error \(Connection refused\); keeping 1 known keys")
    jwks.publish(("rsa-1", keys["rsa-1"]))
    assert await create(client, signed(keys, "rsa-1")) == 201
    jwks.stop()
    assert await create(client, signed(keys, "rsa-2")) == 401
    assert await create(client, signed(keys, "rsa-1")) == 201
    assert await create(client, signed(keys, "rsa-2")) == 401


@pytest.mark.settings(**JWKS)
async def test_a_slow_endpoint_never_holds_a_request_past_ask_timeout(
    client: SignalingClient, jwks: Jwks, keys: dict[str, Any], log_guard: Any
) -> None:
    log_guard.expect("signal_srv.auth", FETCH_FAILED + r": timeout; keeping 1 known keys")
    jwks.publish(("rsa-1", keys["rsa-1"]))
    assert await create(client, signed(keys, "rsa-1")) == 201
    jwks.hang = True  # every later fetch hangs until the test ends
    started = asyncio.get_running_loop().time()
    unknown = asyncio.ensure_future(create(client, signed(keys, "rsa-2")))
    # While that request waits on the hanging endpoint, known keys answer at once.
    assert await create(client, signed(keys, "rsa-1")) == 201
    assert not unknown.done()
    assert await asyncio.wait_for(unknown, ASK_TIMEOUT + TIMEOUT) == 401
    assert asyncio.get_running_loop().time() - started >= ASK_TIMEOUT * 0.9  # it did wait for the fetch, bounded
    assert await create(client, signed(keys, "rsa-1")) == 201


GARBAGE = {
    "not JSON": (200, b"<html>maintenance</html>", "the answer is not JSON"),
    "no keys list": (200, b'{"keys": "none"}', 'the answer has no "keys" list'),
    "a JSON list": (200, b"[1, 2, 3]", 'the answer has no "keys" list'),
    "only unusable keys": (200, json.dumps({"keys": [
        {"kty": "oct", "kid": "rsa-2", "k": "c2VjcmV0"},  # a symmetric key must never be taken from a JWKS
        {"kty": "RSA", "kid": "rsa-2", "n": "AQAB", "e": "AQAB", "use": "enc"},
        {"kty": "EC", "kid": "bad", "crv": "P-256", "x": "AA", "y": "AA"},
        "not an object",
    ]}).encode(), "the answer has no usable signing key"),
    "a server error": (503, b"{}", "HTTP 503"),
}


@pytest.mark.settings(**JWKS)
@pytest.mark.parametrize("kind", sorted(GARBAGE))
async def test_garbage_from_the_endpoint_keeps_known_keys_and_refuses_unknown_ones(
    kind: str, client: SignalingClient, jwks: Jwks, keys: dict[str, Any], log_guard: Any
) -> None:
    status, body, why = GARBAGE[kind]
    log_guard.expect("signal_srv.auth", FETCH_FAILED + ": " + why.replace("(", r"\(").replace(")", r"\)"))
    jwks.publish(("rsa-1", keys["rsa-1"]))
    assert await create(client, signed(keys, "rsa-1")) == 201
    jwks.status, jwks.body = status, body
    assert await create(client, signed(keys, "rsa-2")) == 401
    assert jwks.requests == 2
    assert await create(client, signed(keys, "rsa-1")) == 201


@pytest.mark.settings(**JWKS)
async def test_a_symmetric_key_in_the_jwks_cannot_sign_tokens(
    client: SignalingClient, jwks: Jwks, keys: dict[str, Any], log_guard: Any
) -> None:
    rsa_entry = jwt.algorithms.RSAAlgorithm.to_jwk(keys["rsa-1"].public_key(), as_dict=True)
    jwks.body = json.dumps({"keys": [{**rsa_entry, "kid": "rsa-1"}, {"kty": "oct", "kid": "hs", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}]}).encode()
    forged = jwt.encode({"sub": "mallory", "exp": int(time.time()) + 60, "grants": ["create"]},
                        b"secretsecretsecretsecretsecretsecret", algorithm="HS256", headers={"kid": "hs"})
    with pytest.raises(ApiError) as refused:
        await client.create_call(access_token=forged)
    assert (refused.value.status, refused.value.message) == (401, "the token's key is unknown")
    assert await create(client, signed(keys, "rsa-1")) == 201


@pytest.mark.settings(**JWKS)
async def test_an_endpoint_down_from_the_start_refuses_every_token(
    client: SignalingClient, jwks: Jwks, keys: dict[str, Any], log_guard: Any
) -> None:
    log_guard.expect("signal_srv.auth", FETCH_FAILED + r": HTTP 404; keeping 0 known keys")
    jwks.status = 404
    assert await create(client, signed(keys, "rsa-1")) == 401
    jwks.publish(("rsa-1", keys["rsa-1"]))  # back: the next unknown kid fetches again
    assert await create(client, signed(keys, "rsa-1")) == 201
