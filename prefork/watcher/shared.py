"""``prefork-watcher --shared RUNDIR``: one watcher for every server of a run directory.

The per-server watcher of v1 (``--daemon SOCKET``) costs a process and an inotify instance
per server.  This one costs one process and one inotify instance per run directory, whatever
the number of servers: the directory itself is watched once (for every server's socket), and
the program files of every server that asks (its autoreload) are watched in the same
instance, a file shared by several servers once.  See ``prefork.common.watchwire`` for how a
server is handed over (its WATCHI read end and WATCHE write end, passed by SCM_RIGHTS) and
for the records on those pipes.

For each server it holds, the watcher does what the v1 watcher does, and nothing else:

- its socket's name no longer names the inode it was registered with (removed, renamed
  away, replaced): WATCHE is closed (EOF: "the socket is gone", the server quits) and the
  server is forgotten -- only that server: the event names the entry;
- its sentinel (WATCHI) reads EOF: the server is gone; it is forgotten, its watches dropped;
- (``pfw1`` servers) one of its files has an mtime later than its birth: ``stale PATH`` is
  written on its WATCHE and its files are no longer watched.

When it holds no server for ``--linger`` seconds it removes its socket (under
``pwatcher.lock``, the lock a client takes to start one) and exits.  If it dies, every
WATCHE it held reads EOF: our servers look at their socket, find it still theirs and hand
themselves to a new shared watcher (see the server's loop); a v1 server (Perl) quits, as it
would with its own watcher dead.

The daemon's imports are kept to built-in modules (no ``argparse``, no ``ctypes`` package):
it is resident for as long as any server lives.

Exit statuses: 0 (retired, or the first process once the daemon listens), 1 error (one line
on stderr), 2 usage.
"""

from __future__ import annotations

import _socket
import fcntl
import os
import select
import stat
import sys
import time

from prefork.common import cfunc, fdio, inotify, watchwire
from prefork.common.consts import WATCHER_LOCK_NAME

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

PROG = "prefork-watcher"
#: Seconds with no server before the watcher retires: none, so that no process is left
#: once the last server is gone (starting another costs the next cold start ~30 ms).
DEFAULT_LINGER = 0.0
#: Retiring was put off (a client holds the lock, or is connecting): try again after this.
RETIRE_RETRY = 0.05
#: A look at every socket path this often anyway (changes inotify cannot see: an ancestor
#: of the run directory renamed), and at unwatchable files (watch limit reached) this often.
RECHECK_INTERVAL = 60.0
POLL_INTERVAL = 2.0
#: A registering client must deliver its message within this.
REGISTER_TIMEOUT = 2.0
_PEERCRED = _socket.SO_PEERCRED
_CRED_SIZE = 12

USAGE = f"""\
usage: {PROG} --shared [--foreground] [--linger SECS] RUNDIR

Watch the sockets (and, for servers that ask, the program files) of every prefork-interp
server of the run directory RUNDIR, with one process and one inotify instance.  Clients
hand each new server's WATCHI/WATCHE pipes to it over RUNDIR/pwatcher.sock.  It daemonises
(the first process exits 0 once it listens) unless --foreground, which prints one line per
event.  It exits once it has held no server for --linger seconds (default {DEFAULT_LINGER:g}).

  {PROG} --list RUNDIR     print the servers the running shared watcher holds
"""


class UsageError(Exception):
    """Bad command line (exit status 2)."""


#: A directory on a watched file's path: its names created, deleted or moved in or out, or
#: the directory itself moved or deleted.
_DIR_NAMES_MASK = (inotify.IN_MOVED_FROM | inotify.IN_MOVED_TO | inotify.IN_CREATE
                   | inotify.IN_DELETE | inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF
                   | inotify.IN_ONLYDIR | 0x20000000)  # IN_MASK_ADD: a directory watched
                                                     # for another reason keeps its mask


class Entry:
    """One server: its socket's name and inode, its two pipe ends, its files."""

    __slots__ = ("birth", "buf", "dev", "dirs", "files", "ino", "known", "name", "told",
                 "unwatched", "watch_err", "watch_in")

    def __init__(self, name: str, dev: int, ino: int, watch_in: int, watch_err: int) -> None:
        self.name = name
        self.dev = dev
        self.ino = ino
        self.watch_in = watch_in
        self.watch_err = watch_err
        self.buf = b""
        self.birth = 0
        #: path -> watch descriptor; files that could not be watched are polled.
        self.files: dict[str, int] = {}
        self.unwatched: set[str] = set()
        #: path -> what was there when the server sent it (None: missing then).
        self.known: dict[str, inotify.Identity | None] = {}
        #: directory watch descriptors this server's files use.
        self.dirs: set[int] = set()
        #: "stale" already written: its files no longer matter.
        self.told = False


class Shared:
    """The daemon's state and loop."""

    def __init__(self, run_dir: str, listen: _socket.socket, notify: inotify.Inotify,
                 linger: float, show: Callable[[str], None] | None) -> None:
        self.run_dir = run_dir
        self.listen = listen
        self.inotify = notify
        self.linger = linger
        self.show = show
        self.dir_wd = notify.add(run_dir, inotify.DIR_MASK)
        self.entries: dict[int, Entry] = {}          # by watch_in fd
        self.by_wd: dict[int, dict[int, set[str]]] = {}  # file wd -> entry fd -> paths
        #: directory wd -> name in it -> entry fd -> paths (the name is the path's file,
        #: or the directory on its way)
        self.by_dir: dict[int, dict[bytes, dict[int, set[str]]]] = {}
        self.poll = select.poll()
        self.poll.register(listen.fileno(), select.POLLIN)
        self.poll.register(notify.fd, select.POLLIN)
        self.uid = os.getuid()
        now = time.monotonic()
        #: When to try to retire (no server held); None while it holds any.
        self.retire_at: float | None = now + linger
        self.next_recheck = now + RECHECK_INTERVAL
        self.listen_ino = os.lstat(watchwire.socket_path(run_dir)).st_ino
        #: Held (flock) while events are handled: see watchwire's ``sync fds``.
        self.busy_fd = os.open(os.path.join(run_dir, watchwire.BUSY_NAME),
                               os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def say(self, text: str) -> None:
        if self.show is not None:
            self.show(text)

    # ------------------------------------------------------------ loop

    def run(self) -> str:
        """Serve until retired; return why."""
        while True:
            now = time.monotonic()
            wake = self.next_recheck
            if any(e.unwatched and not e.told for e in self.entries.values()):
                wake = min(wake, now + POLL_INTERVAL)
            if self.retire_at is not None:
                wake = min(wake, self.retire_at)
            ready = self.poll.poll(max(0.0, wake - now) * 1000)
            for fd, _ev in ready:
                if fd == self.inotify.fd:
                    self._events()
                elif fd == self.listen.fileno():
                    self._accept()
                elif fd in self.entries:
                    self._sentinel(self.entries[fd])
            now = time.monotonic()
            if now >= self.next_recheck:
                self.next_recheck = now + RECHECK_INTERVAL
                for entry in list(self.entries.values()):
                    self._check_socket(entry)
            for entry in list(self.entries.values()):
                if entry.unwatched and not entry.told:
                    self._check_files(entry, entry.unwatched)
            if self.retire_at is not None and now >= self.retire_at:
                if self._retire():
                    return f"no server for {self.linger:g}s"
                self.retire_at = now + RETIRE_RETRY

    # ------------------------------------------------------------ registration

    def _accept(self) -> None:
        try:
            conn_fd, _ = self.listen._accept()  # type: ignore[attr-defined]
        except BlockingIOError:
            return
        conn = _socket.socket(fileno=conn_fd)  # close-on-exec (accept4)
        try:
            conn.settimeout(REGISTER_TIMEOUT)
            uid = int.from_bytes(conn.getsockopt(_socket.SOL_SOCKET, _PEERCRED,
                                                 _CRED_SIZE)[4:8], sys.byteorder)
            if uid != self.uid:
                self.say(f"refused a connection from uid {uid}")
                return
            self._serve(conn)
        except (OSError, EOFError, ValueError) as e:
            self.say(f"connection dropped: {e}")
        finally:
            conn.close()

    def _serve(self, conn: _socket.socket) -> None:
        head, fds = fdio.recv_with_fds(conn, watchwire.REGISTER.size, 2)
        try:
            if head[:4] == watchwire.MAGIC_LIST and not fds:
                conn.sendall(self._listing().encode("utf-8", "surrogateescape"))
                return
            if head[:4] == watchwire.MAGIC_SYNC_FDS and not fds:
                fdio.send_fds(conn, watchwire.ACK, (self.inotify.fd, self.busy_fd))
                return
            if len(head) < watchwire.REGISTER.size:
                head += fdio.read_exactly(conn, watchwire.REGISTER.size - len(head))
            magic, dev, ino, size = watchwire.REGISTER.unpack(head)
            if magic != watchwire.MAGIC_REGISTER or len(fds) != 2 or not 0 < size <= 255:
                raise ValueError(f"not a registration ({magic!r}, {len(fds)} fds)")
            name = os.fsdecode(fdio.read_exactly(conn, size))
            if "/" in name or name in (".", ".."):
                raise ValueError(f"socket name {name!r} is not a run-directory entry")
            watch_in, watch_err = fds
            for fd in fds:
                st = os.fstat(fd)
                if not stat.S_ISFIFO(st.st_mode):
                    raise ValueError("passed fds are not pipes")
            os.set_blocking(watch_in, False)
            os.set_blocking(watch_err, False)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        entry = Entry(name, dev, ino, watch_in, watch_err)
        self.entries[watch_in] = entry
        self.retire_at = None
        self.poll.register(watch_in, select.POLLIN)
        self.say(f"registered {name} (dev {dev}, inode {ino}); {len(self.entries)} server(s)")
        self._check_socket(entry)  # it may have gone before the watch saw it
        conn.sendall(watchwire.ACK)

    def _listing(self) -> str:
        lines = [f"{e.name} {e.dev} {e.ino} {len(e.files) + len(e.unwatched)}\n"
                 for e in self.entries.values()]
        # the run directory, program files, directories on their paths (each wd once)
        wds = {self.dir_wd, *self.by_wd, *self.by_dir}
        lines.append(f"inotify {len(wds)}\n")
        return "".join(lines)

    # ------------------------------------------------------------ the servers' pipes

    def _sentinel(self, entry: Entry) -> None:
        try:
            data = os.read(entry.watch_in, 65536)
        except BlockingIOError:
            return
        except OSError as e:
            data = b""
            self.say(f"{entry.name}: sentinel: {e}")
        if not data:
            self.say(f"{entry.name}: server gone (sentinel closed)")
            self._drop(entry)
            return
        entry.buf += data
        try:
            records, entry.buf = watchwire.decode_records(entry.buf)
        except ValueError:  # a v1 server writing on its sentinel: ignored, as v1 does
            entry.buf = b""
            return
        for record in records:
            if record is None:  # S: deal with every pending event, then say so
                self._events()
                if entry.watch_in not in self.entries:
                    return  # its socket was gone: it was told (EOF)
                try:
                    os.write(entry.watch_err, watchwire.SYNCED)
                except (BlockingIOError, BrokenPipeError):
                    pass
            else:
                self._add_files(entry, *record)

    def _add_files(self, entry: Entry, birth: int, files: list[str], deep: bool = False
                   ) -> None:
        if entry.told:
            return
        entry.birth = birth
        for path in files:
            if path in entry.known:
                continue
            entry.known[path] = inotify.identity(path)
            self._watch_file(entry, path)
            self._watch_dirs(entry, path, deep)
        self.say(f"{entry.name}: watching {len(entry.files)} file(s)"
                 + (f", polling {len(entry.unwatched)}" if entry.unwatched else ""))
        # Changed between the server's birth and the watch: looked at once, now.
        self._check_files(entry, files)

    def _watch_file(self, entry: Entry, path: str) -> None:
        try:
            wd = self.inotify.add(path, inotify.FILE_MASK)
        except OSError:  # missing now, or the watch limit: looked at every POLL_INTERVAL
            entry.unwatched.add(path)
            return
        entry.unwatched.discard(path)
        entry.files[path] = wd
        self.by_wd.setdefault(wd, {}).setdefault(entry.watch_in, set()).add(path)

    def _watch_dirs(self, entry: Entry, path: str, deep: bool) -> None:
        """Watch the directory holding ``path`` (and, ``deep``, every one above it) for its
        name being created, deleted or moved: a file replaced by a rename keeps no watch of
        ours on its new inode, and a symlink swapped above it changes no inode we watch."""
        child, parent = path, os.path.dirname(path)
        while True:
            try:
                wd = self.inotify.add(parent, _DIR_NAMES_MASK)
            except OSError:  # missing, or the watch limit: the file is polled instead
                entry.unwatched.add(path)
            else:
                entry.dirs.add(wd)
                names = self.by_dir.setdefault(wd, {})
                names.setdefault(os.fsencode(os.path.basename(child)), {}).setdefault(
                    entry.watch_in, set()).add(path)
            if not deep or parent in (child, "/"):
                return
            child, parent = parent, os.path.dirname(parent)

    def _unwatch_files(self, entry: Entry) -> None:
        for wd in entry.dirs:
            names = self.by_dir.get(wd)
            if names is None:
                continue
            for dir_users in list(names.values()):
                dir_users.pop(entry.watch_in, None)
            for name in [n for n, dir_users in names.items() if not dir_users]:
                del names[name]
            if not names:
                del self.by_dir[wd]
                if wd != self.dir_wd and wd not in self.by_wd:
                    self.inotify.remove(wd)
        entry.dirs.clear()
        for path, wd in entry.files.items():
            users = self.by_wd.get(wd)
            if users is None:
                continue
            paths = users.get(entry.watch_in)
            if paths is not None:
                paths.discard(path)
                if not paths:
                    del users[entry.watch_in]
            if not users:
                del self.by_wd[wd]
                self.inotify.remove(wd)
        entry.files.clear()
        entry.unwatched.clear()

    def _check_files(self, entry: Entry, files: list[str] | set[str]) -> None:
        """Tell the server if one of ``files`` changed since its birth: modified or its
        inode changed after it (mtime or ctime: a deploy that keeps the old mtime, ``cp -p``,
        ``rsync -a``, ``tar x``, still sets the ctime), or no longer the file first seen at
        that path (renamed over, a symlink swapped), or there now when it was missing."""
        for path in list(files):
            now = inotify.identity(path)
            if now is None:
                if entry.known.get(path) is not None:
                    entry.unwatched.add(path)  # gone for now (a deploy half done): polled
                continue  # gone: not a reason to reload (as the server's own check)
            if (now != entry.known.get(path, now) or now[3] > entry.birth
                    or now[4] > entry.birth):
                self._tell_stale(entry, path)
                return

    def _tell_stale(self, entry: Entry, path: str) -> None:
        entry.told = True
        self._unwatch_files(entry)
        self.say(f"{entry.name}: stale: {path}")
        try:
            os.write(entry.watch_err, watchwire.STALE_PREFIX + os.fsencode(path) + b"\n")
        except (BlockingIOError, BrokenPipeError):
            pass  # the server is gone, or has a full pipe it does not read: it is told anyway

    def _check_socket(self, entry: Entry) -> None:
        """Close the server's WATCHE (EOF: quit) if its socket's name lost its inode."""
        path = os.path.join(self.run_dir, entry.name)
        try:
            st = os.lstat(path)
            gone = (st.st_dev, st.st_ino) != (entry.dev, entry.ino)
            why = f"replaced by inode {st.st_ino}"
        except OSError:
            gone, why = True, "removed"
        if gone:
            self.say(f"{entry.name}: socket {why}: server told")
            self._drop(entry)

    def _drop(self, entry: Entry) -> None:
        self._unwatch_files(entry)
        self.poll.unregister(entry.watch_in)
        del self.entries[entry.watch_in]
        os.close(entry.watch_in)
        os.close(entry.watch_err)  # EOF on WATCHE (if the server still reads it)
        if not self.entries:
            self.retire_at = time.monotonic() + self.linger

    # ------------------------------------------------------------ inotify

    def _events(self) -> None:
        """Read and handle every pending event, holding the busy lock from before the read
        until every server concerned has been told."""
        fcntl.flock(self.busy_fd, fcntl.LOCK_EX)
        try:
            self._handle_events()
        finally:
            fcntl.flock(self.busy_fd, fcntl.LOCK_UN)

    def _handle_events(self) -> None:
        names: set[str] = set()
        everything = False
        touched: dict[int, int] = {}
        for wd, mask, name in self.inotify.read():
            if mask & inotify.IN_Q_OVERFLOW:
                everything = True
            else:
                if wd == self.dir_wd:
                    if name:
                        names.add(os.fsdecode(name))
                    else:  # the directory itself moved or went
                        everything = True
                if wd in self.by_dir:  # a directory on a program file's path
                    self._dir_event(wd, mask, name)
                if wd in self.by_wd:
                    touched[wd] = touched.get(wd, 0) | mask
        if names and self.show is not None:
            self.say("directory event: " + " ".join(sorted(names)))
        for entry in list(self.entries.values()):
            if everything or entry.name in names:
                self._check_socket(entry)
        for wd, mask in touched.items():
            self._file_event(wd, mask)
        if everything:
            for entry in list(self.entries.values()):
                if not entry.told:
                    self._check_files(entry, list(entry.known))

    def _dir_event(self, wd: int, mask: int, name: bytes) -> None:
        """A watched directory: the named entry changed (or, the directory itself moved
        or went, every one): check the paths through it."""
        names = self.by_dir.get(wd)
        if names is None:
            return
        if mask & (inotify.IN_IGNORED | inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF):
            groups = list(names.values())
            if mask & inotify.IN_IGNORED:
                del self.by_dir[wd]
        else:
            users = names.get(name)
            groups = [users] if users else []
        for users in groups:
            for fd, paths in list(users.items()):
                entry = self.entries.get(fd)
                if entry is not None and not entry.told:
                    self._check_files(entry, paths)

    def _file_event(self, wd: int, mask: int) -> None:
        users = self.by_wd.get(wd)
        if users is None:
            return
        gone = bool(mask & (inotify.IN_IGNORED | inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF))
        if mask & inotify.IN_IGNORED:  # the kernel dropped the watch (file deleted)
            del self.by_wd[wd]
        for fd, paths in list(users.items()):
            entry = self.entries.get(fd)
            if entry is None or entry.told:
                continue
            self._check_files(entry, paths)
            if gone and not entry.told:  # the name may name another file now: watch that
                for path in list(paths):
                    if entry.files.get(path) == wd:
                        del entry.files[path]
                        paths.discard(path)
                        self._watch_file(entry, path)
                        self._check_files(entry, [path])

    # ------------------------------------------------------------ retiring

    def _retire(self) -> bool:
        """Remove our socket and stop, unless a client is about to register."""
        from prefork.common import locking

        try:
            lock_fd = locking.try_lock_file(os.path.join(self.run_dir, WATCHER_LOCK_NAME))
        except OSError:
            lock_fd = None
        if lock_fd is None:  # a client is starting a watcher or registering: not now
            return False
        try:
            if select.select([self.listen], [], [], 0)[0]:
                return False  # a connection waits: serve it first
            path = watchwire.socket_path(self.run_dir)
            try:
                if os.lstat(path).st_ino == self.listen_ino:
                    os.unlink(path)
            except FileNotFoundError:
                pass
            return True
        finally:
            os.close(lock_fd)


# ------------------------------------------------------------------ command line

def _parse(argv: list[str]) -> tuple[str, bool, float]:
    foreground = False
    linger = DEFAULT_LINGER
    rest: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--foreground":
            foreground = True
        elif arg == "--linger" or arg.startswith("--linger="):
            value = arg.partition("=")[2] if "=" in arg else next(it, "")
            try:
                linger = float(value)
            except ValueError:
                raise UsageError(f"--linger {value!r} is not a number of seconds") from None
            if not linger >= 0:
                raise UsageError(f"--linger {value!r} must be >= 0")
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"unknown option {arg}")
        else:
            rest.append(arg)
    if len(rest) != 1:
        raise UsageError("expected one RUNDIR")
    return rest[0], foreground, linger


def _say(message: str) -> None:
    try:
        os.write(2, f"{PROG}: {message}\n".encode("utf-8", "backslashreplace"))
    except OSError:
        pass


def main(argv: list[str]) -> int:
    """``prefork-watcher --shared ...`` (``argv`` without ``--shared``): exit status."""
    if "-h" in argv or "--help" in argv:
        sys.stdout.write(USAGE)
        return 0
    try:
        run_dir, foreground, linger = _parse(argv)
    except UsageError as e:
        _say(f"{e}\n{USAGE}")
        return 2
    run_dir = os.path.abspath(run_dir)
    try:
        listen, notify = _open(run_dir)
    except (OSError, ValueError) as e:
        _say(str(e))
        return 1
    ino = os.lstat(watchwire.socket_path(run_dir)).st_ino
    if not foreground:
        _daemonise(run_dir, listen, notify, linger, ino)

    def show(text: str) -> None:
        now = time.time()
        stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1e6):06d}"
        sys.stdout.write(f"{stamp} {text}\n")
        sys.stdout.flush()

    try:
        show(f"shared watcher of {run_dir} listening")
        reason = Shared(run_dir, listen, notify, linger, show).run()
    except KeyboardInterrupt:
        _unlink_own(run_dir, ino)
        _say("interrupted")
        return 130
    show(f"exit 0: {reason}")
    return 0


def _open(run_dir: str) -> tuple[_socket.socket, inotify.Inotify]:
    """Check the run directory, bind and listen on its watcher socket, open inotify."""
    st = os.lstat(run_dir)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ValueError(f"{run_dir}: not a directory of ours with mode 0700")
    path = watchwire.socket_path(run_dir)
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
        raise ValueError(f"{path}: a shared watcher is already listening there")
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listen = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        listen.bind(path)
    finally:
        os.umask(old)
    listen.listen(128)
    listen.setblocking(False)
    try:
        notify = inotify.Inotify()
    except OSError as e:
        listen.close()
        os.unlink(path)
        raise OSError(e.errno, f"inotify: {e.strerror}") from None
    return listen, notify


def _unlink_own(run_dir: str, ino: int) -> None:
    """Remove the watcher's socket if its name still names the one bound (inode ``ino``)."""
    path = watchwire.socket_path(run_dir)
    try:
        if os.lstat(path).st_ino == ino:
            os.unlink(path)
    except OSError:
        pass


def _daemonise(run_dir: str, listen: _socket.socket, notify: inotify.Inotify,
               linger: float, ino: int) -> NoReturn:
    """Fork; the first process exits 0 (the socket listens already); the daemon serves."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() != 0:
        os._exit(0)
    status = 1
    try:
        os.setsid()
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        keep = {listen.fileno(), notify.fd}
        for entry in os.listdir("/proc/self/fd"):
            fd = int(entry)
            if fd > 2 and fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        import gc

        gc.collect()
        gc.freeze()
        cfunc.malloc_trim()
        Shared(run_dir, listen, notify, linger, None).run()
        status = 0
    except BaseException:  # noqa: BLE001 - the daemon ends in os._exit whatever happens
        _unlink_own(run_dir, ino)
    finally:
        os._exit(status)
