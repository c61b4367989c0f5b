"""Tests for prefork-watcher, with real processes, real sockets and real pipes.

Each test binds an AF_UNIX socket in a short directory under /tmp, starts
``python -m prefork.watcher --daemon SOCKET`` as the client does (fd 0 = the read end of the
sentinel pipe, fds 1 and 2 = the write end of the pipe the server reads), waits for the first
process to exit 0, finds the daemon in /proc by the pipes it holds, then acts and reads the
WATCHE pipe until EOF against a hard deadline.  No sleeps: the tests synchronise on pipe EOF,
on the daemon draining bytes written to its sentinel, and on /proc facts, polled against a
deadline.  Every process that holds one of a test's pipes when the test ends is killed and
reported as a failure.

The daemon re-checks the path on every wake-up, so a daemon test alone cannot tell the inotify
event from that re-check; the foreground tests act only after the "watching" line (printed
after the watch and the re-check) and so prove that the event arrives and is printed.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import termios
from collections.abc import Iterator
from pathlib import Path

import procfs
import pytest
from harness import REPO, Lines, read_until_eof, scaled, wait_for

from prefork.watcher.main import EXIT_ERROR, EXIT_OK, EXIT_USAGE, main

DEADLINE = scaled(10.0)  # for waits on a subprocess


def _pipe_inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def _holders(inodes: set[int]) -> list[int]:
    """Pids of the processes (not us) that hold an fd on one of these pipe inodes."""
    return procfs.pids_holding({f"pipe:[{ino}]" for ino in inodes})


class Watcher:
    """One watcher started as the client starts it, and the server's ends of its pipes."""

    def __init__(self, tmpdir: str) -> None:
        self.tmpdir = tmpdir
        self.path = os.path.join(tmpdir, "s")
        self.sockets: list[socket.socket] = []
        self.sock = self.bind(self.path)
        self.watchi_w = -1  # the server's sentinel (write end of the watcher's stdin)
        self.watche_r = -1  # what the server reads (the watcher's stdout and stderr)
        self.inodes: set[int] = set()
        self.first: subprocess.Popen[bytes] | None = None
        self.daemon_pid = -1

    def bind(self, path: str) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sockets.append(s)
        s.bind(path)
        return s

    def start(self, *args: str, cwd: Path | str = REPO) -> int:
        """Spawn ``prefork.watcher ARGS`` with the client's fds; return the first process's
        exit status."""
        watchi_r, self.watchi_w = os.pipe()
        self.watche_r, watche_w = os.pipe()
        self.inodes = {_pipe_inode(watchi_r), _pipe_inode(watche_w)}
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        try:
            self.first = subprocess.Popen(
                [sys.executable, "-m", "prefork.watcher", *args],
                stdin=watchi_r, stdout=watche_w, stderr=watche_w, cwd=cwd, env=env)
        finally:
            os.close(watchi_r)
            os.close(watche_w)
        return self.first.wait(timeout=DEADLINE)

    def start_daemon(self, path: str | None = None, cwd: Path | str = REPO) -> int:
        """Start in --daemon mode, check the first process exited 0, return the daemon's pid."""
        assert self.start("--daemon", path or self.path, cwd=cwd) == EXIT_OK
        pids = _holders(self.inodes)
        assert len(pids) == 1, f"expected one daemon, found {pids}"
        self.daemon_pid = pids[0]
        assert self.first is not None
        assert self.daemon_pid != self.first.pid
        return self.daemon_pid

    def wait_watching(self) -> list[int]:
        """Poll the daemon's fdinfo until its inotify watch exists; return the watched inodes."""
        watched: list[int] = []

        def ready() -> bool:
            watched[:] = procfs.inotify_watches(self.daemon_pid)
            return bool(watched)

        wait_for(ready, what="the daemon's inotify watch")
        return watched

    def assert_in_loop(self) -> None:
        """Prove the daemon is alive and in its loop: it reads and discards sentinel data.

        Written twice: had the first read made it exit, the second write would fail with
        EPIPE or never drain."""
        for _ in range(2):
            os.write(self.watchi_w, b"ping")
            wait_for(lambda: _unread(self.watchi_w) == 0, what="the daemon to drain its sentinel")
        assert not select.select([self.watche_r], [], [], 0)[0], "the daemon wrote or exited"

    def stop(self) -> None:
        """End a daemon that is still watching the normal way: close the sentinel."""
        os.close(self.watchi_w)
        self.watchi_w = -1
        assert read_until_eof(self.watche_r) == b""

    def close(self) -> list[int]:
        """Close everything; kill and return the pids of processes still holding our pipes."""
        for fd in (self.watchi_w, self.watche_r):
            if fd >= 0:
                os.close(fd)
        for s in self.sockets:
            s.close()
        if self.first is not None and self.first.poll() is None:
            self.first.kill()
            self.first.wait()
        leftovers = _holders(self.inodes) if self.inodes else []
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not _holders(self.inodes), what="leftover watchers to die")
        return leftovers


def _unread(fd: int) -> int:
    """Bytes waiting in the pipe (FIONREAD works on either end)."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    return buf[0]


@pytest.fixture
def tmpdir_short() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="pfw", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def watcher(tmpdir_short: str) -> Iterator[Watcher]:
    w = Watcher(tmpdir_short)
    try:
        yield w
    finally:
        leftovers = w.close()
    assert leftovers == [], f"watcher processes survived the test: {leftovers}"


# ------------------------------------------------------------------------- daemon mode


@pytest.mark.parametrize("when", ["at once", "once watching"])
def test_unlinking_the_socket_ends_the_daemon(watcher: Watcher, when: str) -> None:
    watcher.start_daemon()
    if when == "once watching":  # the inotify event, not the re-check after the watch
        watcher.wait_watching()
        watcher.assert_in_loop()
    os.unlink(watcher.path)
    assert read_until_eof(watcher.watche_r) == b""


@pytest.mark.parametrize("how", ["rename over", "unlink and bind"])
def test_replacing_the_socket_ends_the_daemon(watcher: Watcher, how: str) -> None:
    watcher.start_daemon()
    watcher.wait_watching()
    watcher.assert_in_loop()
    if how == "rename over":
        watcher.bind(watcher.path + ".new")
        os.rename(watcher.path + ".new", watcher.path)
    else:
        os.unlink(watcher.path)
        watcher.bind(watcher.path)
    assert read_until_eof(watcher.watche_r) == b""


def test_renaming_the_directory_ends_the_daemon(watcher: Watcher) -> None:
    watcher.start_daemon()
    watcher.wait_watching()
    watcher.assert_in_loop()
    os.rename(watcher.tmpdir, watcher.tmpdir + ".moved")
    try:
        assert read_until_eof(watcher.watche_r) == b""
    finally:
        os.rename(watcher.tmpdir + ".moved", watcher.tmpdir)


def test_closing_the_sentinel_ends_the_daemon_and_data_does_not(watcher: Watcher) -> None:
    watcher.start_daemon()
    watcher.wait_watching()
    watcher.assert_in_loop()  # data is read and discarded, the daemon stays
    watcher.stop()
    assert os.path.exists(watcher.path)


def test_other_files_in_the_directory_do_not_end_the_daemon(watcher: Watcher) -> None:
    watcher.start_daemon()
    watcher.wait_watching()
    other = os.path.join(watcher.tmpdir, "lother")
    with open(other, "w"):
        pass
    os.utime(other)
    os.rename(other, other + "2")
    os.unlink(other + "2")
    os.utime(watcher.path)  # IN_ATTRIB on the socket itself: same inode, stays
    watcher.assert_in_loop()
    watcher.stop()


@pytest.mark.parametrize("what", ["missing", "regular file"])
def test_bad_socket_path_is_an_error_reported_on_watche(watcher: Watcher, what: str) -> None:
    path = os.path.join(watcher.tmpdir, "nope")
    if what == "regular file":
        with open(path, "w"):
            pass
    assert watcher.start("--daemon", path) == EXIT_ERROR
    message = read_until_eof(watcher.watche_r).decode()
    reason = "No such file or directory" if what == "missing" else "not a socket"
    assert message == f"prefork-watcher: {path}: {reason}\n"


def test_daemon_is_a_session_leader_in_root_with_only_its_own_fds(watcher: Watcher) -> None:
    pid = watcher.start_daemon()
    watched = watcher.wait_watching()
    watcher.assert_in_loop()
    assert watched == [os.stat(watcher.tmpdir).st_ino]
    assert os.getsid(pid) == pid
    assert procfs.cwd(pid) == "/"
    watchi, watche = (f"pipe:[{ino}]" for ino in sorted(
        watcher.inodes, key=lambda ino: ino != _pipe_inode(watcher.watchi_w)))
    fds = procfs.fd_links(pid)
    inotify_fds = [fd for fd, link in fds.items() if link == "anon_inode:inotify"]
    assert len(inotify_fds) == 1
    assert fds == {0: watchi, 1: watche, 2: watche, inotify_fds[0]: "anon_inode:inotify"}
    assert procfs.fd_flags(pid, 0) & os.O_NONBLOCK
    with contextlib.suppress(ImportError):
        import setproctitle  # noqa: F401  (the title is set only when it is importable)

        assert procfs.cmdline(pid).startswith(f"prefork-watcher {watcher.path}".encode())
    watcher.stop()


def test_relative_socket_path_is_resolved_before_chdir(watcher: Watcher) -> None:
    watcher.start_daemon("s", cwd=watcher.tmpdir)
    assert watcher.wait_watching() == [os.stat(watcher.tmpdir).st_ino]
    watcher.assert_in_loop()
    os.unlink(watcher.path)
    assert read_until_eof(watcher.watche_r) == b""


# --------------------------------------------------------------------- foreground mode


def test_foreground_prints_events_and_why_it_exits(watcher: Watcher) -> None:
    assert watcher.first is None
    start_ino = os.stat(watcher.path).st_ino
    watchi_r, watcher.watchi_w = os.pipe()  # unused: no --sentinel, stdin is not watched
    watcher.watche_r, out_w = os.pipe()
    watcher.inodes = {_pipe_inode(watchi_r), _pipe_inode(out_w)}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefork.watcher", watcher.path],
            stdin=watchi_r, stdout=out_w, stderr=subprocess.PIPE, cwd=REPO)
    finally:
        os.close(watchi_r)
        os.close(out_w)
    watcher.first = proc
    lines = Lines(watcher.watche_r)
    first = lines.text()
    assert f"watching {watcher.path} " in first
    assert f"inode {start_ino})" in first
    assert "sentinel" not in first
    os.close(watcher.watchi_w)  # not the sentinel in this mode: nothing happens
    watcher.watchi_w = -1
    os.unlink(watcher.path)
    seen = lines.until("exit 0:")
    assert any("IN_DELETE" in line and "name='s'" in line and "now=missing" in line
               and f"started={start_ino}" in line for line in seen), seen
    assert seen[-1].endswith("exit 0: socket path removed")
    assert not seen[0].startswith("exit")
    assert read_until_eof(watcher.watche_r) == b""
    assert proc.wait(timeout=DEADLINE) == EXIT_OK
    assert proc.stderr is not None
    assert proc.stderr.read() == b""
    proc.stderr.close()


def _start_foreground(watcher: Watcher, *args: str) -> Lines:
    """Start the watcher in the foreground, stdin on the sentinel pipe, stdout on the pipe
    read as ``watcher.watche_r``; return a line reader past its "watching" line."""
    out_r, out_w = os.pipe()
    watcher.watche_r = out_r
    watchi_r, watcher.watchi_w = os.pipe()
    watcher.inodes = {_pipe_inode(watchi_r), _pipe_inode(out_w)}
    try:
        watcher.first = subprocess.Popen(
            [sys.executable, "-m", "prefork.watcher", *args, watcher.path],
            stdin=watchi_r, stdout=out_w, cwd=REPO)
    finally:
        os.close(watchi_r)
        os.close(out_w)
    lines = Lines(out_r)
    first = lines.text()
    assert f"watching {watcher.path} " in first
    assert ("stdin is the sentinel" in first) == ("--sentinel" in args)
    return lines


def test_foreground_replacement_is_named(watcher: Watcher) -> None:
    start_ino = os.stat(watcher.path).st_ino
    lines = _start_foreground(watcher)
    # After the "watching" line every change reaches the watcher as an event first.
    watcher.bind(watcher.path + ".new")
    new_ino = os.stat(watcher.path + ".new").st_ino
    os.rename(watcher.path + ".new", watcher.path)
    seen = lines.until("exit 0:")
    # It looks at the path on every wake-up, so it may quit on the IN_CREATE of s.new
    # (read after the rename) before it sees the IN_MOVED_TO of s.
    assert any(" IN_CREATE name='s.new'" in line and f"started={start_ino}" in line
               for line in seen[:-1]), seen
    assert seen[-1].endswith(f"exit 0: socket replaced by inode {new_ino}")
    assert read_until_eof(watcher.watche_r) == b""
    assert watcher.first is not None
    assert watcher.first.wait(timeout=DEADLINE) == EXIT_OK


def test_foreground_sentinel_data_is_discarded_and_eof_ends_it(watcher: Watcher) -> None:
    lines = _start_foreground(watcher, "--sentinel")
    os.write(watcher.watchi_w, b"abc")
    assert lines.text().endswith("sentinel: discarded 3 bytes")
    os.close(watcher.watchi_w)
    watcher.watchi_w = -1
    assert lines.text().endswith("exit 0: sentinel closed")
    assert read_until_eof(watcher.watche_r) == b""
    assert watcher.first is not None
    assert watcher.first.wait(timeout=DEADLINE) == EXIT_OK


# ------------------------------------------------------------------------ command line


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == EXIT_OK
    import prefork

    assert capsys.readouterr().out == f"prefork-watcher {prefork.__version__}\n"


def test_help_explains_the_role(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == EXIT_OK
    out = capsys.readouterr().out
    for words in ("--daemon", "sentinel", "fd 0", "fd 1, fd 2", "exit status"):
        assert words in out


@pytest.mark.parametrize("argv", [[], ["--bogus", "/x"], ["a", "b"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == EXIT_USAGE
    assert "usage: prefork-watcher" in capsys.readouterr().err


def test_foreground_missing_socket_is_exit_1(tmpdir_short: str) -> None:
    path = os.path.join(tmpdir_short, "nope")
    r = subprocess.run([sys.executable, "-m", "prefork.watcher", path], cwd=REPO,
                       capture_output=True, timeout=DEADLINE, check=False)
    assert r.returncode == EXIT_ERROR
    assert r.stdout == b""
    assert r.stderr.decode() == f"prefork-watcher: {path}: No such file or directory\n"


def test_polls_when_inotify_is_unavailable() -> None:
    """Out of inotify instances, the watcher falls back to polling instead of failing
    (a failing watcher would make its server quit at once)."""
    d = tempfile.mkdtemp(prefix="pfwp", dir="/tmp")
    path = os.path.join(d, "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    code = (
        "import ctypes, sys\n"
        "libc = ctypes.CDLL(None)\n"
        "while libc.inotify_init1(0) >= 0: pass\n"  # use up every instance we may have
        "sys.argv = ['prefork-watcher', sys.argv[1]]\n"
        "from prefork.watcher.main import main\n"
        "sys.exit(main())\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE,
                            cwd=repo, env={**os.environ, "PYTHONPATH": repo})
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert b"polling" in first, first
        os.unlink(path)
        rest = proc.stdout.read()
        assert proc.wait(timeout=10) == 0
        assert b"socket path removed" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()
        shutil.rmtree(d, ignore_errors=True)
