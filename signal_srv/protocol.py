"""``GuardedProtocol``: Tornado's RFC 6455 protocol with every received frame charged to a budget,
a frame reader that takes what has arrived in one read, and writes without a Task each.

Tornado answers pings and gathers fragments inside its frame loop, out of the handler's
sight, so this subclass replaces that loop and hooks Tornado's private methods, as in
Tornado 6.6 (the version pinned in .ci/constraints.txt; a Tornado that changes them fails
tests/test_protocol.py, tests/test_abuse.py and tests/test_ws_fuzz.py).
"""

from __future__ import annotations

import asyncio
from asyncio import Future
from typing import TYPE_CHECKING, Any

from tornado.iostream import StreamClosedError
from tornado.util import _websocket_mask
from tornado.websocket import _FRAME_YIELD_COST, _YIELD_THRESHOLD, WebSocketClosedError, WebSocketProtocol13

if TYPE_CHECKING:
    from signal_srv.ws import SignalingSocket

__all__ = ["CLOSE_GRACE", "FRAMES_AFTER_CLOSE", "MAX_FRAGMENTS", "GuardedProtocol"]

POLICY_VIOLATION = 1008  # RFC 6455 section 7.4.1
MESSAGE_TOO_BIG = 1009
# Frames one message may arrive in (RFC 6455 section 5.4 fragments); more: close 1008.
MAX_FRAGMENTS = 128
# After the server's close frame: seconds the peer has to answer with its own before the
# connection is dropped, and frames read meanwhile (none is processed) before it is dropped at once.
CLOSE_GRACE = 1.0
FRAMES_AFTER_CLOSE = 4
# Bytes one read may take from the stream's buffer: whatever has arrived, up to this.
READ_SIZE = 65536

_TEXT_OPCODE = 0x1
_CLOSE_OPCODE = 0x8
_CONTROL_BIT = 0x8  # RFC 6455 section 5.5: opcodes 0x8-0xF are control frames


# What _take_frame answers while the buffer does not hold the whole next frame yet.
_MORE: tuple[int, int, int, bytes] = (0, 0, 0, b"")


class GuardedProtocol(WebSocketProtocol13):
    """The protocol of every signaling socket.

    - ``_receive_frame_loop`` reads whatever the socket has (Tornado awaits each frame's
      header, length, mask and payload apart: four futures through the stream per frame),
      and handles every whole frame in it, with Tornado's checks in Tornado's order;
    - each frame is charged to the handler's budget (``admit``): a fragment that does not
      finish its message in the loop (and counted against ``MAX_FRAGMENTS``), every finished
      message and control frame in ``_handle_message`` before Tornado acts on it, where it is
      dropped (a ping goes unanswered) when over budget;
    - ``send_text`` writes a frame without the Task ``write_message`` wraps around it.

    Once the server has sent its close frame nothing more is processed: only the peer's
    closing reply is awaited, for ``grace`` seconds (``CLOSE_GRACE`` unless the handler sets
    another) and ``FRAMES_AFTER_CLOSE`` frames; then the connection is cut.
    """

    handler: SignalingSocket
    # Slots, not instance attributes: Tornado's own fill the instance dict to the size up to
    # which instances share their keys (30); more would give each socket a dict of its own.
    __slots__ = ("_frame_start", "_fragments", "_refused_fragment", "_frames_after_close", "grace")

    def __init__(self, handler: SignalingSocket, mask_outgoing: bool, params: Any) -> None:
        super().__init__(handler, mask_outgoing, params)
        self._frame_start = 0
        self._fragments = 0
        self._refused_fragment = False
        self._frames_after_close = 0
        self.grace = CLOSE_GRACE

    async def _receive_frame_loop(self) -> None:
        buffer = bytearray()  # received, not yet taken as frames
        work = 0  # Tornado's measure for giving other sockets a turn (see its _YIELD_THRESHOLD)
        try:
            while not self.client_terminated:
                if self.server_terminated:
                    self._frames_after_close += 1
                    if self._frames_after_close > FRAMES_AFTER_CLOSE:
                        self._abort()
                        return
                frame = self._take_frame(buffer)
                while frame is _MORE:
                    buffer += await self.stream.read_bytes(READ_SIZE, partial=True)
                    frame = self._take_frame(buffer)
                if frame is None:
                    return  # refused: the connection is aborted
                size, final, opcode, data = frame
                self._frame_start, self._wire_bytes_in = self._wire_bytes_in, self._wire_bytes_in + size
                handled = self._on_frame(final, opcode, data)
                if handled is not None:
                    await handled
                work += _FRAME_YIELD_COST + size
                if work >= _YIELD_THRESHOLD:
                    work = 0
                    await asyncio.sleep(0)
        except StreamClosedError:
            self._abort()
        finally:
            self.handler.on_ws_connection_close(self.close_code, self.close_reason)

    def _take_frame(self, buffer: bytearray) -> tuple[int, int, int, bytes] | None:
        """Remove the next whole frame from ``buffer``: its size on the wire, FIN bit, opcode and
        unmasked payload; ``_MORE`` if it is not all there yet. None: the frame breaks the
        protocol and the connection is aborted (closed with 1009 first if too big, as Tornado does)."""
        if len(buffer) < 2:
            return _MORE
        header, second = buffer[0], buffer[1]
        reserved, opcode = header & self.RSV_MASK, header & self.OPCODE_MASK
        if self._decompressor is not None and opcode != 0:
            self._frame_compressed = bool(reserved & self.RSV1)
            reserved &= ~self.RSV1
        length, start = second & 0x7F, 2
        if reserved or (opcode & _CONTROL_BIT and length >= 126):
            self._abort()
            return None
        if length >= 126:
            start = 4 if length == 126 else 10
            if len(buffer) < start:
                return _MORE
            length = int.from_bytes(buffer[2:start], "big")
        fragments = self._fragmented_message_buffer
        if length + (len(fragments) if fragments is not None else 0) > self.params.max_message_size:
            self.close(MESSAGE_TOO_BIG, "message too big")
            self._abort()
            return None
        masked = second & 0x80
        end = start + (4 if masked else 0) + length
        if len(buffer) < end:
            return _MORE
        data = bytes(memoryview(buffer)[end - length:end])  # one copy (a bytearray slice would be two)
        if masked:
            data = _websocket_mask(bytes(buffer[start:start + 4]), data)
        del buffer[:end]
        return end, header & self.FIN, opcode, data

    def _on_frame(self, final: int, opcode: int, data: bytes) -> Future[None] | None:
        """What Tornado's ``_receive_frame`` does with a frame once read, plus the fragment budget."""
        if opcode & _CONTROL_BIT:
            if not final:  # control frames must not be fragmented
                self._abort()
                return None
        elif opcode == 0:  # continuation
            if self._fragmented_message_buffer is None:
                self._abort()
                return None
            self._fragmented_message_buffer.extend(data)
            if final:
                opcode = self._fragmented_message_opcode  # type: ignore[assignment]  # Tornado types it None
                data = bytes(self._fragmented_message_buffer)
                self._fragmented_message_buffer = None
        else:  # a new message
            if self._fragmented_message_buffer is not None:
                self._abort()
                return None
            if not final:
                self._fragmented_message_opcode = opcode  # type: ignore[assignment]
                self._fragmented_message_buffer = bytearray(data)
        if final:
            return self._handle_message(opcode, data)
        if not (self.client_terminated or self.server_terminated):
            self._fragments += 1
            if self._fragments > MAX_FRAGMENTS:
                self.handler.close(POLICY_VIOLATION, f"a message may come in at most {MAX_FRAGMENTS} frames")
            elif not self.handler.admit(self._wire_bytes_in - self._frame_start):
                self._refused_fragment = True
        return None

    def _handle_message(self, opcode: int, data: bytes) -> Future[None] | None:
        if self.server_terminated and opcode != _CLOSE_OPCODE:
            return None
        admitted = opcode == _CLOSE_OPCODE or self.handler.admit(self._wire_bytes_in - self._frame_start)
        if not opcode & _CONTROL_BIT:  # a whole message: a refused fragment drops all of it
            admitted = admitted and not self._refused_fragment
            self._fragments, self._refused_fragment = 0, False
        return super()._handle_message(opcode, data) if admitted else None

    def send_text(self, text: str) -> None:
        """``write_message(text)`` without the Task Tornado wraps around each write's future.

        Nothing awaits these writes, and a stream that closes fails its write futures (and
        marks their exceptions as seen) itself. Raises ``WebSocketClosedError`` and
        ``StreamBufferFullError`` as ``write_message`` does.
        """
        if self.is_closing():
            raise WebSocketClosedError()
        data = text.encode()
        self._message_bytes_out += len(data)
        flags = 0
        if self._compressor:
            data = self._compressor.compress(data)
            flags |= self.RSV1
        try:
            self._write_frame(True, _TEXT_OPCODE, data, flags=flags)
        except StreamClosedError:
            raise WebSocketClosedError() from None

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Send the close frame (once), stop reading, and cut the connection after ``grace``.

        Tornado's own close() waits a fixed 5 s for the peer's close frame (``_waiting``).
        """
        first = not self.server_terminated
        super().close(code, reason)
        if first and self._waiting is not None:
            loop = self.stream.io_loop
            loop.remove_timeout(self._waiting)
            self._waiting = loop.call_later(self.grace, self._abort)
