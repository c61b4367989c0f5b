"""What prefork-ctl changes: stop servers, remove stale entries, read and follow logs.

Stopping (``kill_entries``) goes in the order that lets running calls finish:

1. under the entry's lock (waited for briefly: a client may be starting that server right
   now), unlink the socket, if it is still the very file we scanned, and the lock file: new
   calls now start a fresh server instead of reaching this one;
2. SIGTERM to the server. Ours stops accepting and finishes its running calls
   (``prefork/server/loop.py``: ``_drain_wakeups`` -> ``_begin_quit``); the Perl side's dies
   at once while its monitors, each in its own process group, finish their calls. The
   watcher sees the socket go (or its sentinel close) and exits;
3. wait up to the timeout for the server, its descendants and the watcher
   (``psutil.wait_procs``; a zombie counts as gone), then SIGKILL the survivors (and the
   process groups the executors and monitors lead) and wait again.

Every process is signalled through the ``psutil.Process`` made for it at scan time, after
checking that its create time is still the one scanned: a pid reused meanwhile is left alone.
Never this process nor its ancestors (``prefork-ctl kill`` run from a script under prefork).
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import time
from dataclasses import dataclass, field

import psutil

from prefork.common import locking
from prefork.ctl import discover, kernel

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from prefork.ctl.discover import Entry, ProcInfo

    Say = Callable[[str], None]

LOCK_WAIT = 3.0      # seconds kill waits for an entry's lock before going on without it
KILL_WAIT = 5.0      # seconds to wait for SIGKILLed processes to be gone
_POLL = 0.05         # slice of psutil.wait_procs between zombie checks
_LOG_SUFFIXES = ("", ".1")


@dataclass
class KillResult:
    """What ``kill_entries`` did, for the exit status and the tests."""

    found: bool = False
    signalled: list[int] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    """pids that needed SIGKILL."""
    survivors: list[int] = field(default_factory=list)
    """pids still running at the end (should be empty)."""
    removed: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- processes


def _protected() -> set[int]:
    """This process and its ancestors."""
    me = psutil.Process()
    return {me.pid, *(p.pid for p in me.parents())}


def _handle(info: ProcInfo, protected: set[int]) -> psutil.Process | None:
    """A psutil handle on ``info``'s process if it is still that process (same create time),
    alive, and not protected; else None."""
    if info.pid in protected or info.zombie:
        return None
    try:
        proc = psutil.Process(info.pid)
        if proc.create_time() != info.create_time:
            return None  # the pid was reused since the scan
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    return proc


def _running(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def wait_gone(procs: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited (a zombie counts) or ``timeout`` passes; return the
    ones still running. ``psutil.wait_procs`` in short slices, since it would wait the whole
    timeout on a zombie whose parent has not reaped it yet."""
    alive = [p for p in procs if _running(p)]
    deadline = time.monotonic() + timeout
    while alive:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        _gone, still = psutil.wait_procs(alive, timeout=min(_POLL, remaining))
        alive = [p for p in still if _running(p)]
    return alive


def _signal(proc: psutil.Process, sig: int, info: ProcInfo | None = None) -> bool:
    """Send ``sig`` (psutil re-checks pid reuse); for SIGKILL of an executor or monitor also
    its process group, which it leads. True if the process was still there."""
    try:
        proc.send_signal(sig)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return False
    if sig == signal.SIGKILL and info is not None and info.role in ("executor", "monitor"):
        try:
            if os.getpgid(info.pid) == info.pid:
                os.killpg(info.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return True


# --------------------------------------------------------------------------- files


def _unlink(path: str, result: KillResult) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    result.removed.append(path)
    return True


def _is_file(path: str, file_id: tuple[int, int] | None) -> bool:
    """Whether ``path`` still names the file ``file_id`` = (st_dev, st_ino)."""
    if file_id is None:
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == file_id


def _lock_bounded(path: str, wait: float) -> int | None:
    """The entry's lock, waiting at most ``wait`` seconds; None if someone keeps it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = locking.try_lock_file(path)
        except OSError:
            return None
        if fd is not None or time.monotonic() >= deadline:
            return fd
        time.sleep(0.02)


def _remove_names(e: Entry, result: KillResult) -> list[str]:
    """Unlink the entry's socket (only the file scanned) and lock, under the lock if we get it."""
    done: list[str] = []
    if not (e.has_socket or e.has_lock):
        return done
    fd = _lock_bounded(e.lock_path, LOCK_WAIT)  # creates the lock file if it was missing
    try:
        if _is_file(e.socket_path, e.socket_id) and _unlink(e.socket_path, result):
            done.append("socket")
        if _unlink(e.lock_path, result) and e.has_lock:
            done.append("lock")
    finally:
        if fd is not None:
            os.close(fd)
    return done


# --------------------------------------------------------------------------- kill


def kill_entries(entries: list[Entry], timeout: float, say: Say) -> KillResult:
    """Stop the servers of ``entries`` (graceful, then forceful after ``timeout`` seconds) and
    remove their sockets and locks; logs stay. ``say`` gets one line per thing done."""
    result = KillResult()
    protected = _protected()
    short = discover.short_idents(entries)
    started = time.monotonic()
    handles: list[tuple[psutil.Process, ProcInfo]] = []
    per_entry: list[tuple[psutil.Process | None, list[str]]] = []
    # 0. handles on every process first, while each is surely the one scanned
    for e in entries:
        said: list[str] = []
        server = None
        for info in e.processes():
            proc = _handle(info, protected)
            if proc is not None:
                handles.append((proc, info))
                if info is e.server:
                    server = proc
            elif info.pid in protected:
                said.append(f"not signalling {info.role} {info.pid}: it is prefork-ctl "
                            "or one of its ancestors")
        per_entry.append((server, said))
    names_done: set[str] = set()
    for e, (server, said) in zip(entries, per_entry, strict=True):
        # 1. the names first, so that no new call reaches a server being stopped
        if e.state != discover.DRAINING and e.ident not in names_done:
            names_done.add(e.ident)
            done = _remove_names(e, result)
            if done:
                result.found = True
                kind = {discover.STALE: "stale ", discover.DEAD: "leftover "}.get(e.state, "")
                said.insert(0, f"removed {kind}{' and '.join(done)}")
        # 2. SIGTERM to the server
        if e.server is not None:
            if server is not None and _signal(server, signal.SIGTERM):
                result.found = True
                result.signalled.append(e.server.pid)
                calls = f"{e.calls} call{'s' if e.calls != 1 else ''} running"
                said.append(f"SIGTERM to server {e.server.pid} ({calls})")
            else:
                said.append(f"server {e.server.pid} already gone")
        name = (e.script or e.server.title) if e.server is not None else e.state
        say(f"{short[e.ident]} {name}: {'; '.join(said) or 'nothing to do'}")
    if not handles:
        return result
    # 3. wait, then SIGKILL the survivors
    alive = wait_gone([p for p, _ in handles], timeout)
    if alive:
        info_of = {p.pid: i for p, i in handles}
        for proc in alive:
            info = info_of[proc.pid]
            if _signal(proc, signal.SIGKILL, info):
                result.killed.append(proc.pid)
                say(f"still running after {timeout:g}s: SIGKILL to {info.role} {proc.pid}")
        alive = wait_gone(alive, KILL_WAIT)
    result.survivors = [p.pid for p in alive]
    elapsed = time.monotonic() - started
    stopped = len(handles) - len(alive)
    say(f"{stopped} process{'es' if stopped != 1 else ''} gone after {elapsed:.1f}s"
        + (f"; still running: {result.survivors}" if alive else ""))
    return result


# --------------------------------------------------------------------------- clean


def clean(run_dir: str, say: Say) -> list[str]:
    """Remove what no live server holds: stale sockets, their locks, leftover locks and logs.

    Each entry is handled under its lock, taken without waiting (a client holding it is
    starting that server: the entry is kept), and the socket is checked once more under the
    lock: nobody may listen on it. Files that are not entries are left alone. Returns the
    paths removed.
    """
    entries = discover.scan(run_dir)
    busy = {e.ident for e in entries if e.state in (discover.LIVE, discover.DRAINING)}
    short = discover.short_idents(entries)
    removed: list[str] = []
    for e in entries:
        if e.ident in busy:
            continue
        fd = locking.try_lock_file(e.lock_path)
        if fd is None:
            say(f"{short[e.ident]}: kept (its lock is held: a server is starting)")
            continue
        result = KillResult()
        try:
            if e.has_socket and _listened(e):
                say(f"{short[e.ident]}: kept (a server listens on it now)")
                continue
            gone = []
            if _is_file(e.socket_path, e.socket_id) and _unlink(e.socket_path, result):
                gone.append("socket")
            for suffix in _LOG_SUFFIXES:
                if _unlink(e.log_path + suffix, result):
                    gone.append("log" + suffix)
            if e.stat_path is not None and _unlink(e.stat_path, result):
                gone.append("stat")
            _unlink(e.lock_path, result)  # we created it if it was missing: always ours now
            if e.has_lock:
                gone.append("lock")
        finally:
            os.close(fd)
        removed.extend(result.removed)
        if gone:
            say(f"{short[e.ident]}: removed {e.state} {', '.join(gone)}")
    return removed


def _listened(e: Entry) -> bool:
    """Whether a process listens on the socket file at the entry's path right now."""
    try:
        st = os.lstat(e.socket_path)
    except OSError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        return False
    for s in kernel.unix_listeners(e.run_dir):
        if s.path == e.socket_path and (s.vfs is None or s.vfs == (st.st_dev, st.st_ino)):
            return True
    return False


# --------------------------------------------------------------------------- logs


def log_files(e: Entry) -> list[str]:
    """The entry's log files that exist, oldest first (``p<IDENT>.log.1``, ``p<IDENT>.log``)."""
    return [p for p in (e.log_path + ".1", e.log_path) if os.path.exists(p)]


def log_order(entries: list[Entry]) -> list[Entry]:
    """Entries with a log file, the one written to last at the end (as ``ls -tr``)."""
    def newest(e: Entry) -> float:
        times = []
        for path in log_files(e):
            try:
                times.append(os.stat(path).st_mtime)
            except OSError:
                pass
        return max(times, default=0.0)

    return sorted((e for e in entries if log_files(e)), key=newest)


def print_files(files: list[str], lines: int | None, out: Callable[[bytes], None], *,
                follow: bool = False, poll: float = 0.2,
                stop: Callable[[], bool] | None = None,
                headers: dict[str, bytes] | None = None) -> None:
    """The contents of ``files`` (only the last ``lines`` lines of them all, if given); with
    ``follow``, then what is appended to them, like ``tail -F``.  ``headers`` maps files
    to a header line: printed before the first output from that file, and again whenever
    the output switches to it from another file with another header (as ``tail``).

    Following reads on through the fds the contents came from, so no line written meanwhile
    is lost; a file renamed away by rotation is read to its end before the new one at the
    path is opened and read from its start. Each wait is bounded by ``poll`` seconds; it
    returns when ``stop()`` says so (the CLI stops on Ctrl-C, i.e. KeyboardInterrupt).
    """
    open_fds: dict[str, int] = {}
    last_header: list[bytes | None] = [None]

    def emit(path: str, data: bytes) -> None:
        header = (headers or {}).get(path)
        if data and header is not None and header != last_header[0]:
            out((b"\n" if last_header[0] is not None else b"") + header)
            last_header[0] = header
        out(data)

    try:
        groups: list[tuple[bytes | None, list[tuple[str, bytes]]]] = []
        for path in files:
            fd = _open_or_none(path)
            if fd is None:
                if not follow:
                    raise FileNotFoundError(f"{path}: cannot open")
                continue
            open_fds[path] = fd
            header = (headers or {}).get(path)
            if not groups or groups[-1][0] != header:
                groups.append((header, []))
            groups[-1][1].append((path, _read_rest(fd)))
        for _header, parts in groups:
            # the last ``lines`` lines of each server's files (of all files without headers)
            data = b"".join(d for _p, d in parts)
            if lines is not None:
                data = b"".join(data.splitlines(keepends=True)[-lines:]) if lines > 0 else b""
            emit(parts[-1][0], data)
        while follow and (stop is None or not stop()):
            time.sleep(poll)
            for path in files:
                fd = open_fds.get(path)
                if fd is not None:
                    emit(path, _read_rest(fd))
                    if _replaced(path, fd):
                        os.close(open_fds.pop(path))
                        fd = None
                if fd is None:
                    fd = _open_or_none(path)
                    if fd is not None:
                        open_fds[path] = fd
                        emit(path, _read_rest(fd))
    finally:
        for fd in open_fds.values():
            os.close(fd)


def _open_or_none(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _read_rest(fd: int) -> bytes:
    """Everything from the fd's position to its end (from the start if it was truncated)."""
    if os.lseek(fd, 0, os.SEEK_CUR) > os.fstat(fd).st_size:
        os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _replaced(path: str, fd: int) -> bool:
    """Whether ``path`` no longer names the file open on ``fd`` (rotated or removed)."""
    st = os.fstat(fd)
    try:
        now = os.stat(path)
    except OSError:
        return True
    return (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino)


def stdout_bytes(data: bytes) -> None:
    """Write raw bytes to stdout (log lines are not rich markup) and flush."""
    if not data:
        return
    sys.stdout.flush()
    buf = getattr(sys.stdout, "buffer", None)
    if buf is not None:
        buf.write(data)
        buf.flush()
    else:
        sys.stdout.write(data.decode("utf-8", "backslashreplace"))
        sys.stdout.flush()
