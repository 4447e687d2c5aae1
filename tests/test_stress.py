"""The stress tool: a clean run against the real server, and a faulty relay it must catch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest
from tornado.web import Application

from signal_srv.errors import CallNotFound
from signal_srv.messages import to_json
from signal_srv.stress import StressOptions, format_table, percentiles, run_stress
from signal_srv.ws import SignalingSocket
from tests.conftest import TIMEOUT
from tests.services import needs


class Faults:
    """What the faulty relay does wrong.

    ``drop_at`` and ``misroute_at`` count relayed candidate frames server-wide, from 1 (0: off).
    Each of ``per_socket`` happens once, on the next socket that gets its first candidate
    ("duplicate", "swap_payloads", "swap_frames"), or on the next state frame ("repeat").
    """

    def __init__(self, drop_at: int = 0, misroute_at: int = 0, per_socket: tuple[str, ...] = ()) -> None:
        self.drop_at = drop_at
        self.misroute_at = misroute_at
        self.candidates = 0
        self.dropped = 0
        self.misrouted = 0
        self.pending = list(per_socket)
        self.done: list[str] = []
        self.sockets: list[FaultySocket] = []

    def take(self, *kinds: str) -> str | None:
        """The first pending fault of ``kinds``, now counted as done; None if none is left."""
        for kind in self.pending:
            if kind in kinds:
                self.pending.remove(kind)
                self.done.append(kind)
                return kind
        return None


class FaultySocket(SignalingSocket):
    """The real socket edge, except for the faults it is given (see ``Faults``).

    - duplicate: a candidate is relayed twice, the copy with the next seq (later seqs shift
      by one), as if the server had relayed the message twice;
    - repeat: a state frame goes out twice with the same seq;
    - swap_payloads: two candidates swap places but keep their seqs in order, as if the server
      had relayed them in the wrong order;
    - swap_frames: two candidate frames swap places on the wire, seqs and all.
    """

    def initialize(self, faults: Faults, **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.faults = faults
        self.fault: str | None = None
        self.candidates_here = 0
        self.seq_shift = 0
        self.held = ""

    async def open(self, *args: Any, **kwargs: Any) -> None:
        self.faults.sockets.append(self)
        await super().open(*args, **kwargs)

    def on_close(self) -> None:
        self.faults.sockets.remove(self)
        super().on_close()

    def send(self, text: str) -> None:
        if self.seq_shift:
            text = with_seq(text, json.loads(text)["seq"] + self.seq_shift)
        if text.startswith('{"type":"candidate"') and (self._drop_or_misroute(text) or self._swap_or_duplicate(text)):
            return
        if text.startswith('{"type":"state"') and self.faults.take("repeat"):
            super().send(text)
        super().send(text)

    def _drop_or_misroute(self, text: str) -> bool:
        faults = self.faults
        faults.candidates += 1
        if faults.candidates == faults.drop_at:
            faults.dropped += 1
            return True
        other = self._socket_of_another_live_call()
        if faults.misroute_at and faults.candidates >= faults.misroute_at and not faults.misrouted and other is not None:
            faults.misrouted += 1
            other.write_message(text)
            return True
        return False

    def _swap_or_duplicate(self, text: str) -> bool:
        self.candidates_here += 1
        if self.candidates_here == 1:
            self.fault = self.faults.take("duplicate", "swap_payloads", "swap_frames")
            if self.fault == "duplicate":
                super().send(text)
                self.seq_shift += 1
                super().send(with_seq(text, json.loads(text)["seq"] + 1))
                return True
            if self.fault in ("swap_payloads", "swap_frames"):
                self.held = text
                return True
        elif self.candidates_here == 2 and self.fault == "swap_frames":
            super().send(text)
            super().send(self.held)
            return True
        elif self.candidates_here == 2 and self.fault == "swap_payloads":
            first, second = json.loads(self.held), json.loads(text)
            first["payload"], second["payload"] = second["payload"], first["payload"]
            super().send(to_json(first))
            super().send(to_json(second))
            return True
        return False

    def _socket_of_another_live_call(self) -> FaultySocket | None:
        mine = self.get_query_argument("call_id")
        for socket in self.faults.sockets:
            call_id = socket.get_query_argument("call_id")
            if call_id == mine or socket.ws_connection is None or socket.ws_connection.is_closing():
                continue
            try:
                self.registry.get(call_id)
            except CallNotFound:
                continue
            return socket
        return None


def with_seq(text: str, seq: int) -> str:
    return to_json({**json.loads(text), "seq": seq})


def install_faults(app: Application, faults: Faults) -> None:
    """Swap the app's socket handler for ``FaultySocket`` (the rest of the server is untouched)."""
    for rule in app.wildcard_router.rules:
        if rule.target is SignalingSocket:
            rule.target = FaultySocket
            rule.target_kwargs = {**rule.target_kwargs, "faults": faults}
            return
    raise AssertionError("no SignalingSocket route in the app")


def small(**overrides: Any) -> StressOptions:
    options: dict[str, Any] = dict(calls=20, candidates=3, end_fraction=0.3, duration=6 * TIMEOUT,
                                   timeout=TIMEOUT, seed=7)
    options.update(overrides)
    return StressOptions(**options)


async def test_twenty_calls_against_the_server_deliver_every_message_exactly_once(base_url: str) -> None:
    result = await run_stress(base_url, small())
    assert result.failures == []
    assert result.ok
    assert (result.calls_ok, result.calls_failed, result.ended_mid_run) == (20, 0, 6)
    # Per call: offer, answer, 3 candidates each way, and one message each way from the 14 survivors.
    assert result.sent == result.delivered == 20 * (2 + 2 * 3) + 14 * 2
    assert (result.lost, result.duplicated, result.misrouted, result.reordered) == (0, 0, 0, 0)
    assert len(result.latency_ms["connect"]) == 40 and len(result.latency_ms["relay_hop"]) == result.delivered


async def test_a_dropped_and_a_misrouted_message_are_counted_and_fail_the_run(app: Application, base_url: str) -> None:
    faults = Faults(drop_at=5, misroute_at=15)
    install_faults(app, faults)
    result = await run_stress(base_url, small(timeout=TIMEOUT / 4))
    assert (faults.dropped, faults.misrouted) == (1, 1)
    assert not result.ok
    # The dropped one and the misrouted one both never reached their rightful receiver.
    assert (result.lost, result.misrouted) == (2, 1)
    assert (result.duplicated, result.reordered) == (0, 0)
    assert result.seq_gaps == 2, result.failures  # each leaves a hole in its receiver's seqs
    assert result.delivered == result.sent - 2
    assert 2 <= result.calls_failed <= 3 and result.calls_ok + result.calls_failed == 20
    assert any("got a candidate frame of call" in text for text in result.failures)
    assert any("never arrived" in text for text in result.failures)


async def test_duplicated_repeated_and_reordered_frames_are_each_counted_once(app: Application, base_url: str) -> None:
    faults = Faults(per_socket=("duplicate", "repeat", "swap_payloads", "swap_frames"))
    install_faults(app, faults)
    result = await run_stress(base_url, small())
    assert sorted(faults.done) == ["duplicate", "repeat", "swap_frames", "swap_payloads"]
    assert not result.ok
    # duplicate (a fresh seq) + repeat (the same seq); swap_payloads (seqs in order) + swap_frames (seq late)
    assert (result.duplicated, result.reordered) == (2, 2)
    assert (result.lost, result.misrouted, result.seq_gaps, result.unexpected_errors) == (0, 0, 0, 0)
    assert result.delivered == result.sent and result.calls_ok == 20
    kinds = {
        "duplicate": r"message \d+ arrived twice",
        "repeat": r"server seq \d+ again",
        "swap_payloads": r"message \d+ arrived after",
        "swap_frames": r"server seq \d+ arrived after",
    }
    for kind, pattern in kinds.items():
        assert len([f for f in result.failures if re.search(pattern, f)]) == 1, (kind, result.failures)
    assert len(result.failures) == 4, result.failures


async def test_calls_ended_mid_run_are_verified_closed_and_the_others_go_on(base_url: str) -> None:
    result = await run_stress(base_url, small(calls=10, candidates=0, end_fraction=1.0))
    assert result.ok and result.ended_mid_run == 10 and result.sent == 20


STRESS_SECRET = "a-stress-secret-that-is-long-enough-for-hs256"


@pytest.mark.settings(auth="jwt", jwt_secret=STRESS_SECRET)
async def test_with_auth_jwt_every_call_carries_minted_tokens_and_identities(base_url: str) -> None:
    result = await run_stress(base_url, small(jwt_secret=STRESS_SECRET))
    assert result.failures == []
    assert result.ok and result.calls_ok == 20 and result.sent == result.delivered
    assert "auth=jwt" in format_table(result, small(jwt_secret=STRESS_SECRET))
    assert STRESS_SECRET not in repr(small(jwt_secret=STRESS_SECRET))


@pytest.mark.settings(auth="jwt", jwt_secret=STRESS_SECRET)
async def test_without_tokens_an_auth_jwt_server_refuses_every_call(base_url: str) -> None:
    result = await run_stress(base_url, small(calls=3))
    assert not result.ok and result.calls_failed == 3
    assert all("401 unauthorized" in text for text in result.failures)


@pytest.mark.settings(ws_buffer_limit=1024, resume_buffer=1024)
async def test_cut_sockets_resume_and_still_get_every_message_once_and_in_order(base_url: str) -> None:
    result = await run_stress(base_url, small(candidates=10, cut_fraction=0.5))
    assert result.failures == []
    assert result.ok
    assert (result.calls_ok, result.cuts, result.resume_failed) == (20, 10, 0)
    assert len(result.latency_ms["resume"]) == 10
    # Each cut leaves at least 2 of the peer's frames unread on the cut socket: replayed on resume.
    assert result.replayed >= 10 * 2
    # The cut calls send exactly what the others do; pings are the tool's own and are not counted.
    assert result.sent == result.delivered == 20 * (2 + 2 * 10) + 14 * 2
    assert (result.lost, result.duplicated, result.reordered, result.seq_gaps) == (0, 0, 0, 0)


@pytest.mark.settings(resume_buffer=1)
async def test_a_server_that_keeps_too_little_for_a_resume_fails_the_run(base_url: str) -> None:
    # With 10 candidates the peer sends 3 frames to the cut socket after it stopped reading
    # (a pong proves the server sent them all before the cut); the paused reader records at
    # most the one it was already awaiting, so at least 2 are missed and a server that keeps
    # only 1 frame must answer resume_failed, every time.
    result = await run_stress(base_url, small(calls=4, candidates=10, cut_fraction=1.0))
    assert not result.ok
    assert (result.cuts, result.resume_failed, result.calls_failed) == (4, 4, 4)
    assert result.lost >= 4 * 2 and result.delivered == result.sent - result.lost
    assert (result.duplicated, result.reordered, result.seq_gaps) == (0, 0, 0)
    assert any("resume_failed after seq" in text for text in result.failures)
    assert "resume failed 4" in format_table(result, small(cut_fraction=1.0))


def test_the_cut_fraction_must_be_a_fraction() -> None:
    from signal_srv.stress import parse_args

    assert parse_args(["--cut-fraction", "0.3"]).cut_fraction == 0.3
    with pytest.raises(SystemExit):
        parse_args(["--cut-fraction", "1.5"])


def test_the_table_and_json_report_every_count() -> None:
    options = small()
    from signal_srv.stress import StressResult

    result = StressResult(calls=2, calls_ok=1, calls_failed=1, sent=4, delivered=3, lost=1, cuts=1)
    result.latency_ms["relay_hop"] += [1.0, 2.0, 3.0]
    table = format_table(result, options)
    assert "FAILED" in table and "lost 1" in table and "cut 1" in table and "relay_hop" in table
    data = json.loads(json.dumps(result.to_dict()))
    assert data["ok"] is False and data["lost"] == 1 and data["latency_ms"]["relay_hop"]["max"] == 3.0
    assert data["cuts"] == 1 and data["resume_failed"] == 0
    assert not StressResult(calls=1, calls_ok=1, resume_failed=1).ok


def test_percentiles_use_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values) == {"n": 100, "p50": 51.0, "p95": 96.0, "p99": 100.0, "max": 100.0}
    assert percentiles([])["n"] == 0


@pytest.mark.e2e
def test_the_command_spawns_its_own_server_and_exits_zero_on_a_clean_run() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "signal_srv.stress", "--calls=20", "--candidates=2", "--json", "--duration=60"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["calls_ok"] == 20


@pytest.mark.e2e
def test_the_command_runs_with_auth_jwt_on_its_own_server() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "signal_srv.stress", "--calls=10", "--candidates=2", "--auth=jwt", "--duration=60"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout and "auth=jwt" in done.stdout


@pytest.mark.e2e
@needs("redis-server", "redis-cli")
def test_the_command_kills_a_node_of_its_own_cluster_mid_burst_and_loses_nothing() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "signal_srv.stress", "--chaos=kill", "--calls=40", "--candidates=6", "--json",
         "--duration=60"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert (result["calls_ok"], result["lost"], result["duplicated"], result["ended_unasked"]) == (40, 0, 0, 0)
    assert result["reconnects"] > 0


def test_chaos_starts_its_own_cluster_and_excludes_urls_and_cuts() -> None:
    from signal_srv.stress import parse_args

    assert parse_args(["--chaos", "freeze"]).chaos == "freeze"
    for wrong in (["--chaos", "kill", "--url", "http://127.0.0.1:1"], ["--chaos", "kill", "--cut-fraction", "0.1"],
                  ["--chaos", "kill", "--nodes", "1"], ["--reconnect", "--cut-fraction", "0.1"]):
        with pytest.raises(SystemExit):
            parse_args(wrong)
