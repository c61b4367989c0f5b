"""Facts about a test server's processes, its run directory, and a raw protocol client.

Shared by the reliability, bad-input, security and soak tests (issue 4).  The facts are built
on the /proc readers of ``procfs``; the client speaks the wire protocol over a real AF_UNIX
socket; nothing is mocked.
"""

from __future__ import annotations

import glob
import os
import re
import socket
import struct
from collections.abc import Sequence

from harness import Deadline, scaled
from procfs import children, cmdline_pids, title, wchan

GREETING = struct.Struct("=4sI")  # host byte order, as the server writes it
U32BE = struct.Struct(">I")


# ------------------------------------------------------------------ a server's processes


def is_spare(pid: int) -> bool:
    """Our server's ready executor, waiting for its call: titled ``SCRIPT [spare]`` (or still
    ``SCRIPT [server]``, just forked).  A zombie has no title: not a spare."""
    return title(pid).endswith((" [spare]", " [server]"))


def executors(server: int) -> list[tuple[int, str]]:
    """``children(server)`` without its spare: the executors of calls (zombies included)."""
    return [(pid, state) for pid, state in children(server) if not is_spare(pid)]


def spares(server: int) -> list[int]:
    """The server's spare(s) (one, except for a moment after it took a call)."""
    return [pid for pid, _ in children(server) if is_spare(pid)]


def watcher_of(sock_path: str) -> int:
    """The pid of the watcher of ``sock_path``: the run directory's shared watcher (our
    client's), else one started for that socket alone."""
    pids = (cmdline_pids("--shared", os.path.dirname(sock_path))
            or cmdline_pids("prefork-watcher", sock_path))
    assert len(pids) == 1, f"expected one watcher for {sock_path}, found {pids}"
    return pids[0]


def asleep_in_epoll(pid: int) -> bool:
    """The server sleeps in its event loop's epoll_wait: nothing it can act on is pending."""
    return "epoll" in wchan(pid)


# ------------------------------------------------------------------ run directory


def only(pattern: str) -> str:
    """The single path matching ``pattern``."""
    found = glob.glob(pattern)
    assert len(found) == 1, f"expected one match for {pattern}, got {found}"
    return found[0]


def socket_file(rundir: str) -> str:
    """The single server socket ``s<IDENT>`` in ``rundir``."""
    found = [n for n in os.listdir(rundir) if re.fullmatch("s[0-9a-f]+", n)]
    assert len(found) == 1, f"expected one socket in {rundir}, got {found}"
    return os.path.join(rundir, found[0])


def log_text(rundir: str) -> str:
    """Everything the servers of ``rundir`` logged to their ``p<IDENT>.log`` files."""
    text = ""
    for path in sorted(glob.glob(os.path.join(rundir, "p*.log"))):
        with open(path, encoding="utf-8", errors="backslashreplace") as f:
            text += f.read()
    return text


# ------------------------------------------------------------------ raw protocol client


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from ``sock``; AssertionError on EOF."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return data


def raw_connect(sock_path: str, greeting: bool = True) -> socket.socket:
    """A connection to the server (with a timeout), its greeting read unless told not to."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(scaled(10.0))
    sock.connect(sock_path)
    if greeting:
        magic, xlen = GREETING.unpack(recv_exactly(sock, GREETING.size))
        assert magic == b"PFI\n"
        recv_exactly(sock, xlen)
    return sock


def send_fds(sock: socket.socket, fds: Sequence[int], data: bytes = b"\0") -> None:
    """One ``sendmsg`` of ``data`` carrying ``fds``."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] \
        if fds else []
    sock.sendmsg([data], anc)


def message(env: Sequence[bytes], argv: Sequence[bytes]) -> bytes:
    """A well-formed request message with its big-endian length."""
    body = b"".join(e + b"\0" for e in [*env, b"", *argv])
    return U32BE.pack(len(body)) + body


def drain_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (fails on timeout)."""
    deadline = Deadline(timeout, "the server to close the connection")
    data = b""
    while True:
        if not deadline.readable(sock.fileno(), f"got {data!r}"):
            continue
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
