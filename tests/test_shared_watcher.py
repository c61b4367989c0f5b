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
import threading
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
        _wait_for("the files watched", lambda: listing(run_dir).get("inotify") == "3")
        (pid,) = daemons(run_dir)
        assert inotify_instances(pid) == [3], "a file two servers use is watched once"
        shared_file.write_text("x = 2\n")  # mtime now > birth
        for s in (a, b):
            line = os.read(s.watche_r, 4096) if select.select([s.watche_r], [], [],
                                                               DEADLINE)[0] else b""
            assert line == b"stale " + os.fsencode(shared_file) + b"\n"
        assert not c.told()
        # a and b no longer need their files: only own.py (c's) is still watched.
        _wait_for("watches released", lambda: listing(run_dir).get("inotify") == "2")
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


def test_replaced_file_is_still_watched(run_dir: str, tmp_path: Path) -> None:
    """An editor saving by rename: the old inode goes, the name then names a new file."""
    f = tmp_path / "m.py"
    f.write_text("")
    birth = time.time_ns() + 10**12  # far ahead: the rename alone is not stale
    a = Server(run_dir, "sa")
    try:
        os.write(a.watchi_w, watchwire.encode_files(birth, [str(f)]))
        _wait_for("the file watched", lambda: listing(run_dir).get("inotify") == "2")
        new = tmp_path / "m.py.new"
        new.write_text("y")
        os.utime(new, ns=(birth - 1, birth - 1))
        os.rename(new, f)
        _wait_for("the new inode watched", lambda: listing(run_dir).get("inotify") == "2"
                  and os.stat(f).st_ino in _watched_inodes(run_dir))
        assert not a.told()
        os.utime(f, ns=(birth + 1, birth + 1))
        assert select.select([a.watche_r], [], [], DEADLINE)[0]
        assert os.read(a.watche_r, 4096).startswith(b"stale ")
    finally:
        a.close()


def _watched_inodes(run_dir: str) -> set[int]:
    (pid,) = daemons(run_dir)
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as fi:
                for line in fi:
                    if line.startswith("inotify wd:"):
                        fields = dict(w.split(":", 1) for w in line.split()[1:])
                        inodes.add(int(fields["ino"], 16))
        except OSError:
            continue
    return inodes


def test_killed_watcher_releases_every_server_and_another_takes_over(run_dir: str) -> None:
    a, b = Server(run_dir, "sa"), Server(run_dir, "sb")
    try:
        (pid,) = daemons(run_dir)
        os.kill(pid, signal.SIGKILL)
        # What a v1 server sees: EOF on WATCHE.  (Ours look at their socket first and hand
        # themselves to a new watcher: tests/test_scale.py.)
        assert _eof_within(a.watche_r) == b""
        assert _eof_within(b.watche_r) == b""
        _wait_for("the old watcher gone", lambda: not daemons(run_dir))
        # Its socket file is left behind: the next attach starts a new watcher regardless.
        c = Server(run_dir, "sc")
        (pid2,) = daemons(run_dir)
        assert pid2 != pid
        assert set(listing(run_dir)) == {"sc", "inotify"}
        c.close()
    finally:
        retire(run_dir, [a, b])


def test_watcher_retires_when_no_server_is_left(run_dir: str) -> None:
    a = Server(run_dir, "sa")
    assert len(daemons(run_dir)) == 1
    a.close()
    _wait_for("the watcher to retire", lambda: not daemons(run_dir))
    assert not os.path.exists(watchwire.socket_path(run_dir))


def test_concurrent_attaches_start_one_watcher(run_dir: str) -> None:
    names = [f"s{i}" for i in range(12)]
    socks = {}
    for n in names:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(os.path.join(run_dir, n))
        socks[n] = s
    got: dict[str, tuple[int, int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(names))

    def go(n: str) -> None:
        try:
            st = os.lstat(os.path.join(run_dir, n))
            barrier.wait()
            got[n] = watchwire.attach(run_dir, n, st.st_dev, st.st_ino, watcher_cmd())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    try:
        assert not errors
        assert len(daemons(run_dir)) == 1
        assert set(listing(run_dir)) == set(names) | {"inotify"}
    finally:
        for fds in got.values():
            for fd in fds:
                os.close(fd)
        for s in socks.values():
            s.close()


def test_refuses_what_is_not_a_registration(run_dir: str) -> None:
    a = Server(run_dir, "sa")
    try:
        for junk in (b"GET / HTTP/1.0\r\n\r\n", b"PFW1" + b"\0" * 18):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(DEADLINE)
            c.connect(watchwire.socket_path(run_dir))
            c.sendall(junk)
            c.shutdown(socket.SHUT_WR)
            assert c.recv(1) == b""  # closed without an ACK
            c.close()
        assert set(listing(run_dir)) == {"sa", "inotify"}
        assert not a.told()
    finally:
        a.close()


@pytest.mark.parametrize(("args", "status", "message"), [
    (["--shared"], 2, "expected one RUNDIR"),
    (["--shared", "--linger", "x", "/tmp"], 2, "is not a number"),
    (["--shared", "--bogus", "/tmp"], 2, "unknown option --bogus"),
    (["--shared", "/nonexistent-pfw"], 1, "No such file or directory"),
    (["--shared", "/tmp"], 1, "not a directory of ours with mode 0700"),
])
def test_usage_and_run_dir_errors(args: list[str], status: int, message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "prefork.watcher", *args], env=_env(),
                       capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert r.returncode == status
    assert r.stderr.startswith("prefork-watcher: ")
    assert message in r.stderr


def test_second_watcher_refuses_to_start(run_dir: str) -> None:
    a = Server(run_dir, "sa")
    try:
        r = subprocess.run([*watcher_cmd(), run_dir], env=_env(), capture_output=True,
                           text=True, timeout=DEADLINE, check=False)
        assert r.returncode == 1
        assert "already listening" in r.stderr
        assert len(daemons(run_dir)) == 1
    finally:
        a.close()


def _lines_until(fd: int, text: str, got: list[str]) -> list[str]:
    """Lines from ``fd`` (appended to ``got``) until one contains ``text``, within DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    buf = b""
    while not any(text in line for line in got):
        left = deadline - time.monotonic()
        assert left > 0, f"no line with {text!r} within {DEADLINE}s: {got}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"EOF before a line with {text!r}: {got}"
            buf += chunk
            *done, buf = buf.split(b"\n")
            got.extend(d.decode() for d in done)
    return got


def test_foreground_mode_prints_events(run_dir: str) -> None:
    p = subprocess.Popen([*watcher_cmd("60"), "--foreground", run_dir], env=_env(),
                         stdout=subprocess.PIPE)
    a = None
    try:
        assert p.stdout is not None
        out = p.stdout.fileno()
        lines = _lines_until(out, "listening", [])
        a = Server(run_dir, "sa")
        _lines_until(out, "registered sa", lines)
        os.unlink(a.path)
        assert _eof_within(a.watche_r) == b""
        _lines_until(out, "sa: socket removed: server told", lines)
        told = next(i for i, line in enumerate(lines) if "server told" in line)
        registered = next(i for i, line in enumerate(lines) if "registered sa" in line)
        # The event that told it was printed first (the socket's creation may show too).
        assert any("directory event:" in line and " sa" in line
                   for line in lines[registered:told]), lines
        p.send_signal(signal.SIGINT)  # by hand: ^C
        assert p.wait(DEADLINE) == 130
        assert not os.path.exists(watchwire.socket_path(run_dir))
    finally:
        if a is not None:
            a.close()
        if p.poll() is None:
            p.kill()
            p.wait()


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
        _wait_for("the file watched", lambda: listing(run_dir).get("inotify") == "2")
        (pid,) = daemons(run_dir)
        assert inotify_instances(pid) == [2]
        with open(f"/proc/self/fdinfo/{ino_fd}") as fi:
            assert sum(1 for line in fi if line.startswith("inotify wd:")) == 2
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
    got, rest = watchwire.decode_records(rec + watchwire.SYNC_RECORD + rec[:3])
    assert got == [(7, ["/a", "/b c"]), None]
    assert rest == rec[:3]
    with pytest.raises(ValueError, match="bad record"):
        watchwire.decode_records(b"X\0\0\0\0")
    with pytest.raises(ValueError, match="not a run-directory entry"):
        watchwire.encode_register(1, 2, "a/b")
