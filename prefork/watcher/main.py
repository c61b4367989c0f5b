"""prefork-watcher: exit when a server's socket goes away, so that the server quits.

The client starts one watcher per server, on the cold path, as
``prefork-watcher --daemon SOCKET`` (PROTOCOL.md, "Roles and processes")::

    client ── spawn ──> watcher (first process)      fd0 = watchi_r   (the sentinel pipe)
                          │ lstat SOCKET, fork,      fd1 = fd2 = watche_w
                          │ _exit(0) at once  <── the client waits for this
                          └── daemon: setsid, chdir /, close fds >= 3,
                              inotify on SOCKET's directory, select() on inotify + fd0

    server holds watchi_w (WATCHI): when the server dies it closes, fd0 reads EOF, we exit.
    server reads watche_r (WATCHE): EOF = "the socket is gone, quit"; data = an error message.

The daemon exits 0, silently, when SOCKET no longer names the socket inode it was started
for (removed, renamed away or replaced by another file), or when the sentinel reads EOF;
data on the sentinel is read and discarded.  Any other failure is one line
``prefork-watcher: ...`` on stderr (the server logs it and quits) and exit status 1.

Without ``--daemon`` (debugging by hand) it stays in the foreground, prints one line per
inotify event and the reason when it exits; stdin is the sentinel only with ``--sentinel``.

Exit statuses: 0 normal (socket gone or sentinel closed), 1 error (message on stderr),
2 usage.

With ``--shared RUNDIR`` it is instead the one watcher of every server of a run directory
(``prefork.watcher.shared``); ``--list RUNDIR`` prints what that watcher holds.

This module imports only built-in modules at load time (``argparse`` when the per-server
command line is parsed; none of it for ``--shared``, which stays resident); pyinotify is
imported after daemonising.
"""

from __future__ import annotations

import _signal
import os
import select
import stat
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from typing import Any, NoReturn

try:
    from prefork import __version__
except ImportError:
    __version__ = "0.1.0"

PROG = "prefork-watcher"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

#: Seconds between re-checks of the socket path when nothing happens: a safety net for
#: changes that inotify on the socket's directory cannot see (an ancestor renamed).
RECHECK_INTERVAL = 60.0
#: How often the socket path is looked at when inotify cannot be used.
POLL_INTERVAL = 0.5

#: Events on the directory holding the socket; those naming the socket (or the directory
#: itself) make us lstat the path again.
_MASK_NAMES = ("IN_DELETE", "IN_MOVED_FROM", "IN_MOVED_TO", "IN_CREATE", "IN_ATTRIB",
               "IN_DELETE_SELF", "IN_MOVE_SELF", "IN_ONLYDIR")

_DESCRIPTION = """\
Watch the listening socket of a prefork-interp server and exit when it is gone.

The client (prefork-interp) starts one watcher per server, as
'prefork-watcher --daemon SOCKET', with these fds:

  fd 0        read end of a pipe whose write end the server holds (the
              sentinel, WATCHI): EOF there means the server is gone.
  fd 1, fd 2  write end of a pipe the server reads (WATCHE): EOF there tells
              the server that its socket is gone and it should quit; a line
              of text is an error message, which the server logs before it
              quits too.

The watcher records the socket's device and inode, daemonises (the first
process exits 0 at once; the daemon calls setsid, changes to /, closes its
other fds) and watches the socket's directory with inotify.  It exits 0 without
a word when SOCKET is removed, renamed away or replaced by another file, or when
the sentinel closes.  Data on the sentinel is read and discarded.
"""

_EPILOG = """\
Without --daemon the watcher stays in the foreground for debugging: it prints
one line per inotify event (time, event names, file name, the inode now at
SOCKET and the one it started with) and, before it exits, why.

The clients of this version start instead one shared watcher per run directory:
  prefork-watcher --shared [--foreground] [--linger SECS] RUNDIR
  prefork-watcher --list RUNDIR      (what the running shared watcher holds)
see 'prefork-watcher --shared --help'.

exit status: 0 = socket gone or sentinel closed, 1 = error (one line on
stderr), 2 = usage.
"""


class WatcherError(Exception):
    """A failure reported as one line ``prefork-watcher: <message>``, exit status 1."""


def _parser() -> argparse.ArgumentParser:
    import argparse

    p = argparse.ArgumentParser(
        prog=PROG, description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--daemon", action="store_true",
                   help="daemonise and watch silently (how the client starts it); "
                        "fd 0 is the sentinel")
    p.add_argument("--sentinel", action="store_true",
                   help="foreground mode: treat stdin as the sentinel too (exit on EOF); "
                        "implied by --daemon")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("socket", metavar="SOCKET",
                   help="path of the server's listening socket (AF_UNIX)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``prefork-watcher``; returns the exit status.

    With ``--daemon`` it does not return: the first process ends in ``os._exit(0)`` once
    the daemon is forked, and the daemon ends in ``os._exit`` too.
    """
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--shared"]:
        from prefork.watcher import shared

        return shared.main(argv[1:])
    if argv[:1] == ["--list"] and len(argv) == 2:
        from prefork.common import watchwire

        try:
            sys.stdout.write(watchwire.list_entries(os.path.abspath(argv[1])))
        except watchwire.WatchError as e:
            _say(str(e))
            return EXIT_ERROR
        return EXIT_OK
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    path: str = args.socket
    try:
        if not os.path.isabs(path):  # we chdir("/") when daemonising
            path = os.path.join(os.getcwd(), path)
        start = _initial(path)
    except WatcherError as e:
        _say(str(e))
        return EXIT_ERROR
    if args.daemon:
        _daemonise_and_watch(path, start)
    return _foreground(path, start, sentinel=args.sentinel)


def _say(message: str) -> None:
    """Write ``prefork-watcher: message`` as one line on fd 2, unbuffered."""
    line = f"{PROG}: " + " ".join(message.split("\n")) + "\n"
    try:
        os.write(2, line.encode("utf-8", "backslashreplace"))
    except OSError:
        pass  # nobody is listening any more: the exit status is all we can give


def _initial(path: str) -> tuple[int, int]:
    """(st_dev, st_ino) of the socket at ``path``, or WatcherError saying what is wrong."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise WatcherError(f"{path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise WatcherError(f"{path}: not a socket")
    return st.st_dev, st.st_ino


def _check(path: str, start: tuple[int, int]) -> str | None:
    """Why the watcher should exit now (the socket is gone), or None while it is there."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "socket path removed"
    except OSError as e:
        raise WatcherError(f"{path}: {e.strerror}") from None
    if (st.st_dev, st.st_ino) != start:
        where = "" if st.st_dev == start[0] else f" on device {st.st_dev}"
        return f"socket replaced by inode {st.st_ino}{where}"
    return None


# ---------------------------------------------------------------------------- daemon mode

def _daemonise_and_watch(path: str, start: tuple[int, int]) -> NoReturn:
    """Fork; the parent exits 0 at once; the child becomes the daemon and never returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() != 0:
        os._exit(EXIT_OK)
    status = EXIT_ERROR
    try:
        os.setsid()
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)  # die quietly, no traceback on WATCHE
        os.chdir("/")
        _close_fds_from(3)
        os.set_blocking(0, False)
        _set_title(path)
        _watch(path, start, sentinel=True, show=None)
        status = EXIT_OK
    except WatcherError as e:
        _say(str(e))
    except BaseException as e:  # noqa: BLE001 - the daemon ends in os._exit whatever happens
        _say(f"{type(e).__name__}: {e}")
    finally:
        os._exit(status)


def _close_fds_from(low: int) -> None:
    """Close every fd >= low (inherited strays must not keep anything of the caller's open)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        os.closerange(low, os.sysconf("SC_OPEN_MAX"))
        return
    for name in names:
        fd = int(name)
        if fd >= low:
            try:
                os.close(fd)
            except OSError:
                pass  # the directory fd listdir used, already closed


def _set_title(path: str) -> None:
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(f"{PROG} {path}")


# ------------------------------------------------------------------------ foreground mode

def _foreground(path: str, start: tuple[int, int], *, sentinel: bool) -> int:
    def show(text: str) -> None:
        sys.stdout.write(f"{_timestamp()} {text}\n")
        sys.stdout.flush()

    _set_title(path)
    try:
        reason = _watch(path, start, sentinel=sentinel, show=show)
    except WatcherError as e:
        _say(str(e))
        return EXIT_ERROR
    except KeyboardInterrupt:
        _say("interrupted")
        return 128 + int(_signal.SIGINT)
    show(f"exit {EXIT_OK}: {reason}")
    return EXIT_OK


def _timestamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1e6):06d}"


# --------------------------------------------------------------------------- the watching

def _import_pyinotify() -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # asyncore's DeprecationWarning must not reach WATCHE
        try:
            import pyinotify  # type: ignore[import-untyped, unused-ignore]
        except ImportError as e:
            hint = " (Python >= 3.12 needs the pyasyncore package)" if e.name == "asyncore" else ""
            raise WatcherError(f"cannot import pyinotify: {e}{hint}") from None
    # pyinotify logs to stderr, which is WATCHE: any text there would stop the server.
    pyinotify.log.disabled = True
    return pyinotify


def _watch_manager(pyinotify: Any) -> Any:
    """A pyinotify WatchManager (one inotify fd), made without running a program.

    pyinotify looks for libc with ``ctypes.util.find_library("c")``, which runs
    ``/sbin/ldconfig -p`` (or gcc, or ld) in a child process that inherits the daemon's
    fds until it execs.  Answering None instead makes ctypes ``dlopen(NULL)``: the running
    program, whose libc has the inotify functions, without a child.
    """
    import ctypes.util

    find_library = ctypes.util.find_library
    ctypes.util.find_library = _no_library
    try:
        return pyinotify.WatchManager()
    except (OSError, pyinotify.PyinotifyError) as e:
        raise WatcherError(f"inotify: {e}") from None
    finally:
        ctypes.util.find_library = find_library


def _no_library(name: str) -> str | None:
    """Stand-in for ``ctypes.util.find_library``: None, so that ctypes opens the program."""
    return None


def _watch(path: str, start: tuple[int, int], *, sentinel: bool,
           show: Callable[[str], None] | None) -> str:
    """Block until ``path`` stops naming the inode ``start`` or the sentinel (fd 0, if
    ``sentinel``) reads EOF; return why.  ``show`` gets one line per event (foreground)."""
    pyinotify = _import_pyinotify()
    dirpath, name = os.path.split(path)
    try:
        wm = _watch_manager(pyinotify)
    except WatcherError as e:  # e.g. out of inotify instances: poll rather than fail
        return _poll(path, start, sentinel=sentinel, show=show, why=str(e))
    try:
        inotify_fd: int = wm.get_fd()
        os.set_inheritable(inotify_fd, False)
        events: list[Any] = []
        notifier = pyinotify.Notifier(wm, default_proc_fun=events.append)
        mask = 0
        for flag in _MASK_NAMES:
            mask |= getattr(pyinotify, flag)
        try:
            wm.add_watch(dirpath, mask, proc_fun=events.append, quiet=False)
        except pyinotify.WatchManagerError as e:  # e.g. out of watches: poll instead
            return _poll(path, start, sentinel=sentinel, show=show,
                         why=f"cannot watch {dirpath}: {e}")
        # The socket may have gone between the first lstat and the watch: look again now.
        reason = _check(path, start)
        if show is not None:  # after that look: whatever happens from here shows as events
            show(f"watching {path} (dev {start[0]}, inode {start[1]}) in {dirpath}"
                 + ("; stdin is the sentinel" if sentinel else ""))
        fds = [inotify_fd, 0] if sentinel else [inotify_fd]
        while reason is None:
            ready, reason = _wake(fds, RECHECK_INTERVAL, show)
            if reason is not None:
                break
            if inotify_fd in ready:
                _read_events(notifier, events, show)
                if show is not None:
                    for event in events:
                        show(_describe_event(event, name, path, start))
                events.clear()
            reason = _check(path, start)  # on every wake-up, whatever woke us
        return reason
    finally:
        wm.close()


def _poll(path: str, start: tuple[int, int], *, sentinel: bool,
          show: Callable[[str], None] | None, why: str) -> str:
    """The fallback when inotify is not available (instance or watch limits reached):
    look at the path every POLL_INTERVAL seconds, and at the sentinel whenever it wakes us.
    A watcher that cannot use inotify must not make its server quit."""
    if show is not None:
        show(f"inotify unavailable ({why}); polling {path} every {POLL_INTERVAL:g}s")
    fds = [0] if sentinel else []
    reason = _check(path, start)
    while reason is None:
        _, reason = _wake(fds, POLL_INTERVAL, show)
        if reason is None:
            reason = _check(path, start)
    return reason


def _wake(fds: list[int], timeout: float, show: Callable[[str], None] | None
          ) -> tuple[list[int], str | None]:
    """Wait for one of ``fds`` (at most ``timeout`` seconds): those ready, and why to stop
    if the sentinel (fd 0) woke us and says so."""
    ready, _, _ = select.select(fds, [], [], timeout)
    return ready, (_read_sentinel(show) if 0 in ready else None)


def _read_events(notifier: Any, events: list[Any], show: Callable[[str], None] | None
                 ) -> None:
    """Read what the inotify fd has; the events land in ``events`` (the proc_fun)."""
    try:
        notifier.read_events()
    except UnicodeDecodeError:  # a name that is not UTF-8 (not ours): we look anyway
        if show is not None:
            show("event with an undecodable file name")
    notifier.process_events()


def _read_sentinel(show: Callable[[str], None] | None) -> str | None:
    """Read fd 0 once: "sentinel closed" at EOF, else discard what came and return None."""
    try:
        data = os.read(0, 4096)
    except BlockingIOError:
        return None
    except OSError as e:
        raise WatcherError(f"read sentinel (stdin): {e.strerror}") from None
    if not data:
        return "sentinel closed"
    if show is not None:
        show(f"sentinel: discarded {len(data)} bytes")
    return None


def _describe_event(event: Any, name: str, path: str, start: tuple[int, int]) -> str:
    try:
        now = str(os.lstat(path).st_ino)
    except OSError:
        now = "missing"
    ev_name: str = event.name or ""
    mark = " (the socket)" if ev_name == name else " (the directory)" if not ev_name else ""
    return (f"{event.maskname} name={ev_name!r}{mark} inode now={now} "
            f"started={start[1]}")
