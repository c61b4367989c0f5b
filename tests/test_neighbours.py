"""Hostile neighbours (issue 11, item 7): a run directory another user could steer, and a
peer that is not our server.

- A run directory any of whose ancestors another user can write (or owns) is refused, as
  OpenSSH's StrictModes does; a sticky directory such as ``/tmp`` is fine (others cannot
  rename or delete what is ours in it).
- The client signals an executor's process group (when the server died under a call) only
  after checking that the ``P`` record names a child of the server it is connected to; a
  listener of another uid is refused before anything is sent to it.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess

import pytest
from _procfacts import socket_file
from harness import CLIENT, PYTHON, Lines, ProcRegistry, scaled, wait_for, write_script
from procfs import gone

SCRIPT = """
import os, sys
import prefork
prefork.initialisation_complete(log="file")
print("ok", os.getppid())
"""


def _one_line_127(rc: int, out: bytes, err: bytes, *words: str) -> None:
    assert rc == 127, (rc, out, err)
    lines = err.decode(errors="replace").splitlines()
    assert len(lines) == 1 and lines[0].startswith("prefork-interp: "), lines
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o757])
@pytest.mark.parametrize("exists", [True, False])
def test_run_dir_under_a_directory_others_can_write_is_refused(
        mode: int, exists: bool, rundir: str, env: dict[str, str], procs: ProcRegistry) -> None:
    shared = os.path.join(rundir, "shared")
    os.mkdir(shared)
    os.chmod(shared, mode)
    run = os.path.join(shared, "run")
    if exists:
        os.mkdir(run, 0o700)
    script = write_script(rundir, "n.py", SCRIPT)
    rc, out, err = procs.run([script], env=dict(env, PREFORK_INTERP_RUNDIR=run))
    _one_line_127(rc, out, err, shared)
    assert os.listdir(run) == [] if exists else not os.path.exists(run)


def test_run_dir_under_a_sticky_directory_is_accepted(rundir: str, env: dict[str, str],
                                                      procs: ProcRegistry) -> None:
    shared = os.path.join(rundir, "sticky")
    os.mkdir(shared)
    os.chmod(shared, 0o1777)
    script = write_script(rundir, "n.py", SCRIPT)
    rc, _, err = procs.run([script], env=dict(env, PREFORK_INTERP_RUNDIR=shared + "/run"))
    assert (rc, err) == (0, b""), err


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
def test_run_dir_under_a_directory_another_user_owns_is_refused(
        rundir: str, env: dict[str, str], procs: ProcRegistry) -> None:
    theirs = os.path.join(rundir, "theirs")
    os.mkdir(theirs, 0o755)
    os.chmod(theirs, 0o755)
    run = os.path.join(theirs, "run")
    os.mkdir(run, 0o700)
    os.chown(theirs, 65534, 65534)
    script = write_script(rundir, "n.py", SCRIPT)
    rc, out, err = procs.run([script], env=dict(env, PREFORK_INTERP_RUNDIR=run))
    _one_line_127(rc, out, err, theirs)


# ------------------------------------------------------------------ fake servers

_FAKE = r"""
import os, socket, struct, sys
path, victim, uid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
assert victim > 1 and victim != os.getpgrp()  # a P record naming a group that is safe to lose
lst = socket.socket(socket.AF_UNIX)
lst.bind(path)
if uid >= 0:
    os.chmod(path, 0o777)
    os.setuid(uid)
lst.listen(1)
print("listening", flush=True)
conn, _ = lst.accept()
tok = b"prefork-x1\0"
got, fds = b"", 0
def take(n):
    global got, fds
    while n > 0:
        data, anc, _, _ = conn.recvmsg(n, socket.CMSG_SPACE(64))
        if not data:
            raise EOFError
        for _lvl, _typ, blob in anc:
            fds += len(blob) // 4
        got += data
        n -= len(data)
try:
    conn.sendall(b"PFI\n" + struct.pack("=I", len(tok)) + tok)  # refused at once: EPIPE
    take(2)                                   # signalling byte, then the fd-carrying byte
    start = len(got); take(4); (mlen,) = struct.unpack(">I", got[start:])
    take(mlen)
    start = len(got); take(4); (xlen,) = struct.unpack(">I", got[start:])
    take(xlen)
    conn.sendall(b"P" + struct.pack(">I", victim))
except (EOFError, ConnectionError):
    pass
conn.close()
print("got", len(got), "bytes", fds, "fds", flush=True)
"""


def _fake_server(procs: ProcRegistry, path: str, victim: int, uid: int = -1
                 ) -> tuple[subprocess.Popen[bytes], Lines]:
    fake = procs.popen([str(PYTHON), "-c", _FAKE, path, str(victim), str(uid)],
                       stdout=subprocess.PIPE)
    assert fake.stdout is not None
    lines = Lines(fake.stdout.fileno())
    assert lines.line() == b"listening"
    return fake, lines


def _victim(procs: ProcRegistry) -> subprocess.Popen[bytes]:
    """A process group of the test's own for a fake server to name: ``cat`` in its own
    session (never a group that is not ours to lose)."""
    return procs.popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                       start_new_session=True)


def _alive(victim: subprocess.Popen[bytes]) -> bool:
    """Whether ``victim`` was not killed: it echoes a line written now.  A SIGKILL sent
    before (by a client that has exited since) is acted on before it can run again, so
    the answer is certain, not a race with the signal's delivery."""
    assert victim.stdin is not None and victim.stdout is not None
    try:
        victim.stdin.write(b"ping\n")
        victim.stdin.flush()
    except BrokenPipeError:
        return False
    fd = victim.stdout.fileno()
    assert select.select([fd], [], [], scaled(10))[0], "cat neither echoed nor ended"
    return os.read(fd, 100) == b"ping\n"  # b"": killed


def _stop_real_server(script: str, env: dict[str, str], procs: ProcRegistry) -> str:
    """Start the script's server, then stop it: its socket path, free for a fake."""
    rc, out, err = procs.run([script], env=env)
    assert rc == 0, err
    server = int(out.split()[1])
    sock = socket_file(env["PREFORK_INTERP_RUNDIR"])
    rc, _, err = procs.run([str(CLIENT), "--kill", "-U", str(PYTHON), script], env=env)
    assert rc == 0, err
    wait_for(lambda: gone(server), what="the real server gone")
    return sock


def test_fake_server_cannot_make_the_client_kill_a_process_group(
        rundir: str, env: dict[str, str], procs: ProcRegistry) -> None:
    """A peer (same uid) that sends ``P <pgid of an unrelated group>`` and hangs up: the
    client reports the failure and signals nobody."""
    script = write_script(rundir, "n.py", SCRIPT)
    sock = _stop_real_server(script, env, procs)
    victim = _victim(procs)
    fake, lines = _fake_server(procs, sock, victim.pid)
    rc, out, err = procs.run([script], env=env)
    assert rc == 127, (rc, out, err)
    assert lines.line().startswith(b"got ")
    fake.wait()
    assert _alive(victim), "the client killed a process group a peer named"


@pytest.mark.skipif(os.getuid() != 0, reason="a listener of another uid needs root")
def test_listener_of_another_uid_is_refused_before_the_request(
        rundir: str, env: dict[str, str], procs: ProcRegistry) -> None:
    """A socket at our path whose listener is another uid (SO_PEERCRED): refused, and it
    gets neither our fds nor our environment."""
    script = write_script(rundir, "n.py", SCRIPT)
    sock = _stop_real_server(script, env, procs)
    # The P record names a group of the test's own (never a shared one: before the fix the
    # client signalled whatever the peer named).
    victim = _victim(procs)
    fake, lines = _fake_server(procs, sock, victim.pid, uid=65534)
    rc, out, err = procs.run([script], env=env)
    _one_line_127(rc, out, err, "uid 65534")
    assert lines.line() == b"got 0 bytes 0 fds"
    fake.wait()
    assert _alive(victim)


HOLD = """
import os, subprocess, sys
import prefork
prefork.initialisation_complete(log="file", autoreload=False)
if sys.argv[1:] == ["hold"]:
    child = subprocess.Popen(["sleep", "1000"])  # in the executor's process group
    print(os.getppid(), os.getpid(), child.pid, flush=True)
    sys.stdin.buffer.read()
print("ok", os.getppid())
"""


def test_warm_call_whose_server_is_killed_still_cleans_up(
        rundir: str, env: dict[str, str], procs: ProcRegistry) -> None:
    """The verified case: a warm call (its connection's peer is the server, which listened
    again once it was the server) whose server is SIGKILLed: the client kills what the
    executor started."""
    script = write_script(rundir, "h.py", HOLD)
    rc, _, err = procs.run([script], env=env)  # the cold start: the first call
    assert rc == 0, err
    p = procs.popen([script, "hold"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
    assert p.stdout is not None
    server, executor, child = map(int, Lines(p.stdout.fileno()).line().split())
    os.kill(server, signal.SIGKILL)
    assert p.wait(timeout=scaled(60)) == 127
    wait_for(lambda: gone(executor) and gone(child), what="the executor and its child gone")
