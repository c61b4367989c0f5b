"""Extension x1 falls back to pure v1 with either reference peer (docs/protocol.md).

- The C client ignores our server's offer and sends signalling byte 0: its executor gets v1
  semantics (the *server's* cwd and umask), while our client, on the same server, gets x1
  (its own cwd and umask).
- The Perl script side offers nothing: our client sends signalling byte 0 and a v1 request
  (the Perl side dies on any other byte), and the call works.
- On the wire, a peer that records what each client sends: signalling byte 1 and four fds in
  one message only from our client and only after an x1 offer; otherwise byte 0 and three
  fds, one per message.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import socket
import stat
import subprocess
import sys
import threading

import pytest
from harness import C_CLIENT, CLIENT, PYTHON, ProcRegistry, scaled, write_script
from realbase import RealBase

from prefork.common import fdio, protocol
from prefork.common.ident import RUNDIR_ENV, compute_ident, socket_path

pytestmark = pytest.mark.timeout(90)

PY = str(PYTHON)

SCRIPT = """\
import os, sys
import prefork
prefork.initialisation_complete()
mask = os.umask(0)
os.umask(mask)
print(os.getcwd(), oct(mask), os.getppid())
"""


def _call(procs: ProcRegistry, argv: list[str], env: dict[str, str], cwd: str,
          umask: int) -> tuple[str, str, int]:
    rc, out, err = procs.run(argv, env=env, cwd=cwd, umask=umask)
    assert (rc, err) == (0, b""), (argv, rc, out, err)
    where, mask, ppid = out.decode().split()
    return where, mask, int(ppid)


def test_c_client_gets_v1_semantics_ours_gets_x1_on_one_server(
        procs: ProcRegistry, env: dict[str, str], rundir: str, real_base: RealBase) -> None:
    """One server (fixed ident ``-g``, real run base), started from directory A with umask
    022; calls from directory B with umask 077."""
    a = os.path.join(rundir, "A")
    b = os.path.join(rundir, "B")
    os.mkdir(a)
    os.mkdir(b)
    script = write_script(rundir, "where.py", SCRIPT)
    ident = real_base.track("pftest" + secrets.token_hex(16))
    env = dict(env)
    env.pop(RUNDIR_ENV)  # our client then uses the C client's run base
    c_argv = [C_CLIENT, "-g", ident, "-U", PY, script]
    o_argv = [str(CLIENT), "-g", ident, "-U", PY, script]

    cwd, mask, server = _call(procs, c_argv, env, a, 0o022)  # cold: the server starts in A
    assert (cwd, mask) == (a, "0o22")
    # The C client: v1, whatever its own cwd and umask, the executor has the server's.
    assert _call(procs, c_argv, env, b, 0o077) == (a, "0o22", server)
    # Our client, same server: x1, the executor has the caller's.
    assert _call(procs, o_argv, env, b, 0o077) == (b, "0o77", server)
    assert _call(procs, o_argv, env, a, 0o027) == (a, "0o27", server)

    # The other way round: our client starts a fresh server from B with umask 007 ...
    cwd, mask, fresh = _call(procs, [str(CLIENT), "-f", *o_argv[1:]], env, b, 0o007)
    assert (cwd, mask) == (b, "0o7") and fresh != server
    # ... and the C client, calling from A with umask 022, gets the server's B and 007.
    assert _call(procs, c_argv, env, a, 0o022) == (b, "0o7", fresh)


def _greeting_of(sock_path: str) -> bytes:
    """Connect to a server and read its whole greeting (then hang up: a v1 monitor quits
    quietly on EOF before the signalling byte)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(scaled(10))
        s.connect(sock_path)
        head = fdio.read_exactly(s, 8)
        return head + fdio.read_exactly(s, protocol.decode_greeting_head(head))


def test_our_client_drives_the_perl_side_in_v1(procs: ProcRegistry, env: dict[str, str],
                                               rundir: str) -> None:
    perl = write_script(rundir, "v1.pl", """\
        use strict;
        use POSIX ();
        use Proc::Prefork::Interp;
        prefork_initialisation_complete();
        $| = 1;
        print "perl got: @ARGV\\n";
        POSIX::_exit(5);
        """, shebang=f"{CLIENT} -U,perl")
    for _ in range(3):  # cold, then warm
        rc, out, err = procs.run([perl, "x", "y"], env=env, cwd=rundir)
        # Any signalling byte but 0 makes the Perl monitor die without a status (the client
        # would then fail with 127): a right answer proves byte 0 and a v1 request.
        assert (rc, out, err) == (5, f"perl got: perl {perl} x y\n".encode(), b"")
    ident = compute_ident(rundir, b"perl", os.fsencode(perl), [], cwd=rundir)
    # The Perl side offers nothing, so there is nothing for our client to accept.
    assert _greeting_of(socket_path(rundir, ident)) == b"PFI\n\0\0\0\0"


def test_our_server_offers_x1(procs: ProcRegistry, env: dict[str, str], rundir: str) -> None:
    script = write_script(rundir, "offer.py", SCRIPT)
    rc, _, err = procs.run([CLIENT, "-U", PY, script], env=env, cwd=rundir)
    assert (rc, err) == (0, b"")
    ident = compute_ident(rundir, os.fsencode(PY), os.fsencode(script), [], cwd=rundir)
    xdata = protocol.X1_TOKEN + b"\0" + protocol.FDS_TOKEN + b"\0" + protocol.RETRY_TOKEN + b"\0"
    assert _greeting_of(socket_path(rundir, ident)) == (
        b"PFI\n" + len(xdata).to_bytes(4, sys.byteorder)
        + xdata)


class RecordingPeer(threading.Thread):
    """A one-call server that records the request as it arrives (no script side at all)."""

    def __init__(self, sock_path: str, offer: tuple[bytes, ...], status: int) -> None:
        super().__init__(daemon=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(sock_path)
        self.listener.listen(1)
        self.listener.settimeout(scaled(20))
        self.offer = offer
        self.status = status
        self.raw = b""
        self.fds_per_message: list[int] = []
        self.fd_stats: list[os.stat_result] = []
        self.request: protocol.Request | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(scaled(20))
                conn.sendall(protocol.encode_greeting(self.offer))
                parser = protocol.RequestParser(protocol.X1_TOKEN in self.offer,
                                                protocol.FDS_TOKEN in self.offer)
                req = None
                while req is None:
                    data, fds = fdio.recv_with_fds(conn, 65536, 8)
                    if not data and not fds:
                        raise EOFError("client hung up before the request was complete")
                    self.raw += data
                    if fds:
                        self.fds_per_message.append(len(fds))
                    self.fd_stats += [os.fstat(fd) for fd in fds]
                    for fd in fds:
                        os.close(fd)
                    req = parser.feed(data, fds)
                self.request = req
                if req.extended:
                    conn.sendall(protocol.encode_record(protocol.REC_STATUS, self.status))
                else:
                    conn.sendall(protocol.encode_status(self.status))
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            self.error = e
        finally:
            self.listener.close()


@pytest.mark.parametrize("offer", [(), (protocol.X1_TOKEN,), (b"other", protocol.X1_TOKEN),
                                   (protocol.X1_TOKEN, protocol.FDS_TOKEN)])
@pytest.mark.parametrize("kind", ["ours", "c"])
def test_what_each_client_sends(kind: str, offer: tuple[bytes, ...], procs: ProcRegistry,
                                env: dict[str, str], rundir: str,
                                real_base: RealBase) -> None:
    if kind == "c" and not os.access(C_CLIENT, os.X_OK):
        pytest.fail(f"reference C client {C_CLIENT} missing (apt-get install chiark-utils-bin)")
    ident = real_base.track("pftest" + secrets.token_hex(16))
    base = real_base.base if kind == "c" else rundir
    peer = RecordingPeer(socket_path(base, ident), offer, 7 << 8)
    peer.start()
    exe = C_CLIENT if kind == "c" else CLIENT
    env = dict(env, PF_MARK="marked")
    r, w = os.pipe()
    try:
        p = procs.popen([exe, "-g", ident, "-U", "some-interp", "the script", "a b", ""],
                        env=env, cwd=rundir, stdout=w)
        os.close(w)
        w = -1
        assert p.wait(timeout=scaled(30)) == 7
        pipe_ino = os.fstat(r).st_ino
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    peer.join(scaled(30))
    assert not peer.is_alive()
    assert peer.error is None, peer.error
    req = peer.request
    assert req is not None
    x1 = kind == "ours" and protocol.X1_TOKEN in offer
    assert peer.raw[0] == (protocol.SIGBYTE_X1 if x1 else protocol.SIGBYTE_V1)
    assert req.extended == x1
    assert req.argv == [b"some-interp", b"the script", b"a b", b""]
    assert (b"PF_MARK", b"marked") in req.env
    # fd 1 of the call is the caller's very pipe.
    assert peer.fd_stats[1].st_ino == pipe_ino
    if x1:
        assert peer.fds_per_message == [4]
        assert stat.S_ISDIR(peer.fd_stats[3].st_mode)
        assert peer.fd_stats[3].st_ino == os.stat(rundir).st_ino  # the caller's cwd
        assert req.umask is not None and req.client_pid == p.pid
    else:
        assert peer.fds_per_message == [1, 1, 1]
        assert len(peer.fd_stats) == 3
        assert req.umask is None


@pytest.mark.parametrize("offer", [(protocol.X1_TOKEN,), (protocol.X1_TOKEN, protocol.FDS_TOKEN)])
def test_our_client_passes_other_fds_only_when_offered(
        offer: tuple[bytes, ...], procs: ProcRegistry, env: dict[str, str], rundir: str) -> None:
    """The caller's fds above 2 (here a pipe at a free number, and a file's fd) go along, after the
    extension block, only to a server that offered ``prefork-fds`` (older servers of ours
    take exactly 4 fds)."""
    ident = "pftest" + secrets.token_hex(16)
    peer = RecordingPeer(socket_path(rundir, ident), offer, 0)
    peer.start()
    r, w = os.pipe()
    high = fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, 100)  # a number nobody else here uses
    with open(os.path.join(rundir, "f"), "w") as f:
        try:
            p = procs.popen([CLIENT, "-g", ident, "-U", "interp", "script"], env=env,
                            cwd=rundir, pass_fds=(high, f.fileno()), stderr=subprocess.PIPE)
            _, err = p.communicate(timeout=scaled(30))
            peer.join(scaled(30))
            assert p.returncode == 0, (err, peer.error)
        finally:
            os.close(high)
            os.close(r)
            os.close(w)
        fno = f.fileno()
        f_ino = os.fstat(fno).st_ino
    peer.join(scaled(30))
    assert peer.error is None, peer.error
    req = peer.request
    assert req is not None and req.extended
    if protocol.FDS_TOKEN in offer:
        assert req.passed == tuple(sorted((high, fno)))
        assert peer.fds_per_message == [4, 2]
        inos = {fd: st.st_ino for fd, st in zip(req.passed, peer.fd_stats[4:], strict=True)}
        assert inos[fno] == f_ino
        assert stat.S_ISFIFO(peer.fd_stats[4 + req.passed.index(high)].st_mode)
    else:
        assert req.passed == () and peer.fds_per_message == [4]
