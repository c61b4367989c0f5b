"""The client's cold path: under the lock, start a server (watcher + setup) or kill one.

Mirrors the reference: clean stale entries, lock ``l<IDENT>``, try to connect again, else
bind a fresh socket, spawn the watcher (fds 0/1/2 on its two pipes), make the first call's
socketpair and spawn setup (the interpreter running the script with ``PREFORK_INTERP``), wait
for setup to exit, read the greeting on the socketpair, release the lock.  A start that fails
leaves nothing behind: one ``ExitStack`` unlinks the socket and closes our fds unless the
server greeted us.
"""

from __future__ import annotations

import _signal
import _socket
import os
import select
import sys
import time
from contextlib import ExitStack, contextmanager

from prefork.client.wire import (
    ClientError,
    Connection,
    NoGreeting,
    ScriptEnded,
    caller_env,
    read_greeting,
    try_connect,
)
from prefork.common import envspec, fdio, locking, paths, protocol
from prefork.common.consts import SUN_PATH_MAX
from prefork.common.ident import RUNDIR_ENV, lock_path, socket_path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

SETUP_TIMEOUT_ENV = "PREFORK_INTERP_SETUP_TIMEOUT"
WATCHER_ENV = "PREFORK_INTERP_WATCHER"
DEFAULT_SETUP_TIMEOUT = 120.0
#: Every signal back at its default in what we spawn: those Python ignores at start-up,
#: and those our caller ignores (a server must not pass one caller's ignored signals on to
#: every later call: executors take each call's own from its client).
_RESET = tuple(_signal.valid_signals() - {_signal.SIGKILL, _signal.SIGSTOP})


#: A setup timeout longer than this (about 30 years; ``inf`` too) is no limit at all.
_NO_LIMIT = 1e9


def _setup_timeout() -> float | None:
    """Seconds to wait for setup and the greeting; ``None``: no limit."""
    raw = os.environ.get(SETUP_TIMEOUT_ENV)
    if not raw:
        return DEFAULT_SETUP_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise ClientError(f"{SETUP_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:  # also NaN
        raise ClientError(f"{SETUP_TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return None if value > _NO_LIMIT else value


def _watcher_cmd(sock_path: str) -> list[str]:
    exe = os.environ.get(WATCHER_ENV)
    if not exe:
        here = os.path.dirname(os.path.abspath(sys.argv[0]))
        cand = os.path.join(here, "prefork-watcher")
        exe = cand if os.access(cand, os.X_OK) else "prefork-watcher"
    return [exe, "--daemon", sock_path]


def kill_server(base: str, ident: str) -> None:
    """``--kill``: under the lock, remove the socket and the lock file (the watcher then stops
    the server, which finishes the calls it has)."""
    with _locked_entry(base, ident) as sock_path:
        for path in (sock_path, lock_path(base, ident)):
            _unlink_quietly(path)


def connect_or_start(base: str, ident: str, setup_argv: list[str], *, force: bool
                     ) -> Connection:
    """Under the lock: connect to a server that appeared meanwhile (unless ``force``), or
    start one running ``setup_argv``.

    Raises ``ScriptEnded`` when the script ended before it became a server (its own message
    is on the caller's stderr already; ours says what it means).
    """
    timeout = _setup_timeout()  # refused before anything is touched
    with _locked_entry(base, ident) as sock_path:
        if not force:
            try:
                conn = try_connect(sock_path)
            except NoGreeting:  # a dead server's listener: replaced, as for -f
                conn = None
            if conn is not None:
                return conn
        return _start(setup_argv, sock_path, timeout)


@contextmanager
def _locked_entry(base: str, ident: str) -> Iterator[str]:
    """Check that the socket path fits, clean stale entries, and hold the entry's lock;
    yields the socket path."""
    sock_path = socket_path(base, ident)
    size = len(os.fsencode(sock_path))
    if size > SUN_PATH_MAX:  # e.g. a long -g IDENT; say so before touching any file
        raise ClientError(f"socket path {sock_path} is too long for an AF_UNIX address "
                          f"({size} bytes; at most {SUN_PATH_MAX})")
    paths.preclean(base)
    lock_fd = locking.lock_file(lock_path(base, ident))
    try:
        yield sock_path
    finally:
        os.close(lock_fd)


def _bind(sock_path: str) -> tuple[_socket.socket, int]:
    try:
        os.unlink(sock_path)
    except FileNotFoundError:
        pass
    listen_sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # the socket file: 0600, like the lock (x means nothing on it)
    try:
        listen_sock.bind(sock_path)
    except OSError as e:
        listen_sock.close()
        raise ClientError(f"bind {sock_path}: {e.strerror or e}") from None
    finally:
        os.umask(old)
    birth_ns = os.stat(sock_path).st_mtime_ns
    listen_sock.listen(128)
    return listen_sock, birth_ns


def _attach_watcher(sock_path: str) -> tuple[int, int, bool]:
    """Hand the new server to the run directory's shared watcher (started if none runs):
    (watch_in_w, watch_err_r, True).  If that fails, start a watcher of its own, as v1
    does: (watch_in_w, watch_err_r, False)."""
    from prefork.common import watchwire

    run_dir, name = os.path.split(sock_path)
    st = os.lstat(sock_path)
    exe = _watcher_cmd(sock_path)[0]
    try:
        w_in, w_err = watchwire.attach(run_dir, name, st.st_dev, st.st_ino, [exe, "--shared"])
    except (watchwire.WatchError, OSError):
        return (*_spawn_watcher(sock_path), False)
    return w_in, w_err, True


def _spawn_watcher(sock_path: str) -> tuple[int, int]:
    """Start the watcher; return (watch_in_w, watch_err_r) for the server."""
    watch_in_r, watch_in_w = os.pipe2(os.O_CLOEXEC)
    watch_err_r, watch_err_w = os.pipe2(os.O_CLOEXEC)
    cmd = _watcher_cmd(sock_path)
    fdio.cloexec_strays()
    try:
        # (no entry without a name, ``=x``: execve allows it, posix_spawn does not)
        pid = os.posix_spawnp(cmd[0], cmd, {k: v for k, v in os.environb.items() if k},
                              file_actions=[
            (os.POSIX_SPAWN_DUP2, watch_in_r, 0),
            (os.POSIX_SPAWN_DUP2, watch_err_w, 1),
            (os.POSIX_SPAWN_DUP2, watch_err_w, 2),
        ], setsigdef=_RESET)
    except (OSError, ValueError) as e:
        for fd in (watch_in_r, watch_in_w, watch_err_r, watch_err_w):
            os.close(fd)
        why = e.strerror if isinstance(e, OSError) else str(e)
        raise ClientError(f"execute watcher {cmd[0]}: {why}") from None
    os.close(watch_in_r)
    os.close(watch_err_w)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        os.set_blocking(watch_err_r, False)
        try:
            msg = os.read(watch_err_r, 4096).decode("utf-8", "replace").strip()
        except BlockingIOError:
            msg = ""
        os.close(watch_in_w)
        os.close(watch_err_r)
        why = protocol.describe_status(status)
        raise ClientError(f"watcher failed ({why}): {msg or 'no message'}")
    return watch_in_w, watch_err_r


def _wait_readable(fd: int, deadline: float | None) -> bool:
    if deadline is None:
        return bool(select.select([fd], [], [])[0])
    left = deadline - time.monotonic()
    if left <= 0:
        return False
    return bool(select.select([fd], [], [], left)[0])


def _warn_fallback(sock_path: str) -> None:
    """Say so when the per-user run directory was refused and the home directory is used
    instead (once per server start: warm calls stay silent)."""
    if os.environ.get(RUNDIR_ENV):
        return
    base, reason = paths.run_base_with_reason()
    if reason is not None and sock_path.startswith(base + "/"):
        try:
            os.write(2, f"prefork-interp: warning: {reason}; using {base} instead\n"
                     .encode("utf-8", "backslashreplace"))
        except OSError:
            pass


def _start(setup_argv: list[str], sock_path: str, timeout: float | None) -> Connection:
    """Bind the socket, spawn the watcher and setup, wait for setup and the greeting (for
    ``timeout`` seconds; ``None``: no limit)."""
    _warn_fallback(sock_path)
    with ExitStack() as undo:  # a start that fails leaves nothing behind
        listen_sock, birth_ns = _bind(sock_path)
        undo.callback(_unlink_quietly, sock_path)
        call_client, call_server = _socket.socketpair(
            _socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        undo.callback(call_client.close)
        with ExitStack() as server_ends:  # the server's copies: ours go once it is spawned
            server_ends.callback(listen_sock.close)
            server_ends.callback(call_server.close)
            watch_in_w, watch_err_r, shared = _attach_watcher(sock_path)
            server_ends.callback(os.close, watch_in_w)
            server_ends.callback(os.close, watch_err_r)
            pid = _spawn_setup(setup_argv, birth_ns, (
                listen_sock.fileno(), call_server.fileno(), watch_in_w, watch_err_r), shared)
        deadline = None if timeout is None else time.monotonic() + timeout
        status = _wait_setup(pid, deadline, timeout)
        if status != 0:
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                # The script's own traceback is already on the caller's stderr: say what it
                # means; the client then exits as the script did.
                try:
                    why = protocol.describe_status(status)
                    os.write(2, (f"prefork-interp: setup failed: the script ended ({why}) "
                                 f"before prefork.initialisation_complete() made it a server\n"
                                 + _interp_hint(setup_argv[0])).encode())
                except OSError:
                    pass
                raise ScriptEnded(status)
            raise ClientError(f"setup failed ({protocol.describe_status(status)})")
        if not _wait_readable(call_client.fileno(), deadline):
            raise ClientError(f"setup timed out: no greeting from the server within "
                              f"{timeout:g}s (set {SETUP_TIMEOUT_ENV} to wait longer)")
        offer = read_greeting(call_client)
        if offer is None:
            raise ClientError("setup failed: initial monitor process quit (maybe the script "
                              "didn't call prefork.initialisation_complete()?)")
        undo.pop_all()  # started: the socket is the server's, the connection the caller's
        return call_client, offer


def _interp_hint(name: str) -> str:
    """What to add when setup ended early: which interpreter ran, and how to name one that
    can import prefork (``prefork.client.interp``)."""
    from prefork.client import interp

    env = dict(e.split(b"=", 1) for e in caller_env())
    path, how = interp.resolve(name, env)
    return interp.failure_hint(name, path, how, env)


def _spawn_setup(argv: list[str], birth_ns: int, fds: tuple[int, int, int, int],
                 shared_watcher: bool = False) -> int:
    """Spawn setup: ``argv`` with ``PREFORK_INTERP`` naming ``fds`` (LISTEN, CALL, WATCHI,
    WATCHE), made inheritable here (and ``pfw1`` if WATCHI/WATCHE lead to the shared
    watcher); stdin /dev/null, stdout on our stderr."""
    listen_fd, _, _, watch_err_r = fds
    os.set_blocking(listen_fd, False)
    os.set_blocking(watch_err_r, False)
    for fd in fds:
        os.set_inheritable(fd, True)
    # The caller's environment exactly (not os.environ: the client's own start-up may
    # have changed it, e.g. LC_CTYPE from C-locale coercion), plus PREFORK_INTERP.
    # An entry without a name (``=x``: execve allows it) cannot be passed by posix_spawn;
    # the calls get the caller's environment from their requests, so setup can do without.
    env = dict(e.split(b"=", 1) for e in caller_env() if not e.startswith(b"="))
    env[envspec.ENV_NAME.encode()] = envspec.build(
        birth_ns // 1_000_000_000, birth_ns % 1_000_000_000, *fds,
        shared_watcher=shared_watcher).encode()
    fdio.cloexec_strays(fds)
    try:
        return os.posix_spawnp(argv[0], argv, env, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, 2, 1),
        ], setsigdef=_RESET)
    except OSError as e:
        raise ClientError(f"execute {argv[0]}: {e.strerror}") from None
    except ValueError as e:  # an argument or environment entry spawn cannot pass
        raise ClientError(f"execute {argv[0]}: {e}") from None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _wait_setup(pid: int, deadline: float | None, timeout: float | None) -> int:
    """Wait for setup's first process to exit (it forks the server and exits 0)."""
    pidfd = os.pidfd_open(pid)
    try:
        if not _wait_readable(pidfd, deadline):
            try:
                os.kill(pid, _signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            raise ClientError(f"setup timed out: the script did not reach "
                              f"prefork.initialisation_complete() within {timeout:g}s "
                              f"(set {SETUP_TIMEOUT_ENV} to wait longer)")
    finally:
        os.close(pidfd)
    return os.waitpid(pid, 0)[1]
