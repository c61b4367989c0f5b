"""Staleness: has any file the server was built from changed since the server was born?

The files are the script, every loaded module's file, the interpreter binary, the prefork
package itself (it is among the modules) and any extra path registered.  A file whose mtime
is later than the listening socket's (``SECS.NSECS`` of ``PREFORK_INTERP``) makes the server
stale; it then quits and the waiting client starts a fresh one.

Checking thousands of files with ``stat`` on every call costs milliseconds, so each file gets
an inotify watch (modify, attribute/link-count change, move, delete): a check is then one
non-blocking ``read`` of the inotify fd, and only when something happened are the files
``stat``-ed to confirm (an event alone, e.g. a ``chmod``, does not make the server stale).
Files that cannot be watched (no inotify, watch limit reached) are ``stat``-ed every time.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

_IN_MODIFY = 0x2
_IN_ATTRIB = 0x4
_IN_MOVE_SELF = 0x800
_IN_DELETE_SELF = 0x400
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_MASK = _IN_MODIFY | _IN_ATTRIB | _IN_MOVE_SELF | _IN_DELETE_SELF


def module_files() -> list[str]:
    """Files of every loaded module (sources and extension modules), the script, the interpreter."""
    files: list[str] = []
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if isinstance(f, str):
            files.append(f)
    main = sys.modules.get("__main__")
    mf = getattr(main, "__file__", None)
    if isinstance(mf, str):
        files.append(mf)
    elif sys.argv and sys.argv[0]:
        files.append(sys.argv[0])
    if sys.executable:
        files.append(sys.executable)
    return files


def _inotify() -> tuple[int, Callable[[int, bytes, int], int]] | None:
    from prefork.common import cfunc

    try:
        fd = cfunc.function("inotify_init1")(_IN_NONBLOCK | _IN_CLOEXEC)
        add = cfunc.function("inotify_add_watch")
    except (OSError, AttributeError):
        return None
    if fd < 0:
        return None
    return fd, add


class Autoreload:
    """Checks a fixed set of files against the server's birth time (nanoseconds)."""

    def __init__(self, birth_ns: int, files: Iterable[str], use_inotify: bool = True) -> None:
        self.birth_ns = birth_ns
        seen: dict[str, None] = {}
        for f in files:
            seen.setdefault(os.path.abspath(f), None)
        self.files = list(seen)
        self.unwatched = self.files
        self.inotify_fd = -1
        self._add: Callable[[int, bytes, int], int] | None = None
        if use_inotify:
            self._watch()
        self._dirty = True  # check everything once: a file may have changed before the watch

    def _watch(self) -> None:
        got = _inotify()
        if got is None:
            return
        self.inotify_fd, add = got
        self._add = add
        unwatched = []
        for f in self.files:
            if add(self.inotify_fd, os.fsencode(f), _MASK) < 0:
                unwatched.append(f)
        self.unwatched = unwatched

    def add_files(self, files: Iterable[str]) -> None:
        """Check these files too (modules the server learned after it started)."""
        known = set(self.files)
        new = [p for p in dict.fromkeys(os.path.abspath(f) for f in files) if p not in known]
        self.files = [*self.files, *new]
        for f in new:
            if self._add is None or self.inotify_fd < 0 \
                    or self._add(self.inotify_fd, os.fsencode(f), _MASK) < 0:
                self.unwatched = [*self.unwatched, f]
        self._dirty = True

    def fileno(self) -> int:
        """The inotify fd (-1 if none); the server closes it in executors."""
        return self.inotify_fd

    def close(self) -> None:
        """Release the inotify fd."""
        if self.inotify_fd >= 0:
            os.close(self.inotify_fd)
            self.inotify_fd = -1

    def _events(self) -> bool:
        if self.inotify_fd < 0:
            return True
        got = False
        while True:
            try:
                data = os.read(self.inotify_fd, 65536)
            except BlockingIOError:
                return got
            except OSError:
                return True
            if not data:
                return got
            got = True

    @staticmethod
    def _first_newer(files: list[str], birth: int) -> str | None:
        for f in files:
            try:
                st = os.stat(f)
            except OSError:
                continue
            if st.st_mtime_ns > birth:
                return f
        return None

    def stale(self) -> str | None:
        """The first file changed since birth, or None."""
        if self._events() or self._dirty:
            self._dirty = False
            return self._first_newer(self.files, self.birth_ns)
        return self._first_newer(self.unwatched, self.birth_ns)
