"""inotify(7) without the ``ctypes`` package: one instance, watches added and removed,
events decoded; and what identifies a file's content at a path.  Used by the shared watcher
(resident for as long as any server of its run directory lives, so its size matters: see
``prefork.common.cfunc``) and by a server's own autoreload.
"""

from __future__ import annotations

import _struct
import os

from prefork.common import cfunc

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

#: A program file changed: written, chmod/touch/link count, moved away, deleted.
FILE_MASK = IN_MODIFY | IN_ATTRIB | IN_MOVE_SELF | IN_DELETE_SELF
#: A directory entry came, went, or changed; the directory itself moved or went.
DIR_MASK = (IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_ATTRIB
            | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)

#: struct inotify_event: wd, mask, cookie, len (then ``len`` bytes of NUL-padded name).
EVENT = _struct.Struct("=iIII")


#: What identifies a file's content at a path, short of reading it:
#: (dev, ino, size, mtime_ns, ctime_ns).  A deploy that keeps the old mtime (``cp -p``,
#: ``rsync -a``, ``tar x``, ``mv new old``) still changes the inode or the ctime.
Identity = tuple[int, int, int, int, int]


def identity(path: str) -> Identity | None:
    """The ``Identity`` of what is at ``path`` now (None: nothing there, or unreadable)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def parse_events(data: bytes) -> list[tuple[int, int, bytes]]:
    """``(wd, mask, name)`` of each ``struct inotify_event`` in ``data``."""
    out = []
    pos = 0
    while pos + EVENT.size <= len(data):
        wd, mask, _cookie, size = EVENT.unpack_from(data, pos)
        pos += EVENT.size
        out.append((wd, mask, data[pos:pos + size].rstrip(b"\0")))
        pos += size
    return out


class Inotify:
    """One inotify instance (non-blocking, close-on-exec)."""

    def __init__(self) -> None:
        """Open the instance; ``OSError`` (e.g. EMFILE: the per-user limit) if it cannot."""
        self._add = cfunc.function("inotify_add_watch")
        self._rm = cfunc.function("inotify_rm_watch")
        fd = cfunc.function("inotify_init1")(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = cfunc.errno()
            raise OSError(err, os.strerror(err))
        self.fd: int = fd

    def add(self, path: str, mask: int) -> int:
        """Watch ``path``; the watch descriptor (the same one again for an inode already
        watched).  ``OSError`` if it cannot (ENOSPC: the per-user watch limit; ENOENT)."""
        wd: int = self._add(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = cfunc.errno()
            raise OSError(err, os.strerror(err), path)
        return wd

    def remove(self, wd: int) -> None:
        """Stop watching ``wd`` (already gone, e.g. its file was deleted: nothing to do)."""
        self._rm(self.fd, wd)

    def read(self) -> list[tuple[int, int, bytes]]:
        """The pending events as (wd, mask, name); empty when there are none."""
        out: list[tuple[int, int, bytes]] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            if not data:
                return out
            out += parse_events(data)

    def close(self) -> None:
        """Close the instance (every watch goes with it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
