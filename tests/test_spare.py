"""``spare.become_spare()`` on its own: the child's side of the server's fork, without a server.

Everything the child needs is an argument, so a test forks a child that calls it and plays
the server's part itself: a real hand-over on a real socket pair, with real fds, checked in
what the child then is (an executor, or a process that ended with the documented status).
"""

from __future__ import annotations

import ast
import os
import select
import signal
import socket
import sys
from collections.abc import Callable, Iterator

import pytest

from prefork.common import fdio, protocol
from prefork.common.consts import EXIT_FAILED
from prefork.server.spare import become_spare

pytestmark = pytest.mark.timeout(60)

#: Children forked by the test running now; any left at its end is killed and reaped.
_children: set[int] = set()


@pytest.fixture(autouse=True)
def _reap_children() -> Iterator[None]:
    yield
    while _children:
        pid = _children.pop()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)


def _wait(pid: int, timeout: float = 30.0) -> int:
    """The child's wait status, once it has ended (killed if it has not within ``timeout``)."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
        _children.discard(pid)
        return status
    finally:
        os.close(pidfd)


def _read_all(fd: int, timeout: float = 30.0) -> bytes:
    out = b""
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, "no EOF from the child"
        chunk = os.read(fd, 65536)
        if not chunk:
            return out
        out += chunk


def _fork_spare(then: Callable[[], None], server_pid: int | None = None
                ) -> tuple[int, socket.socket, int]:
    """Fork a child that becomes a spare and, if it returns as an executor, runs ``then``.
    Returns its pid, the server's end of the socket pair, and the read end of its stderr."""
    server_end, spare_end = socket.socketpair()
    err_r, err_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 99
        try:
            os.dup2(err_w, 2)
            become_spare(spare_end, server_pid=parent if server_pid is None else server_pid,
                         server_objects=[server_end], keep_fds=(), saved_signals={},
                         prctl=None, title=None, set_title=None, environ=None)
            then()
            status = 0
        finally:
            os._exit(status)
    _children.add(pid)
    spare_end.close()
    os.close(err_w)
    return pid, server_end, err_r


def test_a_handed_over_call_makes_the_child_its_executor(tmp_path: os.PathLike[str]) -> None:
    cwd = os.path.realpath(tmp_path)

    def report() -> None:
        print(repr((sys.argv, os.getcwd(), dict(os.environ), oct(os.umask(0)))))
        sys.stdout.flush()

    pid, server_end, err_r = _fork_spare(report)
    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe()
    cwd_fd = os.open(cwd, os.O_PATH | os.O_DIRECTORY)
    try:
        fds = [in_r, out_w, out_w, cwd_fd]
        req = protocol.Request(True, fds, [(b"HANDOVER_TEST", b"yes"), (b"LC_ALL", b"C.UTF-8")],
                               [b"/usr/bin/python3", b"/x/script.py", b"arg one"], 0o027, 0, 0)
        fdio.send_fds(server_end, protocol.encode_handover(req, client_pid=os.getpid(),
                                                           with_env=True), fds)
    finally:
        for fd in (in_r, out_w, cwd_fd):
            os.close(fd)
        server_end.close()
    out = _read_all(out_r)
    os.close(out_r)
    os.close(in_w)
    err = _read_all(err_r)
    os.close(err_r)
    status = _wait(pid)
    assert os.waitstatus_to_exitcode(status) == 0, err
    argv, got_cwd, env, umask = ast.literal_eval(out.decode())
    assert argv == ["/x/script.py", "arg one"]
    assert got_cwd == cwd
    assert env["HANDOVER_TEST"] == "yes" and "PATH" not in env
    assert umask == "0o27"


def test_let_go_by_the_server_the_spare_exits_quietly() -> None:
    pid, server_end, err_r = _fork_spare(lambda: None)
    server_end.close()  # EOF where the hand-over would be
    err = _read_all(err_r)
    os.close(err_r)
    assert os.waitstatus_to_exitcode(_wait(pid)) == 0
    assert err == b""


def test_a_garbage_hand_over_ends_the_spare_with_a_clear_error() -> None:
    pid, server_end, err_r = _fork_spare(lambda: None)
    r, w = os.pipe()
    try:
        fdio.send_fds(server_end, b"GARBAGE!" * 4, [r, w, w])
    finally:
        os.close(r)
        os.close(w)
        server_end.close()
    err = _read_all(err_r)
    os.close(err_r)
    assert os.waitstatus_to_exitcode(_wait(pid)) == EXIT_FAILED
    assert err == (b"prefork: failed to set up the executor: "
                   b"ProtocolError(\"hand-over: bad magic b'GA'\")\n")


def test_a_spare_whose_server_is_gone_exits() -> None:
    """Forked by a server that died before PDEATHSIG was set: the parent is not the server."""
    pid, server_end, err_r = _fork_spare(lambda: None, server_pid=1)
    err = _read_all(err_r)
    os.close(err_r)
    server_end.close()
    assert os.waitstatus_to_exitcode(_wait(pid)) == 1
    assert err == b""
