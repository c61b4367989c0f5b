"""The client's side of the wire: connect, read the greeting, send the request, read a v1 status.

Shared by the warm path (``prefork.client.main``) and the cold path (``prefork.client.start``,
which reads the greeting of the server it started); imports neither.  Hot path: only
``_socket``, ``posix`` and the common codec and fd passing.
"""

import _socket
import posix

from prefork.common import fdio, protocol

#: A connected server: the socket, and the extension tokens its greeting offered.
Connection = tuple[_socket.socket, frozenset[bytes]]

_STD_FDS = (0, 1, 2)


class ClientError(Exception):
    """prefork-interp itself failed; the text is the whole message."""


class ScriptEnded(Exception):
    """The script ended before it became a server; the client exits as it did (``status``)."""

    def __init__(self, status: int) -> None:
        """Keep the script's wait status."""
        super().__init__(f"the script ended with wait status {status:#x}")
        self.status = status


def read_greeting(sock: _socket.socket) -> frozenset[bytes] | None:
    """Read the greeting; the offered extension tokens, or None if the server went away."""
    try:
        head = fdio.read_exactly(sock, protocol.GREETING_HEAD.size)
        xlen = protocol.decode_greeting_head(head)
        xdata = fdio.read_exactly(sock, xlen) if xlen else b""
    except (EOFError, ConnectionResetError):
        return None
    except protocol.ProtocolError as e:
        raise ClientError(f"server sent a bad greeting: {e}") from None
    return protocol.decode_offer(xdata)


def try_connect(sock_path: str) -> Connection | None:
    """Connect to a running server and read its greeting; None if there is none."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(sock_path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError as e:
        sock.close()
        raise ClientError(f"connect to {sock_path}: {e.strerror or e}") from None
    offer = read_greeting(sock)
    if offer is None:
        sock.close()
        return None
    return sock, offer


def caller_env() -> list[bytes]:
    """The environment exactly as the caller passed it (``/proc/self/environ``: untouched
    by anything the interpreter did at start-up, such as locale coercion)."""
    try:
        fd = posix.open("/proc/self/environ", posix.O_RDONLY | posix.O_CLOEXEC)
    except OSError:
        return [k + b"=" + v for k, v in posix.environ.items()]
    try:
        chunks = []
        while chunk := posix.read(fd, 65536):
            chunks.append(chunk)
    finally:
        posix.close(fd)
    return [e for e in b"".join(chunks).split(b"\0") if b"=" in e]


def send_request(sock: _socket.socket, argv: list[bytes], extended: bool,
                 closed: int, passed: list[int] | None = None) -> None:
    """Send the call: signalling byte, fds 0/1/2 (and the cwd), message (and, under x1, the
    extension block with the umask, the std fds the caller left ``closed``, our pid and
    the numbers of the other fds ``passed``, which follow it)."""
    env = caller_env()
    if extended:
        cwd_fd = posix.open(".", posix.O_PATH | posix.O_DIRECTORY | posix.O_CLOEXEC)
        umask = posix.umask(0o022)
        posix.umask(umask)
        try:
            sock.sendall(b"\x01")
            fdio.send_fds(sock, b"\0", [*_STD_FDS, cwd_fd])
        finally:
            posix.close(cwd_fd)
        sock.sendall(protocol.encode_request_x1_tail(env, argv, umask, closed, posix.getpid(),
                                                     passed or ()))
        if passed:
            fdio.send_fd_chunks(sock, passed, protocol.SCM_MAX_FD)
    else:
        sock.sendall(b"\0")
        for fd in _STD_FDS:
            fdio.send_fds(sock, b"\0", [fd])
        sock.sendall(protocol.encode_request_v1_tail(env, argv))


def read_status_v1(sock: _socket.socket) -> int:
    """Read the final wait status (v1)."""
    try:
        return protocol.decode_status(fdio.read_exactly(sock, 4))
    except (EOFError, ConnectionResetError):
        raise ClientError("monitor process quit unexpectedly (the server went away "
                          "during the call)") from None
