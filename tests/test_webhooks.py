"""Lifecycle webhooks against a real local receiver: signature, order, retries, timeouts, drops."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import re
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pytest
from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPHeaders
from tornado.ioloop import IOLoop
from tornado.testing import bind_unused_port
from tornado.web import Application, RequestHandler

from signal_srv.client import SignalingClient
from signal_srv.config import Config
from signal_srv.metrics import Metrics
from signal_srv.registry import Registry
from signal_srv.webhooks import Webhooks
from tests.conftest import TIMEOUT

SECRET = "s3cret"
ISO_UTC_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@dataclass(frozen=True)
class Received:
    body: bytes
    headers: HTTPHeaders
    at: float

    @property
    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    def signed_with(self, secret: str) -> bool:
        expected = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("X-Signal-Srv-Signature", ""), expected)


class Receiver:
    """A webhook endpoint: records every request, answers with queued statuses (then 200).

    While ``hold`` is set, each request waits for a turn (``allow``) before it answers, so a
    test decides exactly when the sender's in-flight delivery completes.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.requests: asyncio.Queue[Received] = asyncio.Queue()
        self.statuses: deque[int] = deque()
        self.hold = False
        self._turns = asyncio.Semaphore(0)

    async def next(self, timeout: float = TIMEOUT) -> Received:
        return await asyncio.wait_for(self.requests.get(), timeout)

    async def take(self, n: int) -> list[Received]:
        return [await self.next() for _ in range(n)]

    def allow(self, n: int = 1) -> None:
        for _ in range(n):
            self._turns.release()

    def release_all(self) -> None:
        self.hold = False
        self.allow(1000)

    async def answer(self, handler: RequestHandler) -> None:
        request = handler.request
        self.requests.put_nowait(Received(request.body, request.headers, time.monotonic()))
        if self.hold:
            await self._turns.acquire()
        handler.set_status(self.statuses.popleft() if self.statuses else 200)


class _Hook(RequestHandler):
    def initialize(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def post(self) -> None:
        await self.receiver.answer(self)


@pytest.fixture
def receiver(io_loop: IOLoop) -> Iterator[Receiver]:
    sock, port = bind_unused_port()
    receiver = Receiver(f"http://127.0.0.1:{port}/hook")
    # No access log: its 5xx lines are ERROR records, and the log guard would fail the test.
    app = Application([(r"/hook", _Hook, {"receiver": receiver})], log_function=lambda handler: None)
    server = HTTPServer(app)
    server.add_socket(sock)
    yield receiver
    receiver.release_all()
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=TIMEOUT)


@pytest.fixture
def make_webhooks(receiver: Receiver, io_loop: IOLoop) -> Iterator[Callable[..., Webhooks]]:
    """Build ``Webhooks`` to the receiver (fast backoff); each is closed after the test."""
    made: list[Webhooks] = []

    def make(**options: Any) -> Webhooks:
        options = {"timeout": TIMEOUT, "backoff": 0.01, "metrics": Metrics(), **options}
        webhooks = Webhooks(options.pop("url", receiver.url), SECRET, **options)
        made.append(webhooks)
        return webhooks

    yield make
    for webhooks in made:
        io_loop.run_sync(lambda: webhooks.close(0.1), timeout=TIMEOUT)


def counts(webhooks: Webhooks) -> dict[str, int]:
    return {k: v for k, v in webhooks.counts.items() if v}


def warnings(log_guard: Any, logger: str = "signal_srv.webhooks") -> list[str]:
    return [r.getMessage() for r in log_guard.records if r.name == logger]


# The module on its own --------------------------------------------------------------


async def test_event_is_signed_over_its_exact_body_and_describes_itself(
    receiver: Receiver, make_webhooks: Callable[..., Webhooks]
) -> None:
    webhooks = make_webhooks()
    webhooks.start()
    webhooks.emit("participant_left", "call-1", peer_id="peer-9", reason="timeout")
    got = await receiver.next()
    assert got.signed_with(SECRET) and not got.signed_with("other")
    assert got.headers["Content-Type"] == "application/json"
    body = got.json
    assert list(body) == ["id", "event", "time", "call_id", "peer_id", "reason"]
    assert body["event"] == "participant_left" and body["call_id"] == "call-1"
    assert body["peer_id"] == "peer-9" and body["reason"] == "timeout"
    assert ISO_UTC_MS.match(body["time"]) and len(body["id"]) >= 16
    assert got.headers["X-Signal-Srv-Event"] == "participant_left"
    assert got.headers["X-Signal-Srv-Delivery"] == body["id"]


async def test_fields_cannot_replace_the_id_or_time(
    receiver: Receiver, make_webhooks: Callable[..., Webhooks]
) -> None:
    webhooks = make_webhooks()
    webhooks.start()
    webhooks.emit("call_ended", "call-1", id="x", time="y", reason="ended")
    body = (await receiver.next()).json
    assert body["id"] != "x" and ISO_UTC_MS.match(body["time"]) and body["reason"] == "ended"


async def test_events_arrive_in_emit_order_with_unique_ids(
    receiver: Receiver, make_webhooks: Callable[..., Webhooks]
) -> None:
    webhooks = make_webhooks()
    webhooks.start()
    sent = [(f"call-{i % 3}", event) for i in range(10)
            for event in ("call_created", "participant_joined", "participant_left", "call_ended")]
    for call_id, event in sent:
        webhooks.emit(event, call_id)
    got = [r.json for r in await receiver.take(len(sent))]
    assert [(b["call_id"], b["event"]) for b in got] == sent
    assert len({b["id"] for b in got}) == len(sent)
    await webhooks.close(TIMEOUT)
    assert counts(webhooks) == {"delivered": len(sent)}


async def test_a_500_is_retried_with_the_same_body_then_delivered(
    receiver: Receiver, make_webhooks: Callable[..., Webhooks]
) -> None:
    receiver.statuses.extend([500, 503])
    webhooks = make_webhooks(retries=2, backoff=0.1)
    webhooks.start()
    webhooks.emit("call_created", "call-1", peer_id="p")
    first, second, third = await receiver.take(3)
    assert first.body == second.body == third.body and third.signed_with(SECRET)
    # Exponential backoff (0.1 s, then 0.2 s), less 0.05 s for arrival times lagging the sender's clock.
    assert second.at - first.at >= 0.1 - 0.05 and third.at - second.at >= 0.2 - 0.05
    await webhooks.close(TIMEOUT)
    assert counts(webhooks) == {"delivered": 1, "retried": 2}


async def test_a_4xx_is_not_retried(
    receiver: Receiver, make_webhooks: Callable[..., Webhooks], log_guard: Any
) -> None:
    log_guard.expect("signal_srv.webhooks", r"^webhook call_created \S+ for call call-1 failed: refused: HTTP 410")
    receiver.statuses.append(410)
    webhooks = make_webhooks(retries=3)
    webhooks.start()
    webhooks.emit("call_created", "call-1")
    webhooks.emit("call_ended", "call-1", reason="ended")
    first, second = await receiver.take(2)
    assert (first.json["event"], second.json["event"]) == ("call_created", "call_ended")
    await webhooks.close(TIMEOUT)
    assert receiver.requests.empty()
    assert counts(webhooks) == {"failed": 1, "delivered": 1}


async def test_a_dead_receiver_is_retried_then_given_up_and_logged_once(
    make_webhooks: Callable[..., Webhooks], log_guard: Any
) -> None:
    log_guard.expect("signal_srv.webhooks", r"failed: ConnectionRefusedError.*gave up after 3 attempts")
    sock, port = bind_unused_port()
    sock.close()  # nothing listens there: every connection is refused
    webhooks = make_webhooks(url=f"http://127.0.0.1:{port}/hook", retries=2)
    webhooks.start()
    for _ in range(3):
        webhooks.emit("call_created", "call-1")
    await webhooks.close(TIMEOUT)
    assert counts(webhooks) == {"failed": 3, "retried": 6}
    assert len(warnings(log_guard)) == 1


async def test_a_hanging_receiver_times_out_each_attempt_and_never_blocks_emit(
    receiver: Receiver, make_webhooks: Callable[..., Webhooks], log_guard: Any
) -> None:
    log_guard.expect("signal_srv.webhooks", r"^webhook call_created \S+ for call call-0 failed: timeout")
    log_guard.expect("signal_srv.webhooks", r"^webhooks closed with 50 events undelivered")
    receiver.hold = True
    webhooks = make_webhooks(timeout=0.5, retries=1, backoff=0.05, queue_size=50)
    webhooks.start()
    webhooks.emit("call_created", "call-0")
    first = await receiver.next()

    started = time.monotonic()
    for i in range(1, 51):
        webhooks.emit("call_created", f"call-{i}")
    assert time.monotonic() - started < 0.05
    assert webhooks.pending == 50 and counts(webhooks) == {}

    # Arrival times lag the sender's clock a little: allow 0.1 s of it.
    retry = await receiver.next()
    assert retry.json["id"] == first.json["id"]
    assert 0.5 - 0.1 <= retry.at - first.at < 0.5 + 1.0
    after = await receiver.next()  # the next event goes out once the first has failed
    assert after.json["call_id"] == "call-1" and after.at - retry.at >= 0.5 - 0.1
    assert counts(webhooks) == {"failed": 1, "retried": 1}
    assert warnings(log_guard)[0].startswith("webhook call_created ")
    assert "failed: timeout; gave up after 2 attempts" in warnings(log_guard)[0]

    started = time.monotonic()
    await webhooks.close(0.1)
    assert time.monotonic() - started < 0.1 + 1.0
    assert counts(webhooks) == {"failed": 1, "retried": 1, "dropped": 50}


async def test_drops_beyond_queue_size_are_counted_and_logged_once_per_burst(
    receiver: Receiver, make_webhooks: Callable[..., Webhooks], log_guard: Any
) -> None:
    log_guard.expect("signal_srv.webhooks", r"^webhook queue full \(4 events\); dropping events")
    log_guard.expect("signal_srv.webhooks", r"^webhook queue accepts events again; dropped 4 events$")
    receiver.hold = True
    webhooks = make_webhooks(queue_size=4)
    webhooks.start()
    webhooks.emit("call_created", "in-flight")
    await receiver.next()
    for i in range(7):
        webhooks.emit("participant_joined", f"call-{i}")
    assert webhooks.pending == 4 and counts(webhooks) == {"dropped": 3}
    assert len(warnings(log_guard)) == 1

    receiver.allow()  # one slot frees: accepted, but the burst goes on above half full
    await receiver.next()
    webhooks.emit("participant_joined", "call-7")
    webhooks.emit("participant_joined", "call-8")
    assert counts(webhooks) == {"delivered": 1, "dropped": 4}
    assert len(warnings(log_guard)) == 1

    receiver.allow(2)  # the queue drains to half: the next event ends the burst
    await receiver.take(2)
    webhooks.emit("call_ended", "call-9")
    assert warnings(log_guard)[1] == "webhook queue accepts events again; dropped 4 events"

    receiver.release_all()
    rest = await receiver.take(3)
    assert [r.json["call_id"] for r in rest] == ["call-3", "call-7", "call-9"]
    await webhooks.close(TIMEOUT)
    assert counts(webhooks) == {"delivered": 7, "dropped": 4}
    assert len(warnings(log_guard)) == 2


async def test_close_delivers_what_is_queued_then_drops_new_events(
    receiver: Receiver, make_webhooks: Callable[..., Webhooks], log_guard: Any
) -> None:
    log_guard.expect("signal_srv.webhooks", r"^webhooks are closed; dropping events \(first: call_ended")
    webhooks = make_webhooks()
    for i in range(5):
        webhooks.emit("call_created", f"call-{i}")  # queued before the task even starts
    webhooks.start()
    await webhooks.close(TIMEOUT)
    assert receiver.requests.qsize() == 5 and counts(webhooks) == {"delivered": 5}
    webhooks.emit("call_ended", "call-0")
    webhooks.emit("call_ended", "call-1")
    assert counts(webhooks) == {"delivered": 5, "dropped": 2}
    assert len(warnings(log_guard)) == 1


async def test_close_gives_up_on_a_hanging_receiver_after_its_timeout(
    receiver: Receiver, make_webhooks: Callable[..., Webhooks], log_guard: Any
) -> None:
    log_guard.expect("signal_srv.webhooks", r"^webhooks closed with 3 events undelivered")
    receiver.hold = True
    webhooks = make_webhooks()
    webhooks.start()
    for i in range(3):
        webhooks.emit("call_created", f"call-{i}")
    await receiver.next()
    started = time.monotonic()
    await webhooks.close(0.2)
    assert 0.2 <= time.monotonic() - started < 0.2 + 1.0
    assert counts(webhooks) == {"dropped": 3}


async def test_counts_live_on_the_metrics_object_and_secrets_stay_out_of_logs(
    receiver: Receiver, make_webhooks: Callable[..., Webhooks], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    metrics = Metrics()
    receiver.statuses.append(500)
    webhooks = make_webhooks(metrics=metrics, url=receiver.url + "?key=urlsecret")
    webhooks.start()
    webhooks.emit("call_created", "call-1")
    await receiver.take(2)
    await webhooks.close(TIMEOUT)
    assert getattr(metrics, "webhooks") is webhooks.counts
    assert getattr(metrics, "webhooks") == Counter({"delivered": 1, "retried": 1})
    assert SECRET not in caplog.text and "urlsecret" not in caplog.text and "webhook" in caplog.text
    assert "urlsecret" not in repr(webhooks)


async def test_unknown_event_is_a_bug_logged_and_never_raised(
    make_webhooks: Callable[..., Webhooks], log_guard: Any
) -> None:
    log_guard.expect("signal_srv.webhooks", r"^webhook event 'call_exploded' for call call-1 is not one of")
    webhooks = make_webhooks()
    webhooks.emit("call_exploded", "call-1")
    assert webhooks.pending == 0


# Through the real server --------------------------------------------------------------

RECEIVER = "<receiver>"  # stands for the receiver's URL in @pytest.mark.settings


@pytest.fixture
def config(config: Config, receiver: Receiver) -> Config:
    """The conftest ``config``, with ``webhook_url=RECEIVER`` pointed at the local receiver."""
    if config.webhook_url == RECEIVER:
        return dataclasses.replace(config, webhook_url=receiver.url)
    return config


def lifecycle(received: list[Received], call_id: str) -> list[tuple[str, str | None, str | None]]:
    bodies = [r.json for r in received if r.json["call_id"] == call_id]
    return [(b["event"], b.get("peer_id"), b.get("reason")) for b in bodies]


@pytest.mark.settings(webhook_url=RECEIVER, webhook_secret=SECRET)
async def test_server_posts_each_calls_lifecycle_in_order_and_signed(
    client: SignalingClient, receiver: Receiver
) -> None:
    one, two = await client.create_call(), await client.create_call()
    one_guest = await client.join(one["call_id"])
    two_guest = await client.join(two["call_id"])
    await client.leave(one["call_id"], one_guest["peer_token"])
    await client.leave(two["call_id"], two_guest["peer_token"])
    await client.end(one["call_id"], one["peer_token"])
    await client.leave(two["call_id"], two["peer_token"])
    got = await receiver.take(9)
    assert all(r.signed_with(SECRET) for r in got)
    assert lifecycle(got, one["call_id"]) == [
        ("call_created", one["peer_id"], None),
        ("participant_joined", one_guest["peer_id"], None),
        ("participant_left", one_guest["peer_id"], "left"),
        ("call_ended", None, "ended"),
    ]
    assert lifecycle(got, two["call_id"]) == [
        ("call_created", two["peer_id"], None),
        ("participant_joined", two_guest["peer_id"], None),
        ("participant_left", two_guest["peer_id"], "left"),
        ("participant_left", two["peer_id"], "left"),
        ("call_ended", None, "left"),
    ]
    tokens = [c["peer_token"] for c in (one, two, one_guest, two_guest)]
    assert not any(token.encode() in r.body for r in got for token in tokens)
    assert len({r.json["id"] for r in got}) == 9


@pytest.mark.settings(webhook_url=RECEIVER, webhook_secret=SECRET, webhook_timeout=TIMEOUT, webhook_queue_size=4)
async def test_a_hanging_receiver_never_delays_create_join_or_relay(
    client: SignalingClient, receiver: Receiver, registry: Registry, log_guard: Any
) -> None:
    # Also at teardown: shutdown ends 6 calls at once, and 6 call_ended overflow 4 slots.
    log_guard.expect("signal_srv.webhooks", r"^webhook queue full \(4 events\); dropping events")
    log_guard.expect("signal_srv.webhooks", r"dropped \d+ events")
    receiver.hold = True
    started = time.monotonic()
    host = await client.create_call()
    await receiver.next()  # call_created is in flight, and hangs
    guest = await client.join(host["call_id"])
    a, b = await client.connect_as(host), await client.connect_as(guest)
    a.send("offer", {"type": "offer", "sdp": "v=0\r\n"})
    assert (await b.wait_for("offer"))["from"] == host["peer_id"]
    for _ in range(5):
        await client.create_call()  # 1 join + 5 creates for 4 slots: 2 dropped
    assert time.monotonic() - started < TIMEOUT / 2
    assert getattr(registry.metrics, "webhooks")["dropped"] == 2

    receiver.release_all()
    rest = await receiver.take(4)
    assert [r.json["event"] for r in rest] == ["participant_joined", "call_created", "call_created", "call_created"]
    response = await client.http.fetch(client.base_url + "/metrics")
    assert 'signal_srv_webhooks_total{outcome="dropped"} 2.0' in response.body.decode()
    a.close()
    b.close()


JWT_SECRET = "a-webhook-test-secret-of-32-bytes-and-more"


@pytest.mark.settings(webhook_url=RECEIVER, webhook_secret=SECRET, auth="jwt", jwt_secret=JWT_SECRET)
async def test_events_carry_the_participants_identity(client: SignalingClient, receiver: Receiver) -> None:
    from signal_srv.tokens import mint

    host = await client.create_call(access_token=mint(JWT_SECRET, "alice", grants=["create"], name="Alice"))
    guest = await client.join(host["call_id"], access_token=mint(JWT_SECRET, "bob", grants=["join"]))
    await client.remove(host["call_id"], guest["peer_id"], mint(JWT_SECRET, "ops", grants=["admin"]))
    await client.end(host["call_id"], host["peer_token"])
    got = [r.json for r in await receiver.take(4)]
    assert [(b["event"], b.get("peer_id"), b.get("identity"), b.get("name"), b.get("reason")) for b in got] == [
        ("call_created", host["peer_id"], "alice", "Alice", None),
        ("participant_joined", guest["peer_id"], "bob", None, None),
        ("participant_left", guest["peer_id"], "bob", None, "removed"),
        ("call_ended", None, None, None, "ended"),
    ]
