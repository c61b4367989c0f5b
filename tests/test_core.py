"""The core with real processes: our client and the reference C client driving our script
side, our client driving the reference Perl script side, and the server's life cycle.

Most tests run twice, through our client (``ours``: the test's own run directory) and through
the reference C client (``c``: the real per-user run base, cleaned up by ``RealBase``).  A
"server pid" is what the executor reports as ``os.getppid()``: with one fork per call the
executor's parent is the server.  Nothing sleeps: every wait polls a fact (a pid gone, a file
appearing) against a deadline.
"""

from __future__ import annotations

import ast
import os
import random
import signal
from collections.abc import Sequence
from dataclasses import dataclass

import procfs
import pytest
from harness import C_CLIENT, CLIENT, PYTHON, ProcRegistry, wait_for, write_script
from realbase import RealBase

from prefork.common.ident import RUNDIR_ENV, compute_ident, log_path, socket_path

pytestmark = pytest.mark.timeout(90)

PY = str(PYTHON)

#: The test script: a command word in argv[1] says what the executor does.  ``{opts}`` is
#: filled with keyword arguments for initialisation_complete().
SCRIPT = '''\
import ctypes, os, sys
import prefork
kept = open(__file__, "rb")     # opened before initialisation: the executor keeps it
prefork.initialisation_complete({opts})
cmd = sys.argv[1] if len(sys.argv) > 1 else "echo"
if cmd == "echo":
    print(repr([os.fsencode(a) for a in sys.argv]))
    print("stderr line", file=sys.stderr)
elif cmd == "exit":
    print("exiting with", sys.argv[2])
    print("on stderr too", file=sys.stderr)
    sys.exit(int(sys.argv[2]))
elif cmd == "exitmsg":
    sys.exit(sys.argv[2])
elif cmd == "raise":
    print("partial line", end="")
    raise RuntimeError("raised in the call")
elif cmd == "cat":
    sys.stdout.buffer.write(sys.stdin.buffer.read())
elif cmd == "env":
    getenv = ctypes.CDLL(None).getenv
    getenv.restype = ctypes.c_char_p
    print(repr(sorted(os.environb.items())))
    print(repr({{n: getenv(n.encode()) for n in sys.argv[2:]}}))
elif cmd == "pid":
    print(os.getppid())
elif cmd == "flags":
    print(sys.flags.dev_mode, os.getppid())
elif cmd == "fds":
    links = {{}}
    for name in os.listdir("/proc/self/fd"):
        try:
            links[int(name)] = os.readlink("/proc/self/fd/" + name)
        except FileNotFoundError:
            pass    # listdir's own fd, closed by now
    print(repr((kept.fileno(), links)))
'''


@dataclass
class Result:
    """What a call gave: exit status (negative: killed by that signal), stdout, stderr."""

    rc: int
    out: bytes
    err: bytes


class Client:
    """One of the two clients, with where it keeps its sockets."""

    def __init__(self, kind: str, procs: ProcRegistry, env: dict[str, str], rundir: str,
                 real: RealBase | None) -> None:
        self.kind = kind
        self.exe = CLIENT if kind == "ours" else C_CLIENT
        self.procs = procs
        self.env = env
        self.rundir = rundir
        self.real = real
        self.base = rundir if real is None else real.base

    def ident(self, script: str, interp: str = PY, cwd: str | None = None) -> str:
        """The ident of ``-U INTERP SCRIPT`` from ``cwd`` (tracked for clean-up if real)."""
        cwd = cwd or self.rundir
        if self.real is not None:
            return self.real.ident(interp, script, cwd)
        return compute_ident(self.base, os.fsencode(interp), os.fsencode(script), [],
                                   cwd=cwd)

    def sock_path(self, script: str, interp: str = PY, cwd: str | None = None) -> str:
        """The server socket for ``-U INTERP SCRIPT`` from ``cwd``."""
        return socket_path(self.base, self.ident(script, interp, cwd))

    def run(self, script: str, *args: str | bytes, opts: Sequence[str] = (),
            interp: str = PY, input: bytes | None = None, env: dict[str, str] | None = None,
            cwd: str | None = None) -> Result:
        """``CLIENT [OPTS] -U INTERP SCRIPT ARGS`` with stdio on pipes."""
        cwd = cwd or self.rundir
        self.ident(script, interp, cwd)
        argv = [self.exe, *opts, "-U", interp, script, *map(os.fsdecode, args)]
        rc, out, err = self.procs.run(argv, input=input, env=env or self.env, cwd=cwd)
        return Result(rc, out, err)

    def server_pid(self, script: str, **kw: object) -> int:
        """Make a ``pid`` call; the server's pid."""
        r = self.run(script, "pid", **kw)  # type: ignore[arg-type]
        assert (r.rc, r.err) == (0, b""), r
        return int(r.out)


def direct(procs: ProcRegistry, env: dict[str, str], cwd: str, script: str,
           *args: str | bytes, input: bytes | None = None) -> Result:
    """The same script run directly by the interpreter (no PREFORK_INTERP)."""
    rc, out, err = procs.run([PY, script, *map(os.fsdecode, args)], input=input, env=env,
                             cwd=cwd)
    return Result(rc, out, err)


@pytest.fixture(params=["ours", "c"])
def client(request: pytest.FixtureRequest, procs: ProcRegistry, env: dict[str, str],
           rundir: str) -> Client:
    """Our client (own run dir) or the reference C client (real run base)."""
    kind: str = request.param
    if kind == "c" and not os.access(C_CLIENT, os.X_OK):
        pytest.fail(f"reference C client {C_CLIENT} missing (apt-get install chiark-utils-bin)")
    real = request.getfixturevalue("real_base") if kind == "c" else None
    return Client(kind, procs, env, rundir, real)


@pytest.fixture
def ours(procs: ProcRegistry, env: dict[str, str], rundir: str) -> Client:
    """Our client only."""
    return Client("ours", procs, env, rundir, None)


def _script(rundir: str, opts: str = "", name: str = "core.py") -> str:
    return write_script(rundir, name, SCRIPT.format(opts=opts))


# ------------------------------------------------------------------ calls


ARGS: list[str | bytes] = ["two words", "", b"\xff\xfe-not-utf8", "  lead", "tab\there", "-x"]


def test_cold_and_warm_match_a_direct_run(client: Client, procs: ProcRegistry,
                                          env: dict[str, str], rundir: str) -> None:
    script = _script(rundir)
    sock = client.sock_path(script)
    assert not os.path.exists(sock)
    want = direct(procs, env, rundir, script, "echo", *ARGS)
    cold = client.run(script, "echo", *ARGS)
    assert os.path.exists(sock)
    warm = client.run(script, "echo", *ARGS)
    assert want.rc == 0
    assert cold == want
    assert warm == want
    # sys.argv == [script, *args] exactly, bytes included.
    expected = [os.fsencode(script), b"echo", *(os.fsencode(a) for a in ARGS)]
    assert ast.literal_eval(warm.out.decode()) == expected


def test_exit_codes(client: Client, procs: ProcRegistry, env: dict[str, str],
                    rundir: str) -> None:
    script = _script(rundir)
    cold = client.run(script, "exit", "42")  # the cold path propagates the status too
    assert cold == direct(procs, env, rundir, script, "exit", "42")
    assert cold.rc == 42
    for code in (0, 1, 3, 42, 255):
        got = client.run(script, "exit", str(code))
        assert got.rc == code
        assert got == direct(procs, env, rundir, script, "exit", str(code))
        assert got.out == f"exiting with {code}\n".encode()
    got = client.run(script, "exitmsg", "the message, with spaces")
    assert got == Result(1, b"", b"the message, with spaces\n")
    assert got == direct(procs, env, rundir, script, "exitmsg", "the message, with spaces")
    got = client.run(script, "raise")  # traceback, status 1, unflushed output kept
    assert got.rc == 1 and got.out == b"partial line"
    assert got.err.endswith(b"RuntimeError: raised in the call\n")
    assert got == direct(procs, env, rundir, script, "raise")


def test_environment_passed_and_removed_variable_gone(client: Client, env: dict[str, str],
                                                     rundir: str) -> None:
    script = _script(rundir)
    names = ["PF_A", "PF_B", "PF_RAW"]
    env1 = dict(env, PF_A="1", PF_B="two words", PF_RAW="\udcff\udcfe", PF_EMPTY="")
    for _ in range(2):  # cold, then warm
        r = client.run(script, "env", *names, env=env1)
        assert r.rc == 0, r
        lines = r.out.decode().splitlines()
        assert ast.literal_eval(lines[0]) == sorted(
            (os.fsencode(k), os.fsencode(v)) for k, v in env1.items())
        assert ast.literal_eval(lines[1]) == {"PF_A": b"1", "PF_B": b"two words",
                                              "PF_RAW": b"\xff\xfe"}
    env2 = dict(env1)
    del env2["PF_B"]
    env2["PF_A"] = "changed"
    r = client.run(script, "env", *names, env=env2)
    assert r.rc == 0, r
    lines = r.out.decode().splitlines()
    got = dict(ast.literal_eval(lines[0]))
    assert b"PF_B" not in got
    assert got[b"PF_A"] == b"changed"
    assert got == {os.fsencode(k): os.fsencode(v) for k, v in env2.items()}
    # ... and gone at the C level as well (getenv, as C extensions and subprocesses see it).
    assert ast.literal_eval(lines[1]) == {"PF_A": b"changed", "PF_B": None,
                                          "PF_RAW": b"\xff\xfe"}


def test_three_mib_through_stdin_and_stdout(client: Client, rundir: str) -> None:
    script = _script(rundir)
    data = random.Random(2).randbytes(3 * 1024 * 1024 + 7)
    for _ in range(2):  # cold, then warm
        r = client.run(script, "cat", input=data)
        assert r.rc == 0 and r.err == b"", r.err
        assert len(r.out) == len(data)
        assert r.out == data


def test_executor_has_only_std_fds_and_what_the_script_opened(
        client: Client, procs: ProcRegistry, env: dict[str, str], rundir: str) -> None:
    script = _script(rundir)
    d = direct(procs, env, rundir, script, "fds")
    d_kept, d_links = ast.literal_eval(d.out.decode())
    assert set(d_links) == {0, 1, 2, d_kept}  # the reference point: a direct run
    for _ in range(2):  # cold, then warm
        r = client.run(script, "fds")
        assert r.rc == 0, r
        kept, links = ast.literal_eval(r.out.decode())
        assert set(links) == {0, 1, 2, kept}, links
        assert links[kept] == script
        assert links[1].startswith("pipe:") and links[2].startswith("pipe:")
        assert links[1] != links[2]


# ------------------------------------------------------------------ server life cycle


def test_server_title_and_log(ours: Client, rundir: str) -> None:
    script = _script(rundir, opts="log='file'")
    pid = ours.server_pid(script)
    cmdline = procfs.cmdline(pid)
    assert b"[server]" in cmdline, cmdline
    log = log_path(rundir, ours.ident(script))
    wait_for(lambda: os.path.exists(log), what=f"{log} to appear")
    with open(log) as f:
        text = f.read()
    assert f"server started (pid {pid}" in text, text


def test_without_prefork_interp_the_script_runs_plainly(procs: ProcRegistry,
                                                       env: dict[str, str],
                                                       rundir: str) -> None:
    script = _script(rundir)
    assert "PREFORK_INTERP" not in env
    r = direct(procs, env, rundir, script, "pid")
    assert (r.rc, r.err) == (0, b"")
    assert int(r.out) == os.getpid()  # no server: the parent is us
    r = direct(procs, env, rundir, script, "exit", "3")
    assert r == Result(3, b"exiting with 3\n", b"on stderr too\n")
    assert sorted(os.listdir(rundir)) == ["core.py"]  # no socket, lock or log


def test_same_server_for_warm_calls_and_force_gives_a_fresh_one(client: Client,
                                                                rundir: str) -> None:
    script = _script(rundir)
    first = client.server_pid(script)
    assert client.server_pid(script) == first
    forced = client.server_pid(script, opts=["-f"])
    assert forced != first
    wait_for(lambda: procfs.gone(first), what=f"old server {first} to quit after -f")
    assert client.server_pid(script) == forced


def test_kill_stops_the_server(client: Client, rundir: str) -> None:
    script = _script(rundir)
    pid = client.server_pid(script)
    sock = client.sock_path(script)
    assert os.path.exists(sock)
    rc, out, err = client.procs.run([client.exe, "--kill", "-U", PY, script],
                                    env=client.env, cwd=rundir)
    assert (rc, out, err) == (0, b"", b"")
    assert not os.path.exists(sock)
    wait_for(lambda: procfs.gone(pid), what=f"server {pid} to exit after --kill")
    # The next call starts a fresh server.
    assert client.server_pid(script) != pid


def test_idle_timeout_ends_the_server(ours: Client, rundir: str) -> None:
    script = _script(rundir, opts="idle_timeout=0.5")
    pid = ours.server_pid(script)
    wait_for(lambda: procfs.gone(pid), timeout=15, what=f"idle server {pid} to exit")
    r = ours.run(script, "exit", "3")
    assert r == Result(3, b"exiting with 3\n", b"on stderr too\n")
    assert ours.server_pid(script) not in (pid, 0)


def test_autoreload_when_the_script_changes(ours: Client, rundir: str) -> None:
    script = _script(rundir)
    pid = ours.server_pid(script)
    assert ours.server_pid(script) == pid
    birth = os.stat(ours.sock_path(script)).st_mtime_ns
    newer = birth + 1000  # later than the server's birth (PREFORK_INTERP's SECS.NSECS)
    os.utime(script, ns=(newer, newer))
    r = ours.run(script, "echo", "x y")
    assert r == Result(0, repr([os.fsencode(script), b"echo", b"x y"]).encode() + b"\n",
                       b"stderr line\n")
    fresh = ours.server_pid(script)
    assert fresh != pid
    wait_for(lambda: procfs.gone(pid), what=f"stale server {pid} to quit")
    assert ours.server_pid(script) == fresh  # the fresh server is not stale itself


def test_interpreter_arguments_in_the_combined_form(ours: Client, procs: ProcRegistry,
                                                   env: dict[str, str], rundir: str) -> None:
    """``-U,python3,-X,dev`` runs ``python3 -X dev SCRIPT`` (the reference makes the
    interpreter ``python3,-X,dev``), and the arguments are part of the ident."""
    body = SCRIPT.format(opts="")
    script = write_script(rundir, "dev.py", body, shebang=f"{CLIENT} -U,{PY},-X,dev")
    results = [procs.run([script, "flags"], env=env, cwd=rundir) for _ in range(2)]
    for rc, _out, err in results:
        assert (rc, err) == (0, b"")
    dev_pids = {int(out.split()[1]) for _, out, _ in results}
    assert [out.split()[0] for _, out, _ in results] == [b"True", b"True"]
    assert len(dev_pids) == 1
    plain = ours.run(script, "flags")
    assert plain.rc == 0 and plain.out.split()[0] == b"False", plain
    assert int(plain.out.split()[1]) not in dev_pids
    sockets = [n for n in os.listdir(rundir) if n.startswith("s")]
    assert len(sockets) == 2, sockets


# ------------------------------------------------------------------ set-up failures


def test_script_that_never_calls_initialisation_complete(client: Client,
                                                         rundir: str) -> None:
    script = write_script(rundir, "noinit.py", """\
        import sys
        print("my own stdout")
        print("my own stderr", file=sys.stderr)
        """)
    r = client.run(script, "a")
    assert r.rc == 127
    assert r.out == b""
    # Before initialisation, the script's stdout is the caller's stderr (as the reference).
    assert r.err.startswith(b"my own stdout\nmy own stderr\n"), r.err
    msg = r.err.splitlines()[-1]
    assert msg.startswith(b"prefork-interp: setup failed"), msg
    assert b"initialisation_complete" in msg
    if client.kind == "ours":  # the reference leaves its dead socket behind
        assert not os.path.exists(client.sock_path(script))


def test_script_that_crashes_before_initialisation(client: Client, procs: ProcRegistry,
                                                   env: dict[str, str], rundir: str) -> None:
    script = write_script(rundir, "crash.py", """\
        import prefork
        raise ValueError("broken at import")
        prefork.initialisation_complete()
        """)
    d = direct(procs, env, rundir, script)
    assert d.rc == 1 and d.err.endswith(b"ValueError: broken at import\n")
    r = client.run(script)
    assert r.rc == 1
    assert r.out == b""
    assert r.err.startswith(d.err), r.err  # the traceback, exactly as a direct run gives it
    if client.kind == "ours":  # the reference says nothing more
        assert r.err[len(d.err):].startswith(
            b"prefork-interp: setup failed: the script ended (exit status 1) before "
            b"prefork.initialisation_complete() made it a server\n"
            b"prefork-interp: the interpreter was ")  # which (tests/test_interp_choice.py)
        assert not os.path.exists(client.sock_path(script))


def test_script_killed_before_initialisation(ours: Client, rundir: str) -> None:
    script = write_script(rundir, "killed.py", """\
        import os, signal
        os.kill(os.getpid(), signal.SIGTERM)
        """)
    r = ours.run(script)
    assert r.rc == -signal.SIGTERM
    assert b"killed by signal 15" in r.err


# ------------------------------------------------------------------ both clients, one server


def test_both_clients_share_one_server(procs: ProcRegistry, env: dict[str, str], rundir: str,
                                       real_base: RealBase) -> None:
    """Same script, same cwd: our client (default run base, as the C client's) and the C
    client reach the same server."""
    env_default = dict(env)
    env_default.pop(RUNDIR_ENV)
    c = Client("c", procs, env_default, rundir, real_base)
    o = Client("ours", procs, env_default, rundir, real_base)
    script = _script(rundir)
    pid = c.server_pid(script)
    assert o.server_pid(script) == pid
    assert c.server_pid(script) == pid
    assert o.run(script, "exit", "42") == c.run(script, "exit", "42")
    # ... and it is the other way round too after a fresh start by our client.
    fresh = o.server_pid(script, opts=["-f"])
    assert fresh != pid
    assert c.server_pid(script) == fresh


# ------------------------------------------------------------------ the Perl script side


PERL = """\
use strict;
use POSIX ();
use Proc::Prefork::Interp;
prefork_initialisation_complete();
$| = 1;
print "argv: ", join("|", @ARGV), "\\n";
print STDERR "stderr: $ENV{PF_PERL}\\n";
my ($how, $code) = @ARGV[-2, -1];
POSIX::_exit($code) if $how eq "_exit";
kill 'TERM', $$ if $how eq "term";
exit $code;
"""


@pytest.mark.parametrize(("how", "code", "want"), [
    ("_exit", "0", 0), ("_exit", "3", 3), ("_exit", "42", 42), ("term", "0", -signal.SIGTERM),
])
def test_perl_script_side_ours_matches_c_client(procs: ProcRegistry, env: dict[str, str],
                                                rundir: str, real_base: RealBase, how: str,
                                                code: str, want: int) -> None:
    """Our client drives the reference Perl side exactly as the C client does (POSIX::_exit
    and self-kill give a definite status: a plain ``exit`` races with the reference monitor,
    see the next test)."""
    script = write_script(rundir, "p.pl", PERL, shebang=f"{CLIENT} -U,perl")
    env = dict(env, PF_PERL="from env")
    argv_line = f"argv: perl|{script}|a b||{how}|{code}\n".encode()  # the reference's @ARGV
    c = Client("c", procs, env, rundir, real_base)
    got_c = [c.run(script, "a b", "", how, code, interp="perl") for _ in range(2)]
    # Our client through the #! line (a cold then a warm call) ...
    got_ours = [procs.run([script, "a b", "", how, code], env=env, cwd=rundir)
                for _ in range(2)]
    # ... and spelt out.
    got_ours.append(procs.run([CLIENT, "-U", "perl", script, "a b", "", how, code], env=env,
                              cwd=rundir))
    for r in got_c:
        assert r == Result(want, argv_line, b"stderr: from env\n")
    for rc, out, err in got_ours:
        assert Result(rc, out, err) == got_c[0]


def test_perl_plain_exit_is_the_reference_race(procs: ProcRegistry, env: dict[str, str],
                                               rundir: str, real_base: RealBase) -> None:
    """With a plain ``exit`` the reference monitor SIGINTs an executor that is already
    shutting down (PROTOCOL.md, "Seen wrong"): usually status 130, sometimes the exit code.
    Both clients give the same output and one of those two statuses."""
    script = write_script(rundir, "p.pl", PERL, shebang=f"{CLIENT} -U,perl")
    c = Client("c", procs, env, rundir, real_base)
    o = Client("ours", procs, env, rundir, None)
    for cl in (c, o, c, o):
        r = cl.run(script, "exit", "3", interp="perl")
        assert r.rc in (3, -signal.SIGINT), r
        assert r.out == f"argv: perl|{script}|exit|3\n".encode()
        assert r.err == b"stderr: \n"


def test_perl_script_never_initialised(ours: Client, rundir: str) -> None:
    script = write_script(rundir, "n.pl", 'print "no init\\n"; exit 0;\n',
                          shebang="/usr/bin/perl")
    r = ours.run(script, interp="perl")
    assert r.rc == 127
    assert r.err.startswith(b"no init\n")
    assert b"setup failed" in r.err

