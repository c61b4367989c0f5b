"""Kernel facts about the processes of a test server, and a raw protocol client.

Shared by the reliability, bad-input, security and soak tests (issue 4).  Everything here
reads ``/proc`` or speaks the wire protocol over a real AF_UNIX socket; nothing is mocked.
"""

from __future__ import annotations

import glob
import os
import re
import select
import socket
import struct
import time
from collections.abc import Sequence

from conftest import scaled

GREETING = struct.Struct("=4sI")  # host byte order, as the server writes it
U32BE = struct.Struct(">I")


# ------------------------------------------------------------------ /proc facts


def proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (``R``, ``S``, ``Z``...), or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie (its parent, maybe init, has yet to reap it)."""
    return proc_state(pid) in (None, "Z")


def ppid_of(pid: int) -> int | None:
    """The parent of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def children(pid: int) -> list[tuple[int, str]]:
    """``(child pid, state)`` of every process whose parent is ``pid``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append((int(name), fields[0].decode()))
    return found


def title(pid: int) -> str:
    """``pid``'s command line (its process title), words joined by spaces; "" if gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


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


def fd_links(pid: int) -> dict[int, str]:
    """``{fd: link target}`` of ``pid``'s open fds."""
    links = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            links[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue
    return links


def fd_count(pid: int) -> int:
    """How many fds ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def holders_of(path: str) -> list[int]:
    """Pids (not us) holding an fd on the file ``path``."""
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            links = fd_links(int(name))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        if path in links.values():
            found.append(int(name))
    return found


def listening_pid(sock_path: str) -> int | None:
    """The process holding the listening socket bound at ``sock_path`` (the server)."""
    inodes = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            # flags 00010000 = __SO_ACCEPTCON: a listening socket
            if len(parts) >= 8 and parts[7] == sock_path and parts[3] == "00010000":
                inodes.add(f"socket:[{parts[6]}]")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if inodes & set(fd_links(int(name)).values()):
                return int(name)
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return None


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
    deadline = time.monotonic() + scaled(timeout)
    data = b""
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"the server did not close the connection (got {data!r})"
        if not select.select([sock], [], [], left)[0]:
            continue
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


# ------------------------------------------------------------------ processes of a test


class Lines:
    """Reads whole lines from a pipe against a deadline (no buffering surprises)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def line(self, timeout: float = 10.0) -> bytes:
        """The next line (without its newline); fails on EOF or after ``timeout`` (scaled)."""
        deadline = time.monotonic() + scaled(timeout)
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            assert left > 0, f"no complete line within {scaled(timeout):.1f} s ({self.buf!r})"
            if select.select([self.fd], [], [], left)[0]:
                chunk = os.read(self.fd, 4096)
                assert chunk, f"EOF before a complete line ({self.buf!r})"
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line


def connected_unix_inodes() -> set[str]:
    """``socket:[INODE]`` of every connected AF_UNIX socket (state SS_CONNECTED)."""
    found = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 7 and parts[5] == "03":
                found.add(f"socket:[{parts[6]}]")
    return found


def has_connected_socket(pid: int) -> bool:
    """Whether ``pid`` holds a connected AF_UNIX socket (a client that reached a server)."""
    try:
        links = set(fd_links(pid).values())
    except FileNotFoundError:
        return False
    return bool(links & connected_unix_inodes())


def cmdline_pids(*needles: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains every one of ``needles``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if all(n in cmd for n in needles) and not gone(int(name)):
            found.append(int(name))
    return found


def watcher_of(sock_path: str) -> int:
    """The pid of the watcher started for ``sock_path``."""
    pids = cmdline_pids("prefork-watcher", sock_path)
    assert len(pids) == 1, f"expected one watcher for {sock_path}, found {pids}"
    return pids[0]


def wchan(pid: int) -> str:
    """Where in the kernel ``pid`` sleeps ("" if it runs or is gone)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def asleep_in_epoll(pid: int) -> bool:
    """The server sleeps in its event loop's epoll_wait: nothing it can act on is pending."""
    return "epoll" in wchan(pid)
