"""Lifecycle and faults (issue 4): real clients, servers, watchers and executors.

Each test synchronises on kernel facts (a line read, a process gone, a socket connected, the
server asleep in epoll_wait, a FIFO opened by its reader), never on sleeps.  Calls are made
with our client through the script's ``#!`` line; every executor says which server forked it
(its parent pid), so "served by a fresh server" and "served by the same one" are facts.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from _procfacts import asleep_in_epoll, executors, log_text, socket_file, spares, watcher_of
from harness import (
    CLIENT,
    PYTHON,
    Lines,
    ProcRegistry,
    find_processes,
    hold_self_watch,
    scaled,
    wait_for,
    write_script,
)
from heldcall import Held, start_held
from procfs import cmdline_pids, fd_links, gone, has_connected_socket, signal_mask, title

from prefork.common.locking import try_lock_file

SCRIPT = """
import os, signal, subprocess, sys
if os.environ.get("PREFORK_INTERP") and os.environ.get("PF_SETUP_LOG"):
    with open(os.environ["PF_SETUP_LOG"], "a") as f:   # one line per setup run
        f.write(f"{os.getpid()}\\n")
if os.environ.get("PREFORK_INTERP") and os.environ.get("PF_SETUP_FIFO"):
    os.close(os.open(os.environ["PF_SETUP_FIFO"], os.O_RDONLY))  # until the test opens it
if os.environ.get("PREFORK_INTERP") and os.environ.get("PF_SETUP_HANG_UNLESS"):
    if not os.path.exists(os.environ["PF_SETUP_HANG_UNLESS"]):
        signal.pause()                                   # hangs until killed
import prefork
prefork.initialisation_complete(log="file", max_servers=int(os.environ.get("PF_MAX", "4")),
                                max_wait=float(os.environ.get("PF_MAXWAIT", "1")),
                                idle_timeout=float(os.environ.get("PF_IDLE", "3600")),
                                autoreload=bool(os.environ.get("PF_AUTORELOAD")))
mode = sys.argv[1]
if mode == "ping":
    print("pong", sys.argv[2:], os.getppid())
elif mode == "hold":
    # hold [child] [ignore-int] EXIT: report pids, wait for stdin EOF, exit EXIT
    if "ignore-int" in sys.argv:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "1000"]) if "child" in sys.argv else None
    print("pids", os.getpid(), child.pid if child else 0, os.getppid(), flush=True)
    sys.stdin.buffer.read()
    print("done", os.getppid(), flush=True)
    sys.exit(int(sys.argv[-1]))
"""


@dataclass
class Rig:
    """A test's script, environment and process registry."""

    rundir: str
    env: dict[str, str]
    procs: ProcRegistry
    script: str = ""
    held: list[Held] = field(default_factory=list)

    def call(self, *args: str, env: dict[str, str] | None = None,
             client_args: tuple[str, ...] = ()) -> tuple[int, bytes, bytes]:
        """One call through the ``#!`` line (or the client with extra options)."""
        cmd = [str(CLIENT), "-U", *client_args, str(PYTHON), self.script] if client_args \
            else [self.script]
        return self.procs.run([*cmd, *args], env=env or self.env, cwd=self.rundir)

    def ping(self, *args: str, env: dict[str, str] | None = None,
             client_args: tuple[str, ...] = ()) -> int:
        """A call that must succeed silently; returns the pid of the server that served it."""
        rc, out, err = self.call("ping", *args, env=env, client_args=client_args)
        assert (rc, err) == (0, b""), (rc, out, err)
        head, pid = out.decode().rstrip("\n").rsplit(" ", 1)
        assert head == f"pong {list(args)!r}", out
        return int(pid)

    def hold(self, *flags: str, exit_code: int = 0, env: dict[str, str] | None = None) -> Held:
        """Start a call that reports its pids and runs until its stdin is closed."""
        h = start_held(self.procs, [self.script, "hold", *flags, str(exit_code)], exit_code,
                       env=env or self.env, cwd=self.rundir)
        self.held.append(h)
        return h


@pytest.fixture
def rig(rundir: str, env: dict[str, str], procs: ProcRegistry) -> Iterator[Rig]:
    """The reliability script in a fresh run directory.  Its servers stay with the
    shared watcher (the self-watch lock is held: these tests are about the watcher's part;
    a lone server that watches itself: ``test_reliability.py::``
    ``test_self_watching_server_lost_socket_lets_calls_finish``)."""
    lock = hold_self_watch(rundir)
    r = Rig(rundir, env, procs)
    r.script = write_script(rundir, "rel.py", SCRIPT)
    yield r
    os.close(lock)


@pytest.fixture
def lone_rig(rundir: str, env: dict[str, str], procs: ProcRegistry) -> Iterator[Rig]:
    """The reliability script in a fresh run directory, its server the self-watching one."""
    r = Rig(rundir, env, procs)
    r.script = write_script(rundir, "rel.py", SCRIPT)
    yield r


def all_gone(*pids: int) -> bool:
    """Every one of ``pids`` (0s ignored) is dead."""
    return all(gone(p) for p in pids if p)


# ------------------------------------------------------------------ start-up races


@pytest.mark.timeout(120)
def test_24_simultaneous_first_calls_start_one_server(rig: Rig) -> None:
    setups = os.path.join(rig.rundir, "setups")
    fifo = os.path.join(rig.rundir, "go")
    os.mkfifo(fifo, 0o600)
    env = dict(rig.env, PF_SETUP_LOG=setups, PF_SETUP_FIFO=fifo)
    clients = [rig.procs.popen([rig.script, "ping", str(i)], env=env, cwd=rig.rundir,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for i in range(24)]
    lock = os.path.join(rig.rundir, "l*")

    def in_flight(pid: int) -> bool:
        """Waiting for the lock, or connected (waiting for a greeting), or done."""
        try:
            links = fd_links(pid).values()
        except FileNotFoundError:
            return True
        return has_connected_socket(pid) or any(
            link.startswith(lock[:-1]) for link in links)

    # Setup is blocked on the FIFO; every client has reached the lock or the socket.
    wait_for(lambda: os.path.exists(setups), what="setup started")
    wait_for(lambda: all(in_flight(p.pid) for p in clients), timeout=60,
             what="all 24 clients waiting on the lock or the socket")
    wait_for(lambda: _open_writer(fifo), what="setup reading the FIFO")
    os.unlink(fifo)
    with open(fifo, "w"):  # a second setup (there must be none) would not block
        pass
    servers = set()
    for i, p in enumerate(clients):
        out, err = p.communicate(timeout=scaled(60))
        assert (p.returncode, err) == (0, b""), (i, out, err)
        word, arg, pid = out.decode().split(" ")
        assert (word, arg) == ("pong", repr([str(i)]))
        servers.add(int(pid))
    assert len(servers) == 1, servers
    with open(setups) as f:
        assert len(f.read().split()) == 1


def _open_writer(fifo: str) -> bool:
    """Open (and close) the FIFO's write end if a reader waits on it."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return False
    os.close(fd)
    return True


# ------------------------------------------------------------------ quitting servers


def test_call_to_a_stale_server_is_served_by_a_fresh_one(rig: Rig) -> None:
    """Autoreload: the server sees the script changed when the call arrives, quits (closing
    the pending connection), and the client starts a fresh server without a word."""
    env = dict(rig.env, PF_AUTORELOAD="1")
    first = rig.ping(env=env)
    birth = os.stat(socket_file(rig.rundir)).st_mtime_ns
    os.utime(rig.script, ns=(birth + 10**9, birth + 10**9))
    second = rig.ping("again", env=env)
    assert second != first
    wait_for(lambda: gone(first), what="the stale server gone")
    assert "reloading" in log_text(rig.rundir)


def test_idle_timeout_honoured_and_next_call_served(rig: Rig) -> None:
    env = dict(rig.env, PF_IDLE="0.3")
    t0 = time.monotonic()
    first = rig.ping(env=env)
    wait_for(lambda: gone(first), what="the idle server to quit")
    assert time.monotonic() - t0 >= 0.3
    assert "quitting: idle for 0.3s" in log_text(rig.rundir)
    # The shared watcher retires once its last server is gone.
    wait_for(lambda: not find_processes([rig.rundir]), what="the watcher gone with it")
    assert rig.ping(env=env) != first


def test_calls_racing_an_idle_timeout_are_all_served(rig: Rig) -> None:
    """With a tiny idle timeout the server is quitting just as calls arrive: every call is
    served anyway (by the old server or a fresh one) and the caller notices nothing."""
    env = dict(rig.env, PF_IDLE="0.005")
    servers = {rig.ping(str(i), env=env) for i in range(40)}
    assert len(servers) > 1  # the servers did quit in between


def test_call_waiting_while_server_quits_after_f_is_served_by_the_old_one(rig: Rig) -> None:
    """A call queued at a full server (max_servers=1, max_wait None) when another client's
    ``-f`` replaces it: it was accepted and greeted, so the old server, which accepts
    nothing more, serves it once its slot frees, as it finishes the running call; calls
    made after the ``-f`` reach the fresh server."""
    env = dict(rig.env, PF_MAX="1", PF_MAXWAIT="-1")
    a = rig.hold(exit_code=3, env=env)
    queued = rig.procs.popen([rig.script, "ping", "queued"], env=env, cwd=rig.rundir,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: has_connected_socket(queued.pid), what="the queued client connected")
    wait_for(lambda: asleep_in_epoll(a.server), what="old server idle")
    assert len(executors(a.server)) == 1  # max_servers=1: the queued call waits
    fresh = rig.ping("forced", env=env, client_args=("-f",))
    assert fresh != a.server
    assert rig.ping("after", env=env) == fresh
    assert not gone(a.executor) and queued.poll() is None
    a.finish()
    out, err = queued.communicate(timeout=scaled(30))
    assert (queued.returncode, out, err) == (0, f"pong ['queued'] {a.server}\n".encode(), b"")
    wait_for(lambda: gone(a.server), what="the old server gone after its last call")


@pytest.mark.parametrize("how", ["-f", "--kill"])
def test_f_and_kill_do_not_cut_running_calls(rig: Rig, how: str) -> None:
    a = rig.hold(exit_code=5)
    b = rig.hold(exit_code=0)
    watcher = watcher_of(socket_file(rig.rundir))
    if how == "-f":
        fresh = rig.ping("forced", client_args=("-f",))
        assert fresh != a.server
    else:
        rc, out, err = rig.call(client_args=("--kill",))
        assert (rc, out, err) == (0, b"", b"")
        assert not [n for n in os.listdir(rig.rundir) if n[0] in "sl"]
        # No server left for the shared watcher (with -f the fresh one keeps it).
        wait_for(lambda: gone(watcher), what="the watcher gone")
    wait_for(lambda: "stopped accepting (lost socket" in log_text(rig.rundir),
             what="the old server noticed")
    assert "2 running call(s) will finish first" in log_text(rig.rundir)
    assert not gone(a.executor) and not gone(b.executor)
    a.finish()
    b.finish()
    wait_for(lambda: gone(a.server), what="the old server gone after its calls")
    if how == "--kill":
        assert rig.ping() != a.server


# ------------------------------------------------------------------ killed processes


@pytest.mark.parametrize("flags", [("child",), ("child", "ignore-int")])
def test_client_killed_mid_call_ends_executor_and_its_group(rig: Rig,
                                                           flags: tuple[str, ...]) -> None:
    server = rig.ping()
    h = rig.hold(*flags)
    assert h.server == server and h.child
    h.proc.kill()
    h.proc.wait()
    t0 = time.monotonic()
    wait_for(lambda: all_gone(h.executor, h.child), timeout=1.0,
             what="executor and its child gone within a second")
    assert time.monotonic() - t0 < scaled(1.0)
    assert rig.ping() == server


def test_server_killed_mid_call(rig: Rig) -> None:
    """The client of the running call says so and exits 127; nothing of the old server is
    left (executor by PR_SET_PDEATHSIG, its process group by the client, the watcher by
    its sentinel); the next call starts a fresh server."""
    h = rig.hold("child")
    watcher = watcher_of(socket_file(rig.rundir))
    os.kill(h.server, signal.SIGKILL)
    assert h.proc.wait(timeout=scaled(10)) == 127
    assert h.proc.stderr is not None
    err = h.proc.stderr.read()
    assert err == b"prefork-interp: the server went away during the call (was it killed?)\n"
    wait_for(lambda: all_gone(h.server, h.executor, h.child, watcher),
             what="server, executor, its child and the watcher gone")
    fresh = rig.ping()
    assert fresh != h.server


def test_killed_watcher_takes_nothing_down(rig: Rig) -> None:
    """The shared watcher killed: the server finds its socket still its own, hands itself
    to a new watcher, and goes on serving, the running call untouched."""
    h = rig.hold(exit_code=4)
    watcher = watcher_of(socket_file(rig.rundir))
    os.kill(watcher, signal.SIGKILL)
    wait_for(lambda: "handed over to a new one" in log_text(rig.rundir),
             what="the server handed over to a new watcher")
    assert watcher_of(socket_file(rig.rundir)) != watcher
    assert rig.ping() == h.server
    h.finish()
    assert rig.ping() == h.server
    assert "lost socket" not in log_text(rig.rundir)


@pytest.mark.parametrize("fault", ["socket deleted", "socket replaced"])
def test_lost_socket_lets_calls_finish_then_a_fresh_server(rig: Rig, fault: str) -> None:
    h = rig.hold(exit_code=4)
    fresh = _lose_socket_and_drain(rig, h, fault)
    watcher_of(socket_file(rig.rundir))  # one watcher (a shared one, maybe started anew)
    assert rig.ping() == fresh


def _lose_socket_and_drain(rig: Rig, h: Held, fault: str) -> int:
    """Take the server's socket away (``fault``), see the server notice, a fresh server
    answer, the held call finish and the old server go; returns the fresh server's pid."""
    sock = socket_file(rig.rundir)
    if fault == "--kill":
        rc, out, err = rig.call(client_args=("--kill",))
        assert (rc, out, err) == (0, b"", b"")
    else:
        os.unlink(sock)
    if fault == "socket replaced":
        stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stranger.bind(sock)  # not listening: the next client replaces it in turn
        stranger.close()
    wait_for(lambda: "stopped accepting (lost socket" in log_text(rig.rundir),
             what="the server noticed")
    fresh = rig.ping()
    assert fresh != h.server
    assert not gone(h.executor)
    h.finish()
    wait_for(lambda: gone(h.server), what="the old server gone")
    return fresh


@pytest.mark.parametrize("fault", ["socket deleted", "socket replaced", "--kill"])
def test_self_watching_server_lost_socket_lets_calls_finish(lone_rig: Rig, fault: str) -> None:
    """A lone server (no watcher process: it watches itself) sees its socket go, lets its
    running call finish with its own status, and quits; the next call starts a fresh one."""
    rig = lone_rig
    h = rig.hold(exit_code=4)
    wait_for(lambda: not cmdline_pids("--shared", rig.rundir),
             what="the shared watcher to let the server go and retire")
    fresh = _lose_socket_and_drain(rig, h, fault)
    assert rig.ping() == fresh


@pytest.mark.timeout(120)
def test_watcher_failing_at_once_loses_no_call(rig: Rig) -> None:
    """A watcher that reports an error as soon as it starts (inotify exhausted, say) makes
    each server quit at once: 24 concurrent calls must all be served anyway, and the
    watcher's message is in the log.  (A server once crashed when the listening socket it
    had just closed on quitting was still in the same batch of events.)"""
    fake = os.path.join(rig.rundir, "fake-watcher")
    with open(fake, "w") as f:
        f.write("#!/bin/sh\n"
                "(echo 'prefork-watcher: inotify: simulated failure' >&2; exec cat >/dev/null) &\n")
    os.chmod(fake, 0o755)
    env = dict(rig.env, PREFORK_INTERP_WATCHER=fake)
    clients = [rig.procs.popen([rig.script, "ping", str(i)], env=env, cwd=rig.rundir,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for i in range(24)]
    for i, p in enumerate(clients):
        out, err = p.communicate(timeout=scaled(60))
        assert (p.returncode, err) == (0, b""), (i, out, err)
        assert out.decode().startswith(f"pong {[str(i)]!r} ")
    log = log_text(rig.rundir)
    assert "ERROR" in log and "watcher: prefork-watcher: inotify: simulated failure" in log
    assert "server failed" not in log


# ------------------------------------------------------------------ stale entries


def test_cleanup_of_stale_entries_spares_a_live_server(rig: Rig) -> None:
    """More than 100 idents: the cold start of another server removes the least recently
    used entries down to 100, but never the socket of a live server in use, however old
    its atime (relatime updates it at most daily)."""
    live = rig.hold()
    sock = socket_file(rig.rundir)
    t0 = 1_700_000_000 * 10**9
    fakes = []
    for k in range(105):
        ident = f"{k:064x}"
        for kind in "ls":
            with open(os.path.join(rig.rundir, kind + ident), "w"):
                pass
        os.utime(os.path.join(rig.rundir, "s" + ident), ns=(t0 + k * 10**10, t0))
        fakes.append(ident)
    mtime = os.stat(sock).st_mtime_ns
    os.utime(sock, ns=(t0 - 10**12, mtime))  # the oldest of all
    other = rig.ping(client_args=("-G", "another server"))  # cold start: cleans up first
    assert other != live.server
    # 106 idents before the start: the 6 oldest dead ones go, the live one stays.
    for ident in fakes[:6]:
        assert not os.path.exists(os.path.join(rig.rundir, "s" + ident))
        assert not os.path.exists(os.path.join(rig.rundir, "l" + ident))
    for ident in fakes[6:]:
        assert os.path.exists(os.path.join(rig.rundir, "s" + ident))
    assert os.path.exists(sock)
    assert os.path.exists(os.path.join(rig.rundir, "l" + os.path.basename(sock)[1:]))
    assert rig.ping() == live.server  # still the same server, still listening
    live.finish()


# ------------------------------------------------------------------ failing setups


def test_hanging_setup_times_out_and_leaves_nothing(rig: Rig) -> None:
    go = os.path.join(rig.rundir, "go")
    env = dict(rig.env, PF_SETUP_HANG_UNLESS=go, PREFORK_INTERP_SETUP_TIMEOUT="1")
    t0 = time.monotonic()
    rc, out, err = rig.call("ping", env=env)
    elapsed = time.monotonic() - t0
    assert (rc, out) == (127, b"")
    assert err == (b"prefork-interp: setup timed out: the script did not reach "
                   b"prefork.initialisation_complete() within 1s "
                   b"(set PREFORK_INTERP_SETUP_TIMEOUT to wait longer)\n")
    assert 1.0 <= elapsed < 1.0 + scaled(5)
    lock = [n for n in os.listdir(rig.rundir) if n.startswith("l")]
    assert len(lock) == 1
    fd = try_lock_file(os.path.join(rig.rundir, lock[0]))
    assert fd is not None, "the lock is still held"
    os.close(fd)
    assert not [n for n in os.listdir(rig.rundir) if n.startswith("s")]
    wait_for(lambda: not find_processes([rig.rundir]), what="no half-started server left")
    with open(go, "w"):
        pass
    assert rig.ping(env=env)


@pytest.mark.parametrize("case", ["missing", "not executable", "directory"])
def test_interpreter_that_cannot_run(rig: Rig, case: str) -> None:
    interp = os.path.join(rig.rundir, "interp")
    if case == "not executable":
        with open(interp, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(interp, 0o644)
    elif case == "directory":
        os.mkdir(interp)
    reason = "No such file or directory" if case == "missing" else "Permission denied"
    rc, out, err = rig.procs.run([str(CLIENT), "-U", interp, rig.script, "ping"], env=rig.env,
                                 cwd=rig.rundir)
    assert (rc, out) == (127, b"")
    assert err == f"prefork-interp: execute {interp}: {reason}\n".encode()
    _nothing_left(rig)


def test_script_not_calling_initialisation_complete(rig: Rig) -> None:
    script = write_script(rig.rundir, "plain.py", "x = 1\n")
    rc, out, err = rig.procs.run([script], env=rig.env, cwd=rig.rundir)
    assert (rc, out) == (127, b"")
    assert err == (b"prefork-interp: setup failed: initial monitor process quit (maybe the "
                   b"script didn't call prefork.initialisation_complete()?)\n")
    _nothing_left(rig)


def test_script_failing_before_initialisation_complete_passes_its_status(rig: Rig) -> None:
    script = write_script(rig.rundir, "fail.py", "import sys\nsys.exit(3)\n")
    rc, out, err = rig.procs.run([script], env=rig.env, cwd=rig.rundir)
    assert (rc, out) == (3, b"")
    assert err.startswith(b"prefork-interp: setup failed: the script ended (exit status 3) "
                          b"before prefork.initialisation_complete() made it a server\n"
                          b"prefork-interp: the interpreter was ")  # tests/test_interp_choice
    _nothing_left(rig)


def test_bad_setup_timeout_value(rig: Rig) -> None:
    env = dict(rig.env, PREFORK_INTERP_SETUP_TIMEOUT="soon")
    rc, out, err = rig.call("ping", env=env)
    assert (rc, out) == (127, b"")
    assert err == (b"prefork-interp: PREFORK_INTERP_SETUP_TIMEOUT='soon' is not a number "
                   b"of seconds\n")


def _nothing_left(rig: Rig) -> None:
    """No socket, a free lock, and no process of the failed start."""
    names = os.listdir(rig.rundir)
    assert not [n for n in names if n.startswith("s")]
    for n in names:
        if n.startswith("l"):
            fd = try_lock_file(os.path.join(rig.rundir, n))
            assert fd is not None, "the lock is still held"
            os.close(fd)
    wait_for(lambda: not find_processes([rig.rundir]), what="no process left")


# ------------------------------------------------------------------ load


def test_max_servers_calls_wait_and_are_served_in_turn(rig: Rig) -> None:
    env = dict(rig.env, PF_MAX="2", PF_MAXWAIT="-1")
    first, second = rig.hold(env=env), rig.hold(env=env)
    server = first.server
    waiting = [rig.procs.popen([rig.script, "hold", "0"], env=env, cwd=rig.rundir,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE) for _ in range(2)]
    wait_for(lambda: all(has_connected_socket(p.pid) for p in waiting),
             what="the waiting clients connected")

    def running() -> list[int]:
        # Asleep in epoll_wait with connections pending: it is not listening (it is full).
        wait_for(lambda: asleep_in_epoll(server), what="server idle")
        return sorted(pid for pid, state in executors(server) if state != "Z")

    assert running() == sorted([first.executor, second.executor])
    first.finish()
    started = _next_started(waiting)
    assert len(running()) == 2
    second.finish()
    assert _next_started([p for p in waiting if p is not started]) is not started
    assert len(running()) == 2
    for p in waiting:
        out, err = p.communicate(timeout=scaled(10))  # closes its stdin: the call ends
        assert (p.returncode, err) == (0, b"")
        assert out == f"done {server}\n".encode()


def _next_started(waiting: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """The waiting call that starts next (its executor prints a ``pids`` line); the others
    must print nothing meanwhile."""
    fds = {p.stdout.fileno(): p for p in waiting if p.stdout is not None}
    ready = select.select(list(fds), [], [], scaled(10))[0]
    assert len(ready) == 1, f"{len(ready)} waiting calls started at once"
    p = fds[ready[0]]
    assert Lines(ready[0]).line().startswith(b"pids ")
    return p


# ------------------------------------------------------------------ the ready executor (spare)


def _the_spare(server: int) -> int:
    """The server's spare, once it has settled (titled ``[spare]``, nothing else forking)."""
    found: list[int] = []

    def one() -> bool:
        found[:] = spares(server)
        return len(found) == 1 and title(found[0]).endswith(" [spare]")
    wait_for(one, what="the server's spare")
    return found[0]


def test_spare_is_ready_holds_nothing_and_is_not_a_call(rig: Rig) -> None:
    """Between calls the server keeps one executor forked ahead: in its own process group,
    holding only /dev/null on 0/1/2 and its end of the hand-over socket (no listening
    socket, watcher pipe, log or call of the server's), every signal blocked; it takes the
    next call (that call's executor is that very process), and another is forked."""
    server = rig.ping("first")
    spare = _the_spare(server)
    assert os.getpgid(spare) == spare
    links = fd_links(spare)
    assert {links[fd] for fd in (0, 1, 2)} == {os.devnull}, links
    assert sorted(links) == [0, 1, 2, max(links)] and links[max(links)].startswith("socket:")
    blocked = signal_mask(spare, "SigBlk")
    assert blocked & (1 << (signal.SIGTERM - 1)) and blocked & (1 << (signal.SIGINT - 1))
    held = rig.hold()
    assert held.executor == spare and held.server == server
    assert spares(server) == []  # the next one is forked once this call has ended
    held.finish()
    assert _the_spare(server) != spare


def test_spare_killed_is_replaced_and_the_call_served(rig: Rig) -> None:
    """A spare that dies before its call (killed by someone): the server notes it in its
    log, and the next call is served by a new executor, with nothing lost."""
    server = rig.ping("first")
    spare = _the_spare(server)
    os.kill(spare, signal.SIGKILL)
    wait_for(lambda: "ended before it had a call" in log_text(rig.rundir),
             what="the server to note the lost spare")
    assert rig.ping("second") == server
    assert _the_spare(server) != spare


def test_spare_goes_with_its_server(rig: Rig) -> None:
    """The spare ends with its server: when the server quits (``--kill``) and when it is
    killed outright (PDEATHSIG)."""
    server = rig.ping("first")
    spare = _the_spare(server)
    rc, _out, err = rig.call(client_args=("--kill",))
    assert (rc, err) == (0, b"")
    wait_for(lambda: all_gone(server, spare), what="the server and its spare gone")
    server = rig.ping("again")
    spare = _the_spare(server)
    os.kill(server, signal.SIGKILL)
    wait_for(lambda: all_gone(server, spare), what="the spare gone with its server")
    assert rig.ping("fresh") != server


def test_call_with_unusable_stdio_encoding_fails_clearly_and_the_next_is_served(
        rig: Rig) -> None:
    """A call whose environment names an unknown PYTHONIOENCODING (a direct run would die at
    start-up) gets one clear line and status 127; the server, whose next spare is forked
    with that environment, serves the calls after it as usual."""
    server = rig.ping("first")
    bad = dict(rig.env, PYTHONIOENCODING="no-such-codec")
    rc, out, err = rig.call("ping", env=bad)
    assert (rc, out) == (127, b"")
    assert err.startswith(b"prefork: failed to set up the executor: LookupError(") \
        and b"no-such-codec" in err and err.count(b"\n") == 1, err
    assert rig.ping("after", env=bad | {"PYTHONIOENCODING": "utf-8"}) == server
    assert rig.ping("again") == server
