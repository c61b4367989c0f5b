"""Many servers in one run directory (issue 15): one shared watcher and one inotify instance
for all of them, each told only what concerns it, none taken down by the watcher's death,
and idle servers that let their spare go.

Real clients, servers and watchers in the test's own run directory.  Waits poll a fact (a
pid gone, a log line, the watcher's ``--list``) against a deadline; nothing sleeps.
Instances are counted as open files (``kcmp``): the fd a server holds on its watcher's
instance (to check staleness per call without a round trip) is that instance, not another.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import subprocess
import time
from collections.abc import Sequence

import psutil
import pytest
from harness import (
    CLIENT,
    PYTHON,
    REPO,
    VENV_BIN,
    ProcRegistry,
    find_processes,
    wait_for,
    write_script,
)

pytestmark = pytest.mark.timeout(300)

PY = str(PYTHON)
WATCHER = str(VENV_BIN / "prefork-watcher")
#: The servers started and stopped (the run directory's cleanup limit: ~10 s here).
COUNT = 100

SCRIPT = """\
import os, sys
import prefork
prefork.initialisation_complete({opts})
print(os.getppid())
"""

_SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(platform.machine())
_libc = ctypes.CDLL(None, use_errno=True)


def _same_file(a: tuple[int, int], b: tuple[int, int]) -> bool:
    assert _SYS_KCMP is not None, f"kcmp syscall number unknown on {platform.machine()}"
    return int(_libc.syscall(_SYS_KCMP, a[0], b[0], 0, a[1], b[1])) == 0


def inotify_fds(pids: Sequence[int]) -> list[tuple[int, int]]:
    out = []
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
                        out.append((pid, int(fd)))
                except OSError:
                    continue
        except OSError:
            continue
    return out


def instances(pids: Sequence[int]) -> list[tuple[int, int]]:
    """One (pid, fd) per distinct inotify instance held by ``pids``."""
    distinct: list[tuple[int, int]] = []
    for fd in inotify_fds(pids):
        if not any(_same_file(fd, other) for other in distinct):
            distinct.append(fd)
    return distinct


def shared_watchers(rundir: str) -> list[int]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        argv = p.info["cmdline"] or []
        if "--shared" in argv and rundir in argv and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p.info["pid"])
    return found


def listing(rundir: str, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run([WATCHER, "--list", rundir], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.splitlines()}


class Servers:
    """``n`` trivial scripts in the run directory, each with its server."""

    def __init__(self, rundir: str, env: dict[str, str], procs: ProcRegistry, n: int,
                 opts: str = "") -> None:
        self.rundir, self.env, self.procs = rundir, env, procs
        body = SCRIPT.format(opts=opts)
        self.scripts = [write_script(rundir, f"t{i:03d}.py", body, shebang=f"{CLIENT} -U,{PY}")
                        for i in range(n)]
        self.pids = [self.call(s) for s in self.scripts]

    def call(self, script: str) -> int:
        """Run ``script`` once: the pid of the server that served it."""
        rc, out, err = self.procs.run([script], env=self.env, cwd=self.rundir)
        assert (rc, err) == (0, b""), (rc, err)
        return int(out)

    def kill(self, script: str) -> None:
        rc, _, err = self.procs.run([CLIENT, "--kill", "-U", PY, script], env=self.env,
                                    cwd=self.rundir)
        assert (rc, err) == (0, b"")

    def log(self) -> str:
        text = ""
        for name in sorted(os.listdir(self.rundir)):
            if name.endswith(".log"):
                with open(os.path.join(self.rundir, name), errors="replace") as f:
                    text += f.read()
        return text


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _start_and_stop(rundir: str, env: dict[str, str], procs: ProcRegistry, n: int) -> None:
    t0 = time.monotonic()
    servers = Servers(rundir, env, procs, n)
    assert len(set(servers.pids)) == n
    (watcher,) = shared_watchers(rundir)
    everything = sorted(find_processes([rundir]))
    # Per server: the server and (until it is let go) its spare; and one watcher for all.
    assert watcher in everything
    assert len(everything) <= 2 * n + 1
    # Two inotify instances: the shared watcher's (every server's staleness check holds a
    # dup of it), and the first server's own (it watches itself: see selfwatch.py).
    distinct = instances(everything)
    assert len(distinct) == 2, f"inotify instances: {distinct}"
    watcher_fd = inotify_fds([watcher])[0]
    assert sum(_same_file(d, watcher_fd) for d in distinct) == 1
    own = [d for d in distinct if not _same_file(d, watcher_fd)]
    assert [pid for pid, _ in own] == [servers.pids[0]]
    assert len(listing(rundir, env)) == n  # n - 1 servers, and the "inotify" line
    # Every server still answers, and it is the same one.
    assert [servers.call(s) for s in servers.scripts[:3]] == servers.pids[:3]
    for s in servers.scripts:
        servers.kill(s)
    wait_for(lambda: all(_gone(p) for p in servers.pids), timeout=120, what="servers to quit")
    wait_for(lambda: not find_processes([rundir]), timeout=60,
             what="the watcher to retire after the last server")
    assert not os.path.exists(os.path.join(rundir, "pwatcher.sock"))
    print(f"\n{n} servers started and stopped in {time.monotonic() - t0:.1f}s")


def test_hundred_servers_share_one_watcher_and_one_inotify_instance(
        rundir: str, env: dict[str, str], procs: ProcRegistry) -> None:
    _start_and_stop(rundir, env, procs, COUNT)


def test_socket_replaced_only_that_server_quits(rundir: str, env: dict[str, str],
                                                procs: ProcRegistry) -> None:
    servers = Servers(rundir, env, procs, 4)
    a, b, c, d = servers.scripts  # a watches itself, the others are the shared watcher's
    servers.kill(b)  # removes its socket: the watcher tells that server alone
    wait_for(lambda: _gone(servers.pids[1]), what="the killed server to quit")
    assert servers.call(a) == servers.pids[0]
    assert servers.call(c) == servers.pids[2]
    assert len(listing(rundir, env)) == 3  # c, d and the "inotify" line
    fresh = servers.call(b)
    assert fresh not in servers.pids
    assert len(shared_watchers(rundir)) == 1
    servers.kill(a)  # the self-watching server sees its own socket go
    wait_for(lambda: _gone(servers.pids[0]), what="the killed self-watching server to quit")
    assert servers.call(c) == servers.pids[2]
    assert servers.call(d) == servers.pids[3]


def test_server_death_drops_its_entry(rundir: str, env: dict[str, str],
                                      procs: ProcRegistry) -> None:
    servers = Servers(rundir, env, procs, 3)  # the first one watches itself
    os.kill(servers.pids[1], signal.SIGKILL)
    wait_for(lambda: len(listing(rundir, env)) == 2, what="the dead server's entry dropped")
    assert servers.call(servers.scripts[2]) == servers.pids[2]


def test_killed_watcher_takes_no_server_down(rundir: str, env: dict[str, str],
                                             procs: ProcRegistry) -> None:
    """The servers find their sockets still theirs, hand themselves to a new shared watcher
    and carry on; that watcher does the old one's job (staleness, sockets)."""
    servers = Servers(rundir, env, procs, 3)  # the first one watches itself
    (old,) = shared_watchers(rundir)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: servers.log().count("handed over to a new one") == 2,
             what="every server of the watcher handed over to a new one")
    (new,) = shared_watchers(rundir)
    assert new != old
    assert len(listing(rundir, env)) == 3
    assert [servers.call(s) for s in servers.scripts] == servers.pids
    assert len(instances(find_processes([rundir]))) == 2
    # The new watcher tells of an edit, in time for the next call.
    script = servers.scripts[2]
    st = os.stat(script)
    os.utime(script, ns=(st.st_atime_ns, time.time_ns() + 10**9))
    assert servers.call(script) != servers.pids[2]
    # ... and of a socket removed.
    servers.kill(servers.scripts[1])
    wait_for(lambda: _gone(servers.pids[1]), what="the killed server to quit")
    assert servers.call(servers.scripts[0]) == servers.pids[0]


def test_lone_server_watches_itself(rundir: str, env: dict[str, str],
                                    procs: ProcRegistry) -> None:
    """One server in a run directory: it takes the self-watch lock, lets the shared watcher
    go (which retires), and sees to its own socket and files with its own inotify
    instance -- an idle one quits at an edit, with no call to look; the next server to
    start is the self-watching one."""
    servers = Servers(rundir, env, procs, 1)
    pid = servers.pids[0]
    wait_for(lambda: not shared_watchers(rundir), what="the shared watcher to retire")
    assert not os.path.exists(os.path.join(rundir, "pwatcher.sock"))
    wait_for(lambda: set(find_processes([rundir])) <= {pid, *(c.pid for c in
                                                              psutil.Process(pid).children())},
             what="the server (and its spare) alone")
    assert [p for p, _ in instances([pid])] == [pid]
    assert servers.call(servers.scripts[0]) == pid
    script = servers.scripts[0]
    st = os.stat(script)
    os.utime(script, ns=(st.st_atime_ns, time.time_ns() + 10**9))
    wait_for(lambda: _gone(pid), what="the idle server to quit at the edit")
    assert "reloading" in servers.log()
    fresh = servers.call(script)  # the lock was released with the server: this one has it
    assert fresh != pid
    wait_for(lambda: not shared_watchers(rundir), what="the shared watcher to retire again")
    servers.kill(script)
    wait_for(lambda: _gone(fresh), what="the self-watching server to quit when its socket goes")
    wait_for(lambda: not find_processes([rundir]), what="nothing left")


def test_edit_seen_by_the_very_next_call(rundir: str, env: dict[str, str],
                                         procs: ProcRegistry) -> None:
    """Staleness is event-driven but never late: a call made after an edit is served by a
    fresh server, the edit noticed in the same turn (the server checks the watcher's
    inotify fd and busy lock before it accepts)."""
    servers = Servers(rundir, env, procs, 2)
    pid = servers.pids[0]
    for _ in range(5):
        script = servers.scripts[0]
        os.utime(script, ns=(time.time_ns(), time.time_ns() + 10**9))
        fresh = servers.call(script)
        assert fresh != pid
        pid = fresh
    assert servers.call(servers.scripts[1]) == servers.pids[1]  # not the other server
    assert "reloading" in servers.log()


def test_idle_server_lets_its_spare_go(rundir: str, env: dict[str, str],
                                       procs: ProcRegistry) -> None:
    servers = Servers(rundir, env, procs, 1, opts="spare_idle=0.2")
    server = psutil.Process(servers.pids[0])
    wait_for(lambda: not server.children(), what="the idle server's spare let go")
    assert servers.call(servers.scripts[0]) == servers.pids[0]
    wait_for(lambda: not server.children(), what="the spare let go again")
    assert "server failed" not in servers.log()


#: Modules an idle server of a trivial script must not hold (each costs every idle server
#: 0.3 to 1.6 MB, see docs/performance.md "Idle servers"): what the server needs of them it
#: takes from their C cores (``_ctypes`` through ``prefork.common.cfunc``, ``_signal``,
#: ``_socket``, ``_locale``, ``_weakref``), and what only some calls need is imported then.
KEPT_OUT = ("argparse", "collections", "ctypes", "enum", "fnmatch", "functools", "glob",
            "importlib.util", "json", "locale", "logging", "math", "pathlib", "platform", "re",
            "selectors", "signal", "socket", "threading", "typing", "weakref")

LIST_MODULES = """\
import prefork
prefork.initialisation_complete()
import sys
print(" ".join(sorted(sys.modules)))
"""


def test_idle_server_imports_only_what_it_needs(rundir: str, env: dict[str, str],
                                                procs: ProcRegistry) -> None:
    """A trivial script's server (no ``site``, as an installed script with ``-S`` runs)
    holds none of ``KEPT_OUT``: an executor is a copy of the server, and the third call's
    was forked after the server had logged and recorded earlier calls."""
    site = subprocess.run([PY, "-c", "import site; print(site.getsitepackages()[0])"],
                          check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    env = dict(env, PYTHONPATH=os.pathsep.join([str(REPO), site]))
    script = write_script(rundir, "mods.py", LIST_MODULES, shebang=f"{CLIENT} -U,{PY},-S")
    outs = []
    for _ in range(3):
        rc, out, err = procs.run([script], env=env, cwd=rundir)
        assert (rc, err) == (0, b""), (rc, err)
        outs.append(set(out.decode().split()))
    assert "prefork.server.loop" in outs[-1]  # it did run in a server
    for mods in outs:
        assert sorted(set(KEPT_OUT) & mods) == []
