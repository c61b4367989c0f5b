"""The script side's public API: ``initialisation_complete()`` and ``autoreload_also_check()``.

Run under ``prefork-interp`` (``PREFORK_INTERP`` set), ``initialisation_complete()`` turns the
process into the per-user server and returns once per call, each time in a fresh executor
process.  Run as a plain script, it returns at once and the script simply goes on.
"""

from __future__ import annotations

import os
import signal
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

_extra_reload_paths: list[str] = []
_server: object = None  # the Server, never freed (see _serve)

#: Exit status of a setup that cannot become a server (as the reference's ``fail_log``).
SETUP_FAILED = 127


class PreforkSetupError(Exception):
    """The server could not be set up from what ``prefork-interp`` handed over."""


def autoreload_also_check(*paths: str | os.PathLike[str]) -> None:
    """Also restart the server when any of ``paths`` changes (e.g. data files read at start)."""
    _extra_reload_paths.extend(os.fspath(p) for p in paths)


def _fail(msg: str) -> None:
    sys.stderr.write(f"prefork: {msg}\n")
    sys.stderr.flush()
    raise SystemExit(SETUP_FAILED)


def _check_fd(fd: int, what: str, want_socket: bool) -> None:
    import stat

    try:
        st = os.fstat(fd)
    except OSError as e:
        raise PreforkSetupError(f"{what} fd {fd} from PREFORK_INTERP is not open: {e.strerror}"
                                ) from None
    if want_socket != stat.S_ISSOCK(st.st_mode):
        kind = "a socket" if want_socket else "a pipe"
        raise PreforkSetupError(f"{what} fd {fd} from PREFORK_INTERP is not {kind}")


def _open_fds() -> set[int]:
    try:
        return {int(n) for n in os.listdir("/proc/self/fd")}
    except OSError:
        return set()


def initialisation_complete(*, max_servers: int = 4, idle_timeout: float | None = 3600.0,
                            autoreload: bool = True, autoreload_extra: Iterable[str] = (),
                            log: str | None = None, fast_exit: bool = True) -> None:
    """Become the server (under prefork-interp); return once per call, in its executor.

    ``max_servers``: calls run at once (negative: no limit); more wait their turn.
    ``idle_timeout``: seconds without calls before the server quits (None or < 0: never).
    ``autoreload``: quit when the script, a loaded module or ``autoreload_extra`` changes.
    ``log``: None (syslog if /dev/log exists, else ``p<IDENT>.log`` in the run directory),
    "syslog", "file", "stderr" or a file path.
    ``fast_exit``: end each call without tearing down the inherited heap (Python 3.12+;
    see ``prefork.server.fastexit``).
    """
    from prefork.common import envspec

    value = os.environ.get(envspec.ENV_NAME)
    if value is None:
        return
    try:
        spec = envspec.parse(value)
    except envspec.EnvSpecError as e:
        _fail(str(e))
        return
    del os.environ[envspec.ENV_NAME]
    try:
        fast = _serve(spec, max_servers, idle_timeout, autoreload, list(autoreload_extra),
                      log, fast_exit)
        from prefork.server import fastexit

        if not fast:
            fastexit.full_teardown_at_exit()
    except PreforkSetupError as e:
        _fail(str(e))


def _serve(spec: object, max_servers: int, idle_timeout: float | None, autoreload: bool,
           extra: list[str], log_target: str | None, fast_exit: bool) -> bool:
    """Become the server; returns in each executor, saying whether its fast exit is armed."""
    import ctypes
    import locale  # noqa: F401 - for executors (see below)
    import socket

    from prefork.common import envspec
    from prefork.server import autoreload as ar
    from prefork.server import fastexit
    from prefork.server.log import ServerLog
    from prefork.server.loop import Server

    # locale (rebuilding stdio) is imported here, once, for the executors: an import in
    # every executor would cost more than all the rest of its set-up.

    assert isinstance(spec, envspec.EnvSpec)
    _check_fd(spec.listen, "LISTEN", True)
    _check_fd(spec.call, "CALL", True)
    _check_fd(spec.watch_in, "WATCHI", False)
    _check_fd(spec.watch_err, "WATCHE", False)
    for fd in spec.fds():
        os.set_inheritable(fd, False)
    os.set_blocking(spec.watch_err, False)
    listen_sock = socket.socket(fileno=spec.listen)
    call_sock = socket.socket(fileno=spec.call)
    listen_sock.setblocking(False)
    sock_path = listen_sock.getsockname()
    if not isinstance(sock_path, str) or not os.path.basename(sock_path).startswith("s"):
        raise PreforkSetupError(f"LISTEN fd {spec.listen} is not bound to a prefork socket")
    run_dir, name = os.path.split(sock_path)
    keep = _open_fds() - set(spec.fds())

    script = sys.argv[0] if sys.argv else "?"
    log = ServerLog(script, log_target, os.path.join(run_dir, f"p{name[1:]}.log"))
    # The dispositions the server changes (SIGPIPE: ignored, whatever the script chose, so
    # that writing to a client already gone is an error, not the server's death), given
    # back to the script in every executor.
    saved = {int(s): signal.getsignal(s) for s in
             (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGPIPE)}
    reload = None
    if autoreload:
        reload = ar.Autoreload(spec.birth_ns, [*ar.module_files(), *_extra_reload_paths, *extra])
    libc: ctypes.CDLL | None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        libc = prctl = None
    if idle_timeout is not None and idle_timeout < 0:
        idle_timeout = None
    sys.stdout.flush()
    sys.stderr.flush()
    # Threads must be counted here: after the fork below only this one exists.
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        names = ", ".join(t.name for t in threading.enumerate()
                          if t is not threading.current_thread())
        log.warning(f"{threading.active_count()} threads alive at fork: only the calling "
                    f"thread exists in the server and its executors (others: {names}; see "
                    "README)")

    # setup [1] -> setup [2] exits 0 (prefork-interp waits for it); server carries on.
    if os.fork():
        os._exit(0)
    try:
        os.setsid()
        _title(f"{script} [server]")
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        server = Server(listen_sock=listen_sock, call_sock=call_sock,
                        watch_in_fd=spec.watch_in, watch_err_fd=spec.watch_err,
                        birth_ns=spec.birth_ns, log=log, max_servers=max_servers,
                        idle_timeout=idle_timeout, autoreload=reload, saved_signals=saved,
                        keep_fds=keep, script=script, prctl=prctl, set_title=_title)
        import gc

        from prefork.server.fastexit import remember_main_globals, remember_open_files

        # The fast exit is armed once, here, for all executors (not in each of them).
        fast = fast_exit and fastexit.install()
        gc.collect()
        remember_open_files()
        remember_main_globals()
        gc.freeze()
        # glibc returns the heap's free pages to the kernel: fewer to copy at every fork.
        trim = getattr(libc, "malloc_trim", None)
        if trim is not None:
            trim(0)
        # Kept referenced for good: in an executor, run() returns and dropping the server
        # would free its objects one by one (every one written to, so copied).
        global _server
        _server = server
        server.run()
    except BaseException as e:  # noqa: BLE001 - the server must end in _exit, whatever happens
        # run() returns only in executors (which never raise out of it): this is the server.
        log.error(f"server failed: {e!r}")
        os._exit(1)
    # Only executors get here.
    _title(" ".join(os.fsdecode(a) for a in [sys.executable, *sys.argv]))
    return fast


_setproctitle: object = None  # setproctitle's C function, once loaded; False: unavailable


def _load_setproctitle() -> object:
    """``setproctitle``'s C extension, loaded without its package: the package's
    ``__init__`` imports ``logging``, which imports ``threading``, whose fork handler every
    executor of a script that does not use threads would then pay for."""
    try:
        import importlib.machinery
        import importlib.util

        spec = importlib.util.find_spec("setproctitle")
        for folder in (spec.submodule_search_locations or []) if spec else []:
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                path = os.path.join(folder, "_setproctitle" + suffix)
                if os.path.exists(path):
                    loader = importlib.machinery.ExtensionFileLoader(
                        "setproctitle._setproctitle", path)
                    ext_spec = importlib.util.spec_from_file_location(
                        "setproctitle._setproctitle", path, loader=loader)
                    assert ext_spec is not None
                    module = importlib.util.module_from_spec(ext_spec)
                    loader.exec_module(module)
                    return module.setproctitle
        import setproctitle  # no C extension found where expected: the package's own way

        return setproctitle.setproctitle
    except (ImportError, OSError, ValueError, AssertionError):
        return False


def _title(title: str) -> None:
    global _setproctitle
    if _setproctitle is None:
        _setproctitle = _load_setproctitle()
    if _setproctitle is False:
        return
    # Arguments may hold bytes that are not UTF-8 (surrogate escapes): setproctitle wants
    # encodable text, and a process title must never fail a call.
    _setproctitle(os.fsencode(title).decode("utf-8", "replace"))  # type: ignore[operator]
