"""The server's side of the run directory's shared watcher (``pfw1`` in ``PREFORK_INTERP``).

With the shared watcher (``prefork.common.watchwire``) the server keeps no inotify instance
of its own: it names its program's files once, on WATCHI, and the watcher writes
``stale PATH`` on WATCHE when one of them changes (the server then quits as for any
autoreload: running calls finish, the next client starts a fresh server).  So checking
staleness costs a call nothing at all, and a hundred servers share one instance.

When WATCHE reads EOF the v1 meaning is "your socket is gone".  With the shared watcher it
may also mean that the watcher died (killed, out of memory): the server then looks at its
socket itself; if the name still names its inode the server hands itself to a new shared
watcher (started on demand, as a client does) and carries on, so a watcher's death takes
no server with it.  Only a server whose socket really is gone quits.
"""

from __future__ import annotations

import fcntl
import os
import select
import sys
import time

from prefork.common import watchwire

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

#: Seconds the server waits for the watcher to take its file list.
SEND_TIMEOUT = 10.0


def watcher_cmd() -> list[str]:
    """How a server starts a shared watcher: this interpreter, isolated, running the
    ``prefork-watcher`` code from where this package was loaded."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (f"import sys; sys.path.insert(0, {here!r}); "
            "from prefork.watcher.main import main; sys.exit(main())")
    return [sys.executable, "-I", "-S", "-c", code, "--shared"]


class WatchLink:
    """The server's pipes to the shared watcher, and what it needs to check staleness per
    call (``stale()``, like ``Autoreload.stale()``) and to find a new watcher.

    It owns WATCHI/WATCHE (``watch_in_fd``, ``watch_err_fd``; they change when the server
    re-attaches) and the watcher's inotify fd and busy lock (``watchwire.sync_fds``).
    """

    def __init__(self, sock_path: str, birth_ns: int, files: Sequence[str],
                 watch_in_fd: int, watch_err_fd: int) -> None:
        self.run_dir, self.name = os.path.split(sock_path)
        st = os.lstat(sock_path)
        self.dev, self.ino = st.st_dev, st.st_ino
        self.birth_ns = birth_ns
        self.files = list(dict.fromkeys(os.path.abspath(f) for f in files))
        self.record = self._records(self.files)
        self.watch_in_fd = watch_in_fd
        self.watch_err_fd = watch_err_fd
        self.inotify_fd = self.busy_fd = -1
        self.buf = b""
        #: What WATCHE said: a stale file, an error message, EOF.
        self.told: str | None = None
        self.error: str | None = None
        self.eof = False
        self.synced = False

    def start(self) -> None:
        """Send the file list and fetch the sync fds; ``watchwire.WatchError`` if either
        fails (the server then watches its files itself)."""
        if not self.send_files(self.watch_in_fd):
            raise watchwire.WatchError("the shared watcher did not take the file list")
        self.inotify_fd, self.busy_fd = watchwire.sync_fds(self.run_dir)

    def send_files(self, watch_in_fd: int) -> bool:
        """Write the file list on WATCHI (whole, within SEND_TIMEOUT): whether it went."""
        return _write_all(watch_in_fd, self.record)

    def add_files(self, files: Iterable[str]) -> None:
        """Watch these files too (modules the server learned after it started): the shared
        watcher adds a file list record to what it watches; a re-attach sends them all."""
        known = set(self.files)
        new = [p for p in dict.fromkeys(os.path.abspath(f) for f in files) if p not in known]
        if not new:
            return
        self.files += new
        self.record = self._records(self.files)
        if self.watch_in_fd >= 0:
            _write_all(self.watch_in_fd, self._records(new))

    def _records(self, files: Sequence[str]) -> bytes:
        """``files`` as WATCHI records: imported modules' files watched with the directory
        holding each (``F``), the others (the script, the interpreter, extra paths) with
        every directory above them too (``D``: a release symlink swapped anywhere above)."""
        from prefork.server.autoreload import imported_module_files

        modules = imported_module_files()
        shallow = [f for f in files if f in modules]
        deep = [f for f in files if f not in modules]
        return (watchwire.encode_files(self.birth_ns, shallow)
                + (watchwire.encode_files(self.birth_ns, deep, deep=True) if deep else b""))

    def fileno(self) -> int:
        """Never an inotify fd of the server's own (see ``Autoreload.fileno``)."""
        return -1

    def close(self) -> None:
        """Release every fd (quitting)."""
        for fd in (self.watch_in_fd, self.watch_err_fd, self.inotify_fd, self.busy_fd):
            if fd >= 0:
                os.close(fd)
        self.watch_in_fd = self.watch_err_fd = self.inotify_fd = self.busy_fd = -1

    # ------------------------------------------------------------ WATCHE

    def feed(self) -> None:
        """Read what WATCHE has (non-blocking) and note what it says."""
        while self.watch_err_fd >= 0 and not self.eof:
            try:
                data = os.read(self.watch_err_fd, 4096)
            except BlockingIOError:
                return
            if not data:
                self.eof = True
                return
            self.buf += data
            *lines, self.buf = self.buf.split(b"\n")
            for line in lines:
                path = stale_path(line + b"\n")
                if path is not None:
                    self.told = self.told or path
                elif line + b"\n" == watchwire.SYNCED:
                    self.synced = True
                elif line:
                    self.error = line.decode("utf-8", "backslashreplace")

    def stale(self) -> str | None:
        """Per call: the file the watcher found changed since birth, or None.

        Nothing is pending when the watcher's inotify fd has nothing to read and its busy
        lock is free (every event so far dealt with, every server told): two system calls.
        Otherwise ask (``S``) and wait for the answer, so that a change made before this
        call is never missed."""
        if self.told is not None or self.inotify_fd < 0:
            return self.told
        ready = select.select([self.inotify_fd, self.watch_err_fd], [], [], 0)[0]
        pending = self.inotify_fd in ready
        if not pending:
            try:
                fcntl.flock(self.busy_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pending = True
            else:
                fcntl.flock(self.busy_fd, fcntl.LOCK_UN)
        if pending:
            self._sync()
        elif self.watch_err_fd in ready:
            self.feed()
        return self.told

    def _sync(self) -> None:
        self.synced = False
        if not _write_all(self.watch_in_fd, watchwire.SYNC_RECORD):
            return  # the watcher is gone: WATCHE reads EOF, the loop sees to it
        deadline = time.monotonic() + SEND_TIMEOUT
        while not (self.synced or self.eof or self.told):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.watch_err_fd], [], [], left)[0]:
                return
            self.feed()

    # ------------------------------------------------------------ a new watcher

    def socket_is_ours(self) -> bool:
        """Whether the socket's name still names the inode the server listens on."""
        try:
            st = os.lstat(os.path.join(self.run_dir, self.name))
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (self.dev, self.ino)

    def reattach(self) -> None:
        """The watcher died: new pipes from a (new) shared watcher, the file list sent
        again, its sync fds; ``watchwire.WatchError`` (or ``OSError``) if that fails."""
        watch_in_w, watch_err_r = watchwire.attach(self.run_dir, self.name, self.dev,
                                                   self.ino, watcher_cmd())
        self.close()
        os.set_blocking(watch_err_r, False)
        self.watch_in_fd, self.watch_err_fd = watch_in_w, watch_err_r
        self.buf = b""
        self.eof = False
        self.error = None
        self.start()


def _write_all(fd: int, data: bytes) -> bool:
    """Write ``data`` whole within SEND_TIMEOUT (the pipe may be full for a moment)."""
    view = memoryview(data)
    deadline = time.monotonic() + SEND_TIMEOUT
    blocking = os.get_blocking(fd)
    os.set_blocking(fd, False)
    try:
        while view:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [fd], [], left)[1]:
                return False
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                continue
            except OSError:  # BrokenPipeError: the watcher is gone
                return False
        return True
    finally:
        os.set_blocking(fd, blocking)


def stale_path(message: bytes) -> str | None:
    """The file named by a ``stale PATH`` line from the watcher, or None for other text."""
    if not message.startswith(watchwire.STALE_PREFIX):
        return None
    return os.fsdecode(message[len(watchwire.STALE_PREFIX):].split(b"\n", 1)[0])
