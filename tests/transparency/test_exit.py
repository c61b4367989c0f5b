"""How a call ends: exit codes, sys.exit messages, tracebacks, death by signal (as the calling
shell reports it), SIGPIPE, and what must not be lost at exit (atexit, unclosed files)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from .probes import (
    INTERPRETERS,
    PY311,
    PYTHONS,
    ProbeFactory,
    Run,
    needs_py311,
    normalise_bash,
    status_text,
)

pytestmark = pytest.mark.timeout(120)

EXIT = r'''
what = sys.argv[1]
print("out before", flush=False)
print("err before", file=sys.stderr)
if what == "code":
    sys.exit(int(sys.argv[2]))
if what == "raise-code":
    raise SystemExit(int(sys.argv[2]))
if what == "msg":
    sys.exit("goodbye: " + sys.argv[2])
if what == "none":
    sys.exit()
if what == "obj":
    sys.exit([1, "two"])
if what == "float":
    sys.exit(2.5)
if what == "true":
    sys.exit(True)
if what == "os_exit":
    os._exit(int(sys.argv[2]))
if what == "fallthrough":
    pass
'''

CODES = [0, 1, 2, 3, 7, 42, 63, 64, 99, 100, 125, 126, 127, 128, 129, 130, 137, 141, 143,
         200, 254, 255, 256, 257, 511, -1, -2, -128, 1000]
#: Codes also checked cold (a fresh server each: slower).
COLD_CODES = (0, 1, 42, 255, 256, -1)


@pytest.mark.parametrize("python", PYTHONS)
def test_exit_codes(make_probe: ProbeFactory, python: str) -> None:
    """sys.exit(N) for N across 0..255 and beyond: the same status, the same output."""
    probe = make_probe(EXIT, python=INTERPRETERS[python])
    for code in CODES:
        for what in ("code", "raise-code"):
            hows = ("cold", "warm") if code in COLD_CODES else ("warm",)
            want = probe.differential(what, str(code), hows=hows)
            assert want.status == f"exit {code & 0xFF}"
    for code in (0, 5, 255):
        probe.differential("os_exit", str(code))


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("what", ["msg", "none", "obj", "float", "true", "fallthrough"])
def test_sys_exit_forms(make_probe: ProbeFactory, python: str, what: str) -> None:
    probe = make_probe(EXIT, python=INTERPRETERS[python])
    want = probe.differential(what, "é\udcff" if what == "msg" else "x")
    if what == "msg":
        assert want.status == "exit 1" and b"goodbye: " in want.err


EXCEPTIONS = r'''
import atexit
what = sys.argv[1]
atexit.register(lambda: print("atexit ran", file=sys.stderr))

class Custom(Exception):
    def __str__(self):
        return "custom text é"

def inner(n):
    if n == 0:
        if what == "value":
            raise ValueError("boom")
        if what == "chained":
            try:
                {}["missing"]
            except KeyError as e:
                raise RuntimeError("while handling") from e
        if what == "context":
            try:
                1 / 0
            except ZeroDivisionError:
                raise OSError(2, "no such thing", "/some/path")
        if what == "custom":
            raise Custom()
        if what == "group":
            raise ExceptionGroup("several", [ValueError(1), TypeError("two")])
        if what == "recursion":
            return inner(0) + 1
        if what == "syntax":
            exec("def broken(:\n  pass")
        if what == "note":
            e = ValueError("noted")
            e.add_note("a note about it")
            raise e
        if what == "hook":
            sys.excepthook = lambda t, v, tb: print("HOOK", t.__name__, v, file=sys.stderr)
            raise LookupError("via hook")
        if what == "unprintable":
            class Bad(Exception):
                def __str__(self):
                    raise TypeError("no str")
            raise Bad()
    return inner(n - 1)

print("partial output", end="")
inner(3)
'''

EXC_KINDS = ["value", "chained", "context", "custom", "group", "recursion", "syntax", "note",
             "hook", "unprintable"]


@pytest.mark.parametrize(("what", "python"), [
    pytest.param(what, python.values[0], marks=python.marks)
    for what in EXC_KINDS for python in PYTHONS])
def test_uncaught_exception(make_probe: ProbeFactory, python: str, what: str) -> None:
    """The traceback text (frames, source lines, carets, chaining, notes), the atexit output
    after it, and exit status 1."""
    probe = make_probe(EXCEPTIONS, python=INTERPRETERS[python])
    want = probe.differential(what)
    assert want.status == "exit 1" and b"atexit ran" in want.err, want


@pytest.mark.parametrize("io", ["pipe", "pty"])
def test_uncaught_exception_under_pty(make_probe: ProbeFactory, io: str) -> None:
    probe = make_probe(EXCEPTIONS)
    probe.differential("chained", io=io)


SELF_KILL = r'''
import signal
print("before", flush=True)
how = sys.argv[1]
sig = getattr(signal, sys.argv[2], None)
if how == "kill":
    os.kill(os.getpid(), sig)
elif how == "raise":
    signal.raise_signal(sig)
elif how == "abort":
    os.abort()
elif how == "segv":
    import ctypes
    ctypes.string_at(0)
elif how == "alarm":
    signal.setitimer(signal.ITIMER_REAL, 0.01)
    signal.pause()
print("not reached")
'''

SELF_KILLS = [("kill", "SIGTERM"), ("kill", "SIGSEGV"), ("kill", "SIGABRT"), ("kill", "SIGUSR1"),
              ("kill", "SIGHUP"), ("kill", "SIGKILL"), ("kill", "SIGQUIT"), ("kill", "SIGUSR2"),
              ("raise", "SIGTERM"), ("raise", "SIGBUS"), ("abort", "-"), ("segv", "-"),
              ("alarm", "-"), ("kill", "SIGINT")]


def _in_bash(probe_run: Run) -> tuple[str, bytes, bytes]:
    return probe_run.status, probe_run.out, normalise_bash(probe_run.err)


@pytest.mark.parametrize("how", ["cold", "warm"])
@pytest.mark.parametrize(("kind", "sig"), SELF_KILLS, ids=[f"{k}-{s}" for k, s in SELF_KILLS])
def test_death_by_signal_as_the_shell_sees_it(make_probe: ProbeFactory, how: str, kind: str,
                                              sig: str) -> None:
    """The script kills itself: the caller dies of the same signal (WIFSIGNALED), bash prints
    the same "Terminated" / "Segmentation fault" line and gets the same $?."""
    probe = make_probe(SELF_KILL)
    results = {}
    for mode in ("direct", how):
        probe.prepare(mode)
        cmd = probe.command(mode, kind, sig)
        # As the shell reports it (no core dumps: see test_differences.py for why).
        rc, out, err = probe.procs.run(
            ["bash", "-c", 'ulimit -c 0; "$@"; echo "status=$?"', "bash", *cmd],
            env=probe.env)
        # As a parent's waitpid() sees it.
        plain = probe.procs.run(["bash", "-c", 'ulimit -c 0; exec "$@"', "bash", *cmd],
                                env=probe.env)[0]
        results[mode] = (plain, rc, out, normalise_bash(err))
    assert results[how] == results["direct"]
    assert results["direct"][0] < 0, "the direct run must die of a signal"


@pytest.mark.parametrize("python", PYTHONS)
def test_sigint_to_self_is_keyboardinterrupt(make_probe: ProbeFactory, python: str) -> None:
    """os.kill(getpid(), SIGINT): KeyboardInterrupt traceback, then death by SIGINT."""
    probe = make_probe(SELF_KILL, python=INTERPRETERS[python])
    want = probe.differential("kill", "SIGINT")
    assert want.status == "signal SIGINT" and b"KeyboardInterrupt" in want.err


#: Prints a line, waits until the reader is gone (POLLERR on the pipe), then keeps printing:
#: the outcome does not depend on when ``head`` happens to exit.
SIGPIPE = r'''
import select, signal
if sys.argv[1:] == ["dfl"]:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
print("line 0", flush=True)
poll = select.poll()
poll.register(1, select.POLLERR)
poll.poll(30000)
for i in range(1, 100000):
    print("line", i)
'''


@pytest.mark.parametrize("how", ["cold", "warm"])
@pytest.mark.parametrize("unbuffered", [False, True])
def test_sigpipe_into_head(make_probe: ProbeFactory, how: str, unbuffered: bool) -> None:
    """``script | head -1``: the same stderr (BrokenPipeError and the "Exception ignored"
    flush message) and the same PIPESTATUS."""
    probe = make_probe(SIGPIPE)
    env = {**probe.env, **({"PYTHONUNBUFFERED": "1"} if unbuffered else {})}
    results = {}
    for mode in ("direct", how):
        probe.prepare(mode)
        rc, out, err = probe.procs.run(
            ["bash", "-c", '"$@" | head -1; echo "pipestatus=${PIPESTATUS[*]}"', "bash",
             *probe.command(mode)], env=env)
        results[mode] = (rc, out, err)
    assert results[how] == results["direct"]
    assert b"BrokenPipeError" in results["direct"][2]


@pytest.mark.parametrize("how", ["cold", "warm"])
def test_sigpipe_default_disposition(make_probe: ProbeFactory, how: str) -> None:
    """A script that restores SIGPIPE's default dies of it: so does the caller."""
    probe = make_probe(SIGPIPE)
    results = {}
    for mode in ("direct", how):
        probe.prepare(mode)
        rc, out, err = probe.procs.run(
            ["bash", "-c", '"$@" | head -1; echo "pipestatus=${PIPESTATUS[*]}"', "bash",
             *probe.command(mode, "dfl")], env=probe.env)
        results[mode] = (rc, out, err)
    assert results[how] == results["direct"]
    assert b"pipestatus=141 0" in results["direct"][1]


AT_EXIT = r'''
import atexit, threading, weakref, logging
target = sys.argv[1]
how = sys.argv[2]

class Noisy:
    def __del__(self):
        print("__del__ of a global", file=sys.stderr)

noisy = Noisy()

class Thing:
    pass

thing = Thing()
weakref.finalize(thing, print, "weakref.finalize ran", file=sys.stderr)
atexit.register(print, "atexit 1 (runs last)", file=sys.stderr)
atexit.register(lambda: print("atexit 2 (runs first)", file=sys.stderr, flush=True))
logging.basicConfig(filename=target + ".log", level=logging.INFO)
logging.info("logged, never flushed by hand")

def writer():
    import time
    time.sleep(0.2)
    print("non-daemon thread finished", file=sys.stderr)

threading.Thread(target=writer).start()

unclosed = open(target, "w")
unclosed.write("data in a global file object\n" * 1000)
leaked = []
def leak():
    f = open(target + ".2", "wb")
    f.write(b"bytes in a leaked buffered writer")
    leaked.append(f)
leak()
open(target + ".3", "w").write("temporary object, closed by refcount")
def make_cycle():
    f = open(target + ".4", "w")
    f.write("in a reference cycle")
    garbage = [f]
    garbage.append(garbage)
make_cycle()
print("stdout, no newline, no flush", end="")
if how == "exit":
    sys.exit(3)
if how == "raise":
    raise RuntimeError("boom")
if how == "kbi":
    raise KeyboardInterrupt
'''


def _files(base: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for suffix in ("", ".2", ".3", ".4", ".log"):
        p = Path(str(base) + suffix)
        out[suffix] = p.read_bytes() if p.exists() else None
    return out


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("end", ["normal", "exit", "raise", "kbi"])
def test_nothing_lost_at_exit(make_probe: ProbeFactory, tmp_path: Path, python: str,
                              end: str) -> None:
    """atexit handlers (in LIFO order), weakref.finalize, logging.shutdown, __del__ of
    globals, non-daemon threads joined, unclosed files' data on disk, stdout flushed."""
    probe = make_probe(AT_EXIT, python=INTERPRETERS[python])
    seen = {}
    for how in ("direct", "cold", "warm"):
        target = tmp_path / f"out-{how}"
        r = probe.run(how, str(target), end)
        seen[how] = (r.status, r.out, r.err.replace(str(target).encode(), b"TARGET"),
                     _files(target))
    assert seen["cold"] == seen["direct"]
    assert seen["warm"] == seen["direct"]
    _, out, err, files = seen["direct"]
    assert out == b"stdout, no newline, no flush"
    assert files[""] == b"data in a global file object\n" * 1000, "direct run lost data"
    assert b"atexit 1" in err


@needs_py311
def test_py311_is_the_normal_shutdown_path(make_probe: ProbeFactory) -> None:
    """The 3.11 server has no sys.monitoring: its executors end with the interpreter's own
    shutdown (so the probes above on py311 cover that path)."""
    probe = make_probe("from prefork.server import fastexit\nprint(fastexit.AVAILABLE)",
                       python=PY311)
    assert probe.run("warm").out == b"False\n"
    probe3 = make_probe("from prefork.server import fastexit\nprint(fastexit.AVAILABLE)",
                        name="probe3.py")
    assert probe3.run("warm").out == b"True\n"


def test_signal_names_are_real() -> None:
    """The self-kill table names real signals (a typo would make a probe vacuous)."""
    for _, name in SELF_KILLS:
        assert name == "-" or isinstance(getattr(signal, name), signal.Signals)


@pytest.mark.parametrize("python", PYTHONS)
def test_file_opened_before_initialisation(make_probe: ProbeFactory, tmp_path: Path,
                                           python: str) -> None:
    """A file object the server opened before initialisation_complete(), written during the
    call and never flushed: its data is on disk after the call, as after a direct run."""
    probe = make_probe(
        'early.write(f"written by {sys.argv[1]}\\n")\n',
        pre='early = open(os.path.join(os.path.dirname(__file__), "early.log"), "a")',
        python=INTERPRETERS[python])
    log = tmp_path / "early.log"
    for how in ("direct", "cold", "warm"):
        r = probe.run(how, how)
        assert r.status == "exit 0", r
        assert log.read_text().splitlines()[-1] == f"written by {how}"


FLUSH_FAILS = r'''
what = sys.argv[1]
if what == "hook":
    sys.unraisablehook = lambda u: print("HOOK", u.exc_type.__name__, u.err_msg,
                                         file=sys.stderr)
print("pending output, never written")
if what == "exit":
    sys.exit(3)
if what == "raise":
    raise KeyError("k")
if what == "kbi":
    raise KeyboardInterrupt
'''


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("what", ["normal", "exit", "raise", "kbi", "hook"])
@pytest.mark.parametrize("stderr_too", [False, True], ids=["stdout", "stdout+stderr"])
def test_stdout_flush_fails_at_exit(make_probe: ProbeFactory, python: str, what: str,
                                    stderr_too: bool) -> None:
    """stdout's reader is gone before the final flush: "Exception ignored ..." (through
    sys.unraisablehook) and status 120 whatever the status was -- but death by SIGINT after
    a KeyboardInterrupt.  With stderr the same closed pipe (``script 2>&1 | true``) the
    report itself fails, and is dropped: still 120 (issue 12, item 7)."""
    probe = make_probe(FLUSH_FAILS, python=INTERPRETERS[python])
    seen = {}
    for how in ("direct", "cold", "warm"):
        r, w = os.pipe()
        os.close(r)
        try:
            probe.prepare(how)
            p = probe.popen(how, what, stdout=w, stdin=subprocess.DEVNULL,
                            **({"stderr": w} if stderr_too else {}))
        finally:
            os.close(w)
        _, err = p.communicate(timeout=30)
        seen[how] = (status_text(p.returncode), err)
    assert seen["cold"] == seen["direct"] and seen["warm"] == seen["direct"]
    assert seen["direct"][0] == ("signal SIGINT" if what == "kbi" else "exit 120")
