"""The test fixtures and the session's leak check (helpers are in ``harness``, /proc readers
in ``procfs``: import from those, never from a conftest).

Fixtures::

    rundir -> str   fresh short dir /tmp/pfXXXXXXXX, mode 0700; at teardown every process that
                    holds a socket bound under it, or names it in its command line, environment,
                    cwd or open files (servers, watchers, executors), is killed with its process
                    group, then the dir is removed
    env -> dict     copy of os.environ: PREFORK_INTERP_RUNDIR=rundir, no PREFORK_INTERP,
                    VENV_BIN first on PATH
    procs -> ProcRegistry   start processes through it; all are reaped at teardown
    real_base -> RealBase   entries the reference C client makes in the real run base

At the end of the session, any process still referring to a run directory made by ``rundir``
is a leak: it is killed, listed, and the session fails (an error in the last test's teardown
and, as a backstop, exit status 1).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence

import psutil
import pytest
from harness import VENV_BIN, ProcRegistry, describe, find_processes, kill_processes, protected_pids
from realbase import RealBase


def _as_a_shell_leaves_them() -> None:
    """The tests compare calls with direct runs made the way an interactive shell makes
    them: SIGHUP, SIGINT and SIGQUIT at their defaults.  A runner started with ``nohup`` or
    as a background job of a non-interactive shell ignores them, and every process a test
    starts would inherit that; so the suite puts them back (SIGINT: Python's own)."""
    import signal

    for sig, default in ((signal.SIGHUP, signal.SIG_DFL), (signal.SIGQUIT, signal.SIG_DFL),
                         (signal.SIGINT, signal.default_int_handler)):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, default)


_as_a_shell_leaves_them()

#: Run directories made by the ``rundir`` fixture in this session (for the leak check).
_SESSION_RUNDIRS: list[str] = []


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


@pytest.fixture
def procs() -> Iterator[ProcRegistry]:
    """The test's process registry (see ``harness.ProcRegistry``)."""
    reg = ProcRegistry()
    try:
        yield reg
    finally:
        reg.reap()


@pytest.fixture
def real_base(rundir: str) -> Iterator[RealBase]:
    """Entries the reference C client makes in the real run base (it has no override):
    removed, and their servers killed, at teardown."""
    rb = RealBase()
    try:
        yield rb
    finally:
        rb.cleanup()


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
    return left - protected_pids()


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    """Fails the session (an error at the last teardown) if a test leaked a process."""
    yield
    left = _leftovers()
    if left:
        text = describe(left)
        kill_processes(left)
        pytest.fail(f"processes left running after the tests (now killed):\n{text}",
                    pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Backstop for the fixture above: anything still alive now also fails the run."""
    left = _leftovers()
    if not left:
        return
    text = describe(left)
    kill_processes(left)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
    rep = session.config.pluginmanager.get_plugin("terminalreporter")
    msg = f"processes left running after the tests (now killed):\n{text}"
    if rep is not None:
        rep.write_line(msg, red=True)
    else:
        print(msg, file=sys.stderr)
