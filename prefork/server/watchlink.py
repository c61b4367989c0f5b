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

import os
import select
import sys
import time

from prefork.common import watchwire

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

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
    """What the server needs to talk to the shared watcher and to find a new one."""

    def __init__(self, sock_path: str, birth_ns: int, files: Sequence[str]) -> None:
        self.run_dir, self.name = os.path.split(sock_path)
        st = os.lstat(sock_path)
        self.dev, self.ino = st.st_dev, st.st_ino
        self.record = watchwire.encode_files(birth_ns, [os.path.abspath(f) for f in files])

    def send_files(self, watch_in_fd: int) -> bool:
        """Write the file list on WATCHI (whole, within SEND_TIMEOUT): whether it went."""
        data = memoryview(self.record)
        deadline = time.monotonic() + SEND_TIMEOUT
        blocking = os.get_blocking(watch_in_fd)
        os.set_blocking(watch_in_fd, False)
        try:
            while data:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([], [watch_in_fd], [], left)[1]:
                    return False
                try:
                    data = data[os.write(watch_in_fd, data):]
                except BlockingIOError:
                    continue
                except OSError:  # BrokenPipeError: the watcher is gone
                    return False
            return True
        finally:
            os.set_blocking(watch_in_fd, blocking)

    def socket_is_ours(self) -> bool:
        """Whether the socket's name still names the inode the server listens on."""
        try:
            st = os.lstat(os.path.join(self.run_dir, self.name))
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (self.dev, self.ino)

    def reattach(self) -> tuple[int, int]:
        """New WATCHI/WATCHE ends from a (new) shared watcher, the file list sent again;
        ``watchwire.WatchError`` if that fails."""
        watch_in_w, watch_err_r = watchwire.attach(self.run_dir, self.name, self.dev,
                                                   self.ino, watcher_cmd())
        if not self.send_files(watch_in_w):
            os.close(watch_in_w)
            os.close(watch_err_r)
            raise watchwire.WatchError("the new shared watcher did not take the file list")
        os.set_blocking(watch_err_r, False)
        return watch_in_w, watch_err_r


def stale_path(message: bytes) -> str | None:
    """The file named by a ``stale PATH`` line from the watcher, or None for other text."""
    if not message.startswith(watchwire.STALE_PREFIX):
        return None
    return os.fsdecode(message[len(watchwire.STALE_PREFIX):].split(b"\n", 1)[0])
