"""The OpenAPI document matches the implementation: every route, every method, every status.

- Every route ``make_app`` defines (except the socket and static files) is a path of the
  document with exactly the methods its handler implements, and every documented path is
  routed.
- For every documented (path, method, status) there is a scenario below that makes the
  real server answer it, and the answer (status, content type, required headers, JSON
  body) validates against the document. A status with no scenario, or a scenario for an
  undocumented status, fails ``test_every_documented_status_has_a_scenario``.

Bodies are validated with ``jsonschema`` (Draft 2020-12, which OpenAPI 3.1 Schema Objects
are), resolving the document's own ``$ref``s through a ``referencing`` registry.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable
from urllib.parse import quote

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi_document
from referencing import Registry as SchemaRegistry
from referencing import Resource
from referencing.jsonschema import DRAFT202012
from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse
from tornado.routing import PathMatches, RuleRouter
from tornado.web import Application, RequestHandler, StaticFileHandler
from tornado.websocket import WebSocketHandler

from signal_srv.openapi import OPENAPI_PATH, load_document
from signal_srv.registry import Registry
from signal_srv.tokens import mint
from tests.conftest import TIMEOUT

DOC = load_document()
DOC_URI = "urn:signal-srv:openapi"
METHODS = ("get", "post", "put", "delete", "patch")
JSON = {"Content-Type": "application/json"}
BIG = b"x" * 5000  # over the test config's max_body_size (4096)

# The removed v2 route: its handler refuses every method with 404 not_found in prepare().
REMOVED = {"/apiv2/calls/current"}

# Settings of a server with access control, and tokens it accepts.
SECRET = "openapi-test-secret-of-32-bytes-or-more"
JWT = {"auth": "jwt", "jwt_secret": SECRET}
UNKNOWN_CALL = "AAAAAAAAAAAAAAAAAAAAAA"


def access(*grants: str, **claims: Any) -> dict[str, str]:
    """``Authorization`` with an access token for ``alice`` holding ``grants``."""
    return bearer(mint(SECRET, "alice", grants=grants, **claims))


# Routes of the app -------------------------------------------------------------------


def _openapi_path(pattern: str) -> str:
    path = pattern.rstrip("$").replace("([^/]+)", "{call_id}", 1).replace("([^/]+)", "{peer_id}").replace(r"\.", ".")
    assert not re.search(r"[()\[\]\\*+?^$]", path), f"cannot read route pattern {pattern!r}"
    return path


def app_routes(app: Application) -> dict[str, type[RequestHandler]]:
    """OpenAPI path -> handler class, for every HTTP route (not the socket, not static files)."""
    routes: dict[str, type[RequestHandler]] = {}

    def walk(router: RuleRouter) -> None:
        for rule in router.rules:
            if isinstance(rule.target, RuleRouter):
                walk(rule.target)
            elif isinstance(rule.target, type) and issubclass(rule.target, RequestHandler):
                if issubclass(rule.target, (StaticFileHandler, WebSocketHandler)):
                    continue
                assert isinstance(rule.matcher, PathMatches)
                routes.setdefault(_openapi_path(rule.matcher.regex.pattern), rule.target)

    walk(app.default_router)
    return routes


def implemented_methods(handler: type[RequestHandler]) -> set[str]:
    return {m.lower() for m in handler.SUPPORTED_METHODS
            if getattr(handler, m.lower()) is not getattr(RequestHandler, m.lower())}


def documented_methods(path: str) -> set[str]:
    return {m for m in DOC["paths"][path] if m in METHODS}


# Validating an answer against the document --------------------------------------------

_SCHEMAS = SchemaRegistry().with_resource(DOC_URI, Resource.from_contents(DOC, default_specification=DRAFT202012))


def _pointer(*parts: str) -> str:
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def documented_response(path: str, method: str, status: int) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The Response Object (``$ref`` resolved) and its JSON pointer in the document."""
    responses = DOC["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} answered {status}, which is not documented"
    response = responses[str(status)]
    where: tuple[str, ...] = ("paths", path, method, "responses", str(status))
    if "$ref" in response:
        where = tuple(response["$ref"].lstrip("#/").split("/"))
        response = DOC[where[0]][where[1]][where[2]]
    return response, where


def validate_schema(value: Any, *where: str) -> None:
    validator = Draft202012Validator({"$ref": f"{DOC_URI}#{_pointer(*where)}"}, registry=_SCHEMAS)
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.path))
    assert not errors, f"{value!r} does not match {'/'.join(where)}: " + "; ".join(e.message for e in errors)


def assert_conforms(path: str, method: str, response: HTTPResponse) -> None:
    """Status, media type, required headers and body of ``response`` are as documented."""
    spec, where = documented_response(path, method, response.code)
    for name, header in spec.get("headers", {}).items():
        value = response.headers.get(name)
        if header.get("required"):
            assert value is not None, f"{response.code} lacks the documented header {name}"
        if value is not None:
            validate_schema(value, *where, "headers", name, "schema")
    content = spec.get("content")
    if not content:
        assert not response.body, f"{response.code} should have no body"
        return
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    assert media_type in content, f"{response.code} is {media_type!r}, documented {sorted(content)}"
    if media_type == "application/json":
        validate_schema(json.loads(response.body), *where, "content", media_type, "schema")


# Scenarios: one per documented (path, method, status) -----------------------------------


@dataclass
class Ctx:
    base_url: str
    log_guard: Any
    registry: Registry | None = None

    async def shut_down(self) -> None:
        """Begin the server's shutdown: its calls end, and requests for calls get 503 shutting_down."""
        assert self.registry is not None
        self.log_guard.expect("signal_srv.access", "^503 ")
        await self.registry.close()

    async def fetch(self, method: str, path: str, *, body: bytes | None = None,
                    headers: dict[str, str] | None = None) -> HTTPResponse:
        if body is None and method == "POST":
            body = b""
        return await AsyncHTTPClient().fetch(
            HTTPRequest(self.base_url + path, method=method, body=body, headers=headers,
                        request_timeout=TIMEOUT, allow_nonstandard_methods=True, follow_redirects=False),
            raise_error=False,
        )

    async def create(self, headers: dict[str, str] | None = None) -> dict[str, Any]:
        response = await self.fetch("POST", "/apiv2/calls", headers=headers)
        assert response.code == 201, response.body
        return dict(json.loads(response.body))

    async def join(self, call_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
        response = await self.fetch("POST", f"/apiv2/calls/{call_id}/join", headers=headers)
        assert response.code == 200, response.body
        return dict(json.loads(response.body))

    async def wrong_twice(self, path: str, method: str, token: str) -> HTTPResponse:
        """A wrong token twice: the first is 401, the second is over a one-token auth_failure burst."""
        first = await self.fetch(method, path, headers=bearer(token))
        assert first.code == 401, first.code
        return await self.fetch(method, path, headers=bearer(token))

    async def until_busy(self, make: Callable[[], Awaitable[HTTPResponse]]) -> HTTPResponse:
        """Concurrent requests against a one-envelope inbox until one is refused with 503."""
        self.log_guard.expect("signal_srv.actor", "inbox full")
        self.log_guard.expect("signal_srv.access", "^503 ")
        for _ in range(10):
            answers = await asyncio.gather(*(make() for _ in range(10)))
            busy = [a for a in answers if a.code == 503]
            if busy:
                return busy[0]
        raise AssertionError("no request found the call busy")


Scenario = Callable[[Ctx], Awaitable[HTTPResponse]]
SCENARIOS: list[Any] = []


def scenario(path: str, method: str, status: int, **settings: Any) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        marks = [pytest.mark.settings(**settings)] if settings else []
        SCENARIOS.append(pytest.param(path, method, status, fn, marks=marks, id=f"{method.upper()} {path} {status}"))
        return fn
    return register


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# POST /apiv2/calls
@scenario("/apiv2/calls", "post", 201)
async def create_call(c: Ctx) -> HTTPResponse:
    return await c.fetch("POST", "/apiv2/calls", body=b'{"any": "object"}', headers=JSON)


@scenario("/apiv2/calls", "post", 200)
async def reuse_last(c: Ctx) -> HTTPResponse:
    await c.create()
    return await c.fetch("POST", "/apiv2/calls?reuse_last=true")


@scenario("/apiv2/calls", "post", 400)
async def create_bad_body(c: Ctx) -> HTTPResponse:
    return await c.fetch("POST", "/apiv2/calls", body=b'{"unterminated', headers=JSON)


@scenario("/apiv2/calls", "post", 404, list_calls="off")
async def reuse_last_off(c: Ctx) -> HTTPResponse:
    await c.create()
    return await c.fetch("POST", "/apiv2/calls?reuse_last=true")


@scenario("/apiv2/calls", "post", 413)
async def create_too_large(c: Ctx) -> HTTPResponse:
    return await c.fetch("POST", "/apiv2/calls", body=BIG, headers=JSON)


@scenario("/apiv2/calls", "post", 415)
async def create_not_json(c: Ctx) -> HTTPResponse:
    return await c.fetch("POST", "/apiv2/calls", body=b"hello", headers={"Content-Type": "text/plain"})


@scenario("/apiv2/calls", "post", 429, rate_create=0.001, rate_create_burst=1)
async def create_rate_limited(c: Ctx) -> HTTPResponse:
    await c.create()
    return await c.fetch("POST", "/apiv2/calls")


@scenario("/apiv2/calls", "post", 503, max_calls=1)
async def create_at_capacity(c: Ctx) -> HTTPResponse:
    c.log_guard.expect("signal_srv.access", "^503 ")
    await c.create()
    return await c.fetch("POST", "/apiv2/calls")


# GET /apiv2/calls
@scenario("/apiv2/calls", "get", 200)
async def list_calls(c: Ctx) -> HTTPResponse:
    host = await c.create()
    await c.create()
    await c.join(host["call_id"])
    return await c.fetch("GET", "/apiv2/calls?limit=10")


@scenario("/apiv2/calls", "get", 400)
async def list_bad_limit(c: Ctx) -> HTTPResponse:
    return await c.fetch("GET", "/apiv2/calls?limit=0")


@scenario("/apiv2/calls", "get", 404, list_calls="off")
async def list_off(c: Ctx) -> HTTPResponse:
    return await c.fetch("GET", "/apiv2/calls")


@scenario("/apiv2/calls", "get", 413)
async def list_too_large(c: Ctx) -> HTTPResponse:
    return await c.fetch("GET", "/apiv2/calls", body=BIG)


# GET /apiv2/calls/current
@scenario("/apiv2/calls/current", "get", 404)
async def current_is_gone(c: Ctx) -> HTTPResponse:
    return await c.fetch("GET", "/apiv2/calls/current")


# GET /apiv2/calls/{call_id}
@scenario("/apiv2/calls/{call_id}", "get", 200)
async def get_call(c: Ctx) -> HTTPResponse:
    return await c.fetch("GET", f"/apiv2/calls/{(await c.create())['call_id']}")


@scenario("/apiv2/calls/{call_id}", "get", 400)
async def get_call_bad_utf8(c: Ctx) -> HTTPResponse:
    return await c.fetch("GET", "/apiv2/calls/%FF%FE")


@scenario("/apiv2/calls/{call_id}", "get", 404)
async def get_unknown_call(c: Ctx) -> HTTPResponse:
    return await c.fetch("GET", "/apiv2/calls/AAAAAAAAAAAAAAAAAAAAAA")


@scenario("/apiv2/calls/{call_id}", "get", 503)
async def get_call_shutting_down(c: Ctx) -> HTTPResponse:
    call_id = (await c.create())["call_id"]
    await c.shut_down()
    return await c.fetch("GET", f"/apiv2/calls/{call_id}")


@scenario("/apiv2/calls/{call_id}", "get", 413)
async def get_call_too_large(c: Ctx) -> HTTPResponse:
    return await c.fetch("GET", f"/apiv2/calls/{(await c.create())['call_id']}", body=BIG)


# POST /apiv2/calls/{call_id}/join
@scenario("/apiv2/calls/{call_id}/join", "post", 200)
async def join(c: Ctx) -> HTTPResponse:
    return await c.fetch("POST", f"/apiv2/calls/{(await c.create())['call_id']}/join")


@scenario("/apiv2/calls/{call_id}/join", "post", 400)
async def join_body_not_object(c: Ctx) -> HTTPResponse:
    return await c.fetch("POST", f"/apiv2/calls/{(await c.create())['call_id']}/join", body=b"[1]", headers=JSON)


@scenario("/apiv2/calls/{call_id}/join", "post", 404)
async def join_unknown(c: Ctx) -> HTTPResponse:
    return await c.fetch("POST", "/apiv2/calls/AAAAAAAAAAAAAAAAAAAAAA/join")


@scenario("/apiv2/calls/{call_id}/join", "post", 409)
async def join_full(c: Ctx) -> HTTPResponse:
    host = await c.create()
    await c.join(host["call_id"])
    return await c.fetch("POST", f"/apiv2/calls/{host['call_id']}/join")


@scenario("/apiv2/calls/{call_id}/join", "post", 413)
async def join_too_large(c: Ctx) -> HTTPResponse:
    return await c.fetch("POST", f"/apiv2/calls/{(await c.create())['call_id']}/join", body=BIG, headers=JSON)


@scenario("/apiv2/calls/{call_id}/join", "post", 415)
async def join_not_json(c: Ctx) -> HTTPResponse:
    return await c.fetch("POST", f"/apiv2/calls/{(await c.create())['call_id']}/join", body=b"<x/>",
                         headers={"Content-Type": "application/xml"})


@scenario("/apiv2/calls/{call_id}/join", "post", 429, rate_join=0.001, rate_join_burst=1)
async def join_rate_limited(c: Ctx) -> HTTPResponse:
    host = await c.create()
    await c.join(host["call_id"])
    return await c.fetch("POST", f"/apiv2/calls/{host['call_id']}/join")


@scenario("/apiv2/calls/{call_id}/join", "post", 503, mailbox_size=1, max_participants=16)
async def join_busy(c: Ctx) -> HTTPResponse:
    call_id = (await c.create())["call_id"]
    return await c.until_busy(lambda: c.fetch("POST", f"/apiv2/calls/{call_id}/join"))


# POST /apiv2/calls/{call_id}/leave and /end: the same statuses
for _action in ("leave", "end"):
    _path = "/apiv2/calls/{call_id}/" + _action

    @scenario(_path, "post", 200)
    async def act(c: Ctx, action: str = _action) -> HTTPResponse:
        host = await c.create()
        await c.join(host["call_id"])
        return await c.fetch("POST", f"/apiv2/calls/{host['call_id']}/{action}", headers=bearer(host["peer_token"]))

    @scenario(_path, "post", 400)
    async def act_bad_body(c: Ctx, action: str = _action) -> HTTPResponse:
        host = await c.create()
        return await c.fetch("POST", f"/apiv2/calls/{host['call_id']}/{action}", body=b'"text"',
                             headers={**JSON, **bearer(host["peer_token"])})

    @scenario(_path, "post", 401)
    async def act_wrong_token(c: Ctx, action: str = _action) -> HTTPResponse:
        host, other = await c.create(), await c.create()
        return await c.fetch("POST", f"/apiv2/calls/{host['call_id']}/{action}", headers=bearer(other["peer_token"]))

    @scenario(_path, "post", 404)
    async def act_ended(c: Ctx, action: str = _action) -> HTTPResponse:
        host = await c.create()
        ended = await c.fetch("POST", f"/apiv2/calls/{host['call_id']}/end", headers=bearer(host["peer_token"]))
        assert ended.code == 200
        return await c.fetch("POST", f"/apiv2/calls/{host['call_id']}/{action}", headers=bearer(host["peer_token"]))

    @scenario(_path, "post", 413)
    async def act_too_large(c: Ctx, action: str = _action) -> HTTPResponse:
        host = await c.create()
        return await c.fetch("POST", f"/apiv2/calls/{host['call_id']}/{action}", body=BIG,
                             headers={**JSON, **bearer(host["peer_token"])})

    @scenario(_path, "post", 415)
    async def act_not_json(c: Ctx, action: str = _action) -> HTTPResponse:
        host = await c.create()
        return await c.fetch("POST", f"/apiv2/calls/{host['call_id']}/{action}", body=b"a=1",
                             headers={"Content-Type": "application/x-www-form-urlencoded", **bearer(host["peer_token"])})

    @scenario(_path, "post", 429, auth_failure_rate=0.001, auth_failure_burst=1)
    async def act_wrong_tokens(c: Ctx, action: str = _action) -> HTTPResponse:
        host, other = await c.create(), await c.create()
        return await c.wrong_twice(f"/apiv2/calls/{host['call_id']}/{action}", "POST", other["peer_token"])

    @scenario(_path, "post", 503, mailbox_size=1)
    async def act_busy(c: Ctx, action: str = _action) -> HTTPResponse:
        host = await c.create()
        return await c.until_busy(lambda: c.fetch(
            "POST", f"/apiv2/calls/{host['call_id']}/{action}", headers=bearer(host["peer_token"])))


# Access control (auth=jwt): 401 without a good token, 403 without the grant
@scenario("/apiv2/calls", "post", 401, **JWT)
async def create_without_token(c: Ctx) -> HTTPResponse:
    return await c.fetch("POST", "/apiv2/calls")


@scenario("/apiv2/calls", "post", 403, **JWT)
async def create_without_grant(c: Ctx) -> HTTPResponse:
    return await c.fetch("POST", "/apiv2/calls", headers=access("join", "list"))


@scenario("/apiv2/calls", "get", 401, **JWT)
async def list_with_malformed_token(c: Ctx) -> HTTPResponse:
    return await c.fetch("GET", "/apiv2/calls", headers=bearer("not.a.token"))


@scenario("/apiv2/calls", "get", 403, **JWT)
async def list_without_grant(c: Ctx) -> HTTPResponse:
    return await c.fetch("GET", "/apiv2/calls", headers=access("create", "join"))


@scenario("/apiv2/calls/{call_id}", "get", 401, **JWT)
async def get_call_with_expired_token(c: Ctx) -> HTTPResponse:
    host = await c.create(access("create"))
    return await c.fetch("GET", f"/apiv2/calls/{host['call_id']}", headers=access(ttl=60, now=0))


@scenario("/apiv2/calls/{call_id}", "get", 403, **JWT)
async def get_call_of_another_token(c: Ctx) -> HTTPResponse:
    host = await c.create(access("create"))
    return await c.fetch("GET", f"/apiv2/calls/{host['call_id']}", headers=access(call_id=UNKNOWN_CALL))


@scenario("/apiv2/calls/{call_id}/join", "post", 401, **JWT)
async def join_without_token(c: Ctx) -> HTTPResponse:
    host = await c.create(access("create"))
    return await c.fetch("POST", f"/apiv2/calls/{host['call_id']}/join")


@scenario("/apiv2/calls/{call_id}/join", "post", 403, **JWT)
async def join_with_a_token_for_another_call(c: Ctx) -> HTTPResponse:
    host = await c.create(access("create"))
    return await c.fetch("POST", f"/apiv2/calls/{host['call_id']}/join", headers=access("join", call_id=UNKNOWN_CALL))


@scenario("/apiv2/calls/{call_id}/end", "post", 403, **JWT)
async def end_with_a_token_without_admin(c: Ctx) -> HTTPResponse:
    host = await c.create(access("create"))
    return await c.fetch("POST", f"/apiv2/calls/{host['call_id']}/end", headers=access("create", "join", "list"))


# POST /apiv2/calls/{call_id}/participants/{peer_id}/remove
_REMOVE = "/apiv2/calls/{call_id}/participants/{peer_id}/remove"


def removal(call_id: str, peer_id: str) -> str:
    return _REMOVE.replace("{call_id}", call_id).replace("{peer_id}", peer_id)


@scenario(_REMOVE, "post", 200, **JWT)
async def remove(c: Ctx) -> HTTPResponse:
    host = await c.create(access("create"))
    guest = await c.join(host["call_id"], access("join"))
    return await c.fetch("POST", removal(host["call_id"], guest["peer_id"]),
                         headers=access("admin"))


@scenario(_REMOVE, "post", 400)
async def remove_bad_body(c: Ctx) -> HTTPResponse:
    host = await c.create()
    return await c.fetch("POST", removal(host["call_id"], host["peer_id"]),
                         body=b"[]", headers=JSON)


@scenario(_REMOVE, "post", 401, **JWT)
async def remove_without_token(c: Ctx) -> HTTPResponse:
    host = await c.create(access("create"))
    return await c.fetch("POST", removal(host["call_id"], host["peer_id"]))


@scenario(_REMOVE, "post", 403)
async def remove_without_access_control(c: Ctx) -> HTTPResponse:
    host = await c.create()
    return await c.fetch("POST", removal(host["call_id"], host["peer_id"]),
                         headers=bearer(host["peer_token"]))


@scenario(_REMOVE, "post", 404, **JWT)
async def remove_unknown_participant(c: Ctx) -> HTTPResponse:
    host = await c.create(access("create"))
    return await c.fetch("POST", removal(host["call_id"], UNKNOWN_CALL),
                         headers=access("admin"))


@scenario(_REMOVE, "post", 413)
async def remove_too_large(c: Ctx) -> HTTPResponse:
    host = await c.create()
    return await c.fetch("POST", removal(host["call_id"], host["peer_id"]),
                         body=BIG, headers=JSON)


@scenario(_REMOVE, "post", 415)
async def remove_not_json(c: Ctx) -> HTTPResponse:
    host = await c.create()
    return await c.fetch("POST", removal(host["call_id"], host["peer_id"]),
                         body=b"x", headers={"Content-Type": "text/plain"})


@scenario(_REMOVE, "post", 503, mailbox_size=1, **JWT)
async def remove_busy(c: Ctx) -> HTTPResponse:
    host = await c.create(access("create"))
    return await c.until_busy(lambda: c.fetch(
        "POST", removal(host["call_id"], UNKNOWN_CALL), headers=access("admin")))


# GET /apiv2/config
@scenario("/apiv2/config", "get", 200, ice_servers='[{"urls": "stun:stun.invalid:3478"}]')
async def client_config(c: Ctx) -> HTTPResponse:
    return await c.fetch("GET", "/apiv2/config")


@scenario("/apiv2/config", "get", 400)
async def client_config_bad_call_id(c: Ctx) -> HTTPResponse:
    return await c.fetch("GET", "/apiv2/config?call_id=%FF", headers=bearer("x" * 22))


@scenario("/apiv2/config", "get", 401)
async def client_config_no_token(c: Ctx) -> HTTPResponse:
    return await c.fetch("GET", f"/apiv2/config?call_id={(await c.create())['call_id']}")


@scenario("/apiv2/config", "get", 404)
async def client_config_unknown_call(c: Ctx) -> HTTPResponse:
    return await c.fetch("GET", "/apiv2/config?call_id=AAAAAAAAAAAAAAAAAAAAAA", headers=bearer("x" * 22))


@scenario("/apiv2/config", "get", 413)
async def client_config_too_large(c: Ctx) -> HTTPResponse:
    return await c.fetch("GET", "/apiv2/config", body=BIG)


@scenario("/apiv2/config", "get", 429, auth_failure_rate=0.001, auth_failure_burst=1)
async def client_config_wrong_tokens(c: Ctx) -> HTTPResponse:
    host, other = await c.create(), await c.create()
    return await c.wrong_twice(f"/apiv2/config?call_id={host['call_id']}", "GET", other["peer_token"])


@scenario("/apiv2/config", "get", 503, mailbox_size=1)
async def client_config_busy(c: Ctx) -> HTTPResponse:
    host = await c.create()
    return await c.until_busy(lambda: c.fetch(
        "GET", f"/apiv2/config?call_id={host['call_id']}", headers=bearer(host["peer_token"])))


# GET /apiv2/openapi.json
@scenario("/apiv2/openapi.json", "get", 200)
async def openapi_document(c: Ctx) -> HTTPResponse:
    return await c.fetch("GET", "/apiv2/openapi.json")


@scenario("/apiv2/openapi.json", "get", 304)
async def openapi_not_modified(c: Ctx) -> HTTPResponse:
    first = await c.fetch("GET", "/apiv2/openapi.json")
    return await c.fetch("GET", "/apiv2/openapi.json", headers={"If-None-Match": first.headers["Etag"]})


# GET /healthz, /readyz, /metrics
@scenario("/healthz", "get", 200)
async def health(c: Ctx) -> HTTPResponse:
    await c.create()
    return await c.fetch("GET", "/healthz")


@scenario("/healthz", "get", 413)
async def health_too_large(c: Ctx) -> HTTPResponse:
    return await c.fetch("GET", "/healthz", body=BIG)


@scenario("/readyz", "get", 200)
async def ready(c: Ctx) -> HTTPResponse:
    return await c.fetch("GET", "/readyz")


@scenario("/readyz", "get", 413)
async def ready_too_large(c: Ctx) -> HTTPResponse:
    return await c.fetch("GET", "/readyz", body=BIG)


@scenario("/readyz", "get", 503, max_calls=1)
async def ready_at_capacity(c: Ctx) -> HTTPResponse:
    c.log_guard.expect("signal_srv.access", "^503 ")
    await c.create()
    return await c.fetch("GET", "/readyz")


@scenario("/metrics", "get", 200)
async def metrics(c: Ctx) -> HTTPResponse:
    await c.create()
    return await c.fetch("GET", "/metrics")


# Tests ---------------------------------------------------------------------------------


def test_document_is_valid_openapi() -> None:
    validate_openapi_document(DOC)
    assert DOC["openapi"].startswith("3.1")


def test_every_route_is_documented_with_its_methods(app: Application) -> None:
    routes = app_routes(app)
    assert set(routes) == set(DOC["paths"]), (
        f"routed, not documented: {sorted(set(routes) - set(DOC['paths']))}; "
        f"documented, not routed: {sorted(set(DOC['paths']) - set(routes))}"
    )
    for path, handler in routes.items():
        if path in REMOVED:
            assert documented_methods(path) == {"get"} and DOC["paths"][path]["get"].get("deprecated")
            continue
        assert documented_methods(path) == implemented_methods(handler), f"{path}: {handler.__name__}"


def test_every_documented_status_has_a_scenario() -> None:
    documented = {(path, method, int(status))
                  for path, item in DOC["paths"].items()
                  for method, operation in item.items() if method in METHODS
                  for status in operation["responses"]}
    covered = {tuple(p.values[:3]) for p in SCENARIOS}
    assert covered == documented, (
        f"documented without a scenario: {sorted(documented - covered)}; "
        f"scenario for an undocumented status: {sorted(covered - documented)}"
    )


@pytest.mark.parametrize(("path", "method", "status", "make"), SCENARIOS)
async def test_answer_conforms_to_document(
    path: str, method: str, status: int, make: Scenario, base_url: str, log_guard: Any, registry: Registry
) -> None:
    response = await make(Ctx(base_url, log_guard, registry))
    assert response.code == status, f"expected {status}, got {response.code}: {response.body[:300]!r}"
    assert_conforms(path, method, response)


async def test_every_call_route_answers_shutting_down_as_documented(
    base_url: str, log_guard: Any, registry: Registry
) -> None:
    c = Ctx(base_url, log_guard, registry)
    host = await c.create()
    call, auth = f"/apiv2/calls/{host['call_id']}", bearer(host["peer_token"])
    await c.shut_down()
    for method, path, target in [
        ("post", "/apiv2/calls", "/apiv2/calls"),
        ("post", "/apiv2/calls", "/apiv2/calls?reuse_last=true"),
        ("get", "/apiv2/calls/{call_id}", call),
        ("post", "/apiv2/calls/{call_id}/join", call + "/join"),
        ("post", "/apiv2/calls/{call_id}/leave", call + "/leave"),
        ("post", "/apiv2/calls/{call_id}/end", call + "/end"),
        ("get", "/apiv2/config", f"/apiv2/config?call_id={host['call_id']}"),
    ]:
        # Asking to keep the connection alive: the answer itself must say that it closes.
        response = await c.fetch(method.upper(), target, headers={**auth, "Connection": "keep-alive"})
        assert (response.code, json.loads(response.body)["error"]["code"]) == (503, "shutting_down"), target
        assert response.headers["Connection"] == "close"
        assert_conforms(path, method, response)


_405_CASES = [
    path
    for path in DOC["paths"] if path not in REMOVED
]


@pytest.mark.parametrize("path", _405_CASES)
async def test_undocumented_methods_get_405_with_allow(path: str, base_url: str, log_guard: Any) -> None:
    """Every other method answers 405 method_not_allowed, and Allow lists the documented ones."""
    c = Ctx(base_url, log_guard)
    host = await c.create()
    target = path.replace("{call_id}", host["call_id"]).replace("{peer_id}", host["peer_id"])
    allowed = documented_methods(path)
    for method in sorted(set(METHODS) - allowed):
        response = await c.fetch(method.upper(), target, body=b"" if method in ("post", "put", "patch") else None)
        assert response.code == 405, f"{method.upper()} {path}: {response.code}"
        assert {m.strip().lower() for m in response.headers.get("Allow", "").split(",") if m.strip()} == allowed
        spec, where = DOC["components"]["responses"]["MethodNotAllowed"], ("components", "responses", "MethodNotAllowed")
        assert response.headers["Content-Type"].startswith("application/json"), response.headers["Content-Type"]
        validate_schema(json.loads(response.body), *where, "content", "application/json", "schema")
        assert spec["headers"]["Allow"]["required"]


async def test_served_document_is_the_package_file(base_url: str, log_guard: Any) -> None:
    response = await Ctx(base_url, log_guard).fetch("GET", "/apiv2/openapi.json")
    assert response.code == 200
    with open(OPENAPI_PATH, "rb") as f:
        assert response.body == f.read()
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"


async def test_unicode_digit_limit_is_bad_request_not_500(base_url: str, log_guard: Any) -> None:
    response = await Ctx(base_url, log_guard).fetch("GET", "/apiv2/calls?limit=" + quote("²"))
    assert response.code == 400, response.body


@pytest.mark.parametrize("path", list(DOC["paths"]))
async def test_every_route_refuses_a_host_it_does_not_serve(path: str, base_url: str, log_guard: Any) -> None:
    """A Host outside allowed_hosts is 400 host_not_allowed, as components.responses.HostNotAllowed says."""
    c = Ctx(base_url, log_guard)
    target = path.replace("{call_id}", (await c.create())["call_id"])
    for method in sorted(documented_methods(path)):
        response = await c.fetch(method.upper(), target, headers={"Host": "rebound.example"})
        assert response.code == 400, f"{method.upper()} {path}: {response.code}"
        assert response.headers["Content-Type"].startswith("application/json")
        validate_schema(json.loads(response.body), "components", "responses", "HostNotAllowed",
                        "content", "application/json", "schema")
