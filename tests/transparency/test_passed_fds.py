"""The caller's fds other than 0, 1 and 2 (issue 12, item 6): ``script /dev/fd/3 3<file``,
``script <(cmd)``, a make jobserver, socket activation.  A direct run inherits them; under
x1 the client passes them on and the executor has them at the same numbers, inheritable.
Each test runs the probe directly, cold and warm (the server started by a call without those
fds), under pipes and a pty, on 3.13 and 3.11."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from harness import scaled, wait_for

from .probes import INTERPRETERS, PYTHONS, ProbeFactory, Run, run_pty, status_text

pytestmark = pytest.mark.timeout(120)

#: What a process sees of its fds above 2: number, inheritable, kind, and what it reads.
FDS = r'''
import json, stat
def kind(fd):
    mode = os.fstat(fd).st_mode
    for name in ("S_ISFIFO", "S_ISSOCK", "S_ISREG", "S_ISCHR", "S_ISDIR"):
        if getattr(stat, name)(mode):
            return name[4:]
    return "?"
# os.listdir's own fd is listed too, and closed by the time it returns.
fds = [fd for fd in sorted(int(n) for n in os.listdir("/proc/self/fd"))
       if fd > 2 and os.path.exists(f"/proc/self/fd/{fd}")]
seen = {"fds": [(fd, os.get_inheritable(fd), kind(fd)) for fd in fds]}
for name in sys.argv[1:]:
    with open(name) as f:
        seen[name] = f.read().strip()
if 5 in fds:
    os.write(5, b"written to fd 5\n")
print(json.dumps(seen), flush=True)
'''

#: The caller: a process substitution (/dev/fd/63), a file on 3, an appending fd 5, and a
#: socket on fd 7 (what a service manager leaves).
CALLER = '"$@" <(echo substituted) 3<"$IN" 5>>"$OUT" 7<>/dev/null'


def _run(cmd: list[str], env: dict[str, str], io: str, probe_procs: object) -> Run:
    if io == "pty":
        return run_pty(cmd, env, None, b"", None, 30.0)
    rc, out, err = probe_procs.run(cmd, env=env)  # type: ignore[attr-defined]
    return Run(status_text(rc), out, err)


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("io", ["pipe", "pty"])
def test_other_fds_are_passed_at_their_numbers(make_probe: ProbeFactory, tmp_path: Path,
                                               python: str, io: str) -> None:
    probe = make_probe(FDS, python=INTERPRETERS[python])
    (tmp_path / "in").write_text("from fd 3\n")
    env = {**probe.env, "IN": str(tmp_path / "in"), "OUT": str(tmp_path / "out")}
    runs = {}
    for how in ("direct", "cold", "warm"):
        probe.prepare(how)
        (tmp_path / "out").write_text("")
        runs[how] = (_run(["bash", "-c", CALLER, "bash", *probe.command(how), "/dev/fd/3"],
                          env, io, probe.procs), (tmp_path / "out").read_text())
    direct = runs["direct"]
    seen = json.loads(direct[0].out.decode().strip().splitlines()[-1])
    assert seen["fds"] == [[3, True, "REG"], [5, True, "REG"], [7, True, "CHR"],
                           [63, True, "FIFO"]], seen
    assert seen["/dev/fd/3"] == "from fd 3" and seen["/dev/fd/63"] == "substituted"
    assert direct[1] == "written to fd 5\n"
    for how in ("cold", "warm"):
        assert runs[how] == direct, how


def test_a_script_reading_a_process_substitution(make_probe: ProbeFactory) -> None:
    """``script <(cmd)``: the argument names /dev/fd/63, which the script opens."""
    probe = make_probe('print(open(sys.argv[1]).read(), end="")\n')
    for how in ("direct", "cold", "warm"):
        probe.prepare(how)
        rc, out, err = probe.procs.run(
            ["bash", "-c", '"$@" <(seq 3)', "bash", *probe.command(how)], env=probe.env)
        assert (rc, out, err) == (0, b"1\n2\n3\n", b""), how


MAKEFILE = """\
all: a b
a b:
\t+@$(SCRIPT) $@
"""

JOBSERVER = r'''
import re
auth = re.search(r"--jobserver-auth=(\d+),(\d+)", os.environ.get("MAKEFLAGS", ""))
r, w = int(auth[1]), int(auth[2])
token = os.read(r, 1)          # an extra job slot, from make's jobserver pipe
os.write(w, token)             # given back
print(sys.argv[1], "got a job slot", flush=True)
'''


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_jobserver(make_probe: ProbeFactory, tmp_path: Path) -> None:
    """A recipe marked ``+`` under ``make -j4``: the script takes a job slot from make's
    jobserver pipe (``--jobserver-auth=R,W`` fds) and gives it back.  Four slots: the two
    recipes hold two, each script takes one of the two left (under -j3 one of them could
    find the pipe, which make keeps non-blocking, empty: EAGAIN in a direct run too)."""
    probe = make_probe(JOBSERVER)
    (tmp_path / "Makefile").write_text(MAKEFILE)
    for how in ("direct", "cold", "warm"):
        probe.prepare(how)
        script = " ".join(probe.command(how))
        rc, out, err = probe.procs.run(["make", "-s", "-j4", "-C", str(tmp_path),
                                        f"SCRIPT={script}"], env=probe.env, timeout=60)
        assert rc == 0, (how, out, err)
        assert sorted(out.splitlines()) == [b"a got a job slot", b"b got a job slot"], how


ACTIVATED = r'''
import socket
n = int(os.environ.get("LISTEN_FDS", "0"))
ok = os.environ.get("LISTEN_PID") == str(os.getpid())   # what sd_listen_fds() checks
listener = socket.socket(fileno=3)
conn, _ = listener.accept()
conn.sendall(f"{n} {ok} {listener.family.name}".encode())
conn.close()
'''


def _connected(proc: subprocess.Popen[bytes], path: Path) -> socket.socket | None:
    """A connection to ``path``, once the activator ``proc`` listens (a fresh socket each
    try)."""
    assert proc.poll() is None, proc.communicate()
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        return None
    return s


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="no systemd-socket-activate")
@pytest.mark.parametrize("python", PYTHONS)
def test_socket_activation(make_probe: ProbeFactory, tmp_path: Path, python: str) -> None:
    """``systemd-socket-activate -l SOCK script``: the script gets the listening socket on
    fd 3 with ``LISTEN_FDS=1`` and ``LISTEN_PID`` its own pid, and serves a connection."""
    probe = make_probe(ACTIVATED, python=INTERPRETERS[python])
    for how in ("direct", "cold", "warm"):
        probe.prepare(how)
        path = tmp_path / f"act-{how}"
        # The activator passes its children only the variables it is told to: all of the
        # probe's (its run directory among them, or the servers would go to the user's).
        setenv = [f"--setenv={name}" for name in probe.env]
        proc = probe.procs.popen(["systemd-socket-activate", *setenv, "-l", str(path),
                                  *probe.command(how)], env=probe.env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        with wait_for(lambda: _connected(proc, path), timeout=20,  # noqa: B023 (called now)
                      what="the activator listening") as client:
            client.settimeout(scaled(20))
            assert client.recv(100) == b"1 True AF_UNIX", how
        _, err = proc.communicate(timeout=scaled(20))
        assert proc.returncode == 0, (how, err)


@pytest.mark.parametrize("count", [300])
def test_more_fds_than_one_message_carries(make_probe: ProbeFactory, count: int) -> None:
    """300 extra fds: more than SCM_MAX_FD (253) in one message; all arrive, in place."""
    probe = make_probe(r'''
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
        print(sum(1 for fd in fds if fd > 2 and os.path.exists(f"/proc/self/fd/{fd}")))
    ''')
    spawn = ("import os, sys\n"
             f"for fd in range(10, 10 + {count}): os.dup2(1, fd)\n"
             "os.execvp(sys.argv[1], sys.argv[1:])\n")
    for how in ("direct", "cold", "warm"):
        probe.prepare(how)
        rc, out, err = probe.procs.run([sys.executable, "-c", spawn, *probe.command(how)],
                                       env=probe.env)
        assert (rc, out, err) == (0, f"{count}\n".encode(), b""), how


def test_a_number_the_script_holds_stays_the_scripts(make_probe: ProbeFactory) -> None:
    """Remaining difference: a file the script opened before initialisation_complete()
    keeps its number in every call; a caller's fd at that number cannot be installed (a
    direct run would have the caller's there and the script's elsewhere).  Said on
    stderr, not silent."""
    probe = make_probe(r'''
        print(early.fileno(), os.readlink(f"/proc/self/fd/{early.fileno()}"))
    ''', pre="early = open(os.devnull)")
    probe.prepare("warm")
    rc, out, err = probe.procs.run(probe.command("warm"), env=probe.env)
    assert rc == 0 and err == b"", err
    fd = int(out.split()[0])
    rc, out, err = probe.procs.run(["bash", "-c", f'"$@" {fd}<"$0"', __file__,
                                    *probe.command("warm")], env=probe.env)
    assert (rc, out) == (0, f"{fd} /dev/null\n".encode()), (out, err)
    assert err == f"prefork: warning: the caller's fds [{fd}] are not open in the script: the "\
        "script opened its own there before initialisation_complete(), or the fd limit is " \
        "lower\n".encode(), err
