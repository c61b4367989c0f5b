"""Bad input: raw-socket clients against a real server (issue 4, "Bad input").

Every case connects to a live server, says something that is not the protocol (or stops at
some point of it) and then checks that the server

- closed the connection on its own when it could tell the request was bad (no wait status),
- said what it rejected in its log file ``p<IDENT>.log``,
- closed every fd the client had passed (its fd count is back to what it was),
- did not allocate memory on the client's say-so (an absurd length is refused at once; a
  large allowed one does not grow the server),
- survived: the same server answers a normal call afterwards.

A hypothesis-generated batch of malformed requests then runs against one live server.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from _procfacts import (
    U32BE,
    asleep_in_epoll,
    drain_until_closed,
    executors,
    log_text,
    message,
    raw_connect,
    recv_exactly,
    send_fds,
    socket_file,
)
from harness import PYTHON, ProcRegistry, scaled, wait_for, write_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procfs import fd_count, gone, rss_kib

from prefork.common.protocol import EXT_FIXED, MAX_MESSAGE

SCRIPT = """
import os, sys
import prefork
prefork.initialisation_complete(log="file", autoreload=False)  # the same server throughout
if sys.argv[1:2] == ["ping"]:
    print("pong", os.getppid())
elif sys.argv[1:2] == ["bytes"]:
    out = sys.stdout.buffer
    out.write(b" ".join([os.environb.get(b"PF_BYTES", b"-").hex().encode(),
                         os.environb.get(b"PF_\\xffNAME", b"-").hex().encode(),
                         *(os.fsencode(a).hex().encode() for a in sys.argv)]) + b"\\n")
"""

GOOD_ARGV = [str(PYTHON).encode(), b"script", b"ping"]


def wait_idle(pid: int) -> None:
    """Wait until the server sleeps in its event loop's epoll_wait (all work done)."""
    wait_for(lambda: asleep_in_epoll(pid), what=f"server {pid} asleep in epoll_wait")


@dataclass
class Live:
    """A running server of the test, and what it looked like when idle."""

    pid: int
    sock: str
    script: str
    env: dict[str, str]
    rundir: str
    fds: int
    procs: ProcRegistry

    def ping(self) -> None:
        """A normal call works, and it is served by this same server."""
        rc, out, err = self.procs.run([self.script, "ping"], env=self.env)
        assert (rc, out, err) == (0, f"pong {self.pid}\n".encode(), b"")

    def settled(self) -> None:
        """Back to the idle fd count (every fd a client passed is closed), and alive."""
        wait_for(lambda: fd_count(self.pid) == self.fds,
                 what=f"server fd count back to {self.fds} (now {fd_count(self.pid)})")
        assert not gone(self.pid)


@pytest.fixture
def live(rundir: str, env: dict[str, str], procs: ProcRegistry) -> Live:
    """A server started by a normal call, idle."""
    script = write_script(rundir, "bad.py", SCRIPT)
    rc, out, err = procs.run([script, "ping"], env=env)
    assert rc == 0, err
    pid = int(out.split()[1])
    wait_idle(pid)
    return Live(pid, socket_file(rundir), script, env, rundir, fd_count(pid), procs)


@pytest.fixture
def null_fd() -> Iterator[int]:
    """An fd to pass (the server must close its copies of whatever it is sent)."""
    fd = os.open(os.devnull, os.O_RDWR)
    try:
        yield fd
    finally:
        os.close(fd)


# ------------------------------------------------------------------ hand-written cases

Action = Callable[[socket.socket, int], None]
CLOSED_EARLY = "the client closed the connection before the request was complete"


def v1_head(n_fds: int = 3, data: bytes = b"\0") -> Action:
    """Signalling byte 0 then ``n_fds`` fd-carrying messages."""
    def act(s: socket.socket, fd: int) -> None:
        s.sendall(b"\0")
        for _ in range(n_fds):
            send_fds(s, [fd], data)
    return act


def x1_head(n_fds: int = 4) -> Action:
    """Signalling byte 1 then one message carrying ``n_fds`` fds."""
    def act(s: socket.socket, fd: int) -> None:
        s.sendall(b"\x01")
        send_fds(s, [fd] * n_fds)
    return act


def then(first: Action, data: bytes) -> Action:
    """``first``, then the bytes ``data``."""
    def act(s: socket.socket, fd: int) -> None:
        first(s, fd)
        s.sendall(data)
    return act


def raw(data: bytes) -> Action:
    """Just these bytes."""
    return lambda s, fd: s.sendall(data)


GOOD_MSG = message([b"A=1"], GOOD_ARGV)
GOOD_EXT = U32BE.pack(EXT_FIXED.size) + EXT_FIXED.pack(0o022, 0, os.getpid())


def body(data: bytes) -> bytes:
    """``data`` as a message with the right length."""
    return U32BE.pack(len(data)) + data


#: Connections that close at each point of the protocol: (action, what the log must say).
CLOSES: dict[str, tuple[Action | None, str | None]] = {
    "before-greeting": (None, None),
    "after-greeting": (raw(b""), None),
    "after-sigbyte": (raw(b"\0"), CLOSED_EARLY),
    "after-1-fd": (v1_head(1), CLOSED_EARLY),
    "after-2-fds": (v1_head(2), CLOSED_EARLY),
    "after-3-fds": (v1_head(3), CLOSED_EARLY),
    "inside-length": (then(v1_head(), b"\0\0"), CLOSED_EARLY),
    "after-length": (then(v1_head(), GOOD_MSG[:4]), CLOSED_EARLY),
    "inside-message": (then(v1_head(), GOOD_MSG[:-3]), CLOSED_EARLY),
    "length-past-the-end": (then(v1_head(), U32BE.pack(1000) + b"A=1\0\0x\0"), CLOSED_EARLY),
    "x1-after-sigbyte": (raw(b"\x01"), CLOSED_EARLY),
    "x1-after-fds": (x1_head(), CLOSED_EARLY),
    "x1-after-message": (then(x1_head(), GOOD_MSG), CLOSED_EARLY),
    "x1-inside-ext": (then(x1_head(), GOOD_MSG + GOOD_EXT[:9]), CLOSED_EARLY),
}

#: Requests the server can tell are bad by itself: (action, what the log must say).
REJECTS: dict[str, tuple[Action, str]] = {
    "sigbyte-2": (raw(b"\x02"), "signalling byte is 0x02, not zero"),
    "sigbyte-ff": (raw(b"\xff\xfe\x00"), "signalling byte is 0xff, not zero"),
    "http": (raw(b"GET / HTTP/1.0\r\n\r\n"), "signalling byte is 0x47, not zero"),
    "no-fds": (raw(b"\0\0\0\0" + GOOD_MSG), "only 0 fds received, expected 3"),
    "too-few-fds": (then(v1_head(2), b"\0" + GOOD_MSG), "only 2 fds received, expected 3"),
    "too-many-fds": (then(v1_head(4), GOOD_MSG), "4 fds received, expected 3"),
    "x1-too-few-fds": (then(x1_head(3), GOOD_MSG + GOOD_EXT), "only 3 fds received, expected 4"),
    "x1-too-many-fds": (x1_head(7), "7 fds received, expected 4"),
    "fd-bytes-not-zero": (then(v1_head(3, b"\x07"), GOOD_MSG), "fd-carrying bytes are not zero"),
    "length-absurd": (then(v1_head(), b"\xff\xff\xff\xff"), "message length 4294967295 exceeds"),
    "length-over-limit": (then(v1_head(), U32BE.pack(MAX_MESSAGE + 1)), "exceeds the limit"),
    "no-trailing-nul": (then(v1_head(), body(b"A=1\0\0py\0script")), "missing trailing NUL"),
    "env-without-equals": (then(v1_head(), body(b"NOEQUALS\0\0py\0s\0")),
                           "environment entry without '=': b'NOEQUALS'"),
    "env-non-utf8-without-equals": (then(v1_head(), body(b"\xff\xfe\x80\0\0py\0s\0")),
                                    r"environment entry without '=': b'\xff\xfe\x80'"),
    "no-end-of-environment": (then(v1_head(), body(b"A=1\0B=2\0")), "no empty string ending"),
    "no-interpreter": (then(v1_head(), body(b"A=1\0\0")), "no interpreter in argv"),
    "non-utf8-no-nul": (then(v1_head(), body(b"\xff\xfe\xfd\xc3")), "missing trailing NUL"),
    "x1-bad-umask": (then(x1_head(), GOOD_MSG + U32BE.pack(12) + EXT_FIXED.pack(0o7777, 0, 1)),
                     "bad umask 0o7777"),
    "x1-short-ext": (then(x1_head(), GOOD_MSG + U32BE.pack(4) + b"\0\0\0\0"),
                     "extension block: 4 bytes, need 12"),
    "x1-absurd-ext": (then(x1_head(), GOOD_MSG + b"\xff\xff\xff\xff"),
                      "extension block length 4294967295 exceeds"),
}
def _many_at_once(s: socket.socket, fd: int) -> None:
    s.sendall(b"\0")
    send_fds(s, [fd] * 6)


REJECTS["too-many-fds-at-once"] = (_many_at_once, "6 fds received, expected 3")


@pytest.mark.parametrize("case", list(CLOSES))
def test_connection_closed_at_each_point(case: str, live: Live, null_fd: int) -> None:
    action, logged = CLOSES[case]
    before = len(log_text(live.rundir))
    sock = raw_connect(live.sock, greeting=action is not None)
    if action is not None:
        action(sock, null_fd)
    sock.close()
    live.settled()
    new = log_text(live.rundir)[before:]
    if logged is None:
        assert "rejected" not in new
    else:
        wait_for(lambda: logged in log_text(live.rundir)[before:], what=f"log: {logged}")
    live.ping()


@pytest.mark.parametrize("case", list(REJECTS))
def test_bad_request_is_rejected_and_logged(case: str, live: Live, null_fd: int) -> None:
    action, logged = REJECTS[case]
    before = len(log_text(live.rundir))
    with raw_connect(live.sock) as sock:
        try:
            action(sock, null_fd)
        except (BrokenPipeError, ConnectionResetError):
            pass  # rejected before we had sent it all
        # The server must close the connection by itself, and send no wait status.
        assert drain_until_closed(sock) == b""
    live.settled()
    new = log_text(live.rundir)[before:]
    assert "WARNING" in new and "rejected a call" in new and logged in new, new
    live.ping()


def test_absurd_lengths_allocate_nothing(live: Live, null_fd: int) -> None:
    """A length at the limit is waited for without allocating it; one past it is refused."""
    rss0 = rss_kib(live.pid)
    with raw_connect(live.sock) as sock:
        v1_head()(sock, null_fd)
        sock.sendall(U32BE.pack(MAX_MESSAGE) + b"A=1\0")
        wait_idle(live.pid)
        # 32 MiB promised, a few bytes sent: the server holds only what it received.
        assert rss_kib(live.pid) - rss0 < 2048
        assert not gone(live.pid)
    live.settled()
    with raw_connect(live.sock) as sock:
        v1_head()(sock, null_fd)
        sock.sendall(U32BE.pack(0xFFFFFFFF))
        assert drain_until_closed(sock) == b""
    assert rss_kib(live.pid) - rss0 < 2048
    live.settled()
    live.ping()


def test_non_utf8_everywhere_is_passed_through(live: Live, null_fd: int) -> None:
    """Bytes that are not UTF-8 in environment names and values and in arguments are data,
    not errors: the executor sees exactly the bytes sent."""
    value, arg = b"caf\xe9\xff\x80", b"\xfe\xc3(\xa0"
    env = [b"PF_BYTES=" + value, b"PF_\xffNAME=\xc0\xaf", b"LANG=C.UTF-8"]
    argv = [str(PYTHON).encode(), b"scr\xefpt", b"bytes", arg]
    out_r, out_w = os.pipe()
    try:
        with raw_connect(live.sock) as sock:
            sock.sendall(b"\0")
            for fd in (null_fd, out_w, out_w):
                send_fds(sock, [fd])
            os.close(out_w)
            out_w = -1
            sock.sendall(message(env, argv))
            status = recv_exactly(sock, 4)
            assert drain_until_closed(sock) == b""
        with os.fdopen(out_r, "rb") as f:
            out_r = -1
            got = f.read().split()
    finally:
        for fd in (out_r, out_w):
            if fd >= 0:
                os.close(fd)
    assert U32BE.unpack(status)[0] == 0, b" ".join(got).decode(errors="replace")
    assert got == [value.hex().encode(), b"c0af",
                   b"scr\xefpt".hex().encode(), b"bytes".hex().encode(), arg.hex().encode()]
    live.settled()
    live.ping()


# ------------------------------------------------------------------ generated cases


@st.composite
def malformed(draw: st.DrawFn) -> tuple[int, list[tuple[bytes, int]], bytes, bool]:
    """A request shape: signalling byte, fd-carrying messages (data, fd count), the rest of
    the bytes (a message with a true or false length, then maybe an extension block), cut
    at a random point; and whether the client then closes (else it waits for the server)."""
    sig = draw(st.sampled_from([0, 1]) if draw(st.integers(0, 4)) else st.integers(0, 255))
    if draw(st.integers(0, 3)):  # mostly the right fds, so that the message gets parsed
        fd_msgs = [(b"\0", 4)] if sig == 1 else [(b"\0", 1)] * 3
    else:
        fd_msgs = draw(st.lists(st.tuples(st.sampled_from([b"\0", b"\0\0", b"\x01", b"\xff"]),
                                          st.integers(0, 5)), max_size=5))
    strings = st.binary(max_size=12)
    env = draw(st.lists(st.one_of(strings, strings.map(lambda b: b"K" + b + b"=v")),
                        max_size=4))
    argv = draw(st.lists(strings, max_size=3))
    msg = b"".join(e.replace(b"\0", b"") + b"\0" for e in [*env, b"", *argv])
    if draw(st.booleans()):
        msg = msg.rstrip(b"\0")
    length = draw(st.sampled_from([len(msg), len(msg), len(msg) + 1, max(len(msg) - 1, 0)])
                  | st.integers(0, 2**32 - 1))
    tail = U32BE.pack(length) + msg
    if sig == 1:
        tail += draw(st.sampled_from([GOOD_EXT, b""]) | st.binary(max_size=20))
    tail = tail[: draw(st.integers(0, len(tail)))] if draw(st.booleans()) else tail
    tail += draw(st.binary(max_size=8))
    return sig, fd_msgs, tail, draw(st.booleans())


@pytest.mark.timeout(300)
def test_generated_malformed_requests(live: Live, null_fd: int) -> None:
    """Many generated requests against one live server (bounded in count and time): the
    server closes each connection, never keeps a passed fd, never grows, and survives."""
    rss0 = rss_kib(live.pid)
    deadline = time.monotonic() + scaled(150)
    seen = [0]

    @settings(max_examples=250, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(malformed())
    def one(case: tuple[int, list[tuple[bytes, int]], bytes, bool]) -> None:
        if time.monotonic() > deadline:  # the time bound: stop generating work
            return
        seen[0] += 1
        sig, fd_msgs, tail, close = case
        with raw_connect(live.sock) as sock:
            try:
                sock.sendall(bytes([sig]))
                for data, n in fd_msgs:
                    send_fds(sock, [null_fd] * n, data)
                sock.sendall(tail)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server had already rejected it
            if close:
                sock.close()
            else:
                # Half-close: a request still incomplete now ends; a complete one means the
                # client went away mid-call.  Either way the server must close its side.
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                drain_until_closed(sock)
        live.settled()

    one()
    assert seen[0] >= 50, f"only {seen[0]} generated cases ran within the time bound"
    wait_idle(live.pid)
    assert rss_kib(live.pid) - rss0 < 4096
    assert "rejected a call" in log_text(live.rundir)
    live.ping()


def test_request_then_close_at_once_repeatedly(live: Live, null_fd: int) -> None:
    """A complete request and the client gone at once: the server SIGINTs the executor at
    the very start of its life.  That signal belongs to the executor alone; the server must
    not take it for its own (it once did, through the signal wakeup fd it shares until
    the executor drops it) and must go on serving."""
    for _ in range(60):
        with raw_connect(live.sock) as sock:
            v1_head()(sock, null_fd)
            sock.sendall(GOOD_MSG)
        live.settled()
    wait_for(lambda: all(gone(pid) for pid, _ in executors(live.pid)),
             what="every executor gone")
    assert "quitting" not in log_text(live.rundir)
    live.ping()


SIGPIPE_DFL_SCRIPT = """
import os, signal, sys
signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # as CLIs do, to die quietly under `| head`
import prefork
prefork.initialisation_complete(log="file", autoreload=False)
print("pong", os.getppid(), signal.getsignal(signal.SIGPIPE) == signal.SIG_DFL)
"""


def test_script_with_default_sigpipe_and_clients_gone_at_once(
        rundir: str, env: dict[str, str], procs: ProcRegistry, null_fd: int) -> None:
    """A script that restores SIGPIPE's default action before initialisation (as many CLIs
    do) keeps it in its executors, but the server does not die of SIGPIPE when it writes to
    a client already gone (the x1 pid record right after the hand-over, the status)."""
    script = write_script(rundir, "pipe.py", SIGPIPE_DFL_SCRIPT)
    rc, out, err = procs.run([script], env=env)
    assert (rc, err) == (0, b"")
    word, server, dfl = out.split()
    assert (word, dfl) == (b"pong", b"True")
    argv = [str(PYTHON).encode(), script.encode()]
    for _ in range(30):
        with raw_connect(socket_file(rundir)) as sock:
            x1_head()(sock, null_fd)
            sock.sendall(message([b"A=1"], argv) + GOOD_EXT)
        with raw_connect(socket_file(rundir)) as sock:
            v1_head()(sock, null_fd)
            sock.sendall(message([b"A=1"], argv))
    wait_idle(int(server))
    rc, out, err = procs.run([script], env=env)
    assert (rc, err) == (0, b"") and out.split()[1:] == [server, b"True"]
