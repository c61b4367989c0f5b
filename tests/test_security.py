"""Security (issue 4): the run directory, peer credentials, file modes, isolation of calls.

Everything runs for real: our client through ``#!`` lines, real servers, a child that really
``setuid``s to another user, a private mount namespace for the ``/run/user`` fallback.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
from collections.abc import Callable

import pytest
from _procfacts import drain_until_closed, executors, log_text, socket_file
from harness import CLIENT, PYTHON, Lines, ProcRegistry, wait_for, write_script
from procfs import fd_links, gone

NOBODY = 65534

SCRIPT = """
import json, os, sys
import prefork
STATE = []      # module state the server built: a call must never see another call's changes
prefork.initialisation_complete(log="file", autoreload=False)
if sys.argv[1:2] == ["wait"]:
    print("waiting", os.getppid(), flush=True)
    sys.stdin.buffer.read()
    sys.exit(0)
fds = {}
for name in os.listdir("/proc/self/fd"):
    try:
        fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    except OSError:
        pass  # the directory fd of the listing itself, closed by now
umask = os.umask(0)
os.umask(umask)
print(json.dumps({"fds": fds, "env": dict(os.environ), "argv": sys.argv, "cwd": os.getcwd(),
                  "umask": umask, "state": STATE, "server": os.getppid()}))
# Leave traces that a leaky server would hand on to the next call.
STATE.append(sys.argv[-1])
os.environ["PF_LEAKED"] = sys.argv[-1]
os.chdir("/")
os.umask(0o077)
leaked_fd = os.open("/dev/null", os.O_RDONLY)
"""


def private(mode: int) -> bool:
    """0600 or stricter (nothing for group or other, no execute bit)."""
    return stat.S_IMODE(mode) & 0o177 == 0


def umask_of(mask: int) -> Callable[[], None]:
    """A ``preexec_fn`` running the child under ``umask``."""
    def set_umask() -> None:
        os.umask(mask)
    return set_umask


# ------------------------------------------------------------------ the run directory


def test_run_dir_and_files_created_private_whatever_the_umask(
        rundir: str, env: dict[str, str], procs: ProcRegistry) -> None:
    base = os.path.join(rundir, "a", "b", "run")
    script = write_script(rundir, "s.py", SCRIPT)
    rc, _, err = procs.run([script, "x"], env=dict(env, PREFORK_INTERP_RUNDIR=base),
                           preexec_fn=umask_of(0))
    assert (rc, err) == (0, b"")
    for d in (os.path.join(rundir, "a"), os.path.join(rundir, "a", "b"), base):
        st = os.lstat(d)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700, d
    # the shared watcher's, and the self-watching server's lock
    shared = {"pwatcher.sock", "pwatcher.lock", "pwatcher.busy", "pwatcher.self"}

    def settled() -> list[str]:
        # lock, log, stat, socket: the stat file is (re)written just after the call ends
        names = sorted(os.listdir(base))
        return names if [n[0] for n in names if n not in shared] == ["l", "p", "p", "s"] else []
    names = wait_for(settled, what="the run directory's files after the call")
    assert {n for n in names if n.startswith("pwatcher")} <= shared
    for n in names:
        st = os.lstat(os.path.join(base, n))
        assert private(st.st_mode), f"{n} has mode {stat.S_IMODE(st.st_mode):04o}"
        assert st.st_uid == os.getuid()


@pytest.mark.parametrize("fault", ["mode 0755", "mode 0701", "symlink", "other owner",
                                   "not a directory"])
def test_run_dir_checked_on_every_use(rundir: str, env: dict[str, str], procs: ProcRegistry,
                                      fault: str) -> None:
    """A run directory that goes bad after a server started there is refused on the next
    call, before anything is sent: one line naming the path and the problem, exit 127."""
    base = os.path.join(rundir, "run")
    env = dict(env, PREFORK_INTERP_RUNDIR=base)
    script = write_script(rundir, "s.py", SCRIPT)
    rc, _, err = procs.run([script, "x"], env=env)
    assert (rc, err) == (0, b"")
    server = json.loads(procs.run([script, "y"], env=env)[1])["server"]
    if fault.startswith("mode"):
        os.chmod(base, int(fault.split()[1], 8))
        reason = f"mode {fault.split()[1]} allows group/other access"
    elif fault == "symlink":
        os.rename(base, base + ".real")
        os.symlink(base + ".real", base)
        reason = "is a symlink"
    elif fault == "other owner":
        os.chown(base, NOBODY, NOBODY)
        reason = f"is owned by uid {NOBODY}, not by us (uid {os.getuid()})"
    else:
        os.rename(base, base + ".real")
        with open(base, "w"):
            pass
        reason = "is not a directory"
    rc, out, err = procs.run([script, "z"], env=env)
    assert (rc, out) == (127, b"")
    assert err == f"prefork-interp: run directory {base}: {reason}\n".encode()
    # Refused by the client, nothing run: the server lives on -- except where the fault moved
    # the directory away (symlink, not a directory): then its watcher may have seen the socket
    # path vanish before the test put something in its place, and the server rightly quit.
    if fault.startswith("mode") or fault == "other owner":
        assert not gone(server)
    with contextlib.suppress(ProcessLookupError):
        os.kill(server, signal.SIGTERM)
    wait_for(lambda: gone(server), what="server gone")


def test_run_dir_path_too_long_for_a_socket(rundir: str, env: dict[str, str],
                                            procs: ProcRegistry) -> None:
    base = os.path.join(rundir, "d" * 80)
    script = write_script(rundir, "s.py", SCRIPT)
    rc, out, err = procs.run([script], env=dict(env, PREFORK_INTERP_RUNDIR=base))
    assert (rc, out) == (127, b"")
    size = len(base)
    assert err == (f"prefork-interp: run directory {base}: path too long for a socket name "
                   f"({size} bytes; at most 63)\n").encode()


@pytest.mark.parametrize("how", ["call", "-f", "--kill"])
def test_ident_too_long_for_a_socket(rundir: str, env: dict[str, str], procs: ProcRegistry,
                                     how: str) -> None:
    script = write_script(rundir, "s.py", SCRIPT)
    ident = "a" * 300
    path = f"{rundir}/s{ident}"
    opts = [] if how == "call" else [how]
    rc, out, err = procs.run([str(CLIENT), *opts, "-g", ident, "-U", str(PYTHON), script],
                             env=env)
    assert (rc, out) == (127, b"")
    if how == "call":
        assert err == f"prefork-interp: connect to {path}: AF_UNIX path too long\n".encode()
    else:
        assert err == (f"prefork-interp: socket path {path} is too long for an AF_UNIX "
                       f"address ({len(path)} bytes; at most 108)\n").encode()
    assert os.listdir(rundir) == ["s.py"]


NS_SCRIPT = r"""
set -e
mount -t tmpfs -o mode=0755 pf-test /run
mkdir -p -m 0755 /run/user/0
mkdir -p -m 0700 "$HOME_BASE"
mount -t tmpfs -o mode=0700 pf-home "$HOME_BASE"
cd "$CWD"
"$SCRIPT" cold > "$CWD/out1" 2> "$CWD/err1"
"$SCRIPT" warm > "$CWD/out2" 2> "$CWD/err2"
ls "$HOME_BASE"/*/ > "$CWD/files"
"$CLIENT" -U --kill "$PY" "$SCRIPT"
"""


@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("unshare"),
                    reason="needs root and unshare(1) for a private mount namespace")
def test_refused_per_user_dir_falls_back_to_home_and_says_so(
        rundir: str, env: dict[str, str], procs: ProcRegistry) -> None:
    """``/run/user/0`` with mode 0755 is passed over for ``~/.prefork-interp/HOST``, and the
    client says so once, when it starts the server (in a private mount namespace, with a
    tmpfs over both places: nothing outside is touched)."""
    if subprocess.run(["unshare", "-m", "true"], check=False, capture_output=True).returncode:
        pytest.skip("unshare -m is not permitted here")
    script = write_script(rundir, "s.py", SCRIPT)
    e = {k: v for k, v in env.items() if k != "PREFORK_INTERP_RUNDIR"}
    home_base = f"{pwd.getpwuid(os.getuid()).pw_dir}/.prefork-interp"  # HOME from passwd
    e.update(CWD=rundir, SCRIPT=script, CLIENT=str(CLIENT), PY=str(PYTHON),
             HOME_BASE=home_base)
    rc, _, err = procs.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            NS_SCRIPT], env=e)
    assert rc == 0, err

    def read(name: str) -> str:
        with open(os.path.join(rundir, name)) as f:
            return f.read()

    host = os.uname().nodename.split(".")[0][:32]
    base = f"{home_base}/{host}"
    assert read("err1") == (f"prefork-interp: warning: run directory /var/run/user/0: mode "
                            f"0755 allows group/other access; using {base} instead\n")
    assert read("err2") == ""
    first, second = json.loads(read("out1")), json.loads(read("out2"))
    assert first["server"] == second["server"]
    assert sorted(n[0] for n in read("files").split()
                  if not n.startswith("pwatcher.")) == ["l", "p", "p", "s"]
    wait_for(lambda: gone(first["server"]), what="the server in the namespace gone")


# ------------------------------------------------------------------ peer credentials


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid")
def test_server_refuses_other_uids(rundir: str, env: dict[str, str],
                                   procs: ProcRegistry) -> None:
    """A connection from uid 65534 reaches accept() (for this test only, the run directory
    and the socket are opened up) and is refused without a greeting, and logged."""
    script = write_script(rundir, "s.py", SCRIPT)
    rc, out, _ = procs.run([script, "x"], env=env)
    assert rc == 0
    server = json.loads(out)["server"]
    sock_path = socket_file(rundir)
    os.chmod(rundir, 0o711)
    os.chmod(sock_path, 0o666)
    try:
        got = _connect_as(NOBODY, sock_path)
    finally:
        os.chmod(rundir, 0o700)
        os.chmod(sock_path, 0o600)
    assert got == "closed: b''", got
    wait_for(lambda: f"refused a connection from uid {NOBODY}" in log_text(rundir),
             what="the refusal logged")
    assert not gone(server)
    rc, out, _ = procs.run([script, "y"], env=env)
    assert rc == 0 and json.loads(out)["server"] == server


def _connect_as(uid: int, sock_path: str) -> str:
    """In a forked child running as ``uid``: connect and read what the server sends."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        result = "child failed"
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(sock_path)
            result = f"closed: {drain_until_closed(s)!r}"
        except BaseException as e:  # noqa: BLE001 - report anything, then _exit
            result = f"{type(e).__name__}: {e}"
        finally:
            try:
                os.write(w, result.encode())
            finally:
                os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return data.decode()


# ------------------------------------------------------------------ isolation of calls


def test_nothing_of_one_call_is_visible_in_the_next(rundir: str, env: dict[str, str],
                                                   procs: ProcRegistry) -> None:
    """Two calls in sequence to one server (``--any-cwd``: one server for both cwds) with
    different fds, environment, arguments, cwd and umask; the first also changes all of
    these in its executor.  The second sees only its own."""
    script = write_script(rundir, "s.py", SCRIPT, shebang=f"{CLIENT} -U,--any-cwd,{PYTHON}")
    dirs = [os.path.join(rundir, d) for d in ("one", "two")]
    for d in dirs:
        os.mkdir(d)
    extra_r, extra_w = os.pipe()
    try:
        rc, out1, err = procs.run([script, "--flag", "first"], env=dict(env, PF_FIRST="1"),
                                  cwd=dirs[0], pass_fds=(extra_r, extra_w),
                                  preexec_fn=umask_of(0o027))
    finally:
        os.close(extra_r)
        os.close(extra_w)
    assert (rc, err) == (0, b"")
    rc, out2, err = procs.run([script, "second"], env=dict(env, PF_SECOND="2"), cwd=dirs[1],
                              preexec_fn=umask_of(0o002))
    assert (rc, err) == (0, b"")
    first, second = json.loads(out1), json.loads(out2)
    assert first["server"] == second["server"]
    # The first call's extra fds are passed on to it (as a direct run inherits them), and
    # are gone in the second.
    passed = sorted(str(fd) for fd in (extra_r, extra_w))
    for got, argv, cwd, umask, mine, other, fds in (
            (first, ["--flag", "first"], dirs[0], 0o027, "PF_FIRST", "PF_SECOND", passed),
            (second, ["second"], dirs[1], 0o002, "PF_SECOND", "PF_FIRST", [])):
        assert sorted(got["fds"]) == sorted(["0", "1", "2", *fds]), got["fds"]
        assert got["argv"] == [script, *argv]
        assert got["cwd"] == cwd
        assert got["umask"] == umask
        assert got["state"] == []
        assert mine in got["env"] and other not in got["env"]
        assert "PF_LEAKED" not in got["env"] and "PREFORK_INTERP" not in got["env"]
    expected_env = dict(env, PF_SECOND="2")
    assert {k: v for k, v in second["env"].items() if k in expected_env} == {
        k: v for k, v in expected_env.items() if k in second["env"]}


def test_executor_holds_no_fd_of_the_server_or_other_calls(
        rundir: str, env: dict[str, str], procs: ProcRegistry) -> None:
    """While another call runs, an executor's fds are exactly 0, 1 and 2, and none of them
    is the listening socket, a watcher pipe, the log, or the other call's."""
    script = write_script(rundir, "s.py", SCRIPT)
    other = procs.popen([script, "wait"], env=env, stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE)
    assert other.stdout is not None and other.stdin is not None
    word, server = Lines(other.stdout.fileno()).line().split()
    assert word == b"waiting"
    server_fds = set(fd_links(int(server)).values())
    other_executor = [pid for pid, state in executors(int(server)) if state != "Z"]
    assert len(other_executor) == 1
    other_fds = set(fd_links(other_executor[0]).values())
    rc, out, err = procs.run([script, "x"], env=env, input=b"")  # all three fds: pipes
    assert (rc, err) == (0, b"")
    got = json.loads(out)
    assert got["server"] == int(server)
    assert sorted(got["fds"]) == ["0", "1", "2"]
    links = set(got["fds"].values())
    assert not links & (server_fds | other_fds), links & (server_fds | other_fds)
    other.stdin.close()
    assert other.wait(timeout=30) == 0


# ------------------------------------------------------------------ the script side


@pytest.mark.parametrize(("value", "message"), [
    ("garbage", "PREFORK_INTERP='garbage': too few words (need 2)"),
    ("v2,1.000000000 3,4,5,6", "protocol 'v2' is not v1"),
    ("v1,1.0 3,4,5,6", "socket time '1.0' is not SECS.NNNNNNNNN"),
    ("v1,1.000000000 3,4,5", "too few fds (need 4)"),
    ("v1,1.000000000 0,1,2,3", "fds must be four distinct numbers >= 3"),
    ("v1,1.000000000 3,x,5,6", "fd 'x' is not a number"),
    ("v1,1.000000000 70,71,72,73", "LISTEN fd 70 from PREFORK_INTERP is not open"),
    ("v1,1.000000000 {fds}", "LISTEN fd {listen} from PREFORK_INTERP is not a socket"),
])
def test_malformed_prefork_interp_is_one_clear_line(rundir: str, env: dict[str, str],
                                                    procs: ProcRegistry, value: str,
                                                    message: str) -> None:
    """The script run with a broken ``PREFORK_INTERP`` (by hand, or by an incompatible
    client): one line saying what is wrong, exit 127, no traceback."""
    script = write_script(rundir, "s.py", SCRIPT)
    pipes = [*os.pipe(), *os.pipe()]  # open fds of the wrong kind
    try:
        value = value.format(fds=",".join(map(str, pipes)))
        rc, out, err = procs.run([str(PYTHON), script, "x"],
                                 env=dict(env, PREFORK_INTERP=value), pass_fds=pipes)
    finally:
        for fd in pipes:
            os.close(fd)
    assert (rc, out) == (127, b"")
    text = err.decode()
    assert text.startswith("prefork: ") and text.count("\n") == 1, text
    assert message.format(listen=pipes[0]) in text, text
    assert "Traceback" not in text
