"""Differences from a direct run that remain, each pinned as documented in
docs/transparency.md ("What remains different, and why").  If one of these tests fails,
the behaviour changed: update the documentation with it."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
from pathlib import Path

import procfs
import pytest
from harness import scaled, wait_for
from procfs import reading_fd

from .probes import INTERPRETERS, PY311, PYTHONS, ProbeFactory, read_line
from .test_jobcontrol import Shell

pytestmark = pytest.mark.timeout(120)

PARENTAGE = r'''
import json, subprocess
child = subprocess.run([sys.executable, "-c", "import os; print(os.getppid())"],
                       capture_output=True, text=True, check=True).stdout
print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "child_ppid": int(child)}))
'''


def test_pid_and_parent(make_probe: ProbeFactory) -> None:
    """The script runs in the executor, a child of the server: its pid is not the pid the
    caller started, its parent is the server, not the caller.  Its own children see it."""
    probe = make_probe(PARENTAGE)
    direct = probe.popen("direct")
    out, _ = direct.communicate(timeout=scaled(30))
    d = json.loads(out)
    assert d["pid"] == direct.pid and d["ppid"] == os.getpid()
    assert d["child_ppid"] == d["pid"]
    via = probe.popen("warm")
    out, _ = via.communicate(timeout=scaled(30))
    v = json.loads(out)
    assert v["pid"] != via.pid and v["ppid"] != os.getpid()
    assert v["child_ppid"] == v["pid"]
    assert b"[server]" in procfs.cmdline(v["ppid"]) or v["ppid"] > 1


TERMINAL = r'''
import json
facts = {}
try:
    os.close(os.open("/dev/tty", os.O_RDWR))
    facts["dev_tty"] = "opened"
except OSError as e:
    facts["dev_tty"] = e.strerror
try:
    facts["foreground"] = os.tcgetpgrp(0) == os.getpgrp()
except OSError as e:
    facts["foreground"] = e.strerror
facts["isatty"] = os.isatty(0)
print(json.dumps(facts))
'''


@pytest.mark.parametrize("python", PYTHONS)
def test_no_controlling_terminal(make_probe: ProbeFactory, python: str) -> None:
    """Under a terminal, the executor has the terminal as fds 0/1/2 but not as its
    controlling terminal: /dev/tty cannot be opened (ENXIO), and tcgetpgrp() on it fails
    (ENOTTY), so a script cannot tell whether it is in the foreground."""
    probe = make_probe(TERMINAL, python=INTERPRETERS[python])
    direct = probe.run("direct", io="pty").json()
    via = probe.run("warm", io="pty").json()
    assert direct == {"dev_tty": "opened", "foreground": True, "isatty": True}
    assert via == {"dev_tty": os.strerror(6), "foreground": os.strerror(25), "isatty": True}


BACKGROUND_READ = r'''
print("pid", os.getpid(), flush=True)
line = sys.stdin.readline()
print("read", line.strip(), flush=True)
'''


def test_background_read_from_the_terminal_is_not_stopped(make_probe: ProbeFactory,
                                                         tmp_path: Path) -> None:
    """``script &`` that reads the terminal: a direct run is stopped by SIGTTIN ("Stopped
    (tty input)"); the executor is not in the terminal's session, so its read is not stopped
    (it competes with the shell for input)."""
    probe = make_probe(BACKGROUND_READ)
    states = {}
    for how in ("direct", "warm"):
        probe.prepare(how, tmp_path)
        sh = Shell(probe.env, tmp_path)
        try:
            sh.run(shlex.join(probe.command(how)) + " &")
            pid = int(sh.expect(r"pid (\d+)\r\n").group(1))
            if how == "direct":
                wait_for(lambda: procfs.state(pid) == "T", what="SIGTTIN to stop it")  # noqa: B023
            else:  # asleep inside the terminal read: past the job-control check
                wait_for(lambda: reading_fd(pid), what="the read to block")  # noqa: B023
            states[how] = procfs.state(pid)
            sh.run("kill %1; wait")
        finally:
            sh.close()
        if procfs.state(pid) is not None:
            os.kill(pid, signal.SIGKILL)
    assert states == {"direct": "T", "warm": "S"}


def test_signal_to_the_caller_reaches_the_whole_process_group(make_probe: ProbeFactory
                                                              ) -> None:
    """``kill -USR1 PID`` of a direct run reaches the script only; sent to the client, it is
    forwarded to the executor's process group, so the script's children get it too (as for a
    signal a terminal sends to its foreground job)."""
    probe = make_probe(r'''
        import signal, subprocess
        signal.signal(signal.SIGUSR1, lambda s, f: os.write(1, b"script got USR1\n"))
        child = subprocess.Popen([sys.executable, "-c",
            "import os, signal, sys\n"
            "signal.signal(signal.SIGUSR1, lambda s, f: os.write(1, b'child got USR1\\n'))\n"
            "print('child ready', flush=True)\n"
            "sys.stdin.read()\n"], stdin=subprocess.PIPE)
        time_to_go = sys.stdin.readline()
        child.communicate(b"")
    ''')
    outputs = {}
    for how, n in (("direct", 1), ("warm", 2)):
        p = probe.popen(how)
        assert read_line(p) == b"child ready\n"
        os.kill(p.pid, signal.SIGUSR1)
        lines = sorted(read_line(p) for _ in range(n))
        out, _ = p.communicate(b"go\n", timeout=scaled(20))
        outputs[how] = (lines, out)
    assert outputs == {"direct": ([b"script got USR1\n"], b""),
                       "warm": ([b"child got USR1\n", b"script got USR1\n"], b"")}


def test_sigstop_stops_only_the_client(make_probe: ProbeFactory) -> None:
    """SIGSTOP cannot be caught, so it cannot be forwarded: it stops the client only; the
    script runs on (SIGTSTP, which Ctrl-Z sends, stops both)."""
    probe = make_probe(BACKGROUND_READ)
    p = probe.popen("warm")
    pid = int(read_line(p).split()[1])
    wait_for(lambda: procfs.state(pid) == "S", what="the read to start")
    os.kill(p.pid, signal.SIGSTOP)
    wait_for(lambda: procfs.state(p.pid) == "T", what="the client to stop")
    assert procfs.state(pid) == "S"
    os.kill(p.pid, signal.SIGCONT)
    out, _ = p.communicate(b"x\n", timeout=scaled(20))
    assert out == b"read x\n" and p.returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_client_killed_by_an_unforwardable_signal(make_probe: ProbeFactory, sig: int) -> None:
    """SIGKILL, and the fault signals when sent with kill, end the client itself: the
    server sees the connection close and sends the executor's group SIGINT (then SIGKILL
    0.5 s later), where a direct run would simply die of that signal."""
    probe = make_probe(BACKGROUND_READ)
    p = probe.popen("warm")
    pid = int(read_line(p).split()[1])
    wait_for(lambda: procfs.state(pid) == "S", what="the read to start")
    os.kill(p.pid, sig)
    assert p.wait(timeout=scaled(20)) == -sig
    wait_for(lambda: procfs.state(pid) in (None, "Z"), what="the executor to end")
    assert p.stderr is not None
    assert b"KeyboardInterrupt" in p.stderr.read()


HASHES = r'''
import json, random
print(json.dumps({"hash": hash("some text"), "random": random.random()}))
'''


def test_string_hashes_are_the_servers(make_probe: ProbeFactory) -> None:
    """str/bytes hashes are salted once per interpreter: every call of one server hashes
    alike (set iteration order of strings repeats), where direct runs differ.  ``random``
    is reseeded per call (see test_process.py)."""
    probe = make_probe(HASHES)
    d1, d2 = (probe.run("direct").json() for _ in range(2))
    w1, w2 = (probe.run("warm").json() for _ in range(2))
    assert d1["hash"] != d2["hash"]
    assert w1["hash"] == w2["hash"]
    assert w1["random"] != w2["random"]


WRAPPERS = r'''
import json
def facts(f):
    return {"repr": repr(f).split(" at ")[0], "name": f.__name__, "module": f.__module__,
            "doc": f.__doc__ == getattr(f, "__wrapped__", f).__doc__}
print(json.dumps({"exit": facts(sys.exit), "hook": facts(sys.excepthook),
                  "same": sys.excepthook is sys.__excepthook__}))
'''


def test_sys_exit_and_excepthook_are_wrappers(make_probe: ProbeFactory) -> None:
    """Fast exit (3.12+), a script calling initialisation_complete() itself: sys.exit and
    sys.excepthook are Python functions standing for the builtins (same name, module,
    documentation; the default hook still ``is sys.__excepthook__``): they tell the fast
    exit how the script ended, without an event on every exception.  3.11 (no fast exit)
    has the builtins."""
    probe = make_probe(WRAPPERS)
    direct = probe.run("direct").json()
    warm = probe.run("warm").json()
    builtin = {"doc": True, "repr": "<built-in function exit>", "name": "exit",
               "module": "sys"}
    assert direct["exit"] == builtin and direct["same"] is True
    assert warm["exit"] == {**builtin, "repr": "<function exit"}
    assert warm["hook"] == {**direct["hook"], "repr": "<function excepthook"}
    assert warm["same"] is True
    if PY311:
        probe311 = make_probe(WRAPPERS, python=PY311, name="wrappers311.py")
        assert probe311.run("warm").json() == probe311.run("direct").json()


PRE_INIT_OBJECT = r'''
class Noisy:
    def __del__(self):
        os.write(2, b"finalized " + self.name.encode() + b"\n")
'''


@pytest.mark.parametrize("python", PYTHONS)
def test_objects_from_before_initialisation_are_not_finalized(make_probe: ProbeFactory,
                                                              python: str) -> None:
    """Fast exit (3.12+) does not tear down the heap the server built: an object created
    before initialisation_complete() is not finalized at the end of a call (one created
    during the call is).  The normal shutdown (3.11) finalizes both, as a direct run does."""
    probe = make_probe(
        'during = Noisy(); during.name = "during the call"\n',
        pre=PRE_INIT_OBJECT + 'before = Noisy(); before.name = "before init"\n',
        python=INTERPRETERS[python])
    direct = probe.run("direct")
    warm = probe.run("warm")
    assert sorted(direct.err.splitlines()) == [b"finalized before init",
                                               b"finalized during the call"]
    if python == "py311":
        assert sorted(warm.err.splitlines()) == sorted(direct.err.splitlines())
    else:
        assert warm.err == b"finalized during the call\n"


def test_core_dump_flag_is_not_passed_on(make_probe: ProbeFactory, tmp_path: Path) -> None:
    """With core dumps enabled, a script killed by SIGSEGV dumps core (the executor, in the
    caller's directory, as directly), but the client cannot die "with a core dump" without
    dumping its own: the caller sees a death by SIGSEGV without the core flag."""
    probe = make_probe('import ctypes\nctypes.string_at(0)\n')
    seen = {}
    for how in ("direct", "warm"):
        where = tmp_path / how
        where.mkdir()
        probe.prepare(how, where)
        _, out, err = probe.procs.run(
            ["bash", "-c", 'ulimit -c unlimited; "$@"; echo "status=$?"', "bash",
             *probe.command(how)], env=probe.env, cwd=where)
        seen[how] = (out, re.sub(rb"^bash: line \d+: +\d+ ", b"", err))
        for core in where.glob("core*"):
            core.unlink()
    assert seen["direct"] == (b"status=139\n", b'Segmentation fault      (core dumped) "$@"\n')
    assert seen["warm"] == (b"status=139\n", b'Segmentation fault      "$@"\n')


def test_modules_loaded_by_the_server_are_there(make_probe: ProbeFactory) -> None:
    """sys.modules also holds what the server imported (prefork's own server modules and
    their dependencies): imports of those cost nothing, and ``in sys.modules`` tests see
    them."""
    probe = make_probe('print("prefork.server.loop" in sys.modules)')
    assert probe.run("direct").out == b"False\n"
    assert probe.run("warm").out == b"True\n"


def test_atexit_runs_with_the_main_frame_still_on_the_stack(make_probe: ProbeFactory) -> None:
    """Fast exit (3.12+) runs atexit handlers from sys.monitoring's callback for the end of
    the main module, whose frame is still on the stack (a direct run has left it).  Tracing
    and profiling are off while the handlers run (monitoring callbacks are not traced)."""
    probe = make_probe(r'''
        import atexit, traceback
        atexit.register(lambda: print(len(traceback.extract_stack()) > 1))
    ''')
    assert probe.run("direct").out == b"False\n"
    assert probe.run("warm").out == b"True\n"


def test_process_title(make_probe: ProbeFactory) -> None:
    """With setproctitle (a dependency; without it nothing changes), the executor's command
    line (ps, /proc/PID/cmdline) is one string "python script args", not the direct run's
    separate words."""
    probe = make_probe(r'''
        with open("/proc/self/cmdline", "rb") as f:
            print(f.read().rstrip(b"\0").split(b"\0")[1:])
    ''')
    direct = probe.run("direct", "a b")
    warm = probe.run("warm", "a b")
    assert direct.out == f"[b'{probe.path}', b'a b']\n".encode()
    assert warm.out == b"[]\n"  # setproctitle is a dependency of the package


def test_other_process_attributes_are_the_servers(make_probe: ProbeFactory) -> None:
    """Attributes the executor does not take from the client and that are not part of the
    context a server is chosen by (test_context.py) stay the server's: here the OOM score
    adjustment; likewise the I/O priority."""
    probe = make_probe(r'''
        with open("/proc/self/oom_score_adj") as f:
            print(f.read().strip())
    ''')
    outs = {}
    for how in ("direct", "warm"):
        probe.prepare(how)
        rc, out, _ = probe.procs.run(
            ["bash", "-c", 'echo 345 >/proc/self/oom_score_adj && exec "$@"', "bash",
             *probe.command(how)], env=probe.env)
        outs[how] = (rc, out)
    assert outs["direct"] == (0, b"345\n")
    assert outs["warm"][0] == 0 and outs["warm"][1] != b"345\n"


def test_fork_hooks_run_before_the_call(make_probe: ProbeFactory) -> None:
    """``os.register_at_fork(after_in_child=...)`` hooks run when the executor is forked,
    which is ahead of its call (the server keeps one executor ready): in the hook, argv and
    the environment are still the server's, not the call's.  Directly they do not run.
    (The warm-up call that started the server came without ``PF_WHO`` and arguments.)"""
    probe = make_probe(r'''
        print(json.dumps({"hook": SEEN, "now": [os.environ.get("PF_WHO"), sys.argv[1:]]}))
    ''', pre=r'''
        import json
        SEEN = []
        os.register_at_fork(
            after_in_child=lambda: SEEN.append([os.environ.get("PF_WHO"), sys.argv[1:]]))
    ''')
    env = dict(probe.env, PF_WHO="caller")
    direct = probe.run("direct", "arg", env=env)
    assert json.loads(direct.out) == {"hook": [], "now": ["caller", ["arg"]]}
    warm = json.loads(probe.run("warm", "arg", env=env).out)
    # (The server's own start, a fork too, ran the hook once more, in the server.)
    assert warm["hook"] and all(seen == [None, []] for seen in warm["hook"]), warm
    assert warm["now"] == ["caller", ["arg"]]
