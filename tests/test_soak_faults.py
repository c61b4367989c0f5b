"""Soak under faults (issue 11, ``make soak``): 10,000 calls while the servers are hit.

Calls go through our client and the script's ``#!`` line, ``WORKERS`` at a time
(``PF_SOAK_CALLS`` changes the count, for a quick look).  Every ``INTERVAL`` completed calls
a fault thread applies the next fault of the mix:

phase A (the first 70% of the calls), every fault in turn:
  server-term     SIGTERM to the server (it finishes its calls and quits)
  server-kill     SIGKILL to the server (its executors die with it: PR_SET_PDEATHSIG)
  watcher-kill    SIGKILL to the server's watcher (the server drains and quits)
  force           a call with ``-f`` (a fresh server; the old one finishes its calls)
  kill-option     ``prefork-interp --kill`` (the server drains and quits)
  ctl-kill        ``prefork-ctl kill --all``
  deploy          the script replaced by a copy (``mv new old``: autoreload)
  + the phase B faults
phase B (the rest: one server throughout, measured at its start and end):
  client-kill     SIGKILL to the client of a running (slow) call
  executor-kill   SIGKILL to the executor of a running (slow) call
  idle-conns      40 connections that never send a request, held for a while
  emfile          the server's fd limit lowered to what it holds + 4 (prlimit), plus idle
                  connections to use those up; both undone after a while

A call is *lost* when it does not give the script's real output and exit status, unless the
mix killed it on purpose: its client was killed; its executor was killed (then its client
must die of SIGKILL, or give the normal result if the executor had finished); or it was in
flight when its server was SIGKILLed and failed with 127 (a server killed outright takes its
running calls with it, by design).  Any other failure, a hang, or a wrong output is lost.

Reported (and asserted): calls lost (0), the phase-B server's fd count and RSS at its start
and end (fds equal, RSS within ``RSS_GROWTH_KIB``), its and its watcher's CPU while idle
(~0), no zombie, and at the end exactly one server and one watcher.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from _procfacts import asleep_in_epoll, executors, log_text
from harness import (
    CLIENT,
    PYTHON,
    VENV_BIN,
    hold_self_watch,
    poll_until,
    scaled,
    wait_for,
    write_script,
)
from procfs import children, cmdline_pids, fd_count, gone, listening_pid, rss_kib, title

CALLS = int(os.environ.get("PF_SOAK_CALLS", "10000"))
WORKERS = 4
INTERVAL = 120  # completed calls between faults
PHASE_A = 0.7
SLOW = 16  # calls with n % SLOW == 1 run for a while: targets for client/executor kills
RSS_GROWTH_KIB = 1024
IDLE_CPU_WINDOW = 2.0  # seconds over which idle CPU is measured (a measurement, not a wait)

SCRIPT = """
import os, select, sys
import prefork
prefork.initialisation_complete(log="file")  # autoreload on: the deploys need it
n = int(sys.argv[1])
if n % {slow} == 1:
    select.select([], [], [], 0.25)  # a call that runs a while
print(n, os.getppid(), flush=True)
sys.exit(3 if n % 10 == 0 else 0)
"""

PHASE_A_FAULTS = ["server-term", "client-kill", "server-kill", "idle-conns", "watcher-kill",
                  "executor-kill", "force", "emfile", "kill-option", "ctl-kill", "deploy"]
PHASE_B_FAULTS = ["client-kill", "executor-kill", "idle-conns", "emfile"]


@dataclass
class Outcome:
    n: int
    start: float
    end: float
    rc: int
    out: bytes
    err: bytes


@dataclass
class State:
    """Shared between the callers and the fault thread."""

    script: str
    rundir: str
    env: dict[str, str]
    lock: threading.Lock = field(default_factory=threading.Lock)
    cond: threading.Condition = field(init=False)
    completed: int = 0
    running: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    client_killed: set[int] = field(default_factory=set)
    executor_killed: set[int] = field(default_factory=set)
    server_kills: list[float] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    fault_log: list[tuple[float, str]] = field(default_factory=list)  # (start, fault)
    stop: bool = False
    extra_n: int = 10**6  # call numbers for the fault thread's own calls (-f)

    def __post_init__(self) -> None:
        self.cond = threading.Condition(self.lock)


def _expected(n: int, server: int | None = None) -> tuple[int, bytes]:
    return (3 if n % 10 == 0 else 0), f"{n} {server}\n".encode() if server else b""


def _call(st: State, n: int, extra: tuple[str, ...] = ()) -> None:
    cmd = [str(CLIENT), "-U", *extra, str(PYTHON), st.script, str(n)] if extra \
        else [st.script, str(n)]
    start = time.monotonic()
    p = subprocess.Popen(cmd, env=st.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    with st.lock:
        st.running[n] = p
    try:
        out, err = p.communicate(timeout=scaled(120))
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        err += b"\n[soak: hung, killed after the timeout]"
    with st.cond:
        st.running.pop(n, None)
        st.outcomes[n] = Outcome(n, start, time.monotonic(), p.returncode, out, err)
        st.completed += 1
        st.cond.notify_all()


def _server_of(st: State) -> int | None:
    """The live server listening on the script's socket, if any."""
    for name in os.listdir(st.rundir):
        if name.startswith("s"):
            pid = listening_pid(os.path.join(st.rundir, name))
            if pid is not None:
                return pid
    return None


def _wait_calls(st: State, count: int, seconds: float) -> None:
    """Until ``count`` more calls completed, or ``seconds`` passed (calls may be stalled by
    the fault itself), or the soak is over."""
    deadline = time.monotonic() + scaled(seconds)
    with st.cond:
        target = st.completed + count
        while st.completed < target and not st.stop:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            st.cond.wait(left)


def _idle_connections(path: str, count: int) -> list[socket.socket]:
    conns = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except (BlockingIOError, FileNotFoundError, ConnectionRefusedError):
            s.close()
            break
        conns.append(s)
    return conns


def _slow_running(st: State) -> list[int]:
    with st.lock:
        return [n for n in st.running if n % SLOW == 1 and n < 10**6]


def _slow_executors(st: State, server: int) -> list[tuple[int, int]]:
    """``(executor pid, call number)`` of the server's executors running slow calls."""
    slow = set(_slow_running(st))
    found = []
    for pid, _state in executors(server):
        words = title(pid).split()
        if words and words[-1].isdigit() and int(words[-1]) in slow:
            found.append((pid, int(words[-1])))
    return found


def _apply(st: State, fault: str) -> None:
    with st.lock:
        st.fault_log.append((time.monotonic(), fault))
    server = _server_of(st)
    sock_paths = [os.path.join(st.rundir, n) for n in os.listdir(st.rundir) if n[0] == "s"]
    if fault == "server-term" and server:
        os.kill(server, signal.SIGTERM)
    elif fault == "server-kill" and server:
        with st.lock:
            st.server_kills.append(time.monotonic())
        os.kill(server, signal.SIGKILL)
    elif fault == "watcher-kill" and sock_paths:
        for pid in cmdline_pids("prefork-watcher", sock_paths[0]):
            os.kill(pid, signal.SIGKILL)
    elif fault == "force":
        with st.lock:
            st.extra_n += 1
            n = st.extra_n
        _call(st, n, ("-f",))
    elif fault == "kill-option":
        subprocess.run([str(CLIENT), "--kill", "-U", str(PYTHON), st.script], env=st.env,
                       capture_output=True, timeout=scaled(60), check=True)
    elif fault == "ctl-kill":
        subprocess.run([str(VENV_BIN / "prefork-ctl"), "kill", "--all"], env=st.env,
                       capture_output=True, timeout=scaled(60), check=False)
    elif fault == "deploy":
        new = st.script + ".new"
        with open(st.script, "rb") as f, open(new, "wb") as g:
            g.write(f.read())
        os.chmod(new, 0o755)
        os.rename(new, st.script)
    elif fault == "client-kill":
        for n in poll_until(lambda: _slow_running(st), 2.0)[:2]:
            with st.lock:
                p = st.running.get(n)
                if p is None:
                    continue
                st.client_killed.add(n)
            p.kill()
    elif fault == "executor-kill" and server:
        for pid, n in poll_until(lambda: _slow_executors(st, server), 2.0)[:1]:
            with st.lock:
                st.executor_killed.add(n)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    elif fault == "idle-conns" and sock_paths:
        conns = _idle_connections(sock_paths[0], 40)
        try:
            _wait_calls(st, 40, 3.0)
        finally:
            for c in conns:
                c.close()
    elif fault == "emfile" and server:
        try:
            soft, hard = resource.prlimit(server, resource.RLIMIT_NOFILE)
            resource.prlimit(server, resource.RLIMIT_NOFILE, (fd_count(server) + 4, hard))
        except (ProcessLookupError, OSError):
            return
        conns = _idle_connections(sock_paths[0], 12) if sock_paths else []
        try:
            _wait_calls(st, 20, 2.0)
        finally:
            for c in conns:
                c.close()
            try:
                resource.prlimit(server, resource.RLIMIT_NOFILE, (soft, hard))
            except (ProcessLookupError, OSError):
                pass
    else:
        return
    with st.lock:
        st.faults[fault] = st.faults.get(fault, 0) + 1


def _fault_thread(st: State, faults: list[str], errors: list[BaseException]) -> None:
    i = 0
    try:
        while True:
            _wait_calls(st, INTERVAL, 3600)
            if st.stop:
                return
            _apply(st, faults[i % len(faults)])
            i += 1
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def _run(st: State, numbers: range, faults: list[str]) -> None:
    """The calls ``numbers``, WORKERS at a time, with ``faults`` applied meanwhile."""
    errors: list[BaseException] = []
    st.stop = False
    thread = threading.Thread(target=_fault_thread, args=(st, faults, errors)) if faults \
        else None
    if thread is not None:
        thread.start()
    try:
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(lambda n: _call(st, n), numbers))
    finally:
        with st.cond:
            st.stop = True
            st.cond.notify_all()
        if thread is not None:
            thread.join()
    assert not errors, errors


def _lost(st: State) -> tuple[list[Outcome], dict[str, int]]:
    lost = []
    kinds = {"ok": 0, "client killed": 0, "executor killed": 0, "died with the server": 0}
    for o in st.outcomes.values():
        if o.n in st.client_killed:
            kinds["client killed"] += 1
            continue
        rc, _ = _expected(o.n)
        words = o.out.split()
        normal = (o.rc == rc and o.err == b"" and len(words) == 2
                  and words[0] == str(o.n).encode() and words[1].isdigit())
        if normal:
            kinds["ok"] += 1
        elif o.n in st.executor_killed and o.rc == -signal.SIGKILL:
            kinds["executor killed"] += 1
        elif o.rc == 127 and any(o.start <= t <= o.end for t in st.server_kills):
            kinds["died with the server"] += 1
        else:
            lost.append(o)
    return lost, kinds


def _watchers(rundir: str) -> list[int]:
    return [p for p in cmdline_pids("prefork-watcher", rundir) if not gone(p)]


def _idle(server: int) -> bool:
    return not executors(server) and asleep_in_epoll(server)


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_under_faults(rundir: str, env: dict[str, str]) -> None:
    # Every server with the shared watcher (none watches itself): its kills are a fault.
    self_lock = hold_self_watch(rundir)
    script = write_script(rundir, "soakf.py", SCRIPT.format(slow=SLOW))
    st = State(script, rundir, env)
    t0 = time.monotonic()
    split = int(CALLS * PHASE_A)
    _run(st, range(split), PHASE_A_FAULTS)
    # phase B: one server throughout; a fault-free warm-up, then measured at idle
    warm = min(200, (CALLS - split) // 4)
    _run(st, range(split, split + warm), [])
    server = _server_of(st)
    assert server is not None
    wait_for(lambda: _idle(server), what="the phase-B server idle")
    fds0, rss0 = fd_count(server), rss_kib(server)
    _run(st, range(split + warm, CALLS), PHASE_B_FAULTS)
    wait_for(lambda: _idle(server), what="the phase-B server idle at the end")
    fds1, rss1 = fd_count(server), rss_kib(server)
    elapsed = time.monotonic() - t0
    # servers told to quit, and their watchers, are gone once their calls are done
    wait_for(lambda: len(_watchers(rundir)) == 1, what="one watcher left")
    watchers = _watchers(rundir)
    cpu0 = {pid: _cpu_ticks(pid) for pid in [server, *watchers]}
    select.select([], [], [], IDLE_CPU_WINDOW)  # measuring idle CPU over a window
    idle_ticks = {pid: _cpu_ticks(pid) - t for pid, t in cpu0.items()}
    os.close(self_lock)
    hz = os.sysconf("SC_CLK_TCK")

    lost, kinds = _lost(st)
    phase_b_servers = {o.out.split()[1] for o in st.outcomes.values()
                       if o.n >= split and o.n < 10**6 and o.rc in (0, 3)
                       and len(o.out.split()) == 2}
    zombies = [pid for pid, state in children(server) if state == "Z"]
    servers_left = [p for p in cmdline_pids("[server]") if rundir in title(p)]
    print(f"\nsoak under faults: {len(st.outcomes)} calls in {elapsed:.0f}s; faults {st.faults}; "
          f"outcomes {kinds}; lost {len(lost)}\n"
          f"phase-B server {server}: fds {fds0} -> {fds1}, RSS {rss0} -> {rss1} KiB; "
          f"idle CPU over {IDLE_CPU_WINDOW:g}s (s): "
          f"{ {pid: t / hz for pid, t in idle_ticks.items()} }")
    for o in lost[:10]:
        before = [f for t, f in st.fault_log if t <= o.end][-2:]
        print(f"  lost call {o.n} (after faults {before}): rc {o.rc} out {o.out[:80]!r} "
              f"err {o.err[-300:]!r}")
    if lost:
        print("server log, errors and warnings:")
        for line in log_text(rundir).splitlines():
            if "ERROR" in line or "failed" in line:
                print("  " + line[:300])
    assert not lost, f"{len(lost)} calls lost"
    if split // INTERVAL > len(PHASE_A_FAULTS):  # every fault had its turn
        assert st.faults.keys() >= set(PHASE_A_FAULTS) - {"executor-kill", "client-kill"}, \
            st.faults
    assert phase_b_servers == {str(server).encode()}, phase_b_servers
    assert fds1 == fds0
    assert rss1 - rss0 <= RSS_GROWTH_KIB
    assert all(t <= 2 for t in idle_ticks.values()), idle_ticks
    assert not zombies
    assert len(watchers) == 1 and servers_left == [server], (watchers, servers_left)
