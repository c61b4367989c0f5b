"""The server: one process, one event loop, one fork per call.

The server is its own monitor: for every call it sends the greeting, reads the request
without blocking, hands it to an executor, and then watches both the executor (SIGCHLD
through ``_signal.set_wakeup_fd``, reaped in the loop with ``waitpid(-1, WNOHANG|WUNTRACED|
WCONTINUED)``) and the call socket (EOF: the client is gone; x1 records: signals to forward).
When the executor exits, its wait status goes back to the client.

The executor of a call is forked *before* the call: the server keeps one ready executor (a
"spare"), forked when the server starts, and again once a call has ended (or none runs):
not while the call just handed out runs, where the fork would compete with it.  A call
that finds no spare gets one forked on the spot.  The spare has already done everything
that does not depend on the call (its own process group, PDEATHSIG, the script's signal
handlers, none of the server's fds, the stdio settings for the environment it has) and
waits, every signal blocked, on its end of a socket pair; the call's fds and the
hand-over (``protocol.encode_handover``: argv, environment if it differs from the spare's,
umask, flags, client pid) come through it.  The fork and that set-up -- most of an
executor's start -- are thus off the caller's path; still one fork per call.

The child's side is ``spare.become_spare()``, called right after the fork with everything it
needs; it returns only once the child is the executor of its call.  The child then leaves
the loop at one point: ``_fork_spare`` raises ``TookCall``, which only ``run()`` catches, so
``run()`` returns only in an executor.  The server process itself always ends in
``os._exit``.
"""

from __future__ import annotations

import _signal
import _socket
import _struct
import errno
import os
import sys
import time

from prefork.common import fdio, protocol
from prefork.common.consts import DELIVERABLE_SIGNALS
from prefork.server.autoreload import Autoreload
from prefork.server.context import ServerContext
from prefork.server.fdshort import FdShortage
from prefork.server.poller import EVENT_READ, Poller
from prefork.server.spare import become_spare
from prefork.server.stats import CallStats
from prefork.server.waiting import WaitingCalls

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    from prefork.server.learn import Learner
    from prefork.server.log import ServerLog
    from prefork.server.selfwatch import SelfWatch
    from prefork.server.spare import Closable
    from prefork.server.watchlink import WatchLink

_READS_PER_TURN = 8       # reads of one connection's request per turn of the loop, at most
REQUEST_TIMEOUT = 10.0   # a connection must deliver its request within this (no slot meanwhile)
START_RETRY_FOR = 30.0   # out of fds: a call that cannot get an executor is retried this long
KILL_GRACE = 0.5         # SIGINT to a call whose client vanished, then SIGKILL after this
_PEERCRED = _struct.Struct("3i")
#: Every signal number, as ints: ``_signal`` rather than ``signal`` around the fork, whose
#: wrappers turn each of the 64 into an enum member, on every call.
_ALL_SIGNALS = frozenset(_signal.valid_signals())
#: Signal names by number, for the log (``_signal``: see ``_ALL_SIGNALS``).
_SIGNAMES = {getattr(_signal, n): n for n in dir(_signal)
             if n.startswith("SIG") and not n.startswith("SIG_") and "RT" not in n}


def _signame(signum: int) -> str:
    return _SIGNAMES.get(signum, f"signal {signum}")


#: Signals the server handles (through its wakeup fd).
_HANDLED = (_signal.SIGCHLD, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGINT)


class Call:
    """One connection, from greeting to final status."""

    __slots__ = ("client_pid", "cont_check_at", "cont_checks", "cont_forwarded", "deadline",
                 "extended", "kill_at", "parser", "pending", "pid", "queued", "sock",
                 "stopped")

    def __init__(self, sock: _socket.socket, x1: bool, now: float) -> None:
        self.sock: _socket.socket | None = sock
        self.parser: protocol.RequestParser | None = protocol.RequestParser(x1, x1)
        self.pid = 0
        self.extended = False
        self.deadline = now + REQUEST_TIMEOUT
        self.kill_at: float | None = None
        self.pending = b""
        #: A complete request waiting for a slot (``Server.waiting``): it, the records
        #: that came after it, and when it started waiting.
        self.queued: tuple[protocol.Request, bytes, float] | None = None
        #: The client's pid (x1: SO_PEERCRED), to continue it with its executor.
        self.client_pid = 0
        #: The executor is stopped; the client itself passed it a SIGCONT (so the
        #: continue is its own doing); when and how often to check that it is not left
        #: stopped after a continue made by someone else (see ``Server._continued``).
        self.stopped = False
        self.cont_forwarded = False
        self.cont_check_at: float | None = None
        self.cont_checks = 0


class Spare:
    """The ready executor, as the server knows it: its pid and the server's end of its
    socket pair."""

    __slots__ = ("environ", "handover_sock", "pid")

    def __init__(self, pid: int, handover_sock: _socket.socket, environ: object) -> None:
        self.pid = pid
        self.handover_sock: _socket.socket | None = handover_sock
        #: ``Server.environ`` when it was forked: the environment it already has.
        self.environ = environ


class TookCall(BaseException):
    """Raised in a forked child once it is the executor of its call: unwinds the loop to
    ``Server.run()``, which returns into the script.  (A BaseException, so that no
    ``except Exception`` on the way can keep the child in the server's loop.)"""


#: A hand-over must be taken within this (a spare that does not read is killed).
HANDOVER_TIMEOUT = 5.0
#: Seconds without a call after which the spare is let go (forked again with the next call).
SPARE_IDLE = 30.0

#: After continuing a client whose executor someone else continued: check, after each of
#: these intervals in turn, that it is not left stopped.
_CONT_CHECKS = (0.1, 0.5, 2.0)


def _proc_state(pid: int) -> str:
    """A process's state letter from ``/proc/PID/stat`` ("" if gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return ""
    return stat[stat.rfind(b")") + 2:][:1].decode()


class Server(FdShortage, WaitingCalls):
    """The accept / fork / reap loop (see module docstring; out of fds: ``fdshort``; the
    calls waiting for a slot: ``waiting``)."""

    def __init__(self, *, listen_sock: _socket.socket, call_sock: _socket.socket,
                 watch_in_fd: int, watch_err_fd: int, birth_ns: int, log: ServerLog,
                 max_servers: int, idle_timeout: float | None,
                 autoreload: Autoreload | WatchLink | None,
                 saved_signals: Mapping[int, object], keep_fds: set[int], script: str,
                 prctl: Callable[..., int] | None,
                 set_title: Callable[[str], None] | None = None,
                 learner: Learner | None = None, watch_link: WatchLink | None = None,
                 self_watch: SelfWatch | None = None,
                 spare_idle: float | None = SPARE_IDLE, max_wait: float | None = 1.0) -> None:
        self.listen_sock: _socket.socket | None = listen_sock
        self.first_call_sock = call_sock
        self.watch_in_fd = watch_in_fd
        self.watch_err_fd = watch_err_fd
        self.birth_ns = birth_ns
        self.log = log
        self.max_servers = max_servers
        self.max_wait = max_wait
        self.idle_timeout = idle_timeout
        self.autoreload = autoreload
        #: The shared watcher (our client): it owns WATCHI/WATCHE then.
        self.watch_link = watch_link
        #: The run directory's self-watching server (no watcher: see selfwatch.py).
        self.self_watch = self_watch
        if watch_link is not None or self_watch is not None:
            self.watch_in_fd = self.watch_err_fd = -1
        #: The spare is let go after this long without calls (the fork ahead of a call
        #: saves time only under traffic; an idle server is smaller without it).
        self.spare_idle = spare_idle
        self.spare_let_go = False
        self.saved_signals = saved_signals
        self.keep_fds = keep_fds
        self.script = script
        self.prctl = prctl
        self.set_title = set_title
        #: Learns from calls, checks the setup's side effects (prefork.server.learn).
        self.learner = learner
        self.server_pid = os.getpid()
        self.calls: dict[_socket.socket, Call] = {}
        self.by_pid: dict[int, Call] = {}
        self.quitting: str | None = None
        self.uid = os.getuid()
        self.sel = Poller()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.accepting = False
        self.last_activity = time.monotonic()
        self.threads_warned = False
        #: The environment of the last call (see _start): the next spares set it in
        #: themselves.  None: the server's own (no call yet).
        self.environ: list[tuple[bytes, bytes]] | None = None
        #: The ready executor (see module docstring), and every spare not reaped yet.
        self.spare: Spare | None = None
        self.spare_pids: set[int] = set()
        self.call_ended = False
        self.reap_due = False
        self.stats = CallStats.for_socket(listen_sock.getsockname(), birth_ns, log)
        #: Complete requests waiting for a slot, oldest first (see ``_dispatch``), and when
        #: a call last started or ended (the waiting ones wait ``max_wait`` without either).
        self.waiting: list[Call] = []
        self.progress_at = self.last_activity
        #: Out of fds: when the listener is tried again, and when that was last logged.
        self.accept_resume_at: float | None = None
        self.fd_logged_at: float | None = None
        #: Out of fds: connections whose request brings fds there is no room for yet (not
        #: read meanwhile: the kernel would drop them), and when they are tried again.
        self.deferred: list[Call] = []
        self.read_resume_at: float | None = None
        #: This server's own context (what its forks can and cannot run calls in).
        self.context = ServerContext()

    # ------------------------------------------------------------ set-up

    def _install_signals(self) -> None:
        _signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in _HANDLED:
            _signal.signal(sig, self._note_signal)
        _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)  # given back in executors (saved)

    def _note_signal(self, signum: int, frame: object) -> None:
        """Handlers only wake the loop (the byte arrives on ``wake_r``)."""

    def run(self) -> None:
        """Serve until told to quit (the server then ends in ``os._exit``); returns only in
        an executor, ready to run its call."""
        try:
            self._serve()
        except TookCall:
            return  # the one way out of the loop: this process is now an executor

    def _serve(self) -> None:
        self._install_signals()
        self.sel.register(self.wake_r, EVENT_READ, self._drain_wakeups)
        self.sel.register(self._watch_fd(), EVENT_READ, self._watch_event)
        self._add_call(self.first_call_sock)
        if self.self_watch is not None and not self.self_watch.socket_is_ours():
            # (gone before its watch: no event will say so)
            self._begin_quit("lost socket (fresh start, --kill or cleanup)")
        self._set_accepting(True)
        self.log.info(f"server started (pid {os.getpid()}, max_servers {self.max_servers}, "
                      f"idle timeout {self.idle_timeout})")
        self._fork_spare()
        while True:
            self._step()

    # ------------------------------------------------------------ the loop

    def _timeout(self, now: float) -> float | None:
        deadlines: list[float] = []
        for call in self.calls.values():
            if call.parser is not None:
                deadlines.append(call.deadline)
            if call.kill_at is not None:
                deadlines.append(call.kill_at)
        for call in self.by_pid.values():
            if call.kill_at is not None:
                deadlines.append(call.kill_at)
            if call.cont_check_at is not None:
                deadlines.append(call.cont_check_at)
        if self.idle_timeout is not None and not self.calls and not self.by_pid \
                and self.quitting is None:
            deadlines.append(self.last_activity + self.idle_timeout)
        if self.spare is not None and self.spare_idle is not None and not self.calls \
                and not self.by_pid:
            deadlines.append(self.last_activity + self.spare_idle)
        if self.waiting and self.max_wait is not None:
            deadlines.append(self._overflow_at())
        if self.accept_resume_at is not None:
            deadlines.append(self.accept_resume_at)
        if self.read_resume_at is not None:
            deadlines.append(self.read_resume_at)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    def _step(self) -> None:
        if self.stats is not None:
            self.stats.flush()  # calls ended in the last turn: after the spare's fork
        if self.quitting is not None and not self.calls and not self.by_pid \
                and not self.spare_pids:
            self.log.info(f"quitting: {self.quitting}")
            if self.learner is not None:
                self.learner.server_exit()
            os._exit(0)
        now = time.monotonic()
        events = self.sel.select(self._timeout(now))
        now = time.monotonic()
        # Children are reaped when a signal woke us (SIGCHLD comes through the wakeup fd) or
        # on a timeout, not on every turn: each turn's work is paid for on every call.
        self.reap_due = not events
        for key, _mask in events:
            # A handler earlier in this pass may have unregistered (and closed) another
            # event's fd -- quitting closes the listener and the watcher's pipe, a call's
            # end its socket: only a registration still current is acted on.
            if self.sel.current(key):
                key.data()  # the handler it was registered with
        if self.reap_due:
            self.reap_due = False
            self._reap()
        self._timers(now)
        # The next spare is forked once no call is left running, or when one has just
        # ended: not while a call that was just handed out runs, where the fork (long for
        # a big heap) would hold up the server's reply to it, on the same few cores.
        if self.spare is None and not self.spare_let_go and (self.call_ended or not self.by_pid):
            self.call_ended = False
            if self.learner is not None and not self.by_pid and self.quitting is None \
                    and self.learner.due():
                self.learner.step()  # between calls, before the next spare: it inherits
            self._fork_spare()

    def _drain_wakeups(self) -> None:
        """A signal arrived (its number on ``wake_r``): reap after this turn's events."""
        self.reap_due = True
        try:
            data = os.read(self.wake_r, 4096)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (_signal.SIGTERM, _signal.SIGHUP, _signal.SIGINT):
                self._begin_quit(f"got signal {_signame(signum)}")

    def _timers(self, now: float) -> None:
        for call in list(self.calls.values()):
            if call.parser is not None and now >= call.deadline:
                self.log.warning("rejected a connection: no complete request within "
                                 f"{REQUEST_TIMEOUT:.0f}s")
                self._drop(call)
        if self.accept_resume_at is not None and now >= self.accept_resume_at:
            self.accept_resume_at = None
            self._set_accepting(True)
            self._dispatch()
        self._resume_reads(now)
        if self.waiting and self.max_wait is not None and now >= self._overflow_at():
            # No slot freed up for max_wait: the running calls may be waiting for this one
            # (a pipeline of the script, a script calling itself); start it past the limit.
            self._start_waiting(self.waiting.pop(0), now)
        for call in list(self.by_pid.values()):
            if call.kill_at is not None and now >= call.kill_at:
                call.kill_at = None
                self._killpg(call.pid, _signal.SIGKILL)
            if call.cont_check_at is not None and now >= call.cont_check_at:
                self._check_continued(call, now)
        if (self.idle_timeout is not None and self.quitting is None and not self.calls
                and not self.by_pid and now >= self.last_activity + self.idle_timeout):
            self._begin_quit(f"idle for {self.idle_timeout:g}s")
        if (self.spare is not None and self.spare_idle is not None and not self.calls
                and not self.by_pid and now >= self.last_activity + self.spare_idle):
            self.spare_let_go = True  # forked again when a call comes
            self._drop_spare()

    def _begin_quit(self, why: str) -> None:
        """Stop accepting; running calls are finished first; the watcher is released."""
        if self.quitting is not None:
            return
        self.quitting = why
        self._drop_spare()
        if self.by_pid:
            self.log.info(f"stopped accepting ({why}): {len(self.by_pid)} running call(s) "
                          "will finish first")
        self._set_accepting(False)
        self.accept_resume_at = None
        if self.listen_sock is not None:
            self._close_listener(self.listen_sock)
            self.listen_sock = None
        try:
            self.sel.unregister(self._watch_fd())
        except (KeyError, ValueError):
            pass
        if self.watch_link is not None:
            self.watch_link.close()
        if self.self_watch is not None:
            self.self_watch.close()
        for fd in (self.watch_in_fd, self.watch_err_fd):
            if fd >= 0:
                os.close(fd)
        self.watch_in_fd = self.watch_err_fd = -1

    def _close_listener(self, listen_sock: _socket.socket) -> None:
        """Stop the listener for everyone: a child the script forked before
        ``initialisation_complete()`` may hold it too, and closing our fd alone would leave
        connects succeeding with nobody to accept them.  ``shutdown`` refuses new connects
        in every process holding it; connections already queued are closed (their clients
        see EOF before a greeting and start a fresh server)."""
        try:
            listen_sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
        while True:
            try:
                conn_fd, _ = listen_sock._accept()  # type: ignore[attr-defined]
            except OSError:  # BlockingIOError: none left; EMFILE: the rest see our close
                break
            os.close(conn_fd)
        listen_sock.close()

    def _set_accepting(self, on: bool) -> None:
        on = (on and self.quitting is None and self.listen_sock is not None
              and self.accept_resume_at is None)
        if on == self.accepting:
            return
        self.accepting = on
        if on:
            assert self.listen_sock is not None
            self.sel.register(self.listen_sock, EVENT_READ, self._accept)
        elif self.listen_sock is not None:
            self.sel.unregister(self.listen_sock)

    def _watch_fd(self) -> int:
        if self.self_watch is not None:
            return self.self_watch.fileno()
        return self.watch_err_fd if self.watch_link is None else self.watch_link.watch_err_fd

    def _self_watch_event(self, watch: SelfWatch) -> None:
        """The self-watching server's inotify fd: its socket's name gone or replaced (it
        quits, as when a v1 watcher closes WATCHE), or a file of its program changed (it
        quits now, idle or not, as when the shared watcher says ``stale``)."""
        why = watch.reload.stale()  # (reads the events, whatever they name)
        if not watch.socket_is_ours():
            self._begin_quit("lost socket (fresh start, --kill or cleanup)")
        elif why is not None and self.autoreload is not None:
            self.log.info(f"reloading: {why} changed since the server started")
            self._begin_quit(f"stale ({why})")

    def _link_event(self, link: WatchLink) -> None:
        """WATCHE from the shared watcher: stale, an error, or EOF -- the socket gone, or
        the watcher itself (then the server hands itself to a new one and carries on)."""
        link.feed()
        if link.told is not None:
            self.log.info(f"reloading: {link.told} changed since the server started")
            self._begin_quit(f"stale ({link.told})")
        elif link.error is not None:
            self.log.error(f"watcher: {link.error}")
            self._begin_quit("watcher reported an error")
        elif link.eof:
            if not link.socket_is_ours():
                self._begin_quit("lost socket (fresh start, --kill or cleanup)")
                return
            from prefork.common.watchwire import WatchError

            self.sel.unregister(link.watch_err_fd)
            try:
                link.reattach()
            except (WatchError, OSError) as e:
                self.log.error(f"the shared watcher was lost and no other could take over: {e}")
                link.close()
                self._begin_quit("lost the watcher")
                return
            self.sel.register(link.watch_err_fd, EVENT_READ, self._watch_event)
            self.log.warning("the shared watcher was lost: handed over to a new one")

    def _watch_event(self) -> None:
        if self.self_watch is not None:
            if self.quitting is None:
                self._self_watch_event(self.self_watch)
            return
        if self.watch_link is not None:
            if self.watch_link.watch_err_fd >= 0:  # else closed earlier in this pass
                self._link_event(self.watch_link)
            return
        if self.watch_err_fd < 0:
            return  # closed earlier in this pass (quitting)
        try:
            data = os.read(self.watch_err_fd, 2048)
        except BlockingIOError:
            return
        if data:
            msg = data.decode("utf-8", "backslashreplace").strip()
            self.log.error(f"watcher: {msg}")
            self._begin_quit("watcher reported an error")
        else:
            self._begin_quit("lost socket (fresh start, --kill or cleanup)")

    # ------------------------------------------------------------ connections

    def _accept(self) -> None:
        if self.listen_sock is None or not self.accepting:
            return  # stopped accepting earlier in this batch of events (e.g. quitting)
        if self.autoreload is not None:
            why = self.autoreload.stale()
            if why is not None:
                self.log.info(f"reloading: {why} changed since the server started")
                self._begin_quit(f"stale ({why})")
                return
        # Every connection is accepted and greeted at once, even with every slot taken
        # (its call waits for one once its request is complete): a client that gets no
        # greeting in time takes the server for dead.
        listen_sock = self.listen_sock
        for _ in range(64):  # then the other events of this pass get their turn
            try:
                conn_fd, _ = listen_sock._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._out_of_fds(f"accepting a connection: {e.strerror}")
                else:
                    self.log.warning(f"accept failed: {e}")
                return
            conn = _socket.socket(fileno=conn_fd)  # close-on-exec (accept4)
            try:
                creds = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED,
                                        _PEERCRED.size)
            except OSError:
                conn.close()
                continue
            pid, uid, _gid = _PEERCRED.unpack(creds)
            if uid != self.uid:
                self.log.warning(f"refused a connection from uid {uid} (pid {pid}): "
                                 f"this server serves uid {self.uid} only")
                conn.close()
                continue
            self._add_call(conn)

    def _add_call(self, sock: _socket.socket) -> None:
        self.last_activity = time.monotonic()
        self.spare_let_go = False
        sock.setblocking(False)
        call = Call(sock, True, self.last_activity)
        try:
            sock.send(protocol.encode_greeting(
                (protocol.X1_TOKEN, protocol.FDS_TOKEN, protocol.RETRY_TOKEN)))
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                self.log.warning(f"sending greeting failed: {e}")
            sock.close()
            return
        self.calls[sock] = call
        self._watch_call(call)

    def _watch_call(self, call: Call) -> None:
        assert call.sock is not None
        self.sel.register(call.sock, EVENT_READ, lambda: self._call_readable(call))

    def _drop(self, call: Call) -> None:
        """Forget the connection (closing any fds it had delivered)."""
        if call.parser is not None:
            for fd in call.parser.fds:
                os.close(fd)
            call.parser = None
        self._forget_sock(call)

    def _forget_sock(self, call: Call) -> None:
        """Stop watching the call's socket and close it (a call still waiting for a slot
        is forgotten with it, and the fds it brought closed)."""
        if call.queued is not None:
            for fd in call.queued[0].fds:
                os.close(fd)
            call.queued = None
            self.waiting.remove(call)
        if call.sock is None:
            return
        if call in self.deferred:
            self.deferred.remove(call)
        self.calls.pop(call.sock, None)
        try:
            self.sel.unregister(call.sock)
        except (KeyError, ValueError):
            pass
        call.sock.close()
        call.sock = None

    def _call_readable(self, call: Call) -> None:
        sock = call.sock
        if sock is None:
            return  # forgotten earlier in this turn
        # A request comes in several messages (a v1 client sends each fd on its own): read
        # on until the socket is empty, rather than one message per turn of the loop.
        for _ in range(_READS_PER_TURN):
            try:
                self._read_call(call, sock)
            except BlockingIOError:
                return
            if call.parser is None or call.sock is None or call in self.deferred:
                return

    def _read_call(self, call: Call, sock: _socket.socket) -> None:
        """One read from a call's socket (see ``_call_readable``); ``BlockingIOError`` when
        there is nothing to read.  A request's fds are read only once there is room for
        them all (else the read is deferred, see ``fdshort``)."""
        try:
            if call.parser is not None:
                got = self._recv_request_part(call, sock)
                if got is None:
                    return  # deferred: no room for its fds yet
                data, fds = got
            else:
                data, fds = sock.recv(4096), []
        except BlockingIOError:
            raise
        except ConnectionResetError:
            data, fds = b"", []  # as EOF: the client went away (logged below if mid-request)
        except (ValueError, OSError) as e:
            if call.parser is not None:
                self.log.warning(f"rejected a call: receiving the request failed: {e}")
            data, fds = b"", []
        if call.parser is not None:
            if not data and not fds:
                if call.parser.buf or call.parser.fds:
                    self.log.warning("rejected a call: the client closed the connection "
                                     "before the request was complete")
                self._drop(call)
                return
            try:
                req = call.parser.feed(data, fds)
            except protocol.ProtocolError as e:
                self.log.warning(f"rejected a call: {e}")
                self._drop(call)
                return
            if req is None:
                return
            rest = call.parser.rest
            call.parser = None
            if req.flags & protocol.FLAG_FOLLOWS_REDIRECT and self._redirect(call, req):
                return  # another context's: sent to its own server, holding no slot
            if self._full() or self.waiting:
                call.queued = (req, rest, time.monotonic())
                self.waiting.append(call)
            else:
                self._start(call, req, rest)
            return
        if not data:
            self._client_gone(call)
            return
        if call.queued is not None:  # records (signals) for when it starts
            req, rest, since = call.queued
            call.queued = (req, rest + data, since)
        elif call.extended:
            self._records(call, data)

    def _records(self, call: Call, data: bytes) -> None:
        recs, call.pending = protocol.decode_records(call.pending + data)
        for tag, value in recs:
            if tag == protocol.REC_SIGNAL and call.pid:
                if value in DELIVERABLE_SIGNALS:
                    if value == _signal.SIGCONT and call.stopped:
                        call.cont_forwarded = True  # the continue to come is the client's
                    self._killpg(call.pid, value)
                else:
                    self.log.warning(f"ignored a request to deliver signal {value}")

    def _client_gone(self, call: Call) -> None:
        """EOF on the call socket: the caller is gone; end its executor's process group."""
        self._forget_sock(call)
        if call.pid:
            self._killpg(call.pid, _signal.SIGINT)
            call.kill_at = time.monotonic() + KILL_GRACE

    def _killpg(self, pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as e:
            self.log.warning(f"cannot signal process group {pgid}: {e}")

    def _send(self, call: Call, data: bytes) -> None:
        if call.sock is None:
            return
        # A record or a status is a few bytes: they fit at once, without switching the
        # socket to blocking mode (four more system calls) unless the client lags.
        try:
            sent = call.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                self.log.warning(f"writing to client failed: {e}")
            return
        if sent == len(data):
            return
        try:
            call.sock.setblocking(True)
            call.sock.settimeout(5.0)
            call.sock.sendall(data[sent:])
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                self.log.warning(f"writing to client failed: {e}")
        finally:
            if call.sock is not None:
                call.sock.setblocking(False)

    # ------------------------------------------------------------ executors

    def _start(self, call: Call, req: protocol.Request, rest: bytes) -> None:
        """Hand a complete request to the spare (forked now if there is none; the next one
        is forked later, see ``_step``)."""
        # The next spares are given the caller's environment to set in themselves before
        # their call: most calls bring the same environment as the one before, and then
        # the executor has nothing to do.  Never set in the server itself: the C environ
        # keeps every string ever put in it (glibc frees none), so the server would grow
        # with every distinct environment callers send.
        if self.environ is None or self.environ != req.env:
            self.environ = req.env
        self.progress_at = time.monotonic()
        client_pid = 0
        if req.extended and call.sock is not None:
            try:
                client_pid = _PEERCRED.unpack(call.sock.getsockopt(
                    _socket.SOL_SOCKET, _socket.SO_PEERCRED, _PEERCRED.size))[0]
            except OSError:
                pass
        pid = None
        for _attempt in range(2):  # a spare that died meanwhile is replaced, once
            if self.spare is None:
                self._fork_spare(needed=True)
            pid = self._hand_over(call, req, client_pid)
            if pid is not None:
                break
        if pid is None and self.accept_resume_at is not None \
                and time.monotonic() < call.deadline + START_RETRY_FOR:
            # Out of fds for the executor's socket pair: the call waits (first in line)
            # and is tried again as fds come back (see _timers), rather than lost.
            call.queued = (req, rest, time.monotonic())
            self.waiting.insert(0, call)
            return
        for fd in req.fds:
            os.close(fd)
        if pid is None:
            self.log.error("could not start an executor for a call: dropped it")
            self._forget_sock(call)
            return
        call.pid = pid
        call.extended = req.extended
        call.client_pid = client_pid
        self.by_pid[pid] = call
        if self.stats is not None:
            self.stats.call_started(pid, req)
        if req.extended and rest:
            self._records(call, rest)

    def _redirect(self, call: Call, req: protocol.Request) -> bool:
        """Send the caller to the server of its own context if a fork of this one cannot
        run the call as a direct run would (``prefork.server.context``)."""
        if not req.extended or call.sock is None:
            return False
        try:
            client_pid = _PEERCRED.unpack(call.sock.getsockopt(
                _socket.SOL_SOCKET, _socket.SO_PEERCRED, _PEERCRED.size))[0]
        except OSError:
            return False
        why = self.context.mismatch(req, client_pid)
        if why is None:
            return False
        code = self.context.code(req, client_pid)
        if self.context.first_redirect(code):
            self.log.info(f"call from another context ({why}): sent to context {code:08x}")
        self._send(call, protocol.encode_record(protocol.REC_REDIRECT, code))
        for fd in req.fds:
            os.close(fd)
        self._forget_sock(call)
        return True

    def _hand_over(self, call: Call, req: protocol.Request, client_pid: int) -> int | None:
        """Send the call to the spare, which becomes its executor: its pid, or None if the
        spare could not take it (it is then killed and forgotten)."""
        spare, self.spare = self.spare, None
        if spare is None or spare.handover_sock is None:
            return None
        sock, spare.handover_sock = spare.handover_sock, None
        message = protocol.encode_handover(req, client_pid=client_pid,
                                           with_env=spare.environ is not self.environ)
        if req.extended:
            # The executor's pid goes out before the call does: a client that got no P
            # record knows that none of the script ran, and may send the call again.  (A
            # spare that fails to take it is replaced: the client then gets another P.)
            self._send(call, protocol.encode_record(protocol.REC_PID, spare.pid))
        try:
            sock.settimeout(HANDOVER_TIMEOUT)
            nfds = len(req.fds) - len(req.passed)
            fdio.send_fds(sock, message, req.fds[:nfds])
            fdio.send_fd_chunks(sock, req.fds[nfds:], protocol.SCM_MAX_FD)
        except OSError as e:
            self.log.warning(f"ready executor {spare.pid} could not take a call ({e}): "
                             "replacing it")
            self._kill_spare(spare.pid)
            return None
        finally:
            sock.close()
        self.spare_pids.discard(spare.pid)
        return spare.pid

    def _continued(self, call: Call) -> None:
        """The executor was continued.  By its client's own SIGCONT: say so (``C 0``).  By
        someone else (``kill -CONT`` of its pid, ``cpulimit``): the client, which stopped
        itself with the executor, is continued too (``C 1``, then SIGCONT), and checked
        a few times after, in case our SIGCONT came before it had stopped."""
        call.stopped = False
        if not call.extended or call.sock is None:
            return
        if call.cont_forwarded or not call.client_pid:
            call.cont_forwarded = False
            self._send(call, protocol.encode_record(protocol.REC_CONTINUED, 0))
            return
        self._send(call, protocol.encode_record(protocol.REC_CONTINUED, 1))
        self._continue_client(call)
        call.cont_checks = len(_CONT_CHECKS)
        call.cont_check_at = time.monotonic() + _CONT_CHECKS[0]

    def _continue_client(self, call: Call) -> None:
        try:
            os.kill(call.client_pid, _signal.SIGCONT)
        except ProcessLookupError:
            pass
        except PermissionError as e:
            self.log.warning(f"cannot continue client {call.client_pid}: {e}")

    def _check_continued(self, call: Call, now: float) -> None:
        """A client left stopped while its executor runs (our SIGCONT came just before it
        stopped itself): continued again."""
        call.cont_checks -= 1
        call.cont_check_at = None
        if call.stopped or call.sock is None:
            return
        if _proc_state(call.client_pid) == "T":
            self._continue_client(call)
        if call.cont_checks > 0:
            call.cont_check_at = now + _CONT_CHECKS[len(_CONT_CHECKS) - call.cont_checks]

    def _kill_spare(self, pid: int) -> None:
        try:
            os.kill(pid, _signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _drop_spare(self) -> None:
        """Let the spare go (quitting): it is killed, and reaped like any child."""
        spare, self.spare = self.spare, None
        if spare is None:
            return
        if spare.handover_sock is not None:
            spare.handover_sock.close()
            spare.handover_sock = None
        self._kill_spare(spare.pid)

    def _fork_spare(self, *, needed: bool = False) -> None:
        """Fork the next ready executor (while quitting, only one ``needed`` for a call
        already accepted).  In the child, raises ``TookCall`` once it has taken on a call."""
        if self.spare is not None or (self.quitting is not None and not needed):
            return
        if not self.threads_warned:
            # Not imported here if the script did not: threading's fork handler costs every
            # executor a quarter of a millisecond.  Without the module there are no threads.
            threading = sys.modules.get("threading")
            if threading is not None and threading.active_count() > 1:
                self.threads_warned = True
                self.log.warning(f"{threading.active_count()} threads alive at fork: only the "
                                 "calling thread exists in executors (see docs/transparency.md)")
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            server_end, spare_end = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
        except OSError as e:  # out of fds: the call that needed it is dropped, not the server
            self._out_of_fds(f"forking an executor: {e.strerror}")
            return
        # Every signal stays blocked across the fork, and in the spare until it has its
        # call: until it has dropped our wakeup fd and handlers, a signal sent to it would
        # land in the server's wakeup pipe and be taken for the server's own; and until it
        # has the caller's fds, stdio and the script's handlers, a forwarded signal would
        # be handled by the wrong code.  Pending ones are delivered when it unblocks them,
        # as if they had arrived just then.
        old_mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _ALL_SIGNALS)
        try:
            pid = os.fork()
        except OSError as e:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)
            server_end.close()
            spare_end.close()
            self.log.error(f"cannot fork an executor: {e}")
            return
        if pid == 0:
            # The child: its own function, with everything it needs; it returns only as
            # the executor of a call (any other end is os._exit), which leaves the loop.
            become_spare(
                spare_end, server_pid=self.server_pid,
                server_objects=self._held_objects(server_end), keep_fds=self.keep_fds,
                saved_signals=self.saved_signals, prctl=self.prctl,
                title=f"{self.script} [spare]", set_title=self.set_title,
                environ=self.environ)
            raise TookCall
        _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)
        spare_end.close()
        try:
            os.setpgid(pid, pid)
        except (PermissionError, ProcessLookupError):
            pass  # the child already did it (EACCES after its exec-free start) or is gone
        self.spare = Spare(pid, server_end, self.environ)
        self.spare_pids.add(pid)

    def _held_objects(self, server_end: _socket.socket) -> Iterator[Closable]:
        """What holds the server's fds (for a child to close: see ``spare.become_spare``).
        A generator: nothing of it runs before the child's guarded set-up does."""
        yield server_end
        for call in (*self.calls.values(), *self.by_pid.values()):
            if call.sock is not None:
                yield call.sock
        if self.listen_sock is not None:
            yield self.listen_sock
        yield self.sel
        yield self.log
        if self.learner is not None:
            yield self.learner

    def _reaped_spare(self, pid: int, status: int) -> None:
        """A spare that had no call stopped, went on, or ended."""
        if os.WIFSTOPPED(status) or os.WIFCONTINUED(status):
            return
        self.spare_pids.discard(pid)
        if self.spare is not None and self.spare.pid == pid:
            self.log.warning(f"ready executor {pid} ended before it had a call "
                             f"(status {status:#x}): another is forked for the next call")
            self._drop_spare()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG | os.WUNTRACED | os.WCONTINUED)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.spare_pids:
                self._reaped_spare(pid, status)
                continue
            call = self.by_pid.get(pid)
            if call is None and self.learner is not None and self.learner.owns(pid):
                continue  # a rehearsal probe's fork
            if call is None:
                self.log.warning(f"reaped process {pid} that was not one of ours "
                                 f"(status {status:#x})")
                continue
            if os.WIFSTOPPED(status):
                call.stopped = True
                call.cont_forwarded = False
                call.cont_check_at = None
                if call.extended:
                    self._send(call, protocol.encode_record(protocol.REC_STOPPED,
                                                            os.WSTOPSIG(status)))
                continue
            if os.WIFCONTINUED(status):
                self._continued(call)
                continue
            del self.by_pid[pid]
            self.call_ended = True
            if self.learner is not None:
                undone = self.learner.after_call()
                if undone is not None:
                    self._begin_quit(undone)  # before the answer: the next call restarts
            self.last_activity = time.monotonic()
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) not in (
                    _signal.SIGPIPE, _signal.SIGINT, _signal.SIGKILL) and call.kill_at is None:
                self.log.info(f"executor {pid} died of signal {os.WTERMSIG(status)}")
            if call.sock is not None:
                if call.extended:
                    self._send(call, protocol.encode_record(protocol.REC_STATUS, status))
                else:
                    self._send(call, protocol.encode_status(status))
                self._forget_sock(call)
            call.kill_at = None
            self.progress_at = time.monotonic()
            self._dispatch()
            if self.stats is not None:
                self.stats.call_ended(pid, status)
