"""The shared test harness: paths, timeouts, polling, scripts, processes (no fixtures here).

Test modules import what they need from here (``from harness import CLIENT, wait_for``);
``conftest.py`` holds only the fixtures and hooks, built on this module.  /proc readers are in
``procfs``.

Constants::

    REPO       repository root
    VENV_BIN   REPO/.venv/bin if it exists, else the directory of sys.executable
    PYTHON     VENV_BIN/python if it exists, else sys.executable (the interpreter for scripts)
    CLIENT     VENV_BIN/prefork-interp if it exists, else REPO/bin/prefork-interp
    C_CLIENT   "/usr/bin/prefork-interp" (the reference C client, as Debian installs it)
    TIMEOUT_MULT  float(env PREFORK_TEST_TIMEOUT_MULT or 1): scales every timeout below

Waiting (every wait has a deadline scaled by ``TIMEOUT_MULT``; nothing sleeps blindly)::

    scaled(seconds) -> seconds * TIMEOUT_MULT
    Deadline(timeout, what)           one monotonic deadline; .left() fails the test at its end
    poll_until(predicate, timeout)    -> the predicate's first truthy result, or its last falsy
    wait_for(predicate, timeout=10.0, what="condition") -> truthy result, or AssertionError
    Lines(fd or file).line()/.text()/.until(needle)   whole lines from a pipe, each in time
    read_until_eof(fd, timeout=10.0) -> bytes

Processes::

    write_script(dir, name, body, shebang=None) -> str   (default shebang: CLIENT -U,PYTHON)
    ProcRegistry        starts processes; ``reap()`` ends them (the ``procs`` fixture)
    find_processes(dirs) -> set[int]        live pids referring to any of dirs
    kill_processes(pids, grace=1.0) -> None  SIGTERM (+groups), wait, SIGKILL the rest
    protected_pids() -> set[int]            this process and its ancestors
    describe(pids) -> str                   one "pid N: command line" line each
    find_python(version) -> str | None      an interpreter of that version, looked for
"""

from __future__ import annotations

import glob
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import procfs
import psutil

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


def scaled(seconds: float) -> float:
    """``seconds`` times the CI multiplier ``PREFORK_TEST_TIMEOUT_MULT``."""
    return seconds * TIMEOUT_MULT


# ------------------------------------------------------------------ waiting


class Deadline:
    """A monotonic deadline ``scaled(timeout)`` from now, for waiting on ``what``."""

    def __init__(self, timeout: float, what: str = "condition") -> None:
        self.limit = scaled(timeout)
        self.end = time.monotonic() + self.limit
        self.what = what

    def remaining(self) -> float:
        """Seconds left (<= 0 once passed)."""
        return self.end - time.monotonic()

    def left(self, detail: str = "") -> float:
        """Seconds left; AssertionError naming ``what`` (and ``detail``) once passed."""
        remaining = self.remaining()
        if remaining <= 0:
            raise AssertionError(f"timed out after {self.limit:.1f} s waiting for {self.what}"
                                 + (f" ({detail})" if detail else ""))
        return remaining

    def readable(self, fd: int, detail: str = "") -> bool:
        """Wait until ``fd`` is readable (True) or fail at the deadline; False on a
        spurious wake-up (call again)."""
        return bool(select.select([fd], [], [], self.left(detail))[0])


def poll_until(predicate: Callable[[], T], timeout: float, interval: float = 0.005) -> T:
    """Poll ``predicate`` until it returns something truthy or ``scaled(timeout)`` passes;
    return its last result.  The wait between polls starts at ``interval`` and doubles up
    to 0.1 s."""
    deadline = Deadline(timeout)
    while True:
        result = predicate()
        if result:
            return result
        remaining = deadline.remaining()
        if remaining <= 0:
            return result
        select.select([], [], [], min(interval, remaining))
        interval = min(interval * 2, 0.1)


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.005) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    ``timeout`` is scaled by ``PREFORK_TEST_TIMEOUT_MULT``; the wait between polls starts at
    ``interval`` and doubles up to 0.1 s.  Raises ``AssertionError`` naming ``what`` on timeout.
    """
    result = poll_until(predicate, timeout, interval)
    if not result:
        raise AssertionError(f"timed out after {scaled(timeout):.1f} s waiting for {what}")
    return result


class Lines:
    """Whole lines from a pipe (an fd, or a file object's fd), read with ``os.read`` so no
    buffering hides them; each line must come within its own deadline."""

    def __init__(self, source: int | IO[Any]) -> None:
        self.fd = source if isinstance(source, int) else source.fileno()
        self.buf = b""

    def line(self, timeout: float = 10.0, what: str = "a complete line") -> bytes:
        """The next line (without its newline); fails on EOF or after ``timeout`` (scaled)."""
        deadline = Deadline(timeout, what)
        while b"\n" not in self.buf:
            if deadline.readable(self.fd, f"got {self.buf!r}"):
                chunk = os.read(self.fd, 4096)
                assert chunk, f"EOF waiting for {what}; got {self.buf!r}"
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def text(self, timeout: float = 10.0, what: str = "a complete line") -> str:
        """The next line, decoded."""
        return self.line(timeout, what).decode()

    def until(self, needle: str, what: str = "", timeout: float = 10.0) -> list[str]:
        """Lines (decoded) up to and including the first containing ``needle``."""
        seen = []
        while True:
            seen.append(self.text(timeout, what or f"a line with {needle!r}"))
            if needle in seen[-1]:
                return seen


def read_until_eof(fd: int, timeout: float = 10.0) -> bytes:
    """Everything the pipe ``fd`` gives until EOF; fails if EOF does not come in time."""
    deadline = Deadline(timeout, "EOF")
    data = b""
    while True:
        if deadline.readable(fd, f"read so far: {data!r}"):
            chunk = os.read(fd, 4096)
            if not chunk:
                return data
            data += chunk


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


# ------------------------------------------------------------------ interpreters


def _python_candidates(version: str) -> list[str]:
    """Where a ``pythonVERSION`` may be, most specific first: ``$PREFORK_TEST_PYTHON<V>``
    (V without the dot), the PATH, pyenv's versions, the usual prefixes."""
    found = []
    override = os.environ.get("PREFORK_TEST_PYTHON" + version.replace(".", ""))
    if override:
        found.append(override)
    on_path = shutil.which(f"python{version}")
    if on_path:
        found.append(on_path)
    roots = [os.environ.get("PYENV_ROOT") or "", os.path.expanduser("~/.pyenv")]
    for root in filter(None, roots):
        found += sorted(glob.glob(os.path.join(root, "versions", f"{version}.*", "bin",
                                               "python3")), reverse=True)
    found += [f"{prefix}/bin/python{version}" for prefix in ("/usr/local", "/usr")]
    return found


def find_python(version: str) -> str | None:
    """The path of a working Python ``version`` (e.g. "3.11"): the first candidate (see
    ``_python_candidates``) that runs and reports that version; the interpreter's own
    ``sys.executable``, so a pyenv shim resolves to the real binary.  None if there is none."""
    want = tuple(int(n) for n in version.split("."))
    for cand in _python_candidates(version):
        if not os.access(cand, os.X_OK):
            continue
        try:
            out = subprocess.run(
                [cand, "-c", "import sys; print(*sys.version_info[:2]); print(sys.executable)"],
                capture_output=True, text=True, timeout=scaled(30), check=False,
                stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            continue
        lines = out.stdout.splitlines()
        if out.returncode == 0 and len(lines) == 2 and \
                tuple(map(int, lines[0].split())) == want and os.path.isabs(lines[1]):
            return lines[1]
    return None


# ------------------------------------------------------------------ processes


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


def protected_pids() -> set[int]:
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
    prefixes = tuple(d + "/" for d in ds)
    # /proc/net/unix keeps the bound name whether or not that path still exists.
    sockets = {s.link for s in procfs.unix_sockets() if s.path.startswith(prefixes)}
    needle = re.compile(b"(?:" + b"|".join(re.escape(os.fsencode(d)) for d in ds)
                        + rb")(?:/|\x00|$)")
    protected = protected_pids()
    found: set[int] = set()
    for pid in procfs.pids():
        if pid in protected:
            continue
        try:
            if procfs.gone(pid):
                continue
            hit = bool(needle.search(procfs.cmdline(pid)) or needle.search(procfs.environ(pid)))
            if not hit:
                cwd = procfs.cwd(pid)
                hit = cwd in ds or cwd.startswith(prefixes)
            if not hit:
                hit = any(link in sockets or link.startswith(prefixes)
                          for link in procfs.fd_links(pid).values())
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
    for pid in protected_pids():
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
        procs = _survivors(procs, wait)
        if not procs:
            return


def _survivors(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of ``procs`` still alive after waiting up to ``timeout`` (scaled) for them all
    to be gone."""
    left = list(procs)

    def all_gone() -> bool:
        left[:] = [p for p in left if _alive(p)]
        return not left
    poll_until(all_gone, timeout, interval=0.002)
    return left


def _alive(p: psutil.Process) -> bool:
    try:
        return bool(p.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def describe(pids: Iterable[int]) -> str:
    """One line ``  pid N: command line`` per pid (``?`` for one that is gone)."""
    lines = []
    for pid in sorted(pids):
        lines.append(f"  pid {pid}: {procfs.title(pid) or '?'}")
    return "\n".join(lines)


def hold_self_watch(run_dir: str) -> int:
    """Take the run directory's self-watch lock (``pwatcher.self``) as its self-watching
    server would: every server started then stays with the shared watcher (for tests of
    what the shared watcher does with a lone server).  Returns the fd; closing it lets go."""
    import fcntl

    fd = os.open(os.path.join(run_dir, "pwatcher.self"),
                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd
