"""Staleness: has any file the server was built from changed since the server was born?

The files are the script, every loaded module's file, the interpreter binary, the prefork
package itself (it is among the modules) and any extra path registered.  The server is stale
when one of them

- has an mtime or ctime later than the listening socket's (``SECS.NSECS`` of
  ``PREFORK_INTERP``): changed between the server's birth and its first check; or
- is no longer the file first seen at that path: its ``(dev, ino, size, mtime_ns, ctime_ns)``
  differ.  A deploy that keeps the old mtime (``cp -p``, ``rsync -a``, ``tar x``,
  ``mv new old``, a symlink swapped to another release) still changes the inode or its ctime;
  or
- was missing when first seen and now exists.

A file missing at a check (a deploy half done) does not make the server stale by itself: it
is ``stat``-ed at every later check until it is back, and then it is a different file.

Checking thousands of files with ``stat`` on every call costs milliseconds, so each file gets
an inotify watch (modify, attribute/link-count change, move, delete), and so does the
directory holding it (an entry of its name created, deleted or moved in or out: a rename over
the file; the directory itself moved or deleted: a package directory replaced), and, for the
script, the interpreter and extra paths, every directory above (a ``current`` symlink
swapped).  A check
is then one non-blocking ``read`` of the inotify fd, and only the files that events name are
``stat``-ed.  A watch follows an inode, not a path: files whose watch is gone (the inode
deleted, or the watch limit reached, or no inotify at all) are ``stat``-ed at every check.
"""

from __future__ import annotations

import os
import sys

from prefork.common.inotify import identity, parse_events

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

_IN_MODIFY = 0x2
_IN_ATTRIB = 0x4
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x1000000
_IN_MASK_ADD = 0x20000000
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_FILE_MASK = _IN_MODIFY | _IN_ATTRIB | _IN_MOVE_SELF | _IN_DELETE_SELF | _IN_MASK_ADD
_DIR_MASK = (_IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE | _IN_MOVE_SELF
             | _IN_DELETE_SELF | _IN_ONLYDIR | _IN_MASK_ADD)
_GONE = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED



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


def imported_module_files() -> set[str]:
    """Absolute paths of the files of imported modules, but the script's (``__main__``)."""
    found = set()
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if isinstance(f, str) and name != "__main__":
            found.add(os.path.abspath(f))
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if isinstance(main, str):
        found.discard(os.path.abspath(main))
    return found


def _inotify() -> tuple[int, Callable[[int, bytes, int], int]] | None:
    """An inotify fd and ``inotify_add_watch``, through ``_ctypes`` alone
    (``prefork.common.cfunc``: the ``ctypes`` package costs every idle server memory)."""
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
    """Checks a fixed set of files against the server's birth time (nanoseconds) and against
    what was at their paths when the server started."""

    def __init__(self, birth_ns: int, files: Iterable[str], use_inotify: bool = True) -> None:
        self.birth_ns = birth_ns
        seen: dict[str, None] = {}
        for f in files:
            seen.setdefault(os.path.abspath(f), None)
        self.files = list(seen)
        self.known = {f: identity(f) for f in self.files}
        # Stat-ed at every check: not watched, or missing (when first seen or since).
        self.polled = {f for f, ident in self.known.items() if ident is None}
        self.inotify_fd = -1
        self._add: Callable[[int, bytes, int], int] | None = None
        self._wd_files: dict[int, list[str]] = {}
        self._wd_dirs: dict[int, dict[bytes, list[str]]] = {}
        if use_inotify:
            got = _inotify()
            if got is not None:
                self.inotify_fd, self._add = got
        self._watch(self.files)
        self._dirty = True  # check everything once: a file may have changed before the watch

    # ------------------------------------------------------------ watches

    def _watch(self, files: Iterable[str]) -> None:
        """Watch ``files`` and the directories on their paths; poll those that cannot be.

        Every directory up to ``/`` for the script, the interpreter and extra paths (a
        ``current`` symlink swapped anywhere above them); only the directory holding it for
        an imported module's file (thousands of them, in trees a deploy replaces whole or
        not at all; every event in a watched directory costs a read at the next call).
        """
        add = self._add
        if add is None:
            self.polled.update(files)
            return
        shallow = imported_module_files()
        dirs: dict[str, dict[bytes, list[str]]] = {}
        for f in files:
            child = f
            parent = os.path.dirname(child)
            while True:
                dirs.setdefault(parent, {}).setdefault(
                    os.fsencode(os.path.basename(child)), []).append(f)
                if parent in (child, "/") or f in shallow:
                    break
                child, parent = parent, os.path.dirname(parent)
            wd = add(self.inotify_fd, os.fsencode(f), _FILE_MASK)
            if wd < 0:
                self.polled.add(f)
            else:
                self._wd_files.setdefault(wd, []).append(f)
        for d, names in dirs.items():
            wd = add(self.inotify_fd, os.fsencode(d), _DIR_MASK)
            if wd < 0:
                for fs in names.values():
                    self.polled.update(fs)
                continue
            into = self._wd_dirs.setdefault(wd, {})
            for name, fs in names.items():
                into.setdefault(name, []).extend(fs)

    def add_files(self, files: Iterable[str]) -> None:
        """Check these files too (modules the server learned after it started): what is at
        their paths now is what they are compared with."""
        known = set(self.files)
        new = [p for p in dict.fromkeys(os.path.abspath(f) for f in files) if p not in known]
        if not new:
            return
        self.files = [*self.files, *new]
        for f in new:
            self.known[f] = ident = identity(f)
            if ident is None:
                self.polled.add(f)
        self._watch(new)
        self._dirty = True

    def fileno(self) -> int:
        """The inotify fd (-1 if none); the server closes it in executors."""
        return self.inotify_fd

    def close(self) -> None:
        """Release the inotify fd."""
        if self.inotify_fd >= 0:
            os.close(self.inotify_fd)
            self.inotify_fd = -1

    def _changed(self) -> set[str] | None:
        """Files that events name since the last check (None: every file)."""
        if self.inotify_fd < 0:
            return set()
        changed: set[str] = set()
        while True:
            try:
                data = os.read(self.inotify_fd, 65536)
            except BlockingIOError:
                return changed
            except OSError:
                return None
            if not data:
                return changed
            for wd, mask, name in parse_events(data):
                if mask & _IN_Q_OVERFLOW:
                    return None  # events lost: the rest of the queue is drained next time
                files = self._wd_files.get(wd, ())
                changed.update(files)
                names = self._wd_dirs.get(wd)
                if names is not None:
                    if mask & _GONE:
                        for fs in names.values():
                            changed.update(fs)
                    elif name in names:
                        changed.update(names[name])
                if mask & _IN_IGNORED:  # the watch is gone (its inode deleted): poll instead
                    self.polled.update(files)
                    for fs in (names or {}).values():
                        self.polled.update(fs)
                    self._wd_files.pop(wd, None)
                    self._wd_dirs.pop(wd, None)

    # ------------------------------------------------------------ checks

    def _first_changed(self, files: Iterable[str]) -> str | None:
        birth = self.birth_ns
        for f in files:
            was = self.known.get(f)
            now = identity(f)
            if now is None:
                if was is not None:
                    self.polled.add(f)  # gone for now: a deploy half done
                continue
            if now != was or now[3] > birth or now[4] > birth:
                return f
        return None

    def stale(self) -> str | None:
        """The first file changed since birth, or None."""
        changed = self._changed()
        if changed is None or self._dirty:
            self._dirty = False
            return self._first_changed(self.files)
        if self.polled:
            changed |= self.polled
        return self._first_changed(changed) if changed else None
