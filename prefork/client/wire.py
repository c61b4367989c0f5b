"""The client's side of the wire: connect, read the greeting, send the request, read a v1 status.

Shared by the warm path (``prefork.client.main``) and the cold path (``prefork.client.start``,
which reads the greeting of the server it started); imports neither.  Hot path: only
``_socket``, ``posix`` and the common codec and fd passing.
"""

import _socket
import posix
import select
import sys

from prefork.common import fdio, protocol

#: A connected server: the socket, and the extension tokens its greeting offered.
Connection = tuple[_socket.socket, frozenset[bytes]]

_STD_FDS = (0, 1, 2)

#: Seconds a server has to greet a connection (``PREFORK_INTERP_GREETING_TIMEOUT``
#: overrides): a live server greets at once, even with every slot taken, so one that
#: stays silent this long is taken for dead (say, its listener held by a child the script
#: forked) and a fresh server is started.
GREETING_TIMEOUT = 10.0
GREETING_TIMEOUT_ENV = b"PREFORK_INTERP_GREETING_TIMEOUT"


class ClientError(Exception):
    """prefork-interp itself failed; the text is the whole message."""


class NoGreeting(Exception):
    """A server accepted the connection but did not greet it in time."""


def greeting_timeout() -> float:
    """``GREETING_TIMEOUT``, or the positive number of seconds in the environment."""
    raw = posix.environ.get(GREETING_TIMEOUT_ENV)
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = 0.0
        if 0 < value < 1e9:
            return value
        raise ClientError(f"{GREETING_TIMEOUT_ENV.decode()}={raw.decode(errors='replace')!r} "
                          "is not a positive number of seconds")
    return GREETING_TIMEOUT


class ScriptEnded(Exception):
    """The script ended before it became a server; the client exits as it did (``status``)."""

    def __init__(self, status: int) -> None:
        """Keep the script's wait status."""
        super().__init__(f"the script ended with wait status {status:#x}")
        self.status = status


class Redirected(Exception):
    """The server cannot run the call in the caller's context (x1 ``R`` record): it is to go
    to the server of that context (``code``: its digest)."""

    def __init__(self, code: int) -> None:
        """Keep the context's digest."""
        super().__init__(f"sent to the server of context {code:08x}")
        self.code = code


class NotStarted(Exception):
    """The connection ended before the server named the call's executor (x1 ``P`` record,
    sent before the call is handed to it): none of the script ran, and the call may be sent
    again.  ``signals``: the ``S`` records sent meanwhile, to send again with it."""

    def __init__(self, signals: bytes = b"") -> None:
        """Keep the signal records already sent."""
        super().__init__("the server closed the connection before it took the call")
        self.signals = signals


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


def peer_creds(sock: _socket.socket) -> tuple[int, int]:
    """``(pid, uid)`` of the peer (``SO_PEERCRED``): for a server's socket, the process that
    last called ``listen`` on it (our server does once it is the server)."""
    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    return (int.from_bytes(creds[0:4], sys.byteorder, signed=True),
            int.from_bytes(creds[4:8], sys.byteorder))


def try_connect(sock_path: str, shown: str | None = None) -> Connection | None:
    """Connect to a running server and read its greeting; None if there is none, and
    ``NoGreeting`` if one accepted but said nothing within ``greeting_timeout()``.

    ``shown`` is the path to name in messages (``sock_path`` may go through
    ``/proc/self/fd``).  A listener of another uid is refused before anything is sent.
    """
    shown = sock_path if shown is None else shown
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(sock_path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError as e:
        sock.close()
        raise ClientError(f"connect to {shown}: {e.strerror or e}") from None
    uid = peer_creds(sock)[1]
    if uid != posix.getuid():
        sock.close()
        raise ClientError(f"the server at {shown} runs as uid {uid}, not as us "
                          f"(uid {posix.getuid()}): refused")
    # One poll before the first read (the greeting is usually there already).
    if not select.select([sock], [], [], greeting_timeout())[0]:
        sock.close()
        raise NoGreeting(shown)
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
