"""The script side's public API: ``initialisation_complete()`` and ``autoreload_also_check()``.

Run under ``prefork-interp`` (``PREFORK_INTERP`` set), ``initialisation_complete()`` turns the
process into the per-user server and returns once per call, each time in a fresh executor
process.  Run as a plain script, it returns at once and the script simply goes on.
"""

from __future__ import annotations

import _signal
import os
import sys

from prefork.common import consts
from prefork.common.consts import EXIT_FAILED

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket as socket
    from collections.abc import Callable
    from typing import Any, NoReturn

    from prefork.common.envspec import EnvSpec
    from prefork.server.config import ServerConfig
    from prefork.server.log import ServerLog
    from prefork.server.watchlink import WatchLink

_extra_reload_paths: list[str] = []
_server: object = None  # the Server, never freed (see _serve)


class PreforkSetupError(Exception):
    """The server could not be set up from what ``prefork-interp`` handed over."""


def autoreload_also_check(*paths: str | os.PathLike[str]) -> None:
    """Also restart the server when any of ``paths`` changes (e.g. data files read at start)."""
    _extra_reload_paths.extend(os.fspath(p) for p in paths)


def _fail(msg: str) -> NoReturn:
    sys.stderr.write(f"prefork: {msg}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_FAILED)


def initialisation_complete(**options: Any) -> None:
    """Become the server (under prefork-interp); return once per call, in its executor.

    The keywords (``max_servers``, ``idle_timeout``, ``autoreload``, ``autoreload_extra``,
    ``log``, ``fast_exit``, ``spare_idle``) are described, defaulted and checked in one place:
    ``prefork.server.config.ServerConfig.options``.  Run as a plain script, the options
    are checked and it returns at once.
    """
    from prefork.common import envspec
    from prefork.server.config import ConfigError, ServerConfig

    value = os.environ.get(envspec.ENV_NAME)
    if value is None:
        ServerConfig.options(**options)
        return
    try:
        config = ServerConfig.from_contract(value, sys.argv[0] if sys.argv else "?",
                                            _extra_reload_paths, **options)
    except ConfigError as e:
        _fail(str(e))
    del os.environ[envspec.ENV_NAME]
    from prefork.server import percall

    percall.remember_global()
    try:
        fast = _serve(config)
        from prefork.server import fastexit

        if fast:
            fastexit.started()
        else:
            fastexit.full_teardown_at_exit()
            if config.learn:
                import atexit

                from prefork.server import learn

                atexit.register(learn.report)
    except PreforkSetupError as e:
        _fail(str(e))


class Endpoints:
    """The fds of the contract, checked and adopted: the sockets and where they live."""

    __slots__ = ("call_sock", "keep_fds", "listen_sock", "log_path")

    def __init__(self, listen_sock: socket.socket, call_sock: socket.socket,
                 log_path: str, keep_fds: set[int]) -> None:
        self.listen_sock = listen_sock
        self.call_sock = call_sock
        #: The run directory's log file for this server's ident, ``p<IDENT>.log``.
        self.log_path = log_path
        #: The script's own fds (every fd open now but the contract's): executors keep them.
        self.keep_fds = keep_fds


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
    """The fds open now.  The listing's own directory fd is among the names it returns but
    closed by the time it returns: kept, its number would later be some fd of the server's
    (the autoreload inotify fd, with ``log="stderr"``) handed to every executor."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return set()
    found = set()
    for name in names:
        fd = int(name)
        try:
            os.fstat(fd)
        except OSError:
            continue
        found.add(fd)
    return found


def adopt_endpoints(spec: EnvSpec) -> Endpoints:
    """Check the contract's fds (``PreforkSetupError`` says which is wrong), make them
    non-inheritable and wrap the sockets."""
    import _socket as socket

    _check_fd(spec.listen, "LISTEN", True)
    _check_fd(spec.call, "CALL", True)
    _check_fd(spec.watch_in, "WATCHI", False)
    _check_fd(spec.watch_err, "WATCHE", False)
    for fd in spec.fds():
        os.set_inheritable(fd, False)
    os.set_blocking(spec.watch_err, False)
    listen_sock = socket.socket(fileno=spec.listen)
    sock_path = listen_sock.getsockname()
    prefix = consts.SOCKET_PREFIX
    if not isinstance(sock_path, str) or not os.path.basename(sock_path).startswith(prefix):
        listen_sock.detach()  # not adopted: the fd stays as it was
        raise PreforkSetupError(f"LISTEN fd {spec.listen} is not bound to a prefork socket")
    listen_sock.setblocking(False)
    call_sock = socket.socket(fileno=spec.call)
    run_dir, name = os.path.split(sock_path)
    log_path = os.path.join(run_dir, consts.log_name(name[len(prefix):]))
    return Endpoints(listen_sock, call_sock, log_path, _open_fds() - set(spec.fds()))


def _load_prctl() -> Callable[..., int] | None:
    """libc's ``prctl`` (for PDEATHSIG), where there is one; through ``_ctypes`` alone
    (``prefork.common.cfunc``: the ``ctypes`` package would cost every idle server 0.7 MB)."""
    from prefork.common import cfunc

    try:
        return cfunc.function("prctl")
    except AttributeError:
        return None


def _warn_threads(log: ServerLog) -> None:
    """Threads must be counted before the fork: after it only this one exists."""
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        names = ", ".join(t.name for t in threading.enumerate()
                          if t is not threading.current_thread())
        log.warning(f"{threading.active_count()} threads alive at fork: only the calling "
                    f"thread exists in the server and its executors (others: {names}; see "
                    "docs/transparency.md)")


def _daemonise() -> None:
    """setup [1] -> setup [2]: the parent exits 0 (prefork-interp waits for it); only the
    child, the server, returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork():
        os._exit(0)


def _detach(script: str) -> None:
    """In the server: its own session, its title, stdio on /dev/null."""
    os.setsid()
    _title(f"{script} [server]")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _freeze_heap(fast_exit: bool) -> bool:
    """Ready the heap for forking (collected, frozen, trimmed) and arm the fast exit once
    for all executors; says whether it is armed."""
    import gc

    from prefork.common import cfunc
    from prefork.server import fastexit, percall

    fast = fast_exit and fastexit.install()
    gc.collect()
    fastexit.remember_open_files()
    fastexit.remember_main_globals()
    percall.remember()
    gc.freeze()
    # glibc returns the heap's free pages to the kernel: fewer to copy at every fork.
    cfunc.malloc_trim()
    return fast


def _serve(config: ServerConfig) -> bool:
    """Become the server; returns in each executor, saying whether its fast exit is armed."""
    from prefork.server import autoreload as ar
    from prefork.server import context, fastexit, glibcsig, learn, procenv
    from prefork.server.log import ServerLog
    from prefork.server.loop import Server

    # (The executors rebuild stdio with ``_locale``, built in: no ``locale`` and ``re``
    # imported here for them, which would cost every idle server 1.3 MB.)
    spec = config.spec
    ends = adopt_endpoints(spec)
    log = ServerLog(config.script, config.log, ends.log_path)
    # The dispositions the server changes (SIGPIPE: ignored, whatever the script chose, so
    # that writing to a client already gone is an error, not the server's death), given
    # back to the script in every executor.
    saved = {int(s): _signal.getsignal(s) for s in
             (_signal.SIGCHLD, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGINT, _signal.SIGPIPE)}
    files = [*ar.module_files(), *config.reload_paths] if config.autoreload else []
    reload: ar.Autoreload | WatchLink | None = None
    link = None
    self_watch = None
    if spec.shared_watcher:  # our client: the run directory's one self-watching server?
        from prefork.server.selfwatch import SelfWatch

        self_watch = SelfWatch.claim(ends.listen_sock.getsockname(), spec.birth_ns, files)
    if self_watch is not None:  # watching itself already: the shared watcher lets it go
        os.close(spec.watch_in)
        os.close(spec.watch_err)
        reload = self_watch.reload if config.autoreload else None
    elif spec.shared_watcher:  # our client: the run directory's shared watcher
        from prefork.common.watchwire import WatchError
        from prefork.server.watchlink import WatchLink

        link = WatchLink(ends.listen_sock.getsockname(), spec.birth_ns, files,
                         spec.watch_in, spec.watch_err)
        try:
            link.start()
            reload = link if config.autoreload else None
        except (WatchError, OSError) as e:
            log.warning(f"shared watcher: {e}; the program's files are watched here")
    if config.autoreload and reload is None:
        reload = ar.Autoreload(spec.birth_ns, files)
    prctl = _load_prctl()
    glibcsig.reset_internal_signals()
    sys.stdout.flush()
    sys.stderr.flush()
    _warn_threads(log)
    context.remember_start_environ()
    _daemonise()
    try:
        _detach(config.script)
        # listen() again: clients' SO_PEERCRED then name this process (not the client that
        # started it), so that they can check the executors it names (P records).
        ends.listen_sock.listen(128)
        learner = learn.Learner(learn.state_path(ends.log_path), log, learn=config.learn)
        learner.keep_fds = ends.keep_fds
        learner.start(reload)
        if config.learn:
            fastexit.before_exit.append(learn.report)
        server = Server(listen_sock=ends.listen_sock, call_sock=ends.call_sock,
                        watch_in_fd=spec.watch_in, watch_err_fd=spec.watch_err,
                        birth_ns=spec.birth_ns, log=log, max_servers=config.max_servers,
                        idle_timeout=config.idle_timeout, autoreload=reload,
                        saved_signals=saved, keep_fds=ends.keep_fds, script=config.script,
                        prctl=prctl, set_title=_title, learner=learner, watch_link=link,
                        self_watch=self_watch,
                        spare_idle=config.spare_idle, max_wait=config.max_wait)
        fast = _freeze_heap(config.fast_exit)
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
    if _setproctitle:  # it moved the environment out of the original block: show it there
        procenv.show_environ(os.environb)
    return fast


_setproctitle: object = None  # setproctitle's C function, once loaded; False: unavailable


def _load_setproctitle() -> object:
    """``setproctitle``'s C extension, loaded without its package: the package's
    ``__init__`` imports ``logging``, which imports ``threading``, whose fork handler every
    executor of a script that does not use threads would then pay for.  Found on
    ``sys.path`` and loaded with the import system's own (frozen, always loaded) pieces:
    ``importlib.util`` would cost every idle server 0.2 MB."""
    try:
        import _imp

        bootstrap = sys.modules["_frozen_importlib"]
        external = sys.modules["_frozen_importlib_external"]
        name = "setproctitle._setproctitle"
        for entry in sys.path:
            folder = os.path.join(entry or os.curdir, "setproctitle")
            for suffix in _imp.extension_suffixes():
                path = os.path.join(folder, "_setproctitle" + suffix)
                if os.path.exists(path):
                    loader = external.ExtensionFileLoader(name, path)
                    module = bootstrap.module_from_spec(
                        bootstrap.spec_from_loader(name, loader, origin=path))
                    loader.exec_module(module)
                    return module.setproctitle
        import setproctitle  # no C extension found where expected: the package's own way

        return setproctitle.setproctitle
    except (ImportError, OSError, ValueError, KeyError, AttributeError):
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
