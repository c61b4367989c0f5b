"""The shared test harness: paths, a per-test run directory, a process registry, polling.

Constants (import them: ``from conftest import CLIENT, PYTHON, wait_for``)::

    REPO       repository root
    VENV_BIN   REPO/.venv/bin if it exists, else the directory of sys.executable
    PYTHON     VENV_BIN/python if it exists, else sys.executable (the interpreter for scripts)
    CLIENT     VENV_BIN/prefork-interp if it exists, else REPO/bin/prefork-interp
    C_CLIENT   "/usr/bin/prefork-interp" (the reference C client)
    TIMEOUT_MULT  float(env PREFORK_TEST_TIMEOUT_MULT or 1): scales every timeout below

Fixtures::

    rundir -> str   fresh short dir /tmp/pfXXXXXXXX, mode 0700; at teardown every process that
                    holds a socket bound under it, or names it in its command line, environment,
                    cwd or open files (servers, watchers, executors), is killed with its process
                    group, then the dir is removed
    env -> dict     copy of os.environ: PREFORK_INTERP_RUNDIR=rundir, no PREFORK_INTERP,
                    VENV_BIN first on PATH
    procs -> ProcRegistry   start processes through it; all are reaped at teardown

Helpers::

    wait_for(predicate, timeout=10.0, what="condition", interval=0.005) -> truthy result
    write_script(dir, name, body, shebang=None) -> str   (default shebang: CLIENT -U,PYTHON)
    scaled(seconds) -> seconds * TIMEOUT_MULT
    find_processes(dirs) -> set[int]        live pids referring to any of dirs (as above)
    kill_processes(pids, grace=1.0) -> None  SIGTERM (+groups), wait, SIGKILL the rest

At the end of the session, any process still referring to a run directory made by ``rundir``
is a leak: it is killed, listed, and the session fails (an error in the last test's teardown
and, as a backstop, exit status 1).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import psutil
import pytest

if TYPE_CHECKING:
    from realbase import RealBase

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin" if (REPO / ".venv" / "bin").is_dir() else Path(
    sys.executable).parent
PYTHON = VENV_BIN / "python" if (VENV_BIN / "python").exists() else Path(sys.executable)
CLIENT = (VENV_BIN / "prefork-interp" if (VENV_BIN / "prefork-interp").exists()
          else REPO / "bin" / "prefork-interp")
C_CLIENT = "/usr/bin/prefork-interp"

TIMEOUT_MULT = float(os.environ.get("PREFORK_TEST_TIMEOUT_MULT") or 1)
DEFAULT_TIMEOUT = 30.0

#: Run directories made by the ``rundir`` fixture in this session (for the leak check).
_SESSION_RUNDIRS: list[str] = []


def scaled(seconds: float) -> float:
    """``seconds`` times the CI multiplier ``PREFORK_TEST_TIMEOUT_MULT``."""
    return seconds * TIMEOUT_MULT


# ------------------------------------------------------------------ polling


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.005) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    ``timeout`` is scaled by ``PREFORK_TEST_TIMEOUT_MULT``; the wait between polls starts at
    ``interval`` and doubles up to 0.1 s.  Raises ``AssertionError`` naming ``what`` on timeout.
    """
    limit = scaled(timeout)
    deadline = time.monotonic() + limit
    while True:
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out after {limit:.1f} s waiting for {what}")
        select.select([], [], [], min(interval, remaining))
        interval = min(interval * 2, 0.1)


# ------------------------------------------------------------------ scripts


def write_script(dir: str | os.PathLike[str], name: str, body: str,
                 shebang: str | None = None) -> str:
    """Write an executable script ``dir/name``: the ``#!`` line, then ``body`` dedented.

    ``shebang`` may be given with or without the leading ``#!``; by default it is
    ``#!CLIENT -U,PYTHON`` (our client running the venv's Python).  Returns the path.
    """
    if shebang is None:
        shebang = f"{CLIENT} -U,{PYTHON}"
    if not shebang.startswith("#!"):
        shebang = "#!" + shebang
    path = os.path.join(os.fspath(dir), name)
    with open(path, "w") as f:
        f.write(shebang.rstrip("\n") + "\n" + textwrap.dedent(body).lstrip("\n"))
    os.chmod(path, 0o755)
    return path


# ------------------------------------------------------------------ finding processes


def _unix_socket_inodes(dirs: Sequence[str]) -> set[str]:
    """Inodes of Unix sockets bound to a path under any of ``dirs`` (whether or not that path
    still exists: /proc/net/unix keeps the bound name)."""
    prefixes = tuple(d.rstrip("/") + "/" for d in dirs)
    inodes = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[7].startswith(prefixes):
                inodes.add(parts[6])
    return inodes


def _protected_pids() -> set[int]:
    """This process and its ancestors: never killed by the harness."""
    pids = {os.getpid()}
    try:
        pids.update(p.pid for p in psutil.Process().parents())
    except psutil.Error:
        pass
    return pids


def find_processes(dirs: Iterable[str | os.PathLike[str]]) -> set[int]:
    """Live (non-zombie) processes that refer to any of ``dirs``: a Unix socket bound under
    one, or the path in the command line, environment, cwd or an open file's name.
    Never this process or its ancestors."""
    ds = [os.fspath(d).rstrip("/") for d in dirs]
    if not ds:
        return set()
    inodes = _unix_socket_inodes(ds)
    needle = re.compile(b"(?:" + b"|".join(re.escape(os.fsencode(d)) for d in ds)
                        + rb")(?:/|\x00|$)")
    prefixes = tuple(d + "/" for d in ds)
    protected = _protected_pids()
    found: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in protected:
            continue
        pid = int(name)
        proc = f"/proc/{pid}"
        try:
            with open(f"{proc}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            hit = False
            for fn in ("cmdline", "environ"):
                with open(f"{proc}/{fn}", "rb") as f:
                    if needle.search(f.read()):
                        hit = True
            if not hit:
                cwd = os.readlink(f"{proc}/cwd")
                hit = cwd in ds or cwd.startswith(prefixes)
            if not hit:
                for fd in os.listdir(f"{proc}/fd"):
                    try:
                        link = os.readlink(f"{proc}/fd/{fd}")
                    except FileNotFoundError:
                        continue
                    if (link.startswith("socket:[") and link[8:-1] in inodes) or \
                            link.startswith(prefixes):
                        hit = True
                        break
            if hit:
                found.add(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def kill_processes(pids: Iterable[int], grace: float = 1.0) -> None:
    """SIGTERM each process and its process group (unless that group is ours or an
    ancestor's), wait up to ``grace`` seconds (scaled), then SIGKILL the survivors and wait
    up to 5 s (scaled) for them to be gone."""
    spared = set()
    for pid in _protected_pids():
        try:
            spared.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for p in procs:
            try:
                pgid = os.getpgid(p.pid)
                if pgid > 1 and pgid not in spared:
                    os.killpg(pgid, sig)
                p.send_signal(sig)
            except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
                pass
        # A zombie counts as gone: its parent (maybe init, maybe a Popen of ours) reaps it.
        deadline = time.monotonic() + scaled(wait)
        delay = 0.002
        while True:
            procs = [p for p in procs if _alive(p)]
            remaining = deadline - time.monotonic()
            if not procs or remaining <= 0:
                break
            select.select([], [], [], min(delay, remaining))
            delay = min(delay * 2, 0.05)
        if not procs:
            return


def _alive(p: psutil.Process) -> bool:
    try:
        return bool(p.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _kill_referring(dirs: Sequence[str], rounds: int = 3) -> set[int]:
    """Kill every process referring to ``dirs`` (repeated: a server may fork while dying)."""
    killed: set[int] = set()
    for _ in range(rounds):
        pids = find_processes(dirs)
        if not pids:
            break
        killed |= pids
        kill_processes(pids)
    return killed


def _describe(pids: Iterable[int]) -> str:
    lines = []
    for pid in sorted(pids):
        try:
            cmd = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            cmd = "?"
        lines.append(f"  pid {pid}: {cmd}")
    return "\n".join(lines)


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def rundir() -> Iterator[str]:
    """A fresh, short, private run directory; everything referring to it dies at teardown."""
    d = tempfile.mkdtemp(prefix="pf", dir="/tmp")
    os.chmod(d, 0o700)
    _SESSION_RUNDIRS.append(d)
    try:
        yield d
    finally:
        _kill_referring([d])
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def env(rundir: str) -> dict[str, str]:
    """The environment for a call: this run's run dir, no PREFORK_INTERP, the venv on PATH."""
    e = dict(os.environ)
    e.pop("PREFORK_INTERP", None)
    e["PREFORK_INTERP_RUNDIR"] = rundir
    e["PATH"] = f"{VENV_BIN}{os.pathsep}{e.get('PATH', '')}"
    return e


class ProcRegistry:
    """Starts processes for a test; every one is reaped at teardown.

    ``popen(args, **kw)`` is ``subprocess.Popen`` (stdin defaults to /dev/null);
    ``run(args, input=None, timeout=30, **kw)`` returns ``(returncode, stdout, stderr)`` as
    bytes, killing the process and failing the test if it overruns ``timeout`` (scaled).
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def popen(self, args: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.Popen[bytes]:
        kw.setdefault("stdin", subprocess.DEVNULL)
        p: subprocess.Popen[bytes] = subprocess.Popen(args, **kw)
        self.procs.append(p)
        return p

    def run(self, args: Sequence[str | os.PathLike[str]], input: bytes | None = None,
            timeout: float = DEFAULT_TIMEOUT, **kw: Any) -> tuple[int, bytes, bytes]:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        if input is not None:
            kw["stdin"] = subprocess.PIPE
        p = self.popen(args, **kw)
        limit = scaled(timeout)
        try:
            out, err = p.communicate(input, timeout=limit)
        except subprocess.TimeoutExpired:
            self._stop(p)
            out, err = p.communicate()
            raise AssertionError(
                f"{list(map(str, args))} did not finish within {limit:.1f} s\n"
                f"stdout: {out!r}\nstderr: {err!r}"
            ) from None
        return p.returncode, out or b"", err or b""

    @staticmethod
    def _stop(p: subprocess.Popen[bytes]) -> None:
        if p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout=scaled(5.0))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def reap(self) -> None:
        """Terminate (then kill) whatever is still running, and close the pipes."""
        for p in self.procs:
            self._stop(p)
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()
        self.procs.clear()


@pytest.fixture
def procs() -> Iterator[ProcRegistry]:
    """The test's process registry (see ``ProcRegistry``)."""
    reg = ProcRegistry()
    try:
        yield reg
    finally:
        reg.reap()


# ------------------------------------------------------------------ leak check


_MARKERS = (b"[server]", b"prefork-watcher", b"prefork-server")


def _leftovers() -> set[int]:
    """Processes still referring to this session's run directories (their teardown should
    have killed them), plus servers/watchers naming them that escaped that search."""
    if not _SESSION_RUNDIRS:
        return set()
    left = find_processes(_SESSION_RUNDIRS)
    needle = re.compile(b"|".join(re.escape(os.fsencode(d)) for d in _SESSION_RUNDIRS))
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = os.fsencode(" ".join(p.info["cmdline"] or []))  # args may not be UTF-8
        if any(m in cmd for m in _MARKERS) and needle.search(cmd):
            left.add(p.info["pid"])
    return left - _protected_pids()


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    """Fails the session (an error at the last teardown) if a test leaked a process."""
    yield
    left = _leftovers()
    if left:
        text = _describe(left)
        kill_processes(left)
        pytest.fail(f"processes left running after the tests (now killed):\n{text}",
                    pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Backstop for the fixture above: anything still alive now also fails the run."""
    left = _leftovers()
    if not left:
        return
    text = _describe(left)
    kill_processes(left)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
    rep = session.config.pluginmanager.get_plugin("terminalreporter")
    msg = f"processes left running after the tests (now killed):\n{text}"
    if rep is not None:
        rep.write_line(msg, red=True)
    else:
        print(msg, file=sys.stderr)


@pytest.fixture
def real_base(rundir: str) -> Iterator[RealBase]:
    """Entries the reference C client makes in the real run base (it has no override):
    removed, and their servers killed, at teardown."""
    from realbase import RealBase  # realbase imports this module

    rb = RealBase()
    try:
        yield rb
    finally:
        rb.cleanup()
