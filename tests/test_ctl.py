"""Tests for prefork-ctl, against real servers started through real clients.

Four kinds of server: our client or the reference C client (``/usr/bin/prefork-interp``),
each driving our Python script side or the reference Perl one (``Proc::Prefork::Interp``).
Each test script prints, in its executor, the pids it can see for itself (server, executor,
and for the Perl side the monitor), and with the argument ``block`` waits for a line on stdin,
so a call stays running until the test releases it. Those pids come from the scripts, not
from prefork-ctl, and the watcher is checked by its command line, not by the pipes
prefork-ctl follows.

The C client ignores ``PREFORK_INTERP_RUNDIR``: its servers live in the real per-user run
directory, which other people's servers share. Those tests compute the ident beforehand,
look only at that ident, and remove exactly its files and processes at teardown.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import procfs
import psutil
import pytest
from ctlrun import ctl, ctl_json
from harness import (
    C_CLIENT,
    CLIENT,
    PYTHON,
    REPO,
    VENV_BIN,
    Lines,
    ProcRegistry,
    hold_self_watch,
    kill_processes,
    scaled,
    wait_for,
    write_script,
)

from prefork import __version__
from prefork.common import paths
from prefork.common.ident import RUNDIR_ENV, compute_ident, lock_path, log_path, socket_path
from prefork.common.locking import lock_file
from prefork.ctl import actions, discover

pytestmark = pytest.mark.timeout(90)

CTL = VENV_BIN / "prefork-ctl"
PERL = shutil.which("perl") or "perl"
LINE_TIMEOUT = 30.0

PY_BODY = """\
import os, sys
import prefork
prefork.initialisation_complete(idle_timeout=300)
print(f"server={os.getppid()} executor={os.getpid()}", flush=True)
if "block" in sys.argv[1:]:
    print("release:", sys.stdin.readline().strip(), flush=True)
"""

# In the Perl side the executor's parent is the monitor, whose parent is the server.
PERL_BODY = r"""
use strict;
use Proc::Prefork::Interp;
prefork_initialisation_complete();
$| = 1;
my $monitor = getppid();
open my $st, "<", "/proc/$monitor/stat" or die "stat: $!";
my $line = <$st>;
close $st;
$line =~ s/^.*\) //;
my @f = split / /, $line;
print "server=$f[1] executor=$$ monitor=$monitor\n";
if (grep { $_ eq "block" } @ARGV) {
    my $l = <STDIN>;
    chomp $l;
    print "release: $l\n";
}
"""

COMBOS = [("ours", "python"), ("ours", "perl"), ("c", "python"), ("c", "perl")]
COMBO_IDS = [f"{k}-client-{s}-side" for k, s in COMBOS]


# --------------------------------------------------------------------------- helpers


def pids_of(line: str) -> dict[str, int]:
    """``server=1 executor=2`` -> {"server": 1, "executor": 2}."""
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    return not procfs.gone(pid)


def holds_inode(pid: int, inode: int) -> bool:
    """Whether ``pid`` has an fd on socket ``inode``."""
    try:
        return f"socket:[{inode}]" in procfs.fd_links(pid).values()
    except OSError:
        return False


@dataclass
class Kind:
    """How to start one kind of server, and where it lives."""

    client: str
    side: str
    script: str
    base: str
    ident: str
    cwd: str
    env: dict[str, str]

    @property
    def socket(self) -> str:
        return socket_path(self.base, self.ident)

    @property
    def lock(self) -> str:
        return lock_path(self.base, self.ident)

    def call(self, procs: ProcRegistry, *args: str) -> tuple[int, str]:
        rc, out, err = procs.run([self.script, *args], env=self.env, cwd=self.cwd)
        assert b"server=" in out, (rc, out, err)
        return rc, out.decode()

    def start_blocked(self, procs: ProcRegistry) -> tuple[subprocess.Popen[bytes], Lines,
                                                           dict[str, int]]:
        p = procs.popen([self.script, "block"], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        env=self.env, cwd=self.cwd)
        lines = Lines(p.stdout)
        return p, lines, pids_of(lines.until("server=", "the call's pids", LINE_TIMEOUT)[-1])

    def entry(self) -> dict[str, Any]:
        """This ident's live entry in ``list --json``."""
        found = [e for e in ctl_json("list", "--run-dir", self.base)
                 if e["ident"] == self.ident and e["state"] == "live"]
        assert len(found) == 1, found
        return found[0]


@dataclass
class CRunDir:
    """The C client's run directory, and the idents a test made there (cleaned up)."""

    base: str
    idents: list[str] = field(default_factory=list)


@pytest.fixture
def c_run_dir() -> Iterator[CRunDir]:
    env = {k: v for k, v in os.environ.items() if k != RUNDIR_ENV}
    crd = CRunDir(paths.run_base(env))
    try:
        yield crd
    finally:
        for ident in crd.idents:
            for e in discover.scan(crd.base):
                if e.ident == ident:
                    kill_processes([p.pid for p in e.processes()])
            for name in (socket_path(crd.base, ident), lock_path(crd.base, ident),
                         log_path(crd.base, ident), log_path(crd.base, ident) + ".1"):
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    pass


def make_kind(client: str, side: str, rundir: str, env: dict[str, str],
              crd: CRunDir | None, name: str = "job") -> Kind:
    """Write the script for this kind of server into ``rundir``; compute its ident."""
    interp = str(PYTHON) if side == "python" else "perl"
    front = str(CLIENT) if client == "ours" else C_CLIENT
    body = PY_BODY if side == "python" else PERL_BODY
    script = write_script(rundir, f"{name}.{'py' if side == 'python' else 'pl'}", body,
                          shebang=f"{front} -U,{interp}")
    if client == "ours":
        base = rundir
    else:
        assert crd is not None
        base = crd.base
    old = os.getcwd()
    os.chdir(rundir)
    try:
        ident = compute_ident(base, interp.encode(), script.encode(), [])
    finally:
        os.chdir(old)
    if crd is not None and client == "c":
        crd.idents.append(ident)
    return Kind(client, side, script, base, ident, rundir, env)


@pytest.fixture
def shared_only(rundir: str) -> Iterator[None]:
    """Every server of ``rundir`` with the shared watcher (none watches itself): what
    prefork-ctl shows of a watcher.  The lone, self-watching server:
    ``test_show_self_watching_server``."""
    fd = hold_self_watch(rundir)
    try:
        yield
    finally:
        os.close(fd)


@pytest.fixture(params=COMBOS, ids=COMBO_IDS)
def kind(request: pytest.FixtureRequest, rundir: str, env: dict[str, str],
         c_run_dir: CRunDir, shared_only: None) -> Kind:
    client, side = request.param
    return make_kind(client, side, rundir, env, c_run_dir)


def expected_watcher(k: Kind, pid: int) -> None:
    """The watcher, checked by its command line (not by the pipes prefork-ctl follows)."""
    cmd = " ".join(a for a in psutil.Process(pid).cmdline() if a).split()
    if k.client == "ours":  # the run directory's shared watcher
        assert "prefork-watcher" in cmd[-3] and cmd[-2:] == [
            "--shared", os.path.dirname(k.socket)], cmd
    else:
        assert cmd[0] == C_CLIENT and k.script in cmd, cmd


# --------------------------------------------------------------------------- list


def test_list_json_reports_server(kind: Kind, procs: ProcRegistry) -> None:
    _rc, out = kind.call(procs)
    server = pids_of(out)["server"]
    e = kind.entry()
    assert e["server"]["pid"] == server
    assert e["script_path"] == kind.script
    assert e["side"] == kind.side
    assert e["client"] == ("prefork-interp (Python)" if kind.client == "ours"
                           else "prefork-interp (C)")
    assert e["calls"] == 0
    assert e["socket_exists"] and e["socket"] == kind.socket
    assert e["server"]["rss"] > 0 and e["server"]["pss"] is not None
    expected_watcher(kind, e["watcher"]["pid"])
    table = ctl("list", "--run-dir", kind.base)
    assert table.exit_code == 0 and table.stderr == "", table.output  # quick: no progress
    row = next(r for r in table.stdout.splitlines() if kind.ident[:12] in r)
    assert str(server) in row and "live" in row, row


# --------------------------------------------------------------------------- show


def test_show_tree_while_call_runs(kind: Kind, procs: ProcRegistry) -> None:
    kind.call(procs)  # the server is up
    p, lines, pids = kind.start_blocked(procs)
    [e] = ctl_json("show", kind.ident[:10], "--run-dir", kind.base)
    server = e["server"]
    assert server["pid"] == pids["server"] and server["role"] == "server"
    assert e["calls"] == 1
    live = [c for c in server["children"] if not c["zombie"] and c["role"] != "spare"]
    if kind.side == "perl":
        [monitor] = live
        assert monitor["role"] == "monitor" and monitor["pid"] == pids["monitor"]
        [executor] = monitor["children"]
    else:
        [executor] = live
    assert executor["role"] == "executor" and executor["pid"] == pids["executor"]
    notes = {n["note"].split(":")[0] for n in server["fds"]}
    assert {"LISTEN", "WATCHI", "WATCHE"} <= notes, server["fds"]
    watcher = e["watcher"]
    expected_watcher(kind, watcher["pid"])
    assert {n["fd"] for n in watcher["fds"]} >= {0, 1}
    # the human view says the same, and SCRIPT works as well as IDENT
    text = ctl("show", os.path.basename(kind.script), "--run-dir", kind.base)
    assert text.exit_code == 0, text.output
    for needle in (f"server {pids['server']}", f"executor {pids['executor']}",
                   f"watcher {watcher['pid']}", f"for server {pids['server']}"):
        assert needle in text.stdout, text.stdout
    assert p.stdin is not None
    p.stdin.write(b"go\n")
    p.stdin.flush()
    assert lines.until("release:", "the released call", LINE_TIMEOUT)[-1] == "release: go"
    p.wait(timeout=scaled(20))


def test_show_self_watching_server(rundir: str, env: dict[str, str],
                                   procs: ProcRegistry) -> None:
    """A lone server of our client watches itself: no watcher, its lock and its own inotify
    instance shown on its fds, our client named all the same."""
    k = make_kind("ours", "python", rundir, env, None)
    server = pids_of(k.call(procs)[1])["server"]
    [e] = ctl_json("show", k.ident[:10], "--run-dir", rundir)
    assert e["server"]["pid"] == server
    assert e["watcher"] is None and e["self_watching"] is True
    assert e["client"] == "prefork-interp (Python)"
    notes = {n["note"].split(":")[0] for n in e["server"]["fds"]}
    assert {"LISTEN", "self-watch lock", "its own inotify instance (its files, the run "
            "directory)"} <= notes, e["server"]["fds"]
    text = ctl("show", k.ident[:10], "--run-dir", rundir)
    assert text.exit_code == 0 and "the server watches itself" in text.stdout, text.output


# --------------------------------------------------------------------------- kill


def test_kill_lets_running_call_finish(kind: Kind, procs: ProcRegistry) -> None:
    kind.call(procs)
    before = kind.entry()
    watcher = before["watcher"]["pid"]
    p, lines, pids = kind.start_blocked(procs)
    killer = procs.popen([str(CTL), "kill", kind.ident[:16], "--run-dir", kind.base,
                          "--timeout", str(scaled(60))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # the server has let go of its listening socket (ours: draining; Perl: gone)
    wait_for(lambda: not holds_inode(pids["server"], before["listen_inode"]),
             timeout=20, what="the server to stop listening")
    assert not os.path.lexists(kind.socket)
    if kind.client == "ours" and kind.side == "python":
        [e] = [x for x in ctl_json("list", "--run-dir", kind.base) if x["ident"] == kind.ident]
        assert e["state"] == "draining" and e["calls"] == 1, e
    assert alive(pids["executor"])
    assert p.stdin is not None
    p.stdin.write(b"finish\n")
    p.stdin.flush()
    assert lines.until("release:", "the released call", LINE_TIMEOUT)[-1] == "release: finish"
    rc = p.wait(timeout=scaled(20))
    if kind.side == "python":
        assert rc == 0
    out, err = killer.communicate(timeout=scaled(60))
    assert killer.returncode == 0, (out, err)
    assert f"SIGTERM to server {pids['server']}".encode() in out, out
    assert b"SIGKILL" not in out, out
    for pid in {pids["server"], pids["executor"], watcher, pids.get("monitor", 0)} - {0}:
        assert not alive(pid), pid
    assert not os.path.lexists(kind.socket) and not os.path.lexists(kind.lock)
    # a later call starts a fresh server
    _rc, out2 = kind.call(procs)
    assert pids_of(out2)["server"] != pids["server"]
    assert kind.entry()["server"]["pid"] == pids_of(out2)["server"]


def test_kill_forces_after_timeout(rundir: str, env: dict[str, str],
                                   procs: ProcRegistry, shared_only: None) -> None:
    k = make_kind("ours", "python", rundir, env, None)
    p, _lines, pids = k.start_blocked(procs)
    tree = [pids["server"], pids["executor"], k.entry()["watcher"]["pid"]]
    result = ctl("kill", k.ident[:12], "--run-dir", rundir, "--timeout", "0.2")
    assert result.exit_code == 0, result.output
    assert f"SIGTERM to server {pids['server']}" in result.stdout
    assert "SIGKILL to" in result.stdout, result.stdout
    for pid in tree:
        assert not alive(pid), pid
    assert p.wait(timeout=scaled(20)) != 0  # its executor was killed
    assert not os.path.lexists(k.socket) and not os.path.lexists(k.lock)
    assert ctl_json("list", "--run-dir", rundir) == [] or all(
        e["state"] == "dead" for e in ctl_json("list", "--run-dir", rundir))


def test_kill_all_and_nothing_found(rundir: str, env: dict[str, str],
                                    procs: ProcRegistry) -> None:
    a = make_kind("ours", "python", rundir, env, None, name="a")
    b = make_kind("ours", "perl", rundir, env, None, name="b")
    servers = [pids_of(a.call(procs)[1])["server"], pids_of(b.call(procs)[1])["server"]]
    result = ctl("kill", "--all", "--run-dir", rundir)
    assert result.exit_code == 0, result.output
    for pid in servers:
        assert f"SIGTERM to server {pid}" in result.stdout
        assert not alive(pid)
    assert not any(n.startswith(("s", "l")) for n in os.listdir(rundir))
    again = ctl("kill", "--all", "--run-dir", rundir)
    assert again.exit_code == 1, again.output
    # a.py's server is gone, but its log and stat file still name it: found, nothing to do
    gone = ctl("kill", "a.py", "--run-dir", rundir)
    assert gone.exit_code == 1 and "nothing was running" in gone.stderr, gone.output
    unknown = ctl("kill", "c.py", "--run-dir", rundir)
    assert unknown.exit_code == 1 and "no server matches" in unknown.stderr


def test_kill_spares_a_reused_pid(rundir: str, procs: ProcRegistry) -> None:
    """A pid whose create time is not the one scanned is another process now: left alone."""
    other = procs.popen(["sleep", "60"])
    real = psutil.Process(other.pid).create_time()
    for create_time, spared in ((real - 5.0, True), (real, False)):
        server = discover.ProcInfo(pid=other.pid, ppid=os.getpid(), role="server",
                                   title="x.py [server]", create_time=create_time, zombie=False)
        entry = discover.Entry(ident="ab" * 20, run_dir=rundir, state=discover.LIVE,
                               socket_path=socket_path(rundir, "ab" * 20),
                               lock_path=lock_path(rundir, "ab" * 20),
                               log_path=log_path(rundir, "ab" * 20), has_socket=False,
                               has_lock=False, has_log=False, server=server, script="x.py")
        said: list[str] = []
        result = actions.kill_entries([entry], 5.0, said.append)
        if spared:
            assert result.signalled == [] and other.poll() is None, said
            assert "already gone" in said[0]
        else:
            assert result.signalled == [other.pid] and result.survivors == [], said
            assert not alive(other.pid)  # (psutil.wait_procs reaped our child)


# --------------------------------------------------------------------------- clean


def _stale_socket(path: str) -> None:
    """A real socket file nobody listens on (what a SIGKILLed server leaves)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()


def test_clean_removes_only_stale(rundir: str, env: dict[str, str],
                                  procs: ProcRegistry, shared_only: None) -> None:
    live = make_kind("ours", "python", rundir, env, None, name="live")
    live_server = pids_of(live.call(procs)[1])["server"]
    # a server killed hard: its socket, lock and log stay behind
    dead = make_kind("ours", "python", rundir, env, None, name="dead")
    dead_pids = pids_of(dead.call(procs)[1])
    shared_watcher = dead.entry()["watcher"]["pid"]
    os.kill(dead_pids["server"], signal.SIGKILL)
    wait_for(lambda: not alive(dead_pids["server"]), what="the killed server to be gone")
    assert alive(shared_watcher)  # it still watches the live server
    # a server stopped with --kill: only its log stays
    gone = make_kind("ours", "python", rundir, env, None, name="gone")
    gone.call(procs)
    gone_server = gone.entry()["server"]["pid"]
    rc, _out, err = procs.run([str(CLIENT), "--kill", "-U", str(PYTHON), gone.script],
                              env=env, cwd=rundir)
    assert rc == 0, err
    wait_for(lambda: not alive(gone_server), what="the --kill'ed server to quit")
    # a server being started right now: stale socket, lock held
    starting = "ab" * 20
    _stale_socket(socket_path(rundir, starting))
    held = lock_file(lock_path(rundir, starting))
    other = Path(rundir, "notes.txt")
    other.write_text("not ours\n")
    try:
        states = {e["ident"]: e["state"] for e in ctl_json("list", "--run-dir", rundir)}
        assert states == {live.ident: "live", dead.ident: "stale", gone.ident: "dead",
                          starting: "stale"}, states
        result = ctl("clean", "--run-dir", rundir)
        assert result.exit_code == 0, result.output
        assert "lock is held" in result.stdout
        left = set(os.listdir(rundir))
        for name in (f"s{dead.ident}", f"l{dead.ident}", f"p{dead.ident}.log",
                     f"l{gone.ident}", f"p{gone.ident}.log"):
            assert name not in left, (name, left)
        for name in (f"s{live.ident}", f"l{live.ident}", f"p{live.ident}.log",
                     f"s{starting}", f"l{starting}", "notes.txt"):
            assert name in left, (name, left)
    finally:
        os.close(held)
    assert pids_of(live.call(procs)[1])["server"] == live_server
    result = ctl("clean", "--run-dir", rundir)
    assert f"s{starting}" not in os.listdir(rundir), result.output


# --------------------------------------------------------------------------- logs


def test_logs_show_and_follow(rundir: str, env: dict[str, str], procs: ProcRegistry) -> None:
    k = make_kind("ours", "python", rundir, env, None)
    server = pids_of(k.call(procs)[1])["server"]
    started = f"[{server}] INFO {k.script}: server started (pid {server}"
    result = ctl("logs", k.ident[:8], "--run-dir", rundir)
    assert result.exit_code == 0 and started in result.stdout, result.output
    assert started in ctl("logs", "--run-dir", rundir).stdout
    assert ctl("logs", k.ident[:8], "-n", "0", "--run-dir", rundir).stdout == ""
    follower = procs.popen([str(CTL), "logs", "-f", os.path.basename(k.script),
                            "--run-dir", rundir], stdout=subprocess.PIPE)
    lines = Lines(follower.stdout)
    lines.until("server started", "the existing log line", LINE_TIMEOUT)
    os.kill(server, signal.SIGTERM)  # the server logs why it quits
    line = lines.until("quitting", "the line logged after -f started", LINE_TIMEOUT)[-1]
    assert f"[{server}]" in line and "SIGTERM" in line, line
    follower.send_signal(signal.SIGINT)
    assert follower.wait(timeout=scaled(10)) == 0


def test_logs_of_perl_server_explain_syslog(rundir: str, env: dict[str, str],
                                            procs: ProcRegistry) -> None:
    if os.path.exists("/dev/log"):
        pytest.skip("this host has /dev/log: the Perl side's lines are in the system log")
    k = make_kind("ours", "perl", rundir, env, None)
    k.call(procs)
    result = ctl("logs", k.ident[:8], "--run-dir", rundir)
    assert result.exit_code == 1
    assert "Perl side logs to syslog" in result.stderr and "/dev/log" in result.stderr


# --------------------------------------------------------------------------- arguments


def test_argument_errors(rundir: str, tmp_path: Path) -> None:
    cases = [
        (["kill", "--run-dir", rundir], 2, "IDENT or SCRIPT"),
        (["kill", "abc", "--all", "--run-dir", rundir], 2, "not both"),
        (["kill", "--all", "--timeout", "-1", "--run-dir", rundir], 2, "--timeout"),
        (["show", "--run-dir", rundir], 2, "Missing argument"),
        (["logs", "-n", "-3", "--run-dir", rundir], 2, "--lines"),
        (["frobnicate"], 2, "No such command"),
        (["show", "abc", "--run-dir", rundir], 1, "no servers in"),
        (["list", "--run-dir", str(tmp_path / "nope")], 1, "does not exist"),
    ]
    for args, code, message in cases:
        result = ctl(*args)
        assert result.exit_code == code, (args, result.output)
        assert message in result.output, (args, result.output)
    os.chmod(tmp_path, 0o755)
    result = ctl("list", "--run-dir", str(tmp_path))
    assert result.exit_code == 1 and "group/other" in result.stderr, result.output
    # lookups: unknown, ambiguous prefix, unique prefix
    for ident in ("0a" + "1" * 40, "0b" + "2" * 40):
        Path(rundir, f"l{ident}").touch()
    result = ctl("show", "0", "--run-dir", rundir)
    assert result.exit_code == 1 and "prefix of 2 idents" in result.stderr, result.output
    result = ctl("show", "fff", "--run-dir", rundir)
    assert result.exit_code == 1 and "no server matches 'fff'" in result.stderr, result.output
    [e] = ctl_json("show", "0b", "--run-dir", rundir)
    assert e["ident"] == "0b" + "2" * 40 and e["state"] == "dead"
    assert ctl("--version").stdout == f"prefork-ctl {__version__}\n"


# --------------------------------------------------------------------------- entry points


def test_installed_entry_points(rundir: str, procs: ProcRegistry) -> None:
    env = {**os.environ, "COLUMNS": "120"}
    for cmd, want in (
        ([str(CTL), "--version"], f"prefork-ctl {__version__}"),
        ([str(REPO / "bin" / "prefork-ctl"), "--version"], f"prefork-ctl {__version__}"),
        ([sys.executable, "-m", "prefork.ctl", "--version"], f"prefork-ctl {__version__}"),
        ([str(CTL), "list", "--json", "--run-dir", rundir], "[]"),
        ([str(CTL), "--help"], "kill"),
        ([str(CTL), "--show-completion", "bash"], "prefork-ctl"),
        ([str(VENV_BIN / "prefork-interp"), "--version"], __version__),
        ([str(VENV_BIN / "prefork-watcher"), "--version"], f"prefork-watcher {__version__}"),
    ):
        rc, out, err = procs.run(cmd, env=env, cwd=REPO)
        assert rc == 0 and want in out.decode(), (cmd, rc, out, err)


def test_shell_completion_offers_idents(rundir: str, procs: ProcRegistry) -> None:
    ident = "0123456789abcdef" * 3
    Path(rundir, f"l{ident}").touch()
    env = {**os.environ, RUNDIR_ENV: rundir, "_PREFORK_CTL_COMPLETE": "complete_bash",
           "COMP_WORDS": "prefork-ctl show 0123", "COMP_CWORD": "2"}
    rc, out, err = procs.run([str(CTL)], env=env)
    assert rc == 0 and out.decode().split() == [ident[:12]], (out, err)


def test_no_color(rundir: str, env: dict[str, str], procs: ProcRegistry) -> None:
    k = make_kind("ours", "python", rundir, env, None)
    k.call(procs)
    green = b"\x1b[32m"  # STATE "live"
    base = {**os.environ, "FORCE_COLOR": "1", "TERM": "xterm-256color", "COLUMNS": "200"}
    base.pop("NO_COLOR", None)
    rc, colored, err = procs.run([str(CTL), "list", "--run-dir", rundir], env=base)
    assert rc == 0 and green in colored, (colored, err)
    rc, plain, err = procs.run([str(CTL), "list", "--run-dir", rundir],
                               env={**base, "NO_COLOR": "1"})
    assert rc == 0 and k.ident[:12].encode() in plain and green not in plain, (plain, err)


def test_show_idle_python_server_with_its_spare(rundir: str, env: dict[str, str],
                                                procs: ProcRegistry) -> None:
    """Between calls our server has one child, its spare (``SCRIPT [spare]``): ``show`` gives
    it the role ``spare``, notes the hand-over socket on both sides, and counts no call."""
    k = make_kind("ours", "python", rundir, env, None)
    _rc, out = k.call(procs)
    server = pids_of(out)["server"]

    def settled() -> list[dict[str, Any]]:
        [e] = ctl_json("show", k.ident[:10], "--run-dir", k.base)
        kids = [c for c in e["server"]["children"] if not c["zombie"]]
        ok = len(kids) == 1 and kids[0]["title"].endswith(" [spare]")
        return [e] if ok else []
    [e] = wait_for(settled, what="the server's spare in prefork-ctl show")
    assert e["server"]["pid"] == server and e["calls"] == 0
    [spare] = e["server"]["children"]
    assert spare["role"] == "spare" and spare["ppid"] == server
    spare_notes = [n["note"] for n in spare["fds"] if n["fd"] > 2]
    assert spare_notes == ["hand-over socket: its call comes through it"], spare["fds"]
    assert any(n["note"].startswith("hand-over socket of its spare")
               for n in e["server"]["fds"]), e["server"]["fds"]
