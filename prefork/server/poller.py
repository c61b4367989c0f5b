"""The server loop's selector: ``select.epoll`` with a key per fd carrying its handler.

``selectors`` (with ``collections``, ``math`` and the namedtuple machinery it pulls in) costs
every idle server about 0.3 MB of heap for what the loop needs of it: register an fd or an
object with a ``fileno()`` for reading, unregister it, wait.  The interface is the subset of
``selectors.BaseSelector`` the loop uses; a ready fd (readable, or hung up: EOF) is reported
as ``EVENT_READ``.
"""

from __future__ import annotations

import select

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol

    class _HasFileno(Protocol):
        def fileno(self) -> int: ...

EVENT_READ = 1


class Key:
    """A registration: the object (or fd) registered, its fd, and its data (the handler)."""

    __slots__ = ("data", "fd", "fileobj")

    def __init__(self, fileobj: int | _HasFileno, fd: int, data: Any) -> None:
        self.fileobj = fileobj
        self.fd = fd
        self.data: Any = data


class Poller:
    """Read readiness of a few fds, each with its data."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._keys: dict[int, Key] = {}

    def register(self, fileobj: int | _HasFileno, events: int, data: Any) -> Key:
        """Watch ``fileobj`` for reading; ``KeyError`` if it already is."""
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if fd in self._keys:
            raise KeyError(f"fd {fd} is already registered")
        self._epoll.register(fd, select.EPOLLIN)
        key = self._keys[fd] = Key(fileobj, fd, data)
        return key

    def unregister(self, fileobj: int | _HasFileno) -> Key:
        """Stop watching ``fileobj`` (closed already: found by identity); ``KeyError`` if it
        is not registered."""
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if fd < 0 or fd not in self._keys:
            fd = next((k.fd for k in self._keys.values() if k.fileobj is fileobj), -1)
        key = self._keys.pop(fd)
        try:
            self._epoll.unregister(fd)
        except OSError:  # closed before it was unregistered: epoll dropped it already
            pass
        return key

    def select(self, timeout: float | None = None) -> list[tuple[Key, int]]:
        """Wait up to ``timeout`` seconds (None: for ever) for a registered fd to be ready."""
        ready = self._epoll.poll(-1 if timeout is None else max(timeout, 0.0),
                                 max(len(self._keys), 1))
        out = []
        for fd, _mask in ready:
            key = self._keys.get(fd)
            if key is not None:
                out.append((key, EVENT_READ))
        return out

    def current(self, key: Key) -> bool:
        """Whether ``key`` is still its fd's registration (a handler earlier in the same
        pass of the loop may have unregistered it, and the fd may have been reused)."""
        return self._keys.get(key.fd) is key

    def close(self) -> None:
        """Release the epoll fd (in a spare: the server's)."""
        self._epoll.close()
        self._keys.clear()
