"""The client's cold path: under the lock, start a server (watcher + setup) or kill one.

Mirrors the reference: clean stale entries, lock ``l<IDENT>``, try to connect again, else
bind a fresh socket, spawn the watcher (fds 0/1/2 on its two pipes), make the first call's
socketpair and spawn setup (the interpreter running the script with ``PREFORK_INTERP``), wait
for setup to exit, read the greeting on the socketpair, release the lock.
"""

from __future__ import annotations

import _signal
import _socket
import os
import select
import sys
import time

from prefork.client.main import ClientError, Options, _caller_env, _greeting, try_connect
from prefork.common import envspec, locking, paths

SETUP_TIMEOUT_ENV = "PREFORK_INTERP_SETUP_TIMEOUT"
WATCHER_ENV = "PREFORK_INTERP_WATCHER"
DEFAULT_SETUP_TIMEOUT = 120.0
_SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path) on Linux
#: Every signal back at its default in what we spawn: those Python ignores at start-up,
#: and those our caller ignores (a server must not pass one caller's ignored signals on to
#: every later call: executors take each call's own from its client).
_RESET = tuple(_signal.valid_signals() - {_signal.SIGKILL, _signal.SIGSTOP})


def _setup_timeout() -> float:
    raw = os.environ.get(SETUP_TIMEOUT_ENV)
    if not raw:
        return DEFAULT_SETUP_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise ClientError(f"{SETUP_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise ClientError(f"{SETUP_TIMEOUT_ENV}={raw!r} must be positive")
    return value


def _close_strays(keep: tuple[int, ...]) -> list[tuple[int, int]]:
    """spawn actions closing every inheritable fd >= 3 of the caller's but ``keep``: the
    server must not hold on to the first caller's other fds for the rest of its life."""
    actions = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                if os.get_inheritable(fd):
                    actions.append((os.POSIX_SPAWN_CLOSE, fd))
            except OSError:
                pass
    return actions


def _watcher_cmd(sock_path: str) -> list[str]:
    exe = os.environ.get(WATCHER_ENV)
    if not exe:
        here = os.path.dirname(os.path.abspath(sys.argv[0]))
        cand = os.path.join(here, "prefork-watcher")
        exe = cand if os.access(cand, os.X_OK) else "prefork-watcher"
    return [exe, "--daemon", sock_path]


def connect_or_start(opts: Options, base: str, ident: str, sock_path: str
                     ) -> tuple[_socket.socket, frozenset[bytes]]:
    """Under the lock: connect to a server that appeared meanwhile, or start one.

    With ``--kill``: remove the socket and the lock (the watcher then stops the server) and
    exit 0.
    """
    size = len(os.fsencode(sock_path))
    if size > _SUN_PATH_MAX:  # e.g. a long -g IDENT; say so before touching any file
        raise ClientError(f"socket path {sock_path} is too long for an AF_UNIX address "
                          f"({size} bytes; at most {_SUN_PATH_MAX})")
    paths.preclean(base)
    lock_path = paths.lock_path(base, ident)
    lock_fd = locking.lock_file(lock_path)
    try:
        if opts.kill:
            for p in (sock_path, lock_path):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
            os._exit(0)
        if not opts.force:
            conn = try_connect(sock_path)
            if conn is not None:
                return conn
        return _start(opts, sock_path)
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


def _spawn_watcher(sock_path: str) -> tuple[int, int]:
    """Start the watcher; return (watch_in_w, watch_err_r) for the server."""
    watch_in_r, watch_in_w = os.pipe2(os.O_CLOEXEC)
    watch_err_r, watch_err_w = os.pipe2(os.O_CLOEXEC)
    cmd = _watcher_cmd(sock_path)
    try:
        pid = os.posix_spawnp(cmd[0], cmd, os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, watch_in_r, 0),
            (os.POSIX_SPAWN_DUP2, watch_err_w, 1),
            (os.POSIX_SPAWN_DUP2, watch_err_w, 2),
            *_close_strays(()),
        ], setsigdef=_RESET)
    except OSError as e:
        for fd in (watch_in_r, watch_in_w, watch_err_r, watch_err_w):
            os.close(fd)
        raise ClientError(f"execute watcher {cmd[0]}: {e.strerror}") from None
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
        raise ClientError(f"watcher failed ({_describe(status)}): {msg or 'no message'}")
    return watch_in_w, watch_err_r


def _describe(status: int) -> str:
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"wait status {status:#x}"


def _wait_readable(fd: int, deadline: float) -> bool:
    left = deadline - time.monotonic()
    if left <= 0:
        return False
    return bool(select.select([fd], [], [], left)[0])


def _warn_fallback(sock_path: str) -> None:
    """Say so when the per-user run directory was refused and the home directory is used
    instead (once per server start: warm calls stay silent)."""
    if os.environ.get(paths.RUNDIR_ENV):
        return
    base, reason = paths.run_base_with_reason()
    if reason is not None and sock_path.startswith(base + "/"):
        try:
            os.write(2, f"prefork-interp: warning: {reason}; using {base} instead\n"
                     .encode("utf-8", "backslashreplace"))
        except OSError:
            pass


def _start(opts: Options, sock_path: str) -> tuple[_socket.socket, frozenset[bytes]]:
    timeout = _setup_timeout()
    _warn_fallback(sock_path)
    listen_sock, birth_ns = _bind(sock_path)
    passed: list[int] = []
    call_client = None
    try:
        watch_in_w, watch_err_r = _spawn_watcher(sock_path)
        passed += [watch_in_w, watch_err_r]
        call_client, call_server = _socket.socketpair(
            _socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        listen_fd = listen_sock.fileno()
        call_fd = call_server.detach()
        passed += [call_fd]
        os.set_blocking(listen_fd, False)
        os.set_blocking(watch_err_r, False)
        fds = (listen_fd, call_fd, watch_in_w, watch_err_r)
        for fd in fds:
            os.set_inheritable(fd, True)
        # The caller's environment exactly (not os.environ: the client's own start-up may
        # have changed it, e.g. LC_CTYPE from C-locale coercion), plus PREFORK_INTERP.
        env = dict(e.split(b"=", 1) for e in _caller_env())
        env[envspec.ENV_NAME.encode()] = envspec.build(
            birth_ns // 1_000_000_000, birth_ns % 1_000_000_000, *fds).encode()
        from prefork.client import interp

        interp_path, interp_how = interp.resolve(opts.interp, env)  # see its docstring
        spawn = interp_path if interp_how == interp.BESIDE else opts.interp
        argv = [spawn, *opts.interp_args]
        if opts.script is not None:
            argv.append(opts.script)
        argv += opts.args
        try:
            pid = os.posix_spawnp(spawn, argv, env, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, 2, 1),
                *_close_strays(fds),
            ], setsigdef=_RESET)
        except OSError as e:
            raise ClientError(f"execute {opts.interp}: {e.strerror}") from None
        for fd in passed:
            os.close(fd)
        passed = []
        listen_sock.close()
        deadline = time.monotonic() + timeout
        try:
            status = _wait_setup(pid, deadline, timeout)
        except ClientError:
            _unlink_quietly(sock_path)
            raise
        if status != 0:
            _unlink_quietly(sock_path)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                from prefork.client.main import propagate

                # The script's own traceback is already on the caller's stderr: say what it
                # means, then exit as the script did.
                try:
                    os.write(2, (f"prefork-interp: setup failed: the script ended "
                                 f"({_describe(status)}) before prefork.initialisation_complete() "
                                 f"made it a server\n" + interp.failure_hint(
                                     opts.interp, interp_path, interp_how, env)).encode())
                except OSError:
                    pass
                propagate(status)
            raise ClientError(f"setup failed ({_describe(status)})")
        if not _wait_readable(call_client.fileno(), deadline):
            _unlink_quietly(sock_path)
            raise ClientError(f"setup timed out: no greeting from the server within "
                              f"{timeout:g}s (set {SETUP_TIMEOUT_ENV} to wait longer)")
        offer = _greeting(call_client)
        if offer is None:
            _unlink_quietly(sock_path)
            raise ClientError("setup failed: initial monitor process quit (maybe the script "
                              "didn't call prefork.initialisation_complete()?)")
        result = call_client
        call_client = None
        return result, offer
    except ClientError:
        _unlink_quietly(sock_path)  # e.g. the interpreter or watcher could not be spawned
        raise
    finally:
        for fd in passed:
            os.close(fd)
        if call_client is not None:
            call_client.close()
        listen_sock.close()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _wait_setup(pid: int, deadline: float, timeout: float) -> int:
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
