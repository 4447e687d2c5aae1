"""SIGTERM drains a real server process: requests in flight get answers, idle connections close."""

from __future__ import annotations

import json
import socket

from tests.conftest import TIMEOUT
from tests.live_server import LiveServer

STOPPING = r"signal_srv stopping"


class RawHttp:
    """One client connection that sends bytes when told and parses the answers that come back."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next answer: status, headers (lower-case names), body."""
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), f"the server closed the connection without an answer (got {self.buffer!r})"
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in lines)}
        size = int(headers.get("content-length", "0"))
        while len(self.buffer) < size:
            assert self._fill(), "the server closed the connection in the middle of an answer"
        body, self.buffer = self.buffer[:size], self.buffer[size:]
        return int(status_line.split()[1]), headers, body

    def closed_by_server(self) -> bool:
        """Wait for the server to close the connection; True if it sent nothing more before."""
        try:
            return not self._fill() and not self.buffer
        except ConnectionResetError:
            return not self.buffer


def test_sigterm_answers_the_requests_in_flight_and_closes_idle_connections() -> None:
    server = LiveServer(shutdown_timeout=4 * TIMEOUT).start()
    try:
        idle = RawHttp(server.port)
        idle.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert idle.response()[0] == 200  # the connection is kept alive, and now idle
        create = RawHttp(server.port)
        create.send(b"POST /apiv2/calls HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 2\r\n\r\n")
        config = RawHttp(server.port)
        config.send(b"GET /apiv2/config HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n")
        partial = RawHttp(server.port)
        partial.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        server.terminate()
        server.wait_for_log(STOPPING)

        assert idle.closed_by_server()
        create.send(b"{}")
        status, headers, body = create.response()
        assert (status, json.loads(body)["error"]["code"]) == (503, "shutting_down")
        assert (headers["retry-after"], headers["connection"]) == ("1", "close")
        assert create.closed_by_server()
        config.send(b"{}")  # headers before the signal, body after: a normal answer
        status, headers, body = config.response()
        assert (status, headers["connection"], json.loads(body)) == (200, "close", {"ice_servers": []})
        assert config.closed_by_server()
        partial.send(b"\r\n")  # the rest of the headers
        status, headers, body = partial.response()
        assert (status, headers["connection"], json.loads(body)["status"]) == (200, "close", "ok")
        assert partial.closed_by_server()
        assert server.wait_exited() == 0
    finally:
        server.stop()
    assert not server.problems()
    assert not [line for line in server.lines if "shutdown took longer" in line]


def test_shutdown_timeout_bounds_a_drain_whose_request_never_completes() -> None:
    server = LiveServer(shutdown_timeout=0.5).start()
    try:
        stuck = RawHttp(server.port)
        stuck.send(b"POST /apiv2/calls HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n")
        server.terminate()
        server.wait_for_log(r"shutdown took longer than 0\.5 s; exiting anyway, cutting 1 HTTP connections")
        assert stuck.closed_by_server(), stuck.buffer
        assert server.wait_exited() == 0
    finally:
        server.stop()
    assert not server.problems()
