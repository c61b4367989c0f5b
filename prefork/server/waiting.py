"""The calls waiting for a slot: complete requests while ``max_servers`` calls run, started
in order as slots free up, or past the limit after ``max_wait`` without a call starting
or ending (no deadlock: docs/failure-modes.md).

``WaitingCalls`` is a part of ``loop.Server`` (mixed into it: its methods work on the
server's attributes, declared below), kept apart from the loop itself.
"""

from __future__ import annotations

import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from prefork.common import protocol
    from prefork.server.loop import Call


class WaitingCalls:
    """The waiting-for-a-slot part of ``loop.Server``."""

    if TYPE_CHECKING:  # the server's, used here
        max_servers: int
        max_wait: float | None
        by_pid: dict[int, Call]
        #: Complete requests waiting for a slot, oldest first, and when a call last
        #: started or ended (the waiting ones wait ``max_wait`` without either).
        waiting: list[Call]
        progress_at: float
        accept_resume_at: float | None

        def _start(self, call: Call, req: protocol.Request, rest: bytes) -> None: ...

    def _full(self) -> bool:
        """Every slot taken: a slot is a running call's (a connection still sending its
        request holds none, so idle connections delay nobody)."""
        return 0 <= self.max_servers <= len(self.by_pid)

    def _overflow_at(self) -> float:
        """When the oldest waiting call starts past the limit: ``max_wait`` after it began
        waiting, or after the last call started or ended, whichever is later."""
        assert self.max_wait is not None
        head = self.waiting[0].queued
        queued_at = head[2] if head is not None else self.progress_at
        return max(queued_at, self.progress_at) + self.max_wait

    def _dispatch(self) -> None:
        """Start waiting calls while there are slots for them."""
        while self.waiting and not self._full() and self.accept_resume_at is None:
            self._start_waiting(self.waiting.pop(0), time.monotonic())

    def _start_waiting(self, call: Call, now: float) -> None:
        assert call.queued is not None
        req, rest, _since = call.queued
        call.queued = None
        self.progress_at = now
        self._start(call, req, rest)
