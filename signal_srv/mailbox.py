"""``Mailbox``: a call actor's bounded inbox, with Tornado's ``Queue`` interface and one reader.

A ``tornado.queues.Queue`` keeps three deques (items, waiting readers, waiting writers) and
an ``Event`` for ``join()``: about 2.5 KB per call before anything is queued, a large part
of what a connected call costs. A call's inbox is empty nearly all the time and only its
actor reads it, so this one keeps one waiting reader and two lists that stay empty (56
bytes each) until something waits in them.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

from tornado.queues import QueueEmpty, QueueFull

__all__ = ["Mailbox"]

T = TypeVar("T")


class Mailbox(Generic[T]):
    """A FIFO of at most ``maxsize`` items; ``put`` waits for room, ``get`` for an item.

    Only one reader may wait at a time (the actor). Writers that wait for room get it in
    the order they came, before any later ``put_nowait``, as with Tornado's ``Queue``.
    """

    __slots__ = ("maxsize", "_items", "_getter", "_putters")

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: list[T] = []  # a list, not a deque: it holds a few items at most, and a deque costs 760 bytes
        self._getter: asyncio.Future[T] | None = None
        self._putters: list[tuple[T, asyncio.Future[None]]] = []

    def qsize(self) -> int:
        return len(self._items)

    def put_nowait(self, item: T) -> None:
        """Hand ``item`` to the waiting reader, or queue it; ``QueueFull`` if there is no room."""
        getter, self._getter = self._getter, None
        if getter is not None and not getter.done():
            getter.set_result(item)
        elif len(self._items) >= self.maxsize or self._putters:
            raise QueueFull()
        else:
            self._items.append(item)

    async def put(self, item: T) -> None:
        """Queue ``item``, waiting for room first if the mailbox is full."""
        try:
            self.put_nowait(item)
            return
        except QueueFull:
            pass
        room: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._putters.append((item, room))
        try:
            await room
        except asyncio.CancelledError:
            if (item, room) in self._putters:
                self._putters.remove((item, room))
            raise

    def get_nowait(self) -> T:
        """The oldest item; ``QueueEmpty`` if there is none."""
        if not self._items:
            raise QueueEmpty()
        item = self._items.pop(0)
        while self._putters:
            waiting, room = self._putters.pop(0)
            if not room.done():  # done: its writer was cancelled
                self._items.append(waiting)
                room.set_result(None)
                break
        return item

    def get(self) -> asyncio.Future[T]:
        """A future of the oldest item: resolved now if there is one, else by the next ``put``."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if self._items:
            future.set_result(self.get_nowait())
        else:
            assert self._getter is None or self._getter.done(), "a mailbox has one reader"
            self._getter = future
        return future
