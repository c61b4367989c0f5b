"""Signals sent to the caller's process reach the script as if it had been run directly: to
its handlers, with their default actions, before the executor exists (queued, not lost),
Ctrl-C under a terminal (KeyboardInterrupt and death by SIGINT)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pexpect  # type: ignore[import-untyped]
import pytest
from _procfacts import raw_connect, send_fds, socket_file, spares
from harness import scaled, wait_for
from procfs import listening_pid, reading_fd, signal_mask, title, wchan

from prefork.common import protocol

from .probes import (
    INTERPRETERS,
    PYTHONS,
    Probe,
    ProbeFactory,
    pty_spawn,
    pty_status,
    read_line,
    status_text,
)

pytestmark = pytest.mark.timeout(120)

SIGNALLED = r'''
import signal
sig = int(sys.argv[1])
mode = sys.argv[2]
if mode == "handler":
    # os.write: a print() here could re-enter the "ready" print's flush
    signal.signal(sig, lambda s, f: os.write(1, b"handler %d\n" % s))
elif mode == "ignore":
    signal.signal(sig, signal.SIG_IGN)
print("ready", os.getpid(), flush=True)
data = sys.stdin.read()
print("eof", len(data), flush=True)
'''

#: Signals whose default action ends the process.
FATAL = {signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGALRM, signal.SIGQUIT,
         signal.SIGINT, signal.SIGABRT, signal.SIGRTMIN}


def blocked(pid: int) -> None:
    """Wait until ``pid`` sleeps reading stdin, so that a signal cannot land in the middle
    of its "ready" print."""
    wait_for(lambda: reading_fd(pid), what=f"process {pid} to block reading stdin")


def signal_run(probe_popen: subprocess.Popen[bytes], sig: int, mode: str
               ) -> tuple[str, bytes, bytes]:
    """Wait until the probe is ready and blocked, send ``sig`` to the process we started,
    then end its input (after its death, for a fatal default action); the outcome."""
    p = probe_popen
    ready = read_line(p)
    assert ready.startswith(b"ready "), ready
    blocked(int(ready.split()[1]))
    os.kill(p.pid, sig)
    if mode == "handler":
        line = read_line(p, eof_ok=True)
        if line != f"handler {sig}\n".encode():
            out, err = p.communicate(b"", timeout=scaled(20))
            raise AssertionError(f"no handler line: {line!r} then {out!r} {err!r} "
                                 f"({status_text(p.returncode)})")
    elif mode == "default" and sig in FATAL:
        p.wait(timeout=scaled(20))
    out, err = p.communicate(b"input", timeout=scaled(20))
    return status_text(p.returncode), out, err


#: Every signal a caller can send and a script can catch, but the synchronous faults
#: (SIGSEGV, SIGBUS, SIGILL, SIGFPE: see test_differences.py).
CATCHABLE = sorted(
    {int(s) for s in signal.valid_signals()}
    - {signal.SIGKILL, signal.SIGSTOP, signal.SIGSEGV, signal.SIGBUS, signal.SIGILL,
       signal.SIGFPE}
    # glibc keeps the first real-time signals for itself (Python's SIGRTMIN is past them)
    - set(range(32, signal.SIGRTMIN)))


def _name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"SIGRTMIN+{sig - signal.SIGRTMIN}"


@pytest.mark.parametrize("how", ["cold", "warm"])
@pytest.mark.parametrize("sig", CATCHABLE, ids=_name)
def test_signal_to_the_caller_reaches_the_scripts_handler(make_probe: ProbeFactory,
                                                          how: str, sig: int) -> None:
    probe = make_probe(SIGNALLED)
    want = signal_run(probe.popen("direct", str(sig), "handler"), sig, "handler")
    got = signal_run(probe.popen(how, str(sig), "handler"), sig, "handler")
    assert got == want
    assert want == ("exit 0", b"eof 5\n", b"")


DEFAULT_ACTIONS = [signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGALRM,
                   signal.SIGQUIT, signal.SIGINT, signal.SIGWINCH, signal.SIGCHLD,
                   signal.SIGURG, signal.SIGCONT, signal.SIGABRT, signal.SIGRTMIN]


@pytest.mark.parametrize("how", ["cold", "warm"])
@pytest.mark.parametrize("mode", ["default", "ignore"])
@pytest.mark.parametrize("sig", DEFAULT_ACTIONS, ids=_name)
def test_signal_default_action_and_ignored(make_probe: ProbeFactory, how: str, mode: str,
                                           sig: int) -> None:
    """No handler: the default action (death by the same signal -- SIGINT as
    KeyboardInterrupt -- or nothing); SIG_IGN: nothing."""
    probe = make_probe(SIGNALLED)
    want = signal_run(probe.popen("direct", str(sig), mode), sig, mode)
    got = signal_run(probe.popen(how, str(sig), mode), sig, mode)
    assert got == want


HELD = r'''
import signal
def early(signum, frame):
    os.write(1, b"handler %d\n" % signum)
for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, early)
HOLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hold")
def hold(where):
    def hook():
        if os.path.exists(f"{HOLD}.{where}"):
            os.unlink(f"{HOLD}.{where}")
            with open(f"{HOLD}.pid", "w") as f:
                f.write(str(os.getpid()))
            fd = os.open(HOLD, os.O_RDONLY)
            os.read(fd, 1)
            os.close(fd)
    return hook
os.register_at_fork(before=hold("before"), after_in_child=hold("child"))
'''

HELD_BODY = r'''
import time
print("ready", flush=True)
sys.stdin.read()
'''


def _spare_ready(probe: Probe) -> None:
    """Wait until the probe's server has its spare ready (titled ``[spare]``: forked after
    the last call, past the fork hooks)."""
    rundir = probe.env["PREFORK_INTERP_RUNDIR"]
    server = wait_for(lambda: listening_pid(socket_file(rundir)), what="the probe's server")
    wait_for(lambda: any(title(pid).endswith(" [spare]") for pid in spares(server)),
             what="the server's spare")


class Hold:
    """Makes the server (``before``) or the new executor (``child``) wait at fork."""

    def __init__(self, directory: Path) -> None:
        self.fifo = directory / "hold"
        os.mkfifo(self.fifo)

    def arm(self, where: str) -> None:
        (self.fifo.parent / f"hold.{where}").touch()

    def reached(self) -> tuple[int, int]:
        """Wait until the hook blocks on the FIFO; (fd to release it, pid of the holder)."""
        def opened() -> int:
            try:
                return os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader yet
                return 0
        fd = wait_for(opened, what="the fork hook to block")
        pid = int((self.fifo.parent / "hold.pid").read_text())
        return fd, pid

    @staticmethod
    def release(fd: int) -> None:
        os.write(fd, b"x")
        os.close(fd)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT],
                         ids=_name)
def test_signal_while_the_executor_is_being_set_up(make_probe: ProbeFactory, tmp_path: Path,
                                                   sig: int) -> None:
    """The executor exists but is not ready (held right after its fork: the spare that
    takes the next call, forked when the call before was handed out): the signal sent to
    the client is forwarded, stays pending in the executor, and reaches the script's handler
    once it is ready -- not the server's handlers, not the server itself."""
    probe = make_probe(HELD_BODY, pre=HELD)
    hold = Hold(tmp_path)
    probe.prepare("warm")
    _spare_ready(probe)  # armed earlier, the hook would hold the spare that takes "before"
    hold.arm("child")
    before = probe.run("warm", input=b"")  # handing it out forks the next executor: held
    assert before.status == "exit 0" and before.out == b"ready\n"
    fd, child = hold.reached()
    p = probe.popen("warm")
    # In its x1 loop (select), the client has its forwarding handlers: a signal before
    # that could meet Python's own SIGINT handler or the default action.
    wait_for(lambda: wchan(p.pid).startswith("poll_schedule"),
             what="the client waiting in its x1 loop")
    os.kill(p.pid, sig)
    wait_for(lambda: signal_mask(child, "ShdPnd") & (1 << (sig - 1)), what="the signal pending")
    hold.release(fd)
    assert read_line(p) == f"handler {sig}\n".encode()
    assert read_line(p) == b"ready\n"
    out, err = p.communicate(b"", timeout=scaled(20))
    assert (p.returncode, out, err) == (0, b"", b"")
    # The server took nothing for itself: the same server serves the next call.
    again = probe.run("warm", input=b"")
    assert again.status == "exit 0" and again.out == b"ready\n"


def _occupy(probe: Probe) -> subprocess.Popen[bytes]:
    """A call that runs until its stdin is closed: while it runs, the server has no spare
    (it forks the next one once a call ends), so the next call's executor is forked for it,
    after its request has arrived."""
    p = probe.popen("warm")
    assert read_line(p) == b"ready\n"
    return p


def _end(p: subprocess.Popen[bytes]) -> None:
    out, err = p.communicate(b"", timeout=scaled(20))
    assert (p.returncode, out, err) == (0, b"", b"")


def test_signal_before_the_executor_exists(make_probe: ProbeFactory, tmp_path: Path) -> None:
    """The server is held before the fork of the call's executor when the client is
    signalled: the record waits in the socket and is delivered once the executor exists."""
    probe = make_probe(HELD_BODY, pre=HELD)
    hold = Hold(tmp_path)
    probe.prepare("warm")
    busy = _occupy(probe)
    hold.arm("before")
    p = probe.popen("warm")
    fd, _server = hold.reached()
    os.kill(p.pid, signal.SIGUSR1)
    hold.release(fd)
    # Delivered whether the record is read before or after the executor is ready.
    lines = {read_line(p), read_line(p)}
    assert lines == {b"handler 10\n", b"ready\n"}
    _, err = p.communicate(b"", timeout=scaled(20))
    assert p.returncode == 0 and err == b""
    _end(busy)


@pytest.mark.parametrize("split", ["same-packet", "before-fork"])
def test_signal_record_with_the_request_tail(make_probe: ProbeFactory, tmp_path: Path,
                                             rundir: str, split: str) -> None:
    """A raw x1 client sends the 'S' record in the same packet as the end of its request
    (or while the server is held before the fork of the call's executor): the executor
    still gets the signal, in the script's handler."""
    probe = make_probe(HELD_BODY, pre=HELD)
    hold = Hold(tmp_path)
    probe.prepare("warm")
    busy = _occupy(probe) if split == "before-fork" else None
    sock = raw_connect(socket_file(rundir))
    r_out, w_out = os.pipe()
    r_in, w_in = os.pipe()
    cwd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        sock.sendall(bytes([protocol.SIGBYTE_X1]))
        send_fds(sock, [r_in, w_out, w_out, cwd])
        tail = protocol.encode_request_x1_tail(
            [os.fsencode(f"{k}={v}") for k, v in probe.env.items()],
            [os.fsencode(probe.python), os.fsencode(probe.path)], 0o022, 0, os.getpid())
        record = protocol.encode_record(protocol.REC_SIGNAL, signal.SIGUSR1)
        if split == "same-packet":
            sock.sendall(tail + record)
        else:
            hold.arm("before")
            sock.sendall(tail)
            fd, _ = hold.reached()
            sock.sendall(record)
            hold.release(fd)
    finally:
        for f in (r_in, w_out, cwd):
            os.close(f)
    with os.fdopen(r_out, "rb") as out_f:
        # Both lines before the script is let go (its stdin closed): the signal may reach
        # it after "ready", while it waits on its stdin.
        lines = {out_f.readline(), out_f.readline()}
        assert lines == {b"handler 10\n", b"ready\n"}
        os.close(w_in)
        assert out_f.read() == b""
    recs, _ = protocol.decode_records(_drain(sock))
    assert (protocol.REC_STATUS, 0) in recs
    sock.close()
    if busy is not None:
        _end(busy)


def _drain(sock: object) -> bytes:
    from _procfacts import drain_until_closed

    return drain_until_closed(sock)  # type: ignore[arg-type]


CTRL_C = r'''
import time
print("ready", flush=True)
if sys.argv[1] == "read":
    sys.stdin.readline()
else:
    time.sleep(1000)  # one call: ^C lands in it, never between two (a traceback line apart)
'''


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("how", ["cold", "warm"])
@pytest.mark.parametrize("where", ["read", "sleep"])
def test_ctrl_c_under_a_terminal(make_probe: ProbeFactory, python: str, how: str,
                                 where: str) -> None:
    """^C typed on the terminal: the same KeyboardInterrupt traceback on the terminal and
    death by SIGINT, as the calling shell sees it."""
    probe = make_probe(CTRL_C, python=INTERPRETERS[python])
    env = {**probe.env, "TERM": "xterm-256color"}  # coloured tracebacks in 3.13
    results = {}
    for mode in ("direct", how):
        probe.prepare(mode)
        child = pty_spawn(probe.command(mode, where), env)
        try:
            child.expect_exact(b"ready\r\n")
            child.send(b"\x03")
            child.expect(pexpect.EOF)
            results[mode] = (pty_status(child), child.before)
        finally:
            child.close(force=True)
    assert results[how] == results["direct"]
    assert results["direct"][0] == "signal SIGINT"
    assert b"KeyboardInterrupt" in results["direct"][1]
