"""The run directory's one self-watching server: a lone server needs no watcher process.

A ``pfw1`` server (our client, the shared watcher) first tries to take the run directory's
``pwatcher.self`` lock (flock, not waiting).  The server that gets it watches itself, with
one inotify instance of its own: its program's files (``Autoreload``, the same per-call
check as without a shared watcher) and the run directory (its socket's name removed,
renamed or replaced: it quits, as when a v1 watcher closes WATCHE).  It then closes
WATCHI and WATCHE: the shared watcher forgets it, and retires if it held no other server.
Every other server of the run directory stays with the shared watcher, so a run directory
has at most two inotify instances (this one and the shared watcher's) and, with one
server, one process: the server alone (two Python processes cost more than the
reference's server and its C watcher together; see docs/performance.md).

The lock is released when the server ends (its executors do not inherit the fd); the next
server to start takes it.  No watcher of another process can die under this server: it has
none.
"""

from __future__ import annotations

import fcntl
import os

from prefork.common.consts import WATCHER_SELF_NAME
from prefork.server.autoreload import Autoreload

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_ONLYDIR = 0x1000000
_IN_MASK_ADD = 0x20000000
#: The run directory: entries created, deleted, renamed (any socket's name, ours among them).
_RUNDIR_MASK = (_IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE | _IN_ONLYDIR
                | _IN_MASK_ADD)


class SelfWatch:
    """The self-watching server's lock, inotify instance and checks."""

    def __init__(self, sock_path: str, lock_fd: int, reload: Autoreload) -> None:
        self.sock_path = sock_path
        st = os.lstat(sock_path)
        self.dev, self.ino = st.st_dev, st.st_ino
        self.lock_fd = lock_fd
        self.reload = reload

    @classmethod
    def claim(cls, sock_path: str, birth_ns: int, files: Sequence[str]) -> SelfWatch | None:
        """The run directory's self-watching server, if this server can be it (the lock is
        free, inotify works); None: it stays with the shared watcher."""
        run_dir = os.path.dirname(sock_path)
        try:
            fd = os.open(os.path.join(run_dir, WATCHER_SELF_NAME),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError:
            return None
        reload = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            reload = Autoreload(birth_ns, files)
            add = reload._add
            if add is None or add(reload.inotify_fd, os.fsencode(run_dir), _RUNDIR_MASK) < 0:
                raise OSError("no inotify watch on the run directory")
            return cls(sock_path, fd, reload)
        except OSError:  # BlockingIOError: another server watches itself
            if reload is not None:
                reload.close()
            os.close(fd)
            return None

    def fileno(self) -> int:
        """The inotify fd: readable when a file or the run directory changed."""
        return self.reload.inotify_fd

    def socket_is_ours(self) -> bool:
        """Whether the socket's name still names the inode the server listens on."""
        try:
            st = os.lstat(self.sock_path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (self.dev, self.ino)

    def close(self) -> None:
        """Release the inotify fd and the lock (quitting)."""
        self.reload.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1
