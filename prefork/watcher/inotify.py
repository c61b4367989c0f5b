"""inotify(7) through ``_ctypes`` alone: one instance, watches added and removed, events decoded.

The shared watcher stays resident for as long as any server of its run directory lives, so
its size matters: the ``ctypes`` package builds dozens of classes at import (0.7 MB of
heap); its C core ``_ctypes`` with the one argument/result type we need costs 0.1 MB.
Arguments are passed as Python ``int`` and ``bytes`` (converted to C ``int`` and ``char *``
by ``_ctypes`` itself); every function returns a C ``int``.
"""

from __future__ import annotations

import _ctypes
import _struct
import os

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


class _CInt(_ctypes._SimpleCData):  # type: ignore[misc, name-defined, type-arg, unused-ignore]
    _type_ = "i"


class _CFunc(_ctypes.CFuncPtr):  # type: ignore[misc, name-defined, unused-ignore]
    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = _CInt


class _Program:
    """What ``CFuncPtr((name, library))`` wants of a library: its ``dlopen`` handle."""

    def __init__(self) -> None:
        self._handle = _ctypes.dlopen(None, os.RTLD_NOW)  # type: ignore[arg-type, unused-ignore]  # the running program, libc in it


_libc: _Program | None = None


def _func(name: str) -> _CFunc:
    global _libc
    if _libc is None:
        _libc = _Program()
    return _CFunc((name, _libc))  # type: ignore[arg-type, unused-ignore]


def malloc_trim() -> None:
    """Give the heap's free pages back to the kernel (glibc; nothing elsewhere)."""
    try:
        _func("malloc_trim")(0)
    except AttributeError:  # not glibc
        pass


class Inotify:
    """One inotify instance (non-blocking, close-on-exec)."""

    def __init__(self) -> None:
        """Open the instance; ``OSError`` (e.g. EMFILE: the per-user limit) if it cannot."""
        self._add = _func("inotify_add_watch")
        self._rm = _func("inotify_rm_watch")
        fd = _func("inotify_init1")(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = _ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd: int = fd

    def add(self, path: str, mask: int) -> int:
        """Watch ``path``; the watch descriptor (the same one again for an inode already
        watched).  ``OSError`` if it cannot (ENOSPC: the per-user watch limit; ENOENT)."""
        wd: int = self._add(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = _ctypes.get_errno()
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
            pos = 0
            while pos + EVENT.size <= len(data):
                wd, mask, _cookie, size = EVENT.unpack_from(data, pos)
                pos += EVENT.size
                out.append((wd, mask, data[pos:pos + size].rstrip(b"\0")))
                pos += size

    def close(self) -> None:
        """Close the instance (every watch goes with it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
