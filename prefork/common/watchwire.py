"""The shared watcher's wire formats, and attaching a server to it.

One ``prefork-watcher --shared RUNDIR`` serves every server of a run directory: one process
and one inotify instance whatever their number.  It listens on ``RUNDIR/pwatcher.sock``
(``consts.WATCHER_SOCKET_NAME``; a name starting with ``p``, which the reference's cleanup
leaves alone).  Whoever starts a server (our client's cold path; our server itself when its
watcher was lost) makes the two v1 pipes and hands the watcher's ends over:

``register`` (client -> watcher, one per connection)::

    "PFW1"  st_dev u64  st_ino u64  name_len u16     big-endian, then the socket's name
                                                    (a file in RUNDIR), in UTF-8/surrogates
    SCM_RIGHTS: watchi_r (the sentinel's read end), watche_w (the server's WATCHE write end)
    reply: one byte 0x00 = watching; anything else or EOF = refused (the fds were closed)

``list`` (debugging, tests): ``"PFWL"``; the reply is text until EOF, one line per server,
``NAME DEV INO FILES`` (FILES: program files watched for it), then a line ``inotify N``
(watches in use).

``sync fds`` (server -> watcher): ``"PFWS"``; the reply is one byte 0x00 carrying, by
SCM_RIGHTS, the watcher's inotify fd (the same instance: no new one is made) and its
``pwatcher.busy`` file, which the watcher holds ``flock``-ed while it handles events.  With
them a server knows, in two system calls per call and without waking the watcher, whether
every change made so far has been dealt with (nothing readable on the inotify fd, the lock
free); only if not does it ask (``S`` below) and wait for the answer.  So a call that comes
after an edit is never served by the stale server, as when each server had its own inotify.

On the server's pipes, after registration (only when ``PREFORK_INTERP`` carries the
``pfw1`` word, so a v1 server never sees any of it):

- WATCHI (server -> watcher), records ``tag len u32 payload``: ``F``, ``birth_ns u64`` then
  the program's file names, each ending in NUL: watch these files; one changed since birth
  makes the server stale (several ``F`` records add up).  ``S``, empty: handle every pending
  event now, then answer ``synced``.
- WATCHE (watcher -> server), lines: ``stale PATH\\n``: ``PATH`` changed since the server was
  born; the server quits as for any autoreload.  ``synced\\n``: the answer to ``S``.  EOF
  still means "your socket is gone".

Cold path only (client start-up, server set-up): ``_socket``, ``os``, ``select``, ``_struct``.
"""

from __future__ import annotations

import _socket
import _struct
import os
import select
import time

from prefork.common import fdio
from prefork.common.consts import WATCHER_LOCK_NAME, WATCHER_SOCKET_NAME

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

#: The ``PREFORK_INTERP`` word that says WATCHI/WATCHE lead to the shared watcher.
ENV_WORD = "pfw1"
MAGIC_REGISTER = b"PFW1"
MAGIC_LIST = b"PFWL"
MAGIC_SYNC_FDS = b"PFWS"
REGISTER = _struct.Struct(">4sQQH")
RECORD = _struct.Struct(">cI")
BIRTH = _struct.Struct(">Q")
REC_FILES = b"F"
#: Like ``F``, for files whose every ancestor directory is watched too (the script, the
#: interpreter, extra paths: a ``current`` symlink swapped anywhere above them).
REC_DEEP = b"D"
REC_SYNC = b"S"
STALE_PREFIX = b"stale "
SYNCED = b"synced\n"
BUSY_NAME = "pwatcher.busy"
ACK = b"\0"
#: Longest socket name accepted (a run-directory entry, far under NAME_MAX).
MAX_NAME = 255
#: Longest record on WATCHI (a program's file list: thousands of names).
MAX_RECORD = 16 << 20
#: Seconds to wait for the watcher's reply, or for a watcher being started to listen.
TIMEOUT = 10.0


class WatchError(Exception):
    """The shared watcher could not be reached or started; the text says why."""


# ------------------------------------------------------------------ codec (pure)

def encode_register(dev: int, ino: int, name: str) -> bytes:
    """The ``register`` message (the two fds ride on it)."""
    raw = os.fsencode(name)
    if not 0 < len(raw) <= MAX_NAME or b"/" in raw:
        raise ValueError(f"socket name {name!r} is not a run-directory entry")
    return REGISTER.pack(MAGIC_REGISTER, dev, ino, len(raw)) + raw


def encode_files(birth_ns: int, files: Iterable[str], deep: bool = False) -> bytes:
    """One WATCHI record naming the program's files (absolute paths); ``deep``: watch every
    directory above them too (``D``), else the one holding each (``F``)."""
    payload = BIRTH.pack(birth_ns) + b"".join(os.fsencode(f) + b"\0" for f in files)
    if len(payload) > MAX_RECORD:
        raise ValueError(f"file list of {len(payload)} bytes is over {MAX_RECORD}")
    return RECORD.pack(REC_DEEP if deep else REC_FILES, len(payload)) + payload


SYNC_RECORD = RECORD.pack(REC_SYNC, 0)


def decode_records(buf: bytes) -> tuple[list[tuple[int, list[str], bool] | None], bytes]:
    """Complete WATCHI records in ``buf`` -- (birth_ns, files, deep) for ``F`` and ``D``,
    None for ``S`` -- and the rest.  ``ValueError`` for a record that is not ours."""
    out: list[tuple[int, list[str], bool] | None] = []
    pos = 0
    while len(buf) - pos >= RECORD.size:
        tag, size = RECORD.unpack_from(buf, pos)
        if tag == REC_SYNC and size == 0:
            out.append(None)
            pos += RECORD.size
            continue
        if tag not in (REC_FILES, REC_DEEP) or not BIRTH.size <= size <= MAX_RECORD:
            raise ValueError(f"bad record {tag!r} of {size} bytes on WATCHI")
        if len(buf) - pos - RECORD.size < size:
            break
        body = buf[pos + RECORD.size:pos + RECORD.size + size]
        (birth,) = BIRTH.unpack_from(body)
        names = body[BIRTH.size:].split(b"\0")[:-1]
        out.append((birth, [os.fsdecode(n) for n in names if n], tag == REC_DEEP))
        pos += RECORD.size + size
    return out, buf[pos:]


# ------------------------------------------------------------------ attaching a server

def socket_path(run_dir: str) -> str:
    """Where the shared watcher of ``run_dir`` listens."""
    return os.path.join(run_dir, WATCHER_SOCKET_NAME)


def _register_once(run_dir: str, message: bytes, fds: Sequence[int]) -> str | None:
    """Hand ``fds`` to the running watcher: None once it said so, else why not."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(socket_path(run_dir))
        except (FileNotFoundError, ConnectionRefusedError):
            return "no shared watcher running"
        fdio.send_fds(sock, message, fds)
        reply = sock.recv(1)
    except OSError as e:  # reset by a watcher that was retiring, a timeout
        return f"shared watcher: {e.strerror or e}"
    finally:
        sock.close()
    return None if reply == ACK else "shared watcher refused the server"


def attach(run_dir: str, name: str, dev: int, ino: int, watcher_cmd: Sequence[str]
           ) -> tuple[int, int]:
    """Make the WATCHI/WATCHE pipes of a server whose socket is ``run_dir/name`` (inode
    ``dev``/``ino``), give the watcher's ends to the run directory's shared watcher (started
    with ``watcher_cmd + [run_dir]`` if none runs) and return the server's ends,
    (watchi_w, watche_r), close-on-exec.  ``WatchError`` if no watcher took them."""
    message = encode_register(dev, ino, name)
    watch_in_r, watch_in_w = os.pipe2(os.O_CLOEXEC)
    watch_err_r, watch_err_w = os.pipe2(os.O_CLOEXEC)
    ok = False
    try:
        why = _register_once(run_dir, message, (watch_in_r, watch_err_w))
        if why is not None:
            from prefork.common import locking

            lock_fd = locking.lock_file(os.path.join(run_dir, WATCHER_LOCK_NAME))
            try:
                why = _register_once(run_dir, message, (watch_in_r, watch_err_w))
                if why is not None:
                    start([*watcher_cmd, run_dir])
                    why = _register_once(run_dir, message, (watch_in_r, watch_err_w))
            finally:
                os.close(lock_fd)
        if why is not None:
            raise WatchError(why)
        ok = True
        return watch_in_w, watch_err_r
    finally:
        os.close(watch_in_r)
        os.close(watch_err_w)
        if not ok:
            os.close(watch_in_w)
            os.close(watch_err_r)


def start(cmd: Sequence[str]) -> None:
    """Run ``cmd`` (a ``prefork-watcher --shared ... RUNDIR``), whose first process exits 0
    once the daemon listens; ``WatchError`` with its message otherwise."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            # The watcher lives on for every server of the run directory: it must hold none
            # of one caller's files, nor an environment entry spawn cannot pass (``=x``).
            fdio.cloexec_strays()
            pid = os.posix_spawnp(cmd[0], list(cmd),
                                  {k: v for k, v in os.environb.items() if k}, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, err_w, 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2),
            ], setsigdef=_all_signals())
        except (OSError, ValueError) as e:
            why = e.strerror if isinstance(e, OSError) else str(e)
            raise WatchError(f"execute {cmd[0]}: {why}") from None
        os.close(err_w)
        err_w = -1
        deadline = time.monotonic() + TIMEOUT
        pidfd = os.pidfd_open(pid)
        try:
            if not select.select([pidfd], [], [], TIMEOUT)[0]:
                os.kill(pid, 9)
        finally:
            os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            msg = b""
            while time.monotonic() < deadline and select.select([err_r], [], [], 0)[0]:
                chunk = os.read(err_r, 4096)
                if not chunk:
                    break
                msg += chunk
            text = msg.decode("utf-8", "replace").strip() or f"wait status {status:#x}"
            raise WatchError(f"shared watcher failed to start: {text}")
    finally:
        os.close(err_r)
        if err_w >= 0:
            os.close(err_w)


def _all_signals() -> tuple[int, ...]:
    import _signal

    return tuple(_signal.valid_signals() - {_signal.SIGKILL, _signal.SIGSTOP})


def sync_fds(run_dir: str) -> tuple[int, int]:
    """The running watcher's (inotify fd, busy-lock fd), close-on-exec; ``WatchError``."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(TIMEOUT)
        sock.connect(socket_path(run_dir))
        sock.sendall(MAGIC_SYNC_FDS)
        data, fds = fdio.recv_with_fds(sock, 1, 2)
    except (OSError, ValueError) as e:
        raise WatchError(f"shared watcher of {run_dir}: {e}") from None
    finally:
        sock.close()
    if data != ACK or len(fds) != 2:
        for fd in fds:
            os.close(fd)
        raise WatchError(f"shared watcher of {run_dir} did not pass its fds")
    # flock belongs to the open file description, which the passed fd shares with the
    # watcher's: the same file opened anew gives the server a lock of its own.
    try:
        busy_fd = os.open(f"/proc/self/fd/{fds[1]}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        os.close(fds[0])
        raise WatchError(f"reopen the watcher's busy file: {e.strerror}") from None
    finally:
        os.close(fds[1])
    return fds[0], busy_fd


def list_entries(run_dir: str) -> str:
    """The running shared watcher's ``list`` reply (text); ``WatchError`` if none runs."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(TIMEOUT)
        sock.connect(socket_path(run_dir))
        sock.sendall(MAGIC_LIST)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError as e:
        raise WatchError(f"shared watcher of {run_dir}: {e.strerror or e}") from None
    finally:
        sock.close()
    return b"".join(chunks).decode("utf-8", "surrogateescape")
