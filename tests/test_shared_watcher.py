"""The shared watcher (``prefork-watcher --shared RUNDIR``), with real processes, sockets,
pipes and inotify: one daemon and one inotify instance per run directory, whatever the number
of servers, telling each server only what concerns it.

The "servers" here are the test itself: an AF_UNIX socket bound in a short run directory and
the server's ends of the two v1 pipes, made and handed over by ``watchwire.attach`` exactly as
the client's cold path does.  The tests synchronise on pipe EOF, on the watcher's ``--list``
reply and on /proc facts, polled against a deadline; never on sleep.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from prefork.common import watchwire

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 10.0 * float(os.environ.get("PREFORK_TEST_TIMEOUT_MULT") or 1)
POLL = 0.005
LINGER = "0"  # the watcher retires as soon as a test has closed its last stand-in server


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def watcher_cmd(linger: str = LINGER) -> list[str]:
    return [sys.executable, "-m", "prefork.watcher", "--shared", "--linger", linger]


def _wait_for(what: str, predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL)


def _eof_within(fd: int) -> bytes:
    """Everything ``fd`` gives until EOF, which must come within DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    data = b""
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no EOF within {DEADLINE}s (read: {data!r})"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                return data
            data += chunk


def daemons(run_dir: str) -> list[int]:
    """Pids of shared watchers of ``run_dir`` (by command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
        except OSError:
            continue
        if b"--shared" in argv and os.fsencode(run_dir) in argv:
            found.append(int(entry))
    return found


def inotify_instances(pid: int) -> list[int]:
    """The number of watches of each inotify instance ``pid`` holds."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                out.append(sum(1 for line in f if line.startswith("inotify wd:")))
        except OSError:
            continue
    return out


class Server:
    """A stand-in server: a bound socket and its ends of WATCHI/WATCHE."""

    def __init__(self, run_dir: str, name: str, linger: str = LINGER) -> None:
        self.path = os.path.join(run_dir, name)
        self.name = name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        st = os.lstat(self.path)
        self.watchi_w, self.watche_r = watchwire.attach(run_dir, name, st.st_dev, st.st_ino,
                                                        watcher_cmd(linger))

    def told(self) -> bool:
        """Whether the watcher wrote or closed WATCHE (without reading it)."""
        return bool(select.select([self.watche_r], [], [], 0)[0])

    def close(self) -> None:
        for fd in (self.watchi_w, self.watche_r):
            if fd >= 0:
                os.close(fd)
        self.watchi_w = self.watche_r = -1
        self.sock.close()


@pytest.fixture
def run_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="pfw", dir="/tmp")
    os.chmod(d, 0o700)
    try:
        yield d
    finally:
        deadline = time.monotonic() + DEADLINE
        while daemons(d) and time.monotonic() < deadline:  # retiring on its own
            time.sleep(POLL)
        left = daemons(d)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        _wait_for("watchers to die", lambda: not daemons(d))
        sock_left = os.path.exists(watchwire.socket_path(d))
        shutil.rmtree(d, ignore_errors=True)
        assert not left, f"shared watcher(s) {left} did not retire after the last server"
        assert not sock_left, "the retired watcher left its socket"


def listing(run_dir: str) -> dict[str, str]:
    """The watcher's ``--list``: socket name -> the rest of its line."""
    out = subprocess.run([sys.executable, "-m", "prefork.watcher", "--list", run_dir],
                         env=_env(), capture_output=True, text=True, timeout=DEADLINE, check=True)
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.stdout.splitlines()}


def retire(run_dir: str, servers: list[Server]) -> None:
    """Close every stand-in server; the watcher (linger 0 only) then exits."""
    for s in servers:
        s.close()


def test_one_watcher_one_instance_for_many_servers(run_dir: str) -> None:
    servers = [Server(run_dir, f"s{i:02d}") for i in range(40)]
    try:
        (pid,) = daemons(run_dir)
        assert inotify_instances(pid) == [1], "one instance with one watch (the directory)"
        names = listing(run_dir)
        assert set(names) == {s.name for s in servers} | {"inotify"}
        assert not any(s.told() for s in servers)
        assert os.path.exists(watchwire.socket_path(run_dir))
    finally:
        retire(run_dir, servers)


def test_socket_replaced_tells_only_that_server(run_dir: str) -> None:
    a, b, c = (Server(run_dir, n) for n in ("sa", "sb", "sc"))
    try:
        os.unlink(a.path)
        replacement = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        replacement.bind(a.path)  # a new server's socket under the same name
        assert _eof_within(a.watche_r) == b""
        os.rename(c.path, c.path + "x")  # renamed away
        assert _eof_within(c.watche_r) == b""
        _wait_for("a and c dropped", lambda: set(listing(run_dir)) == {"sb", "inotify"})
        assert not b.told()
        replacement.close()
    finally:
        retire(run_dir, [a, b, c])


def test_server_death_drops_its_entry(run_dir: str) -> None:
    a, b = Server(run_dir, "sa"), Server(run_dir, "sb")
    try:
        os.close(a.watchi_w)  # the sentinel closes: the server died
        a.watchi_w = -1
        assert _eof_within(a.watche_r) == b""
        _wait_for("a's entry dropped", lambda: set(listing(run_dir)) == {"sb", "inotify"})
        assert not b.told()
    finally:
        retire(run_dir, [a, b])


def test_stale_file_tells_the_servers_that_use_it(run_dir: str, tmp_path: Path) -> None:
    shared_file = tmp_path / "lib.py"
    own_file = tmp_path / "own.py"
    for f in (shared_file, own_file):
        f.write_text("x = 1\n")
    birth = time.time_ns()
    os.utime(shared_file, ns=(birth - 10**9, birth - 10**9))
    os.utime(own_file, ns=(birth - 10**9, birth - 10**9))
    a, b, c = (Server(run_dir, n) for n in ("sa", "sb", "sc"))
    try:
        os.write(a.watchi_w, watchwire.encode_files(birth, [str(shared_file), str(own_file)]))
        os.write(b.watchi_w, watchwire.encode_files(birth, [str(shared_file)]))
        os.write(c.watchi_w, watchwire.encode_files(birth, [str(own_file), "/nonexistent/x"]))
        # the run directory, lib.py, own.py and the directory holding both
        _wait_for("the files watched", lambda: listing(run_dir).get("inotify") == "4")
        (pid,) = daemons(run_dir)
        assert inotify_instances(pid) == [4], "a file two servers use is watched once"
        shared_file.write_text("x = 2\n")  # mtime now > birth
        for s in (a, b):
            line = os.read(s.watche_r, 4096) if select.select([s.watche_r], [], [],
                                                               DEADLINE)[0] else b""
            assert line == b"stale " + os.fsencode(shared_file) + b"\n"
        assert not c.told()
        # a and b no longer need their files: only own.py (c's) and its directory are.
        _wait_for("watches released", lambda: listing(run_dir).get("inotify") == "3")
        own_file.touch()
        assert os.read(c.watche_r, 4096) == b"stale " + os.fsencode(own_file) + b"\n"
    finally:
        retire(run_dir, [a, b, c])


def test_file_changed_before_registration_is_stale_at_once(run_dir: str,
                                                           tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("")
    a = Server(run_dir, "sa")
    try:
        os.write(a.watchi_w, watchwire.encode_files(time.time_ns() - 10**9, [str(f)]))
        assert select.select([a.watche_r], [], [], DEADLINE)[0]
        assert os.read(a.watche_r, 4096) == b"stale " + os.fsencode(f) + b"\n"
    finally:
        a.close()


def test_file_replaced_by_a_rename_is_stale(run_dir: str, tmp_path: Path) -> None:
    """An editor or a deploy saving by rename (``mv new old``, ``rsync -a``), even with the
    old times kept: the name now names another file, so the server is told it is stale."""
    f = tmp_path / "m.py"
    f.write_text("")
    birth = time.time_ns() + 10**12  # far ahead: neither mtime nor ctime is after it
    a = Server(run_dir, "sa")
    try:
        os.write(a.watchi_w, watchwire.encode_files(birth, [str(f)]))
        _wait_for("the file watched", lambda: listing(run_dir).get("inotify") == "3")
        assert not a.told()
        new = tmp_path / "m.py.new"
        new.write_text("y")
        os.utime(new, ns=(birth - 1, birth - 1))
        os.rename(new, f)
        assert select.select([a.watche_r], [], [], DEADLINE)[0]
        assert os.read(a.watche_r, 4096) == b"stale " + os.fsencode(f) + b"\n"
    finally:
        a.close()


def test_sync_fds_and_sync_record(run_dir: str, tmp_path: Path) -> None:
    """What a server does at each call: with the watcher's inotify fd (the same instance)
    and busy lock it can tell, without a round trip, whether every change has been dealt
    with; if not, ``S`` on WATCHI gets every pending event handled before ``synced``."""
    import fcntl

    f = tmp_path / "m.py"
    f.write_text("")
    birth = time.time_ns() + 10**12
    a = Server(run_dir, "sa")
    ino_fd, busy_fd = watchwire.sync_fds(run_dir)
    try:
        os.write(a.watchi_w, watchwire.encode_files(birth, [str(f)]))
        # the run directory, m.py and the directory holding it
        _wait_for("the file watched", lambda: listing(run_dir).get("inotify") == "3")
        (pid,) = daemons(run_dir)
        assert inotify_instances(pid) == [3]
        with open(f"/proc/self/fdinfo/{ino_fd}") as fi:
            assert sum(1 for line in fi if line.startswith("inotify wd:")) == 3
        # While a "server" holds the lock shared, the watcher cannot handle an event.
        fcntl.flock(busy_fd, fcntl.LOCK_SH)
        os.utime(f, ns=(birth + 1, birth + 1))
        assert select.select([ino_fd], [], [], DEADLINE)[0], "the event is pending"
        os.write(a.watchi_w, watchwire.SYNC_RECORD)
        assert not select.select([a.watche_r], [], [], 0.2)[0], "told while the lock was held"
        fcntl.flock(busy_fd, fcntl.LOCK_UN)
        data = b""
        while not data.endswith(watchwire.SYNCED):
            assert select.select([a.watche_r], [], [], DEADLINE)[0]
            data += os.read(a.watche_r, 4096)
        assert data == b"stale " + os.fsencode(f) + b"\n" + watchwire.SYNCED
        assert not select.select([ino_fd], [], [], 0)[0], "every event was read"
        # Nothing pending: the answer is "synced" alone.
        os.write(a.watchi_w, watchwire.SYNC_RECORD)
        assert select.select([a.watche_r], [], [], DEADLINE)[0]
        assert os.read(a.watche_r, 4096) == watchwire.SYNCED
    finally:
        os.close(ino_fd)
        os.close(busy_fd)
        a.close()


def test_envspec_shared_watcher_token() -> None:
    from prefork.common import envspec

    plain = envspec.build(5, 6, 3, 4, 7, 8)
    assert plain == "v1,5.000000006 3,4,7,8"  # exactly v1 unless asked
    assert not envspec.parse(plain).shared_watcher
    ours = envspec.build(5, 6, 3, 4, 7, 8, shared_watcher=True)
    assert ours == "v1,5.000000006 3,4,7,8 pfw1"
    assert envspec.parse(ours).shared_watcher
    assert envspec.parse("v1,5.000000006 3,4,7,8 x,pfw1,y more").shared_watcher
    assert not envspec.parse("v1,5.000000006 3,4,7,8,pfw1 pfw2").shared_watcher


def test_watchi_records_codec() -> None:
    rec = watchwire.encode_files(7, ["/a", "/b c"])
    got, rest = watchwire.decode_records(rec[:5])
    assert (got, rest) == ([], rec[:5])
    deep = watchwire.encode_files(8, ["/s"], deep=True)
    assert deep[:1] == watchwire.REC_DEEP
    got, rest = watchwire.decode_records(rec + watchwire.SYNC_RECORD + deep + rec[:3])
    assert got == [(7, ["/a", "/b c"], False), None, (8, ["/s"], True)]
    assert rest == rec[:3]
    with pytest.raises(ValueError, match="bad record"):
        watchwire.decode_records(b"X\0\0\0\0")
    with pytest.raises(ValueError, match="not a run-directory entry"):
        watchwire.encode_register(1, 2, "a/b")
