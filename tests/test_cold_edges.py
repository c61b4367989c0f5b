"""Unusual callers (issue 11, items 10, 11, 12): one ``prefork-interp:`` line and 127, or
the call just works; never a traceback, never another directory's script.

- 10: an inheritable fd at or above the caller's soft ``RLIMIT_NOFILE`` (``exec 200>x;
  ulimit -n 64``) made the cold start fail (glibc refuses a spawn action on such an fd).
- 11: ``-g a/b``, ``-g ../../x``, ``PREFORK_INTERP_SETUP_TIMEOUT=nan|inf|1e308``, an
  environment entry named ``=x`` on the cold path, ``ulimit -n 6``, an absurd number in
  ``PREFORK_INTERP`` when a script is run by hand: each gave a traceback.
- 12: ``--any-cwd`` with a relative script path ran another directory's script of the same
  name.
"""

from __future__ import annotations

import os

import pytest
from harness import CLIENT, PYTHON, ProcRegistry, write_script
from procfs import fd_links

SCRIPT = """
import os, sys
import prefork
prefork.initialisation_complete(log="file")
print("{name}", os.getcwd() == os.path.dirname(os.path.abspath(__file__)), os.getppid())
"""


def _one_line_127(rc: int, out: bytes, err: bytes, *words: str) -> None:
    assert rc == 127, (rc, out, err)
    assert b"Traceback" not in err, err.decode(errors="replace")
    lines = err.decode(errors="replace").splitlines()
    assert len(lines) == 1 and lines[0].startswith("prefork-interp: "), lines
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture
def script(rundir: str) -> str:
    return write_script(rundir, "edge.py", SCRIPT.format(name="edge"))


# ------------------------------------------------------------------ item 10


def test_inheritable_fd_above_the_soft_fd_limit(rundir: str, env: dict[str, str],
                                                procs: ProcRegistry, script: str) -> None:
    """``exec 200>x; ulimit -Sn 64``: the cold start works, and the server does not keep the
    caller's fd 200 (the call's executor has it, as a direct run would: it lifts its soft
    limit to put it in place; only a hard limit below it, ``ulimit -n 64``, would keep it
    out, with a warning)."""
    x = os.path.join(rundir, "x")
    rc, out, err = procs.run(["bash", "-c", 'exec 200>"$1"; ulimit -Sn 64; exec "$2"',
                              "-", x, script], env=env)
    assert (rc, err) == (0, b""), err.decode(errors="replace")
    server = int(out.split()[2])
    assert x not in fd_links(server).values()


# ------------------------------------------------------------------ item 11


@pytest.mark.parametrize("ident", ["a/b", "../../x", "/etc/x"])
def test_ident_with_a_slash_is_refused(ident: str, rundir: str, env: dict[str, str],
                                       procs: ProcRegistry, script: str) -> None:
    before = sorted(os.listdir(rundir))
    rc, out, err = procs.run([str(CLIENT), "-U", "-g", ident, str(PYTHON), script], env=env)
    _one_line_127(rc, out, err, "-g")
    assert sorted(os.listdir(rundir)) == before


@pytest.mark.parametrize("value", ["nan", "-1", "0", "x"])
def test_bad_setup_timeout_is_refused_before_anything_starts(
        value: str, rundir: str, env: dict[str, str], procs: ProcRegistry,
        script: str) -> None:
    before = sorted(os.listdir(rundir))
    rc, out, err = procs.run([script], env=dict(env, PREFORK_INTERP_SETUP_TIMEOUT=value))
    _one_line_127(rc, out, err, "PREFORK_INTERP_SETUP_TIMEOUT")
    assert not [n for n in os.listdir(rundir) if n not in before and n.startswith("s")]


@pytest.mark.parametrize("value", ["inf", "1e308", "1e12"])
def test_huge_setup_timeout_means_no_limit(value: str, env: dict[str, str],
                                           procs: ProcRegistry, script: str) -> None:
    rc, out, err = procs.run([script], env=dict(env, PREFORK_INTERP_SETUP_TIMEOUT=value))
    assert (rc, err) == (0, b""), err.decode(errors="replace")
    assert out.split()[0] == b"edge"


_EXECVE = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
args = [a.encode() for a in sys.argv[1:]]
sep = args.index(b"--")
env, argv = args[:sep], args[sep + 1:]
A = (ctypes.c_char_p * (len(argv) + 1))(*argv, None)
E = (ctypes.c_char_p * (len(env) + 1))(*env, None)
libc.execve(argv[0], A, E)
raise SystemExit(f"execve: {ctypes.get_errno()}")
"""


def test_environment_entry_without_a_name(rundir: str, env: dict[str, str],
                                          procs: ProcRegistry, script: str) -> None:
    """An entry ``=x`` (execve allows it; Python's spawn does not): the cold start works,
    and the warm call after it too; no socket file is left by a failure."""
    entries = ["=x", f"PREFORK_INTERP_RUNDIR={rundir}", f"PATH={env['PATH']}"]
    cmd = [str(PYTHON), "-c", _EXECVE, *entries, "--", script]
    for _ in range(2):
        rc, out, err = procs.run(cmd, env=env)
        assert rc == 0, err.decode(errors="replace")
        assert out.split()[0] == b"edge"
        # the executor cannot put a nameless entry in os.environ, and says so (as before)
        assert all(line.startswith(b"prefork: warning: environment entries with invalid names")
                   for line in err.splitlines()), err


@pytest.mark.parametrize("warm", [False, True])
def test_too_few_fds(warm: bool, env: dict[str, str], procs: ProcRegistry,
                     script: str) -> None:
    """``ulimit -n 6``: not enough fds for a call, cold or warm: said in one line."""
    if warm:
        rc, _, err = procs.run([script], env=env)
        assert rc == 0, err
    rc, out, err = procs.run(["bash", "-c", 'ulimit -n 6; exec "$1"', "-", script], env=env)
    _one_line_127(rc, out, err)


@pytest.mark.parametrize("value", [
    "v1,1.000000000 99999999999999999999,4,5,6",
    "v1,1.000000000 3,4,5,99999999999999999999",
    "v1,99999999999999999999999.000000000 2147483648,4,5,6",
])
def test_absurd_prefork_interp_by_hand(value: str, env: dict[str, str], procs: ProcRegistry,
                                       script: str) -> None:
    """A script run by hand with a made-up PREFORK_INTERP: one line, 127."""
    rc, out, err = procs.run([str(PYTHON), script], env=dict(env, PREFORK_INTERP=value))
    assert rc == 127, (rc, out, err)
    assert b"Traceback" not in err, err.decode(errors="replace")
    assert len(err.splitlines()) == 1 and b"PREFORK_INTERP" in err, err


# ------------------------------------------------------------------ item 12


def test_any_cwd_relative_script_is_not_another_directorys(
        rundir: str, env: dict[str, str], procs: ProcRegistry) -> None:
    """``d1/t.py`` and ``d2/t.py``, each run as ``t.py`` from its own directory with
    ``--any-cwd``: each call runs its own directory's script."""
    for d in ("d1", "d2"):
        os.mkdir(os.path.join(rundir, d))
        write_script(os.path.join(rundir, d), "t.py", SCRIPT.format(name=d))
    for d in ("d1", "d2", "d1", "d2"):
        rc, out, err = procs.run([str(CLIENT), "-U", "--any-cwd", str(PYTHON), "t.py"],
                                 env=env, cwd=os.path.join(rundir, d))
        assert (rc, err) == (0, b""), err.decode(errors="replace")
        assert out.split()[:2] == [d.encode(), b"True"], (d, out)


def test_any_cwd_absolute_script_still_shares_one_server(
        rundir: str, env: dict[str, str], procs: ProcRegistry) -> None:
    """What ``--any-cwd`` is for still holds: one server for calls from any directory."""
    script = write_script(rundir, "t.py", SCRIPT.format(name="t"))
    servers = set()
    for d in ("d1", "d2"):
        os.mkdir(os.path.join(rundir, d))
        rc, out, err = procs.run([str(CLIENT), "-U", "--any-cwd", str(PYTHON), script],
                                 env=env, cwd=os.path.join(rundir, d))
        assert (rc, err) == (0, b""), err.decode(errors="replace")
        servers.add(out.split()[2])
    assert len(servers) == 1
