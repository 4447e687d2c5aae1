"""Cluster figures for ``python -m signal_srv.bench --cluster``, as ratios to the single-process server.

Every server process (nodes and Redis) is pinned to one core and the load client to the
other, so each mode gets the same budget: one core. The figures, on 200 connected pairs:

- (a) single-process mode against "today" (``--baseline-dir``, e.g. a snapshot of main):
  closed-loop relay msgs/s (T1) and paced hop p99 (T2);
- (b) a cluster node (``redis_url``) with both sockets of each call on it;
- (c) two nodes, each call's sockets on different nodes (every frame bridged);
- (d) server-side CPU per relayed frame in each mode (nodes and Redis together), and
  from it a projection of msgs/s per machine at 8 and 16 cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from signal_srv.bench import (
    CLIENT_CPU,
    SERVER_CPU,
    SIGNAL,
    Load,
    Target,
    closed_loop,
    cpu_seconds,
    machine,
    paced,
)

__all__ = ["run_cluster_bench"]

CALLS = 200
SECONDS = 3.0  # each measured window; the whole run stays under a minute


def _redis(folder: str) -> tuple[subprocess.Popen[bytes], str]:
    from signal_srv.stress import free_port

    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", folder, "--save", "",
         "--appendonly", "no", "--protected-mode", "no"],
        stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
    os.sched_setaffinity(process.pid, {SERVER_CPU})
    deadline = time.monotonic() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip() != b"PONG":
        if time.monotonic() > deadline:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)  # polling a child's port: there is no event to wait on
    return process, f"redis://127.0.0.1:{port}/0"


async def _mode(ports_of: Sequence[Any], pids: Sequence[int]) -> dict[str, Any]:
    """Closed loop and paced figures on ``CALLS`` pairs; the first server creates, sockets a/b on ports_of[0]/[-1]."""
    first, last = ports_of[0], ports_of[-1]
    load = Load(first, b_port=last.port)
    try:
        paths = await load.create(CALLS)
        errors = await load.connect(paths, 200, timeout=60)
        cpu = sum(cpu_seconds(pid) for pid in pids)
        closed = await closed_loop(load, SECONDS)
        cpu = sum(cpu_seconds(pid) for pid in pids) - cpu
        relayed = closed["msgs_per_s"] * closed["seconds"]
        hops = await paced(load, SECONDS)
    finally:
        load.close()
    return {"connect_errors": errors, "msgs_per_s": closed["msgs_per_s"], "client_cpu": closed["client_cpu"],
            "hop_p99_ms": hops["hop_ms"]["p99"], "hop_p50_ms": hops["hop_ms"]["p50"],
            "cpu_us_per_frame": round(1e6 * cpu / max(relayed, 1), 1)}


async def _measure(baseline_dir: str | None, say: Any) -> dict[str, Any]:
    from signal_srv.stress import spawn_server

    results: dict[str, Any] = {}
    spawned: list[Any] = []

    def server(extra: Sequence[str] = (), server_dir: str | None = None) -> Target:
        s = spawn_server(CALLS, cpu=SERVER_CPU, extra=extra, server_dir=server_dir)
        spawned.append(s)
        return Target(SIGNAL, s, int(s.base_url.rsplit(":", 1)[1]))

    folder = tempfile.mkdtemp(prefix="signal-srv-bench-")
    redis, url = _redis(folder)
    try:
        if baseline_dir:
            say("(a) today's server")
            t = server(server_dir=baseline_dir)
            results["today"] = await _mode([t], [t.server.process.pid])
            t.server.stop()
        say("single process")
        t = server()
        results["single"] = await _mode([t], [t.server.process.pid])
        t.server.stop()
        say("(b) cluster node, both sockets on the owner")
        t = server([f"--redis_url={url}", "--node_id=bench-b"])
        results["owner"] = await _mode([t], [t.server.process.pid, redis.pid])
        t.server.stop()
        say("(c) two nodes, sockets on different nodes")
        a = server([f"--redis_url={url}", "--node_id=bench-c1"])
        b = server([f"--redis_url={url}", "--node_id=bench-c2"])
        results["bridged"] = await _mode([a, b], [a.server.process.pid, b.server.process.pid, redis.pid])
    finally:
        for s in spawned:
            s.stop()
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
    return results


def _rows(r: dict[str, Any]) -> list[tuple[str, Any, str, str]]:
    single = r["single"]
    rows: list[tuple[str, Any, str, str]] = []

    def ratio(mode: str, key: str) -> float:
        return round(r[mode][key] / max(single[key], 1e-9), 2)

    if "today" in r:
        rows += [("(a) single-process msgs/s vs today", round(single["msgs_per_s"] / r["today"]["msgs_per_s"], 2),
                  ">= 0.95x", f"{single['msgs_per_s']} vs {r['today']['msgs_per_s']}"),
                 ("(a) single-process hop p99 vs today", round(single["hop_p99_ms"] / r["today"]["hop_p99_ms"], 2),
                  "<= 1.05x", f"{single['hop_p99_ms']} vs {r['today']['hop_p99_ms']} ms")]
    for mode, label, floor in (("owner", "(b) owner-local", 0.5), ("bridged", "(c) cross-node", 0.3)):
        rows += [(f"{label} relay msgs/s", ratio(mode, "msgs_per_s"), f">= {floor}x",
                  f"{r[mode]['msgs_per_s']} vs {single['msgs_per_s']}"),
                 (f"{label} paced hop p99 ms", r[mode]["hop_p99_ms"], "<= 5 ms", f"p50 {r[mode]['hop_p50_ms']} ms")]
    for mode in ("single", "owner", "bridged"):
        per_frame = r[mode]["cpu_us_per_frame"]
        projection = ", ".join(f"{cores} cores ~{round(cores * 1e6 / per_frame):,} msg/s" for cores in (8, 16))
        rows.append((f"(d) CPU per relayed frame, {mode}", per_frame, "us", projection))
    return rows


def run_cluster_bench(baseline_dir: str | None, as_json: bool) -> None:
    """Measure, then print a table (or JSON) of the cluster figures."""
    from signal_srv.stress import raise_nofile

    if shutil.which("redis-server") is None:
        raise SystemExit("the cluster figures need redis-server (apt-get install redis-server)")
    raise_nofile(8 * CALLS + 4096)
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {CLIENT_CPU})
    results = asyncio.run(_measure(baseline_dir, lambda text: print(text, flush=True, file=sys.stderr)))
    rows = _rows(results)
    if as_json:
        print(json.dumps({"machine": machine(), **results, "rows": rows}, indent=1))
        return
    print(f"signal_srv cluster figures, {CALLS} pairs, {SECONDS:g} s windows, {machine()}")
    print(f"servers (nodes and Redis) pinned to CPU {SERVER_CPU}, client to CPU {CLIENT_CPU}")
    for name, value, target, note in rows:
        print(f"{name:45} {value!s:>10}  {target:10} {note}")
