"""The context check (prefork/server/context.py), the R record and what the client does with
it: the pure pieces, a client told R twice running the script directly, and the reference C
client keeping v1 semantics (no check) on a server that redirects ours."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from pathlib import Path

import pytest
from harness import C_CLIENT, CLIENT, PYTHON, ProcRegistry, scaled, write_script
from realbase import RealBase

from prefork.common import fdio, protocol
from prefork.common.ident import (
    RUNDIR_ENV,
    compute_ident,
    context_ident,
    ident_max_len,
    socket_path,
)
from prefork.server import context

pytestmark = pytest.mark.timeout(120)


def test_ctype_class() -> None:
    """The locale reduced to what it decides at start-up: C (coerced, UTF-8 mode) or its
    codeset, however spelled."""
    assert context._ctype_class(b"C") == context._ctype_class(b"POSIX") == b"C"
    assert context._ctype_class(b"") == b"C"
    assert context._ctype_class(b"C.UTF-8") == context._ctype_class(b"en_US.utf8")
    assert context._ctype_class(b"de_DE.UTF-8@euro") == context._ctype_class(b"C.UTF-8")
    assert context._ctype_class(b"en_US.ISO-8859-1") != context._ctype_class(b"C.UTF-8")


def test_startup_key() -> None:
    """PYTHON* read at start-up, LD_*, the effective LC_CTYPE count; per-call settings,
    empty values and other variables do not; -E drops PYTHON*."""
    base = [(b"LANG", b"C.UTF-8"), (b"HOME", b"/root")]
    key = context.startup_key(base, False)
    assert context.startup_key([*base, (b"PYTHONIOENCODING", b"latin-1"),
                                (b"PYTHONUNBUFFERED", b"1"), (b"TZ", b"JST-9"),
                                (b"PYTHONPATH", b"")], False) == key
    assert context.startup_key([(b"LANG", b"en_US.UTF-8")], False) == key
    for extra in ((b"PYTHONHASHSEED", b"1"), (b"LD_PRELOAD", b"x.so"), (b"LC_ALL", b"C"),
                  (b"GLIBC_TUNABLES", b"glibc.malloc.check=3")):
        assert context.startup_key([*base, extra], False) != key, extra
    assert context.startup_key([*base, (b"PYTHONHASHSEED", b"1")], True) == \
        context.startup_key(base, True)
    # LC_ALL wins over LANG, LC_CTYPE over LANG.
    assert context.startup_key([(b"LANG", b"C"), (b"LC_ALL", b"C.UTF-8")], False) == key
    assert context.startup_key([(b"LANG", b"C.UTF-8"), (b"LC_CTYPE", b"C")], False) != key


def test_resolve_interp(tmp_path: Path) -> None:
    """The interpreter execvp would run: the first executable on PATH, by directory."""
    first, second = tmp_path / "a", tmp_path / "b"
    for d in (first, second):
        d.mkdir()
        (d / "py").write_text("#!/bin/sh\n")
        (d / "py").chmod(0o755)
    (first / "noexec").write_text("")
    a = context.resolve_interp(b"py", os.fsencode(f"{first}:{second}"))
    b = context.resolve_interp(b"py", os.fsencode(f"{second}:{first}"))
    assert a != b
    assert context.resolve_interp(b"py", os.fsencode(f"/nonexistent:{first}")) == a
    assert context.resolve_interp(b"/abs/py", b"") == b"/abs/py"
    assert context.resolve_interp(b"noexec", os.fsencode(str(first))) == b"?noexec"


def test_hard_limits() -> None:
    text = Path("/proc/self/limits").read_bytes()
    limits = context._hard_limits(text)
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = context._UNLIMITED if hard == resource.RLIM_INFINITY else hard
    assert limits[b"Max open files"] == want


def test_own_context_matches_itself() -> None:
    """A process's own facts, as a request from itself: no mismatch."""
    ctx = context.ServerContext()
    env = list(os.environb.items())
    req = protocol.Request(True, [], env, [os.fsencode(PYTHON)], 0o22, 0, os.getpid())
    assert ctx.mismatch(req, os.getpid()) is None
    req.env = [*env, (b"PYTHONHASHSEED", b"123")]
    assert ctx.mismatch(req, os.getpid()) == "start-up environment"
    assert ctx.code(req, os.getpid()) != ctx.code(
        protocol.Request(True, [], env, [os.fsencode(PYTHON)]), os.getpid())


def test_context_ident() -> None:
    """Hex of a computed ident's length, one per (ident, code)."""
    base = "/tmp/x"
    ident = "ab" * 20
    one = context_ident(base, ident, 1)
    assert len(one) == ident_max_len(base) and int(one, 16) >= 0
    assert one == context_ident(base, ident, 1) != context_ident(base, ident, 2)
    assert one != context_ident(base, "cd" * 20, 1)


def test_redirect_record() -> None:
    assert protocol.encode_record(protocol.REC_REDIRECT, 0xDEADBEEF) == b"R\xde\xad\xbe\xef"
    assert protocol.FLAG_FOLLOWS_REDIRECT == 8


class _Redirector:
    """A fake server on ``path`` that answers every x1 call with ``R code`` (as a server
    that cannot run it would), counting the calls and checking the client's flag."""

    def __init__(self, path: str, code: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen()
        self.sock.settimeout(scaled(30))
        self.code = code
        self.flags: list[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(scaled(30))
            conn.sendall(protocol.encode_greeting((protocol.X1_TOKEN,)))
            parser = protocol.RequestParser(True)
            req = None
            while req is None:
                data, fds = fdio.recv_with_fds(conn, 65536, protocol.X1_FDS)
                if not data and not fds:
                    return
                req = parser.feed(data, fds)
            for fd in req.fds:
                os.close(fd)
            self.flags.append(req.flags)
            conn.sendall(protocol.encode_record(protocol.REC_REDIRECT, self.code))

    def close(self) -> None:
        self.sock.close()
        self.thread.join(scaled(30))


def test_redirected_twice_runs_directly(procs: ProcRegistry, env: dict[str, str],
                                        rundir: str) -> None:
    """A client told R by the server it reached, and again by the server of its context,
    execs the interpreter on the script: the script runs as the client's own process."""
    script = write_script(rundir, "direct.py", """\
        import os, sys
        import prefork
        prefork.initialisation_complete()
        print(os.getpid(), sys.argv[1:], os.environ.get("MARK"))
        """, shebang=f"{CLIENT} -U,{PYTHON}")
    plain = compute_ident(rundir, os.fsencode(PYTHON), os.fsencode(script), [], cwd=rundir)
    code = 0x12345678
    first = _Redirector(socket_path(rundir, plain), code)
    second = _Redirector(socket_path(rundir, context_ident(rundir, plain, code)), code)
    try:
        proc = procs.popen([script, "a b", "c"], env={**env, "MARK": "x"}, cwd=rundir,
                           stdout=-1, stderr=-1)
        out, err = proc.communicate(timeout=scaled(60))
    finally:
        first.close()
        second.close()
    assert (proc.returncode, err) == (0, b""), (out, err)
    assert out == f"{proc.pid} ['a b', 'c'] x\n".encode()
    assert first.flags == second.flags == [protocol.FLAG_FOLLOWS_REDIRECT]


HASHED = """\
import os, sys
import prefork
prefork.initialisation_complete()
print(hash("text"), os.getppid())
"""


@pytest.mark.skipif(not os.access(C_CLIENT, os.X_OK), reason="no reference C client")
def test_c_client_keeps_reference_semantics(procs: ProcRegistry, env: dict[str, str],
                                            rundir: str, real_base: RealBase) -> None:
    """One server (``-g``), started by our client; a call with PYTHONHASHSEED set: ours is
    sent to a server of its context (the hash of a direct run), the C client (v1, which
    cannot follow R) is served by the server itself, as the reference does."""
    script = write_script(rundir, "hashed.py", HASHED)
    ident = real_base.track("pftest" + secrets.token_hex(16))
    env = dict(env)
    env.pop(RUNDIR_ENV)  # the C client's run base, for both clients
    ours = [str(CLIENT), "-g", ident, "-U", str(PYTHON), script]
    theirs = [C_CLIENT, "-g", ident, "-U", str(PYTHON), script]
    rc, out, err = procs.run(ours, env=env, cwd=rundir)
    assert (rc, err) == (0, b""), out
    server = out.split()[1]
    seeded = {**env, "PYTHONHASHSEED": "5"}
    rc, out, err = procs.run([str(PYTHON), script], env=seeded, cwd=rundir)
    direct_hash = out.split()[0]
    rc, out, err = procs.run(ours, env=seeded, cwd=rundir)
    assert (rc, err) == (0, b"") and out.split()[0] == direct_hash
    assert out.split()[1] != server
    real_base.track(context_ident(real_base.base, ident, _only_code(real_base, ident)))
    rc, out, err = procs.run(theirs, env=seeded, cwd=rundir)
    assert (rc, err) == (0, b"") and out.split()[1] == server
    assert out.split()[0] != direct_hash


def _only_code(real_base: RealBase, ident: str) -> int:
    """The context code the server logged for its one redirect."""
    log = Path(real_base.base, f"p{ident}.log").read_text()
    word = log.split("sent to context ")[1].split()[0]
    return int(word, 16)
