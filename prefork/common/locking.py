"""Exclusive ``flock`` on a server's lock file in the run directory.

The lock serialises starting a server for one ident, and the cleanup of stale entries, between
our client and the reference C client. Whoever deletes an entry deletes its lock file while
holding the lock, so a waiter may end up holding a lock on an inode that no longer has the name:
after locking we check that the path still names the locked inode, and start again if not
(the reference's ``flock_file`` does the same).

The returned fd belongs to the caller; closing it releases the lock. It is close-on-exec.
Imported by the client on every call: ``os`` and ``fcntl`` only.
"""

from __future__ import annotations

import fcntl
import os

_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
_LOCK_MODE = 0o600


def lock_file(path: str) -> int:
    """Lock ``path`` exclusively, creating it if missing; block until the lock is ours."""
    fd = _lock(path, blocking=True)
    if fd is None:  # unreachable: a blocking flock does not report contention
        raise AssertionError(f"blocking lock of {path} returned no fd")
    return fd


def try_lock_file(path: str) -> int | None:
    """Like ``lock_file`` but without waiting: ``None`` if someone else holds the lock."""
    return _lock(path, blocking=False)


def lock_existing_file(path: str) -> int | None:
    """Like ``lock_file`` but never creating ``path``: ``None`` once it does not exist (a
    cleanup must not bring back a lock file that another one deleted while it waited)."""
    try:
        return _lock(path, blocking=True, create=False)
    except FileNotFoundError:
        return None


def _lock(path: str, *, blocking: bool, create: bool = True) -> int | None:
    """Open, flock and re-check ``path`` until the locked inode is the one at the path."""
    operation = fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB
    flags = _OPEN_FLAGS if create else _OPEN_FLAGS & ~os.O_CREAT
    while True:
        fd = os.open(path, flags, _LOCK_MODE)
        keep = False
        try:
            try:
                fcntl.flock(fd, operation)
            except BlockingIOError:
                return None
            if _names_inode(path, os.fstat(fd)):
                keep = True
                return fd
        finally:
            if not keep:
                os.close(fd)


def _names_inode(path: str, locked: os.stat_result) -> bool:
    """Whether ``path`` still names the inode we locked (it may have been deleted or replaced)."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    return (current.st_dev, current.st_ino) == (locked.st_dev, locked.st_ino)
