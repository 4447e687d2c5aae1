"""The benchmark's load client against the real server: only relays count in a figure."""

from __future__ import annotations

import asyncio
from typing import Any

from signal_srv.bench import CANDIDATE_A, CANDIDATE_B, SIGNAL, Load, Target, Ws
from tests.conftest import TIMEOUT


async def test_only_frames_with_the_other_sides_payload_count_as_relayed(http_server: Any, http_server_port: tuple[Any, int]) -> None:
    load = Load(Target(SIGNAL, None, http_server_port[1]))  # type: ignore[arg-type]  # the server runs in this test
    try:
        assert await load.connect(await load.create(1), None, timeout=TIMEOUT) == 0
        (pair,) = load.pairs
        relayed: dict[str, list[bytes]] = {"a": [], "b": []}
        back_at_a: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_relay(ws: Ws, data: bytes) -> None:
            relayed["a" if ws is pair.a else "b"].append(data)
            if ws is pair.b:
                ws.send(CANDIDATE_A)  # reaches a like an echo of a's own message would
                ws.send(CANDIDATE_B)
            else:
                back_at_a.set_result(None)

        load.relay(on_relay, CANDIDATE_A, CANDIDATE_B)
        pair.a.send(b'{"type":"ping"}')  # a pong for a
        pair.a.send(b'{"type":"nonsense"}')  # an error frame for a
        pair.a.send(CANDIDATE_A)  # relayed to b, which answers: a's one relay comes after all of the above
        await asyncio.wait_for(back_at_a, TIMEOUT)
        assert (len(relayed["a"]), len(relayed["b"]), load.stray) == (1, 1, 3)
    finally:
        load.close()
