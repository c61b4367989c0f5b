"""Small socket I/O helpers: read exactly N bytes, send and receive fds.

Works on ``_socket.socket`` (the client avoids importing ``socket``) and ``socket.socket``.
The client uses it on every call, so it imports only ``_socket``, ``posix`` and ``sys``.
Received fds are close-on-exec (``MSG_CMSG_CLOEXEC``); a truncated control message is an error
and every fd that did arrive is closed, like ``multiprocessing.reduction.recvfds``.
"""

import _socket
import posix
import sys

TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Sequence

_FD_SIZE = 4  # sizeof(int)
_ORDER = sys.byteorder


def read_exactly(sock: _socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes; ``EOFError`` if the peer closes first."""
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise EOFError(f"connection closed with {n} bytes still expected")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def send_fds(sock: _socket.socket, data: bytes, fds: "Sequence[int]") -> None:
    """Send ``data`` (at least one byte) carrying ``fds`` by SCM_RIGHTS."""
    anc = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
            b"".join(fd.to_bytes(_FD_SIZE, _ORDER) for fd in fds))]
    sent = sock.sendmsg([data], anc)
    if sent != len(data):  # a stream socket may send less; fds went with the first byte
        sock.sendall(data[sent:])


def send_fd_chunks(sock: _socket.socket, fds: "Sequence[int]", per_message: int) -> None:
    """Send ``fds`` on one ``b"\\0"`` each ``per_message`` of them (the kernel takes at most
    ``SCM_MAX_FD`` = 253 in one message)."""
    for i in range(0, len(fds), per_message):
        send_fds(sock, b"\0", fds[i:i + per_message])


def recv_fd_chunks(sock: _socket.socket, count: int, per_message: int) -> list[int]:
    """Receive ``count`` fds sent by ``send_fd_chunks``; on any error the ones received are
    closed and ``ValueError`` (or the socket's error) is raised."""
    got: list[int] = []
    try:
        while len(got) < count:
            data, fds = recv_with_fds(sock, 1, per_message)
            got.extend(fds)
            if data != b"\0" or not fds:
                raise ValueError(f"fd chunk: {data!r} with {len(fds)} fds")
        if len(got) != count:
            raise ValueError(f"{len(got)} fds received, expected {count}")
    except BaseException:
        for fd in got:
            posix.close(fd)
        raise
    return got


def recv_with_fds(sock: _socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """One ``recvmsg``: up to ``bufsize`` bytes and up to ``maxfds`` fds (non-inheritable).

    Raises ``OSError``-derived errors of the socket as is, and ``ValueError`` when the peer
    sent more fds than ``maxfds`` (the control message was truncated; all fds closed).
    """
    data, anc, flags, _ = sock.recvmsg(bufsize, _socket.CMSG_SPACE(maxfds * _FD_SIZE),
                                       _socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, typ, payload in anc:
        if level == _socket.SOL_SOCKET and typ == _socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(int.from_bytes(payload[i:i + _FD_SIZE], _ORDER)
                       for i in range(0, usable, _FD_SIZE))
    if flags & _socket.MSG_CTRUNC:
        for fd in fds:
            posix.close(fd)
        # Either more than we asked for, or the kernel could not install them all: this
        # process is at its fd limit (it drops the rest of the message's fds).
        raise ValueError(f"fds of the message cut short: more than {maxfds} in it, or this "
                         "process at its fd limit (ulimit -n)")
    return data, fds


def inheritable_fds() -> list[int]:
    """This process's inheritable fds above 2, in order ([] without ``/proc``): what it
    inherited from its caller, before it opened anything of its own (the interpreter's own
    fds, and the listing's, are close-on-exec)."""
    try:
        names = posix.listdir("/proc/self/fd")
    except OSError:
        return []
    fds = []
    for name in names:
        fd = int(name)
        if fd > 2:
            try:
                if posix.get_inheritable(fd):
                    fds.append(fd)
            except OSError:
                pass  # the listing's own fd, gone by now
    fds.sort()
    return fds


def cloexec_strays(keep: "Sequence[int]" = ()) -> None:
    """Make every inheritable fd >= 3 but ``keep`` close-on-exec in this process, before it
    spawns a process that lives on (a server, a watcher): that process must not hold one
    caller's other files for the rest of its life.  Not spawn close actions: glibc refuses
    one for an fd at or above the soft ``RLIMIT_NOFILE``, and a caller may hold such an fd
    (``exec 200>x; ulimit -n 64``)."""
    for fd in inheritable_fds():
        if fd not in keep:
            try:
                posix.set_inheritable(fd, False)
            except OSError:
                pass
