"""Out of file descriptors: the server backs off, and reads a request's fds only with room
for them (why: docs/failure-modes.md, "Out of fds, no call is lost").

``FdShortage`` is a part of ``loop.Server`` (mixed into it: its methods work on the
server's attributes, declared below), kept apart from the loop itself.
"""

from __future__ import annotations

import _socket
import errno
import os
import time

from prefork.common import fdio, protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    from prefork.server.log import ServerLog
    from prefork.server.loop import Call
    from prefork.server.poller import Poller

FD_BACKOFF = 0.5         # out of fds: the listener is left alone this long before trying again
FD_LOG_EVERY = 60.0      # out of fds: said at most once per this many seconds (once per episode)


def recv_before_fds(sock: _socket.socket) -> tuple[bytes, bool]:
    """Read what has come up to (not including) the next message carrying fds, and
    whether one is next.  Peeked first, without room for fds: the kernel then keeps them
    and says MSG_CTRUNC.  A read ends with such a message, so it is the last byte peeked
    (the protocol's fds ride on one byte each), read later with room for its fds."""
    data, _anc, flags, _addr = sock.recvmsg(65536, 0, _socket.MSG_PEEK)
    if not flags & _socket.MSG_CTRUNC:
        return (sock.recv(len(data)) if data else b""), False
    return (sock.recv(len(data) - 1) if len(data) > 1 else b""), True


class FdShortage:
    """The out-of-fds part of ``loop.Server``."""

    if TYPE_CHECKING:  # the server's, used here
        log: ServerLog
        sel: Poller
        calls: dict[_socket.socket, Call]
        quitting: str | None
        listen_sock: _socket.socket | None
        wake_r: int
        #: Out of fds: when the listener is tried again, and when that was last logged.
        accept_resume_at: float | None
        fd_logged_at: float | None
        #: Connections whose request brings fds there is no room for yet (not read
        #: meanwhile: the kernel would drop them), and when they are tried again.
        deferred: list[Call]
        read_resume_at: float | None

        def _set_accepting(self, on: bool) -> None: ...
        def _watch_call(self, call: Call) -> None: ...

    def _recv_request_part(self, call: Call,
                           sock: _socket.socket) -> tuple[bytes, list[int]] | None:
        """One read of a request (bytes and fds), with room made for its fds first; None
        when the call is left unread for now (no room for the fds that come next)."""
        assert call.parser is not None
        nfds = call.parser.fds_ahead()
        short = self._room_for_fds(nfds) if nfds else None
        if nfds is not None and short is None:
            data, fds = fdio.recv_with_fds(sock, 65536, protocol.SCM_MAX_FD)
        else:
            # How many fds come next is not known yet, or there is no room for
            # them: only the bytes before them (an EOF, say) are read.
            data, fds_next = recv_before_fds(sock)
            fds = []
            if fds_next and not data:
                if nfds is not None:
                    self._defer_read(call, nfds, short or "")
                    return None
                # fds before the request says how many: not the protocol (the
                # parser says so, or the fds are cut short, ValueError)
                data, fds = fdio.recv_with_fds(sock, 65536, protocol.SCM_MAX_FD)
        return data, fds

    def _resume_reads(self, now: float) -> None:
        """The calls left unread for want of fds are read again (room is made anew)."""
        if self.read_resume_at is not None and now >= self.read_resume_at:
            self.read_resume_at = None
            deferred, self.deferred = self.deferred, []
            for call in deferred:
                self._watch_call(call)

    def _out_of_fds(self, what: str) -> None:
        """Out of file descriptors (or kernel memory): leave the listener alone for
        ``FD_BACKOFF`` (connections wait in the backlog; running calls go on, and free fds
        as they end), and say so once per episode rather than once per attempt."""
        now = time.monotonic()
        if self.fd_logged_at is None or now >= self.fd_logged_at + FD_LOG_EVERY:
            self.fd_logged_at = now
            self.log.warning(f"out of file descriptors ({what}): {len(self.calls)} "
                             f"connection(s) open; new connections wait, retried every "
                             f"{FD_BACKOFF:g}s (said once a minute at most)")
        self._set_accepting(False)
        if self.quitting is None and self.listen_sock is not None:
            self.accept_resume_at = now + FD_BACKOFF

    def _defer_read(self, call: Call, nfds: int, why: str) -> None:
        """No room for the ``nfds`` fds the call's next message brings: its socket is left
        unread for ``FD_BACKOFF`` (read now, the kernel would drop the fds it cannot
        install, MSG_CTRUNC, and the call would be lost); fds come back as calls end."""
        assert call.sock is not None
        self.sel.unregister(call.sock)
        self.deferred.append(call)
        self._out_of_fds(f"room for the {nfds} fds of a call: {why}")
        self.read_resume_at = time.monotonic() + FD_BACKOFF

    def _room_for_fds(self, nfds: int) -> str | None:
        """Make sure ``nfds`` more fds can be opened: they are opened (copies of the
        wakeup pipe's) and closed again, so the read that follows finds them free (one
        thread).  None if they could be, else why not."""
        got: list[int] = []
        try:
            for _ in range(nfds):
                got.append(os.dup(self.wake_r))
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise
            return e.strerror or str(e)
        finally:
            for fd in got:
                os.close(fd)
        return None
