"""Costs that must stay linear, and cleanup that must not race (issue 11, item 13).

A request's bytes arrive in 64 KiB reads: a parser that joins them into one ``bytes`` each
time copies the whole request again per read (a 32 MiB request cost 4 s of server CPU).
Two cleanups (``preclean``) racing for the same entry: the loser used to recreate the lock
file the winner had just deleted, and leave it behind.
"""

from __future__ import annotations

import os
import socket
import subprocess

from _procfacts import (
    U32BE,
    asleep_in_epoll,
    drain_until_closed,
    raw_connect,
    recv_exactly,
    send_fds,
    socket_file,
)
from harness import PYTHON, REPO, ProcRegistry, scaled, wait_for, write_script

from prefork.common import paths
from prefork.common.locking import lock_file
from prefork.common.protocol import MAX_MESSAGE

SCRIPT = """
import os, sys
import prefork
prefork.initialisation_complete(log="file", autoreload=False)
print("pong", len(os.environb.get(b"BIG", b"")), os.getppid())
"""


def _cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` (clock ticks): its own CPU, whatever the machine's load."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_a_32_mib_request_costs_little_server_cpu(rundir: str, env: dict[str, str],
                                                  procs: ProcRegistry) -> None:
    script = write_script(rundir, "big.py", SCRIPT)
    rc, out, err = procs.run([script], env=env)
    assert rc == 0, err
    server = int(out.split()[2])
    wait_for(lambda: asleep_in_epoll(server), what="the server idle")
    argv = [str(PYTHON).encode(), script.encode()]
    tail = b"\0".join([b"", *argv]) + b"\0"
    big = b"BIG=" + b"x" * (MAX_MESSAGE - 4 - len(tail) - 1)
    body = big + b"\0" + tail
    assert len(body) == MAX_MESSAGE
    out_r, out_w = os.pipe()
    before = _cpu_ticks(server)
    with raw_connect(socket_file(rundir)) as sock, os.fdopen(out_r, "rb") as out_f:
        sock.sendall(b"\0")
        for fd in (out_w, out_w, out_w):
            send_fds(sock, [fd])
        os.close(out_w)
        sock.sendall(U32BE.pack(len(body)) + body)
        status = U32BE.unpack(recv_exactly(sock, 4))[0]
        assert drain_until_closed(sock) == b""
        got = out_f.read().split()
    assert status == 0
    assert got == [b"pong", str(len(big) - 4).encode(), str(server).encode()]
    ticks = _cpu_ticks(server) - before
    hz = os.sysconf("SC_CLK_TCK")
    # Linear: well under 0.2 s here; quadratic: about 4 s.
    assert ticks < hz, f"the server spent {ticks / hz:.2f} s of CPU on one 32 MiB request"


def test_racing_cleanups_do_not_recreate_the_lock_they_deleted(rundir: str,
                                                              procs: ProcRegistry) -> None:
    """Entry E (the oldest) is being deleted by one cleanup (the test, holding E's lock)
    while another cleanup, in its own process, waits for that lock to delete E as well."""
    base = os.path.join(rundir, "base")
    os.mkdir(base, 0o700)
    old, young = "e" * 40, "f" * 40
    for ident in (old, young):
        with socket.socket(socket.AF_UNIX) as s:  # a socket file nobody listens on
            s.bind(paths.socket_path(base, ident))
        with open(paths.lock_path(base, ident), "w"):
            pass
    os.utime(paths.socket_path(base, old), ns=(10**9, 10**9))
    lock = paths.lock_path(base, old)
    fd = lock_file(lock)
    try:
        other = procs.popen([str(PYTHON), "-c",
                             "import sys; from prefork.common import paths; "
                             "print(paths.preclean(sys.argv[1], 1))", base],
                            cwd=str(REPO), stdout=subprocess.PIPE)
        ino = os.fstat(fd).st_ino
        wait_for(lambda: _waits_for_flock(ino), what="the other cleanup waiting for E's lock")
        os.unlink(paths.socket_path(base, old))
        os.unlink(lock)
    finally:
        os.close(fd)
    other.communicate(timeout=scaled(60))
    assert other.returncode == 0
    assert sorted(os.listdir(base)) == ["l" + young, "s" + young], \
        "a cleanup recreated a lock file of an entry deleted under it"


def _waits_for_flock(ino: int) -> bool:
    """Someone is blocked waiting for an flock on inode ``ino`` (``/proc/locks`` ``->``)."""
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 6 and parts[1] == "->" and parts[6].endswith(f":{ino}"):
                return True
    return False
