"""The benchmark's "one hostile IP" figure: a victim's relay latency without and with one attacker.

One fresh server on its default limits. The victim (the bench process, 127.0.0.1) runs paced
candidate exchanges on a few calls, first alone, then while ``python -m signal_srv.hostile``
(its own process, 127.0.0.2: a second address on the same loopback) does the worst one client
address can within those defaults, every ``CYCLE`` seconds all at once:

- it holds as many participants as it may (creates and joins at ``rate_create``/``rate_join``)
  and a socket for each, up to ``ws_sockets_per_ip``, then goes on creating and joining
  calls at those rates;
- its sockets together spend the address's whole budget (each within its participant's) in
  one burst: the costliest frames to validate (a 48 KB array of floats) up to the bytes
  burst, then small relays and pings up to the frame burst, relayed to the attacker's other
  socket of the call;
- its participants reconnect as often as the address and each participant may;
- wrong-token ``leave`` requests and socket handshakes go to the victim's calls, up to
  ``auth_failure_burst``.

A flood of plain HTTP requests, which any HTTP server answers at some cost, is left out: it
is the proxy's to cap (README, "What the proxy must still do"). Everything targets 127.0.0.1
and is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from typing import Any, Sequence
from urllib.parse import urlencode

from signal_srv.bench import CANDIDATE_A, CANDIDATE_B, SERVER_CPU, CLIENT_CPU, Http, Load, Target, Ws, http_connect, paced, ws_connect
from signal_srv.config import Config
from signal_srv.spawn import Spawned, free_port, spawn

__all__ = ["ATTACKER_IP", "P99_TARGET_MS", "attack", "hostile_figure", "hostile_row"]

ATTACKER_IP = "127.0.0.2"
P99_TARGET_MS = 50.0
DEFAULTS = Config()
# Seconds between the attacker's synchronized bursts: the time its address's buckets take to refill.
CYCLE = max(DEFAULTS.ws_ip_rate_burst / (DEFAULTS.ws_ip_rate or 1e9),
            DEFAULTS.ws_ip_bytes_burst / (DEFAULTS.ws_ip_bytes_rate or 1e9),
            DEFAULTS.ws_ip_connect_burst / (DEFAULTS.ws_ip_connect_rate or 1e9), 1.0)
VICTIM_PAIRS = 4
RAMP = 30.0  # seconds the attacker may take to seat its participants (create and join at their rates)
# The costliest payload to validate per byte, within max_message_size (measured: floats beat
# strings, objects and integers).
FLOATS = json.dumps({"type": "message", "payload": [1.5] * 12000}, separators=(",", ":")).encode()
SMALL = json.dumps({"type": "message", "payload": "x" * 60}, separators=(",", ":")).encode()
PING = b'{"type":"ping"}'


# The attacker -------------------------------------------------------------------------------


class Attack:
    """What one address does within the defaults; ``counts`` says what came of it."""

    def __init__(self, port: int, seconds: float, victims: Sequence[str]) -> None:
        self.port = port
        self.until = time.monotonic() + seconds
        self.victims = list(victims)
        self.defaults = DEFAULTS
        self.counts: Counter[str] = Counter()
        self.paths: list[str] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.wanted = self.defaults.ws_sockets_per_ip or 100

    def running(self) -> bool:
        return time.monotonic() < self.until

    def _on_text(self, ws: Ws, data: bytes) -> None:
        if data.startswith(b'{"type":"error"'):
            self.counts["error_frames"] += 1

    async def post(self, http: Http, path: str, headers: str = "") -> tuple[int, bytes]:
        assert http.transport is not None
        http.waiter = asyncio.get_running_loop().create_future()
        http.transport.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Content-Length: 0\r\n\r\n".encode())
        status, body = await http.waiter
        self.counts[f"http_{status}"] += 1
        return status, body

    async def participants(self) -> None:
        """Create and join calls at the per-address limits until it holds ``ws_sockets_per_ip`` participants."""
        http = await http_connect(self.port, ATTACKER_IP)
        while self.running() and len(self.paths) < self.wanted:
            status, body = await self.post(http, "/apiv2/calls")
            if status == 429:
                await asyncio.sleep(1.0 / self.defaults.rate_create)  # the refill, not a wait for an event
                continue
            host = json.loads(body)
            while self.running():
                status, body = await self.post(http, f"/apiv2/calls/{host['call_id']}/join")
                if status != 429:
                    break
                await asyncio.sleep(1.0 / self.defaults.rate_join)  # the refill
            if status != 200:
                continue
            for creds in (host, json.loads(body)):
                self.paths.append("/apiv2/ws?" + urlencode(
                    {"call_id": creds["call_id"], "peer_id": creds["peer_id"], "token": creds["peer_token"]}))
                task = asyncio.ensure_future(self.drive(self.paths[-1], len(self.paths) - 1))
                self.tasks.add(task)
        await self.churn(http)

    async def churn(self, http: Http) -> None:
        """Once seated: each cycle, every create and join the address's rates allow, all at once."""
        d = self.defaults
        while self.running():
            await self.next_cycle()
            creates = round(d.rate_create * CYCLE) if d.rate_create else 10
            joins = round(d.rate_join * CYCLE) if d.rate_join else 10
            for i in range(creates):
                status, body = await self.post(http, "/apiv2/calls")
                if status == 201 and i < joins:
                    await self.post(http, f"/apiv2/calls/{json.loads(body)['call_id']}/join")

    async def connect(self, path: str) -> Ws | None:
        try:
            ws = await ws_connect(self.port, path, self._on_text, ATTACKER_IP)
        except (OSError, ConnectionError):
            self.counts["connect_failed"] += 1
            return None
        ws.ready.set_result(None)  # nobody waits for the pair here
        self.counts["connects"] += 1
        return ws

    def share(self, i: int) -> tuple[int, int, int]:
        """Socket ``i``'s part of this cycle's bursts: (big frames, small frames, reconnects).

        Each socket may spend its participant's burst, and all of them together their
        address's burst: that goes to as few sockets as can hold it, other ones each cycle
        (so that each participant's own budget has refilled when its turn comes again).
        """
        d, n = self.defaults, self.wanted
        i = (i - 10 * int(time.monotonic() // CYCLE)) % n

        def part(total: float, each: float, unit: float = 1.0) -> int:
            if not total:  # no per-address limit: every socket spends its own burst
                return int(each // unit)
            per_socket = int(each // unit)
            whole = int(total // unit)
            return max(0, min(per_socket, whole - i * per_socket)) if per_socket else 0

        big = part(d.ws_ip_bytes_rate and d.ws_ip_bytes_burst, d.ws_bytes_burst, len(FLOATS))
        reconnects = part(d.ws_ip_connect_rate and d.ws_ip_connect_burst, d.ws_reconnect_burst)
        frames = min(d.ws_rate_burst, int(d.ws_ip_rate_burst // n) if d.ws_ip_rate else d.ws_rate_burst)
        return big, max(0, frames - big), reconnects

    async def drive(self, path: str, i: int) -> None:
        """One participant: each cycle, its share of the bursts at once, then its reconnects."""
        ws = await self.connect(path)
        while self.running():
            await self.next_cycle()
            if ws is None or not ws.open:
                ws = await self.connect(path)
                if ws is None:
                    continue
            big, small, reconnects = self.share(i)
            for j in range(big + small):
                if ws.transport is None or ws.transport.is_closing():
                    break
                ws.send(FLOATS if j < big else PING if j % 2 else SMALL)
            self.counts["frames_sent"] += big + small
            self.counts["big_frames_sent"] += big
            for _ in range(reconnects):
                if ws is not None and ws.transport is not None:
                    ws.transport.close()
                ws = await self.connect(path)

    async def next_cycle(self) -> None:
        now = time.monotonic()
        await asyncio.sleep(CYCLE - now % CYCLE)  # the attacker's own clock: every socket fires together

    async def wrong_tokens(self) -> None:
        """Each cycle, wrong tokens against the victim's calls, over REST and sockets, up to the failure burst."""
        http = await http_connect(self.port, ATTACKER_IP)
        wrong = "Authorization: Bearer " + "w" * 22 + "\r\n"
        while self.running() and self.victims:
            await self.next_cycle()
            for i in range(self.defaults.auth_failure_burst):
                call_id = self.victims[i % len(self.victims)]
                if i % 2:
                    await self.post(http, f"/apiv2/calls/{call_id}/leave", wrong)
                else:
                    ws = await self.connect("/apiv2/ws?" + urlencode({"call_id": call_id, "peer_id": "p", "token": "w"}))
                    if ws is not None and ws.transport is not None:
                        ws.transport.close()

    async def run(self) -> dict[str, Any]:
        """Attack until stdin closes (or ``seconds`` pass); say "ready" on stdout once every participant is in."""
        tasks = [asyncio.ensure_future(self.participants()), asyncio.ensure_future(self.wrong_tokens())]
        while self.running() and len(self.paths) < self.wanted:
            await asyncio.sleep(0.2)  # progress check only
        print(json.dumps({"ready": True, "participants": len(self.paths)}), flush=True)
        stdin_closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await asyncio.wait([stdin_closed], timeout=max(0.0, self.until - time.monotonic()))
        for task in [*tasks, *self.tasks]:
            task.cancel()
        return {"participants": len(self.paths), **self.counts}


def attack(port: int, seconds: float, victims: Sequence[str]) -> None:
    """Run the attacker (see ``Attack.run``); print its counts as JSON."""
    result = asyncio.run(Attack(port, seconds, victims).run())
    print(json.dumps(result), flush=True)
    os._exit(0)  # the stdin reader thread may still be blocked


# The figure ---------------------------------------------------------------------------------


def start_attacker(port: int, seconds: float, victims: Sequence[str]) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "signal_srv.hostile", f"--port={port}", f"--seconds={seconds}", "--", *victims],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(process.pid, {CLIENT_CPU})
    return process


async def hostile_figure(server_dir: str | None, seconds: float) -> dict[str, Any]:
    """Victim hop latency alone, then under attack, on one fresh server with the default limits."""
    port = free_port()
    server: Spawned = spawn([sys.executable, "-m", "signal_srv", f"--port={port}", "--address=127.0.0.1",
                             "--log_level=error"], port, SERVER_CPU, server_dir)
    load = Load(Target("signal_srv", server, port))
    attacker: subprocess.Popen[str] | None = None
    try:
        paths = await load.create(VICTIM_PAIRS, concurrency=1)
        await load.connect(paths, None, timeout=30)
        victims = [p.split("call_id=")[1].split("&")[0] for p, _ in paths]
        alone = await paced(load, seconds, 0.02, 0.06, offer=CANDIDATE_A, answer=CANDIDATE_B)
        attacker = start_attacker(port, RAMP + seconds + 4 * CYCLE, victims)
        assert attacker.stdout is not None and attacker.stdin is not None
        loop = asyncio.get_running_loop()
        line = await asyncio.wait_for(loop.run_in_executor(None, attacker.stdout.readline), RAMP)
        if not line:
            raise RuntimeError(f"the attacker exited with status {attacker.wait()} before it was ready")
        ready = json.loads(line)
        await asyncio.sleep(CYCLE)  # one full cycle of the attack before measuring: a stretch of time
        attacked = await paced(load, seconds, 0.02, 0.06, offer=CANDIDATE_A, answer=CANDIDATE_B)
        attacker.stdin.close()
        out = await asyncio.wait_for(loop.run_in_executor(None, attacker.stdout.read), 4 * CYCLE)
        counts = json.loads(out.strip().splitlines()[-1])
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
        if attacker is not None:
            attacker.wait()
        server.stop()
        load.close()
    return {"alone": alone, "attacked": attacked, "attacker": {**counts, "ready_participants": ready["participants"]},
            "victim_errors": load.errors}


def hostile_row(result: dict[str, Any]) -> Any:
    """The figure's row in the bench table: the attacked p99, with the victim's p99 alone beside it."""
    from signal_srv.bench import Row

    alone, attacked, a = result["alone"], result["attacked"], result["attacker"]
    p99 = attacked["hop_ms"]["p99"]
    note = (f"no attacker: p99 {alone['hop_ms']['p99']:.2f} ms, p50 {alone['hop_ms']['p50']:.2f}; attacked p50 "
            f"{attacked['hop_ms']['p50']:.2f}; server CPU {alone['server_cpu']:.0%} -> {attacked['server_cpu']:.0%}; "
            f"attacker: {a.get('participants', 0)} participants, {a.get('frames_sent', 0)} frames, "
            f"{a.get('connects', 0)} connects, {a.get('error_frames', 0)} refused")
    return Row("one hostile IP: victim relay p99", p99, None, "ms", f"<= {P99_TARGET_MS:g} ms",
               p99 <= P99_TARGET_MS, max(alone["client_cpu"], attacked["client_cpu"]), note)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m signal_srv.hostile", description="the benchmark's attacker process")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("victims", nargs="*", help="call_ids of the victim's calls")
    args = p.parse_args(argv)
    attack(args.port, args.seconds, args.victims)


if __name__ == "__main__":
    main()
