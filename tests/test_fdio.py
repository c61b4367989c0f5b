"""Tests for prefork.common.fdio, the one copy of fd passing (client, server and spare use it):
real socketpairs and pipes, fds compared by inode."""

from __future__ import annotations

import _socket
import os
import socket
import threading

import pytest

from prefork.common import fdio


def _same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


@pytest.mark.parametrize("kind", ["_socket", "socket"])
def test_send_fds_arrive_non_inheritable_then_read_exactly(kind: str) -> None:
    """Both socket types (the client has only ``_socket``): the fds arrive with the first
    byte, close-on-exec; the bytes after them are read exactly; EOF is an ``EOFError``."""
    make = _socket.socketpair if kind == "_socket" else socket.socketpair
    a, b = make(_socket.AF_UNIX, _socket.SOCK_STREAM)
    r, w = os.pipe()
    got: list[int] = []
    try:
        fdio.send_fds(a, b"\0", [r, w])
        a.sendall(b"rest")
        data, got = fdio.recv_with_fds(b, 1, 4)
        assert data == b"\0" and len(got) == 2
        assert _same_file(got[0], r) and _same_file(got[1], w)
        assert not any(os.get_inheritable(fd) for fd in got)
        assert fdio.read_exactly(b, 4) == b"rest"
        a.close()
        with pytest.raises(EOFError, match="1 bytes still expected"):
            fdio.read_exactly(b, 1)
    finally:
        for fd in (r, w, *got):
            os.close(fd)
        a.close()
        b.close()


def test_too_many_fds_closes_those_that_arrived() -> None:
    """More fds than asked for: ``ValueError``, and none of the delivered fds stays open."""
    a, b = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    r, w = os.pipe()
    before = set(os.listdir("/proc/self/fd"))
    try:
        fdio.send_fds(a, b"\0", [r, w, r])
        with pytest.raises(ValueError, match="more than 1"):
            fdio.recv_with_fds(b, 1, 1)
        assert set(os.listdir("/proc/self/fd")) <= before
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


def test_send_fds_sends_all_data_of_a_long_message() -> None:
    """A message longer than one ``sendmsg`` takes: the rest follows, the fd with the start."""
    a, b = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    a.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, 4096)
    r, w = os.pipe()
    payload = bytes(range(256)) * 1024
    got: list[int] = []
    try:
        sender = threading.Thread(target=fdio.send_fds, args=(a, payload, [r]))
        sender.start()
        data, got = fdio.recv_with_fds(b, 1024, 1)
        rest = fdio.read_exactly(b, len(payload) - len(data))
        sender.join(timeout=30)
        assert not sender.is_alive()
        assert data + rest == payload
        assert len(got) == 1 and _same_file(got[0], r)
    finally:
        for fd in (r, w, *got):
            os.close(fd)
        a.close()
        b.close()
