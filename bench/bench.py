#!/usr/bin/env python3
"""``make bench``: prefork-interp for Python measured side by side with the reference.

One run, every line measured in it, A/B variants interleaved (shuffled order every round) so
that machine noise hits both sides; medians of many repetitions.  Sections:

(a) our client vs the C client (``/usr/bin/prefork-interp``), both against our server, trivial
    script; plus the client's own start-up (``--version``, ``python -IS -c pass``, C ``--help``)
(b) our server vs the Perl server (``Proc::Prefork::Interp``, IO::Handle preloaded), C client
(c) a heavy-import script (>= 250 modules) run directly vs warm through our client
(d) cold start (``-f``: a fresh server every call) vs direct
(e) per-call time for servers holding 10, 100 and 300 MiB of small Python objects
(f) 8 parallel loops x 50 calls, our server vs the Perl server (C client); 1/2/4/8 loops
(g) ``Autoreload.stale()`` with 2,000 files, in-process (inotify, and stat-only for contrast)
(h) an exception-heavy loop timed inside the script: direct vs warm (prefork-server, and a
    script calling initialisation_complete())
(p) the client a real ``pip install`` gives (wheel, fresh venv) vs ``make venv``'s launcher
(i) scale: 1, 10 and 100 idle servers of trivial scripts, ours (our client) vs the reference
    (C client + Perl server): PSS and USS of all their processes, processes per server,
    inotify instances and watches; a warm call with 100 servers alive
(r) real programs from PyPI (httpie, docutils, pygments, flake8, pylint, black) in a venv of
    their own: direct, warm through a ``--wrap`` wrapper (as it comes, and with the run-time
    imports found by ``--wrap NAME -- ARGS``), and the floor (a warm trivial call plus the
    program's second run in one process)

Each section works in its own short directory under /tmp (scripts, cwd, run directory) and
stops its servers at the end (``--kill``), then checks that no process referring to that
directory is left (leftovers are killed and reported; the run then fails).  The reference C
client ignores ``PREFORK_INTERP_RUNDIR``: sections using it run in its per-user run base and
remove exactly the ``s``/``l``/``p`` files of the idents they made.

Writes ``docs/bench-results.md`` and ``docs/bench.png``.  Exit status 0 when every section ran
(targets missed are reported, not fatal), 1 otherwise.

Usage: ``bench/bench.py [--quick] [--no-write]``
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prefork.common import paths  # noqa: E402
from prefork.common.ident import RUNDIR_ENV, compute_ident, lock_path, log_path, socket_path  # noqa: E402
from prefork.server.autoreload import Autoreload  # noqa: E402

VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python")
CLIENT = str(VENV_BIN / "prefork-interp")
C_CLIENT = "/usr/bin/prefork-interp"
PERL = shutil.which("perl") or "/usr/bin/perl"
RESULTS_MD = REPO / "docs" / "bench-results.md"
PLOT_PNG = REPO / "docs" / "bench.png"

HEAP_SIZES = (10, 100, 300)  # MiB of small objects in the server
LOOPS = (1, 2, 4, 8)  # parallel loops in (f)
CALLS_PER_LOOP = 50

# ------------------------------------------------------------------ scripts

TRIVIAL_PY = """\
import prefork
prefork.initialisation_complete()
"""

TRIVIAL_PL = """\
use strict;
use IO::Handle;
use Proc::Prefork::Interp;
prefork_initialisation_complete();
exit 0;
"""

#: A realistic slow-starting CLI: a broad slice of the stdlib plus typer/rich/psutil (if present).
HEAVY_PY = """\
import sys
import argparse, asyncio, base64, bz2, calendar, collections, concurrent.futures
import configparser, contextlib, csv, dataclasses, datetime, decimal, difflib
import email.mime.multipart, email.mime.text, email.parser, fractions, ftplib, glob, gzip
import hashlib, heapq, hmac, html.parser, http.client, http.cookies, imaplib, inspect
import ipaddress, json, logging.handlers, lzma, mailbox, mimetypes, multiprocessing, optparse
import pathlib, pickle, pkgutil, platform, plistlib, pprint, queue, random, shlex, shutil
import smtplib, socket, sqlite3, ssl, statistics, string, subprocess, tarfile, tempfile
import textwrap, threading, tomllib, typing, unittest, urllib.request, uuid
import xml.dom.minidom, xml.etree.ElementTree, zipfile, zoneinfo
for name in ("psutil", "typer", "typer.testing", "click", "rich.console", "rich.markdown",
             "rich.pretty", "rich.progress", "rich.prompt", "rich.syntax", "rich.table",
             "rich.traceback"):
    try:
        __import__(name)
    except ImportError:
        pass
if sys.argv[1:] == ["--count"]:
    print(len(sys.modules))
import prefork
prefork.initialisation_complete()
if sys.argv[1:] == ["--count"]:
    print(len(sys.modules))
"""

#: Grows the heap by MIB MiB of small objects (lists of dicts, every page really written)
#: before initialisation_complete(); ``--info`` prints the server's pid and RSS.
HEAP_PY = """\
import os, sys
MIB = {mib}
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib(pid="self"):
    with open(f"/proc/{{pid}}/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


base = rss_mib()
keep = []
n = 0
while rss_mib() - base < MIB:
    keep.append([{{"i": i, "s": str(i), "f": float(i)}} for i in range(n, n + 5000)])
    n += 5000
import prefork
prefork.initialisation_complete()
if sys.argv[1:] == ["--info"]:
    print(os.getppid(), round(rss_mib(os.getppid()), 1), n)
"""


class BenchError(Exception):
    """A section could not be measured (the message says why)."""


# ------------------------------------------------------------------ running things


def _fds(err_path: str) -> list[tuple[int | str, ...]]:
    return [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, err_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
    ]


def describe_status(status: int) -> str:
    """A wait status in words."""
    if os.WIFEXITED(status):
        return f"exit {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"status {status:#x}"


@dataclass
class Cmd:
    """A command to time: argv, environment, the wait statuses accepted."""

    argv: list[str]
    env: dict[str, str]
    err_path: str
    ok: tuple[int, ...] = (0,)
    seen: set[int] = field(default_factory=set)

    def __call__(self) -> float:
        """Run once (cwd: the process's cwd); seconds from spawn to reaped."""
        actions = _fds(self.err_path)
        t0 = time.perf_counter()
        pid = os.posix_spawn(self.argv[0], self.argv, self.env, file_actions=actions)
        _, status = os.waitpid(pid, 0)
        dt = time.perf_counter() - t0
        self.seen.add(status)
        if status not in self.ok:
            raise BenchError(f"{' '.join(self.argv)}: {describe_status(status)} "
                             f"(stderr in {self.err_path}:\n{_tail(self.err_path)})")
        return dt


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return ""
    return data[-n:].decode("utf-8", "replace")


def output_of(argv: Sequence[str], env: dict[str, str]) -> str:
    """Run and return stdout (checked)."""
    p = subprocess.run(argv, env=env, capture_output=True, check=False, timeout=300,
                       stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: exit {p.returncode}: "
                         f"{p.stderr.decode(errors='replace')[-2000:]}")
    return p.stdout.decode()


def interleaved(cmds: dict[str, Callable[[], float]], reps: int, warmup: int = 3,
                seed: int = 0) -> dict[str, list[float]]:
    """Run every command ``reps`` times, in a new random order each round; seconds."""
    rng = random.Random(seed)
    for _ in range(warmup):
        for c in cmds.values():
            c()
    out: dict[str, list[float]] = {k: [] for k in cmds}
    names = list(cmds)
    for _ in range(reps):
        rng.shuffle(names)
        for k in names:
            out[k].append(cmds[k]())
    return out


def med_ms(xs: Sequence[float]) -> float:
    """Median of seconds, in ms."""
    return statistics.median(xs) * 1000.0


# ------------------------------------------------------------------ directories, cleanup


def clean_env() -> dict[str, str]:
    """The bench's environment without anything of prefork's."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFORK_INTERP", RUNDIR_ENV, "PREFORK_INTERP_WATCHER")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PREFORK_INTERP_WATCHER"] = str(VENV_BIN / "prefork-watcher")
    return env


def write_script(d: str, name: str, shebang: str, body: str) -> str:
    """An executable script ``d/name`` (absolute path)."""
    path = os.path.join(d, name)
    with open(path, "w") as f:
        f.write(f"#!{shebang}\n{body}")
    os.chmod(path, 0o755)
    return path


def referring(d: str) -> set[int]:
    """Live processes whose cwd is under ``d`` or whose command line names it."""
    needle = os.fsencode(d)
    me = os.getpid()
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                hit = needle in f.read()
            if not hit:
                cwd = os.readlink(f"/proc/{name}/cwd")
                hit = cwd == d or cwd.startswith(d + "/")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if hit:
            found.add(int(name))
    return found


def server_pid(d: str, script: str) -> int:
    """The pid of the server started for ``script`` with cwd ``d`` (its title says so)."""
    title = os.fsencode(f"{script} [server]")
    for pid in referring(d):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(title):
                    return pid
        except OSError:
            continue
    raise BenchError(f"no server process for {script} in {d}")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time of ``pid`` itself and of its reaped children (user + system), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tck, (int(fields[13]) + int(fields[14])) / tck


def wait_gone(d: str, timeout: float = 10.0) -> set[int]:
    """Wait until nothing refers to ``d``; kill and return whatever is left after that."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        left = referring(d)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


@dataclass
class Section:
    """A section's directory and the servers to stop at its end."""

    dir: str
    env: dict[str, str]
    uses_c_client: bool
    kills: list[list[str]] = field(default_factory=list)
    idents: list[str] = field(default_factory=list)
    leftovers: set[int] = field(default_factory=set)

    @property
    def err(self) -> str:
        return os.path.join(self.dir, "stderr.txt")

    def server(self, client: str, interp: str, script: str) -> None:
        """Remember how to stop the server of (interp, script) in this section's cwd."""
        self.kills.append([client, "--kill", "-U", interp, script])
        if self.uses_c_client:
            base = paths.run_base({})
            self.idents.append(compute_ident(
                base, os.fsencode(interp), os.fsencode(script), [], cwd=self.dir))


@contextmanager
def section(name: str, uses_c_client: bool = False) -> Iterator[Section]:
    """A fresh directory (cwd for the duration), an environment, and cleanup at the end."""
    d = tempfile.mkdtemp(prefix=f"pfb{name}", dir="/tmp")
    os.chmod(d, 0o700)
    env = clean_env()
    if not uses_c_client:
        rd = os.path.join(d, "r")
        os.mkdir(rd, 0o700)
        env[RUNDIR_ENV] = rd
    sec = Section(d, env, uses_c_client)
    old = os.getcwd()
    os.chdir(d)
    try:
        yield sec
    finally:
        for argv in sec.kills:
            subprocess.run(argv, env=env, check=False, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        os.chdir(old)
        sec.leftovers = wait_gone(d)
        if uses_c_client:
            base = paths.run_base({})
            for ident in sec.idents:
                for p in (socket_path(base, ident), lock_path(base, ident),
                          log_path(base, ident)):
                    try:
                        os.unlink(p)
                    except FileNotFoundError:
                        pass
        shutil.rmtree(d, ignore_errors=True)
        if sec.leftovers:
            LEFTOVERS.append((name, sec.leftovers))


LEFTOVERS: list[tuple[str, set[int]]] = []


# ------------------------------------------------------------------ results


@dataclass
class Row:
    """One line of the table."""

    section: str
    what: str
    value: str
    ratio: str = ""
    target: str = ""
    verdict: str = ""


@dataclass
class Results:
    """Everything measured in this run."""

    rows: list[Row] = field(default_factory=list)
    heap: list[tuple[float, float]] = field(default_factory=list)  # (server RSS MiB, ms)
    heap_fit: tuple[float, float] = (0.0, 0.0)  # slope ms/MiB, intercept ms
    conc: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # ms per call
    facts: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, *args: str) -> None:
        self.rows.append(Row(*args))


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


# ------------------------------------------------------------------ sections


@functools.cache
def alt_python() -> str | None:
    """Another interpreter for the client launcher (``make_launcher.py --client-python``):
    ``/usr/bin/python3`` when it is not the venv's and is >= 3.11 (its byte code compiled)."""
    cand = "/usr/bin/python3"
    if not os.access(cand, os.X_OK) or os.path.realpath(cand) == os.path.realpath(PYTHON):
        return None
    check = [cand, "-IS", "-c", "import sys; sys.exit(sys.version_info < (3, 11))"]
    if subprocess.run(check, check=False).returncode != 0:
        return None
    subprocess.run([cand, "-I", "-m", "compileall", "-q", str(REPO / "prefork")], check=False,
                   stdout=subprocess.DEVNULL)
    return cand


def bench_clients(res: Results, reps: int) -> None:
    """(a): our client vs the C client against our server; client start-up."""
    alt = alt_python()
    with section("a", uses_c_client=True) as sec:
        script = write_script(sec.dir, "t.py", f"{CLIENT} -U,{PYTHON}", TRIVIAL_PY)
        sec.server(C_CLIENT, PYTHON, script)
        cmds: dict[str, Callable[[], float]] = {
            "ours": Cmd([CLIENT, "-U", PYTHON, script], sec.env, sec.err),
            "c": Cmd([C_CLIENT, "-U", PYTHON, script], sec.env, sec.err),
            "version": Cmd([CLIENT, "--version"], sec.env, sec.err),
            "pass": Cmd([PYTHON, "-IS", "-c", "pass"], sec.env, sec.err),
            "chelp": Cmd([C_CLIENT, "--help"], sec.env, sec.err),
        }
        if alt is not None:
            cmds["alt"] = Cmd([alt_launcher(sec.dir, alt), "-U", PYTHON, script], sec.env,
                              sec.err)
            cmds["altpass"] = Cmd([alt, "-IS", "-c", "pass"], sec.env, sec.err)
        t = interleaved(cmds, reps)
    ours, c = med_ms(t["ours"]), med_ms(t["c"])
    ratio = ours / c
    res.facts.update(a_ours=ours, a_c=c, version=med_ms(t["version"]),
                     pass_=med_ms(t["pass"]), chelp=med_ms(t["chelp"]))
    s = "(a) trivial script, our server"
    res.add(s, "C client, warm call", f"{c:.2f} ms")
    res.add(s, "our client, warm call", f"{ours:.2f} ms", f"{ratio:.2f}", "<= 2.0",
            verdict(ratio <= 2.0))
    res.add(s, "our client start-up: prefork-interp --version", f"{med_ms(t['version']):.2f} ms")
    res.add(s, "interpreter floor: python -IS -c pass", f"{med_ms(t['pass']):.2f} ms")
    res.add(s, "C client start-up: prefork-interp --help", f"{med_ms(t['chelp']):.2f} ms")
    if alt is not None:
        altv = subprocess.run([alt, "-c", "import sys; print(sys.version.split()[0])"],
                              capture_output=True, text=True, check=False).stdout.strip()
        a = med_ms(t["alt"])
        res.facts.update(alt=a, altpass=med_ms(t["altpass"]))
        res.add(s, f"our client on {alt} ({altv}; make_launcher --client-python)",
                f"{a:.2f} ms", f"{a / c:.2f}", "(info)")
        res.add(s, f"its floor: {alt} -IS -c pass", f"{med_ms(t['altpass']):.2f} ms")


def bench_pip(res: Results, reps: int) -> None:
    """(p): the client a real ``pip install`` gives (a wheel of this tree into a fresh venv,
    after its first call made pip's launcher the fast one) vs ``make venv``'s launcher."""
    from prefork.client.launcher import ENTRY_LINE, FAST_MARK

    with section("p") as sec:
        whl_dir, venv = os.path.join(sec.dir, "whl"), os.path.join(sec.dir, "v")
        output_of([PYTHON, "-m", "pip", "wheel", "-q", "--no-deps", "-w", whl_dir, str(REPO)],
                  sec.env)
        (whl,) = (os.path.join(whl_dir, n) for n in os.listdir(whl_dir) if n.endswith(".whl"))
        output_of([PYTHON, "-m", "venv", "--without-pip", venv], sec.env)
        output_of([PYTHON, "-m", "pip", "--python", f"{venv}/bin/python", "install", "-q",
                   "--no-deps", whl], sec.env)
        pip_client = f"{venv}/bin/prefork-interp"
        with open(pip_client) as f:
            as_installed = f.read()
        # pip's launcher as it was before (entry point prefork.client.main:main), for contrast
        old = os.path.join(sec.dir, "pip-launcher")
        with open(old, "w") as f:
            f.write(as_installed.replace(ENTRY_LINE, "from prefork.client.main import main"))
        os.chmod(old, 0o755)
        script = write_script(sec.dir, "t.py", f"{CLIENT} -U,{PYTHON}", TRIVIAL_PY)
        sec.server(CLIENT, PYTHON, script)
        output_of([pip_client, "-U", PYTHON, script], sec.env)  # starts the server
        with open(pip_client) as f:
            fast = FAST_MARK in f.read()
        if not fast:
            raise BenchError(f"{pip_client} did not become the fast launcher")
        t = interleaved({
            "pip": Cmd([pip_client, "-U", PYTHON, script], sec.env, sec.err),
            "make": Cmd([CLIENT, "-U", PYTHON, script], sec.env, sec.err),
            "old": Cmd([old, "-U", PYTHON, script], sec.env, sec.err),
        }, reps)
    pip_ms, make_ms, old_ms = med_ms(t["pip"]), med_ms(t["make"]), med_ms(t["old"])
    ratio = pip_ms / make_ms
    res.facts.update(p_pip=pip_ms, p_make=make_ms, p_old=old_ms)
    s = "(p) client from `pip install` (wheel, fresh venv)"
    res.add(s, "make venv's launcher (tools/make_launcher.py), warm call", f"{make_ms:.2f} ms")
    res.add(s, "pip-installed client (fast launcher after its first call), warm call",
            f"{pip_ms:.2f} ms", f"{ratio:.2f}", "<= 1.10", verdict(ratio <= 1.10))
    res.add(s, "pip's console script as it was (site + re), warm call", f"{old_ms:.2f} ms",
            f"{old_ms / make_ms:.2f}", "(info)")


def bench_servers(res: Results, reps: int) -> None:
    """(b): our server vs the Perl server, both driven by the C client."""
    with section("b", uses_c_client=True) as sec:
        py = write_script(sec.dir, "t.py", f"{C_CLIENT} -U,{PYTHON}", TRIVIAL_PY)
        pl = write_script(sec.dir, "t.pl", f"{C_CLIENT} -U,{PERL}", TRIVIAL_PL)
        sec.server(C_CLIENT, PYTHON, py)
        sec.server(C_CLIENT, PERL, pl)
        perl_cmd = Cmd([C_CLIENT, "-U", PERL, pl], sec.env, sec.err,
                       ok=(0, signal.SIGINT))  # the reference's race: see PROTOCOL.md
        cmds: dict[str, Callable[[], float]] = {
            "ours": Cmd([C_CLIENT, "-U", PYTHON, py], sec.env, sec.err),
            "perl": perl_cmd,
        }
        for c in cmds.values():
            c()  # start both servers
        pids = {"ours": server_pid(sec.dir, py), "perl": server_pid(sec.dir, pl)}
        cpu0 = {k: cpu_seconds(pid) for k, pid in pids.items()}
        t = interleaved(cmds, reps, warmup=0)
        cpu1 = {k: cpu_seconds(pid) for k, pid in pids.items()}
    ours, perl = med_ms(t["ours"]), med_ms(t["perl"])
    ratio = ours / perl
    cpu = {k: [(cpu1[k][i] - cpu0[k][i]) * 1000 / reps for i in (0, 1)] for k in pids}
    res.facts.update(b_ours=ours, b_perl=perl, b_cpu_ours=sum(cpu["ours"]),
                     b_cpu_perl=sum(cpu["perl"]), b_cpu_ours_server=cpu["ours"][0],
                     b_cpu_perl_server=cpu["perl"][0])
    s = "(b) trivial script, C client"
    res.add(s, "Perl server (Proc::Prefork::Interp)", f"{perl:.2f} ms")
    res.add(s, "our server", f"{ours:.2f} ms", f"{ratio:.2f}", "<= 1.0", verdict(ratio <= 1.0))
    for k, label in (("perl", "Perl"), ("ours", "our")):
        res.add(s, f"{label} server: CPU per call, server + its children",
                f"{cpu[k][0]:.2f} + {cpu[k][1]:.2f} ms")
    if signal.SIGINT in perl_cmd.seen:
        res.notes.append("The Perl server's calls end as if killed by SIGINT (the reference's "
                         "pipe race, PROTOCOL.md); accepted as success in (b) and (f).")


def alt_launcher(d: str, alt: str) -> str:
    """A client launcher in ``d`` running on ``alt`` (as ``make_launcher --client-python``)."""
    from tools.make_launcher import launcher_text

    launcher = os.path.join(d, "alt-client")
    with open(launcher, "w") as f:
        f.write(launcher_text(Path(alt), "prefork.client.main", [str(REPO)]))
    os.chmod(launcher, 0o755)
    return launcher


def bench_heavy(res: Results, reps: int, cold_reps: int) -> None:
    """(c) and (d): heavy-import script direct vs warm vs cold."""
    alt = alt_python()
    with section("c") as sec:
        script = write_script(sec.dir, "heavy.py", f"{CLIENT} -U,{PYTHON}", HEAVY_PY)
        sec.server(CLIENT, PYTHON, script)
        nmods = int(output_of([PYTHON, script, "--count"], sec.env).split()[0])
        warm_mods = int(output_of([CLIENT, "-U", PYTHON, script, "--count"], sec.env).split()[0])
        direct = Cmd([PYTHON, script], sec.env, sec.err)
        warm = Cmd([CLIENT, "-U", PYTHON, script], sec.env, sec.err)
        cold = Cmd([CLIENT, "-f", "-U", PYTHON, script], sec.env, sec.err)
        cmds: dict[str, Callable[[], float]] = {"direct": direct, "warm": warm}
        if alt is not None:
            cmds["alt"] = Cmd([alt_launcher(sec.dir, alt), "-U", PYTHON, script], sec.env,
                              sec.err)
        t = interleaved(cmds, reps)
        tc = interleaved({"direct": direct, "cold": cold}, cold_reps, warmup=1, seed=1)
    d, w = med_ms(t["direct"]), med_ms(t["warm"])
    d2, cold_ms = med_ms(tc["direct"]), med_ms(tc["cold"])
    res.facts.update(heavy_direct=d, heavy_warm=w, heavy_cold=cold_ms, heavy_mods=nmods)
    s = f"(c) heavy script ({nmods} modules; {warm_mods} in the executor)"
    res.add(s, "direct: python heavy.py", f"{d:.1f} ms")
    res.add(s, "warm through our client", f"{w:.2f} ms", f"{d / w:.1f}x", ">= 15x",
            verdict(d / w >= 15 and nmods >= 250))
    if alt is not None:
        a = med_ms(t["alt"])
        res.facts["heavy_alt"] = a
        res.add(s, f"warm through our client on {alt}", f"{a:.2f} ms", f"{d / a:.1f}x",
                "(info)")
    s = "(d) cold start (prefork-interp -f: a fresh server each call)"
    res.add(s, "direct", f"{d2:.1f} ms")
    res.add(s, "cold through our client", f"{cold_ms:.1f} ms", f"{cold_ms / d2:.2f}x",
            "(info)")


EXC_LOOP_PY = """\
import sys, time
def f3(i):
    raise ValueError(i)
def f2(i):
    return f3(i)
def f1(i):
    try:
        return f2(i)
    except ValueError:
        return 0
def loop(n):
    for i in range(n):
        f1(i)
t0 = time.perf_counter()
loop(int(sys.argv[1]))
print(time.perf_counter() - t0)
"""
EXC_LOOPS = 100_000


def bench_exceptions(res: Results, reps: int) -> None:
    """(h): the script's own code once it runs: an exception-heavy loop (raise through three
    frames, catch), timed inside the script, direct vs warm (the fast exit must cost nothing
    per exception)."""
    with section("h") as sec:
        plain = write_script(sec.dir, "exc.py", PYTHON, EXC_LOOP_PY)
        api = write_script(sec.dir, "exc_api.py", f"{CLIENT} -U,{PYTHON}",
                           "import prefork\nprefork.initialisation_complete()\n" + EXC_LOOP_PY)
        sec.server(CLIENT, "prefork-server", plain)
        sec.server(CLIENT, PYTHON, api)
        n = str(EXC_LOOPS)
        argvs = {"direct": [PYTHON, plain, n],
                 "runner": [CLIENT, "-U", "prefork-server", plain, n],
                 "api": [CLIENT, "-U", PYTHON, api, n]}
        times: dict[str, list[float]] = {k: [] for k in argvs}
        rng = random.Random(2)
        for _ in range(2):  # warm-up: start the servers
            for argv in argvs.values():
                output_of(argv, sec.env)
        for _ in range(reps):
            names = list(argvs)
            rng.shuffle(names)
            for k in names:
                times[k].append(float(output_of(argvs[k], sec.env)))
    d = med_ms(times["direct"])
    r = med_ms(times["runner"])
    a = med_ms(times["api"])
    res.facts.update(exc_direct=d, exc_runner=r, exc_api=a)
    s = f"(h) exception-heavy loop ({EXC_LOOPS} raises through 3 frames), timed in the script"
    res.add(s, "direct: python exc.py", f"{d:.1f} ms")
    res.add(s, "warm through prefork-server", f"{r:.1f} ms", f"{r / d:.2f}x", "<= 1.05x",
            verdict(r / d <= 1.05))
    res.add(s, "warm, script calling initialisation_complete()", f"{a:.1f} ms",
            f"{a / d:.2f}x", "<= 1.05x", verdict(a / d <= 1.05))


def bench_heap(res: Results, reps: int) -> None:
    """(e): per-call time against the server's heap size."""
    with section("e") as sec:
        scripts = {}
        for mib in HEAP_SIZES:
            scripts[mib] = write_script(sec.dir, f"h{mib}.py", f"{CLIENT} -U,{PYTHON}",
                                        HEAP_PY.format(mib=mib))
            sec.server(CLIENT, PYTHON, scripts[mib])
        rss = {}
        for mib, script in scripts.items():
            out = output_of([CLIENT, "-U", PYTHON, script, "--info"], sec.env).split()
            rss[mib] = float(out[1])
        cmds: dict[str, Callable[[], float]] = {
            str(mib): Cmd([CLIENT, "-U", PYTHON, script], sec.env, sec.err)
            for mib, script in scripts.items()
        }
        t = interleaved(cmds, reps)
    pts = [(rss[mib], med_ms(t[str(mib)])) for mib in HEAP_SIZES]
    slope, icpt = _fit(pts)
    res.heap = pts
    res.heap_fit = (slope, icpt)
    res.facts["heap_slope"] = slope
    s = "(e) per call vs server heap (our client)"
    for (r, ms), mib in zip(pts, HEAP_SIZES, strict=True):
        res.add(s, f"server with {mib} MiB of objects (RSS {r:.0f} MiB)", f"{ms:.2f} ms")
    res.add(s, "growth (least squares)", f"{slope:.4f} ms/MiB", "", "<= 0.1 ms/MiB",
            verdict(slope <= 0.1))


def _fit(pts: Sequence[tuple[float, float]]) -> tuple[float, float]:
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, my - slope * mx


def _batch(cmd: Cmd, loops: int, calls: int) -> float:
    """``loops`` threads each making ``calls`` sequential calls; wall seconds."""
    errors: list[BaseException] = []
    start = threading.Barrier(loops + 1)

    def loop() -> None:
        start.wait()
        try:
            for _ in range(calls):
                cmd()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=loop) for _ in range(loops)]
    for th in threads:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t0
    if errors:
        raise BenchError(f"parallel loop failed: {errors[0]}")
    return dt


def bench_concurrency(res: Results, reps: int) -> None:
    """(f): parallel loops of calls, our server vs the Perl server (C client)."""
    with section("f", uses_c_client=True) as sec:
        py = write_script(sec.dir, "t.py", f"{C_CLIENT} -U,{PYTHON}", TRIVIAL_PY)
        pl = write_script(sec.dir, "t.pl", f"{C_CLIENT} -U,{PERL}", TRIVIAL_PL)
        sec.server(C_CLIENT, PYTHON, py)
        sec.server(C_CLIENT, PERL, pl)
        cmds = {"ours": Cmd([C_CLIENT, "-U", PYTHON, py], sec.env, sec.err),
                "perl": Cmd([C_CLIENT, "-U", PERL, pl], sec.env, sec.err,
                            ok=(0, signal.SIGINT))}
        for c in cmds.values():
            c()
        rng = random.Random(2)
        walls: dict[tuple[str, int], list[float]] = {}
        for _ in range(reps):
            order = [(k, n) for k in cmds for n in LOOPS]
            rng.shuffle(order)
            for k, n in order:
                walls.setdefault((k, n), []).append(_batch(cmds[k], n, CALLS_PER_LOOP))
    for k in ("ours", "perl"):
        res.conc[k] = [(n, statistics.median(walls[k, n]) * 1000 / (n * CALLS_PER_LOOP))
                       for n in LOOPS]
    top = LOOPS[-1]
    ours = statistics.median(walls["ours", top])
    perl = statistics.median(walls["perl", top])
    res.facts.update(f_ours=ours, f_perl=perl)
    s = f"(f) {top} parallel loops x {CALLS_PER_LOOP} calls, C client (max_servers 4)"
    res.add(s, "Perl server, wall time", f"{perl * 1000:.0f} ms")
    res.add(s, "our server, wall time", f"{ours * 1000:.0f} ms", f"{ours / perl:.2f}",
            "<= 1.0", verdict(ours <= perl))
    for n, ms in res.conc["ours"]:
        perl_ms = dict(res.conc["perl"])[n]
        res.add(s, f"{n} loop(s): ms per call, ours / Perl", f"{ms:.2f} / {perl_ms:.2f}")


def bench_autoreload(res: Results, reps: int) -> None:
    """(g): Autoreload.stale() with 2,000 files, in this process."""
    with section("g") as sec:
        files = []
        for i in range(2000):
            sub = os.path.join(sec.dir, f"pkg{i // 100:02d}")
            os.makedirs(sub, exist_ok=True)
            f = os.path.join(sub, f"mod{i:04d}.py")
            with open(f, "w") as fh:
                fh.write("x = 1\n")
            files.append(f)
        birth = time.time_ns() + 1
        ino = Autoreload(birth, files)
        stat_only = Autoreload(birth, files, use_inotify=False)
        try:
            if ino.stale() is not None or stat_only.stale() is not None:
                raise BenchError("autoreload: fresh files reported stale")
            t_ino = []
            for _ in range(reps):
                t0 = time.perf_counter()
                ino.stale()
                t_ino.append(time.perf_counter() - t0)
            t_stat = []
            for _ in range(max(reps // 20, 20)):
                t0 = time.perf_counter()
                stat_only.stale()
                t_stat.append(time.perf_counter() - t0)
            target = files[1234]
            os.utime(target, ns=(birth + 10**9, birth + 10**9))
            if ino.stale() != target:
                raise BenchError("autoreload: an edited file was not reported")
        finally:
            ino.close()
    ms = med_ms(t_ino)
    watched = len(files) - len(ino.polled)
    res.facts["autoreload"] = ms
    s = "(g) autoreload check, 2,000 files"
    res.add(s, f"inotify ({watched} watched), no change", f"{ms * 1000:.1f} us", "",
            "<= 1 ms", verdict(ms <= 1.0))
    res.add(s, "stat every file (fallback), no change", f"{med_ms(t_stat):.2f} ms")
    res.add(s, "an edit is reported", "yes")


SCALE_COUNTS = (1, 10, 100)
#: The Perl server's idle timeout is 1,000,000 s; ours drops its spare after SPARE_IDLE s.
SCALE_SETTLE = float(os.environ.get("BENCH_SCALE_SETTLE") or 60.0)


def smaps_rollup(pid: int) -> tuple[int, int]:
    """(PSS, USS) of ``pid`` in KiB, from /proc/PID/smaps_rollup (0, 0 if it is gone)."""
    pss = uss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key == "Pss":
                    pss = int(rest.split()[0])
                elif key in ("Private_Clean", "Private_Dirty"):
                    uss += int(rest.split()[0])
    except OSError:
        pass
    return pss, uss


_SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(platform.machine())
_KCMP_FILE = 0


def _same_file(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether fd a[1] of pid a[0] and fd b[1] of pid b[0] are one open file (kcmp(2));
    an fd passed by SCM_RIGHTS is the same inotify instance, not another one."""
    import ctypes

    if _SYS_KCMP is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.syscall(_SYS_KCMP, a[0], b[0], _KCMP_FILE, a[1], b[1])) == 0


def inotify_use(pids: set[int]) -> tuple[int, int]:
    """(inotify instances, watches) held by ``pids``: fds that are one open file (a
    watcher's instance passed to a server) count once."""
    seen: list[tuple[int, int]] = []
    watches = 0
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    n = sum(1 for line in f if line.startswith("inotify wd:"))
            except OSError:
                continue
            here = (pid, int(fd))
            if not any(_same_file(here, other) for other in seen):
                seen.append(here)
                watches += n
    return len(seen), watches


def _titles(pids: set[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    return out


@dataclass
class ScaleFacts:
    """What the idle processes of N servers cost, all together."""

    servers: int
    procs: int
    pss_kib: int
    uss_kib: int
    instances: int
    watches: int
    spares: int


def _measure(d: str, n: int) -> ScaleFacts:
    pids = referring(d)
    pss = uss = 0
    for pid in pids:
        p, u = smaps_rollup(pid)
        pss, uss = pss + p, uss + u
    inst, watches = inotify_use(pids)
    spares = sum(1 for t in _titles(pids) if t.rstrip().endswith("[spare]"))
    return ScaleFacts(n, len(pids), pss, uss, inst, watches, spares)


def _settle(d: str, n: int, want_procs: int) -> None:
    """Wait (at most SCALE_SETTLE s) until the servers' processes are down to their idle
    set: ``want_procs`` processes (spares dropped, set-up processes gone)."""
    deadline = time.monotonic() + SCALE_SETTLE
    while time.monotonic() < deadline:
        if len(referring(d)) <= want_procs:
            return
        time.sleep(0.5)


def _scale_side(name: str, n: int, ours: bool, reps: int) -> tuple[ScaleFacts, float, float]:
    """Start ``n`` trivial servers; their idle cost; then the warm-call ms of one of them
    (with all ``n`` alive), and of a server alone in a run directory of its own -- for ours
    measured interleaved, so that machine noise hits both (the reference's run base is the
    per-user one: its two figures are taken one after the other)."""
    with section(f"i{name}{n}", uses_c_client=not ours) as sec:
        env = dict(sec.env)
        if ours:
            # A regular install's cost: no editable-install finder in every process (the
            # .pth of ``pip install -e`` imports pathlib and re: +2.4 MB per process).
            site = output_of([PYTHON, "-c", "import site; print(site.getsitepackages()[0])"],
                             env).strip()
            env["PYTHONPATH"] = f"{REPO}{os.pathsep}{site}"
            interp = [PYTHON, "-S"]
            client = CLIENT
            body = TRIVIAL_PY
        else:
            interp = [PERL]
            client = C_CLIENT
            body = TRIVIAL_PL
        shebang = f"{client} -U," + ",".join(interp)
        ext = "py" if ours else "pl"
        scripts = [write_script(sec.dir, f"t{i:03d}.{ext}", shebang, body) for i in range(n)]
        # Our client takes interpreter arguments in the combined form only (as in a #! line).
        mode = ["-U," + ",".join(interp)] if ours else ["-U", *interp]
        for sc in scripts:
            if ours:
                sec.kills.append([client, "--kill," + mode[0], sc])
            else:
                sec.server(C_CLIENT, PERL, sc)
        ok = (0,) if ours else (0, signal.SIGINT)
        first = Cmd([client, *mode, scripts[0]], env, sec.err, ok=ok)
        one = med_ms(interleaved({"x": first}, reps)["x"]) if not ours else 0.0
        for sc in scripts:
            Cmd([client, *mode, sc], env, sec.err, ok=ok)()
        # Idle: ours keeps the server (and, with more than one, the run directory's one
        # shared watcher: a lone server watches itself); the reference keeps the server and
        # the C client's forked watcher.
        per_server = 1 if ours else 2
        _settle(sec.dir, n, per_server * n + (1 if ours and n > 1 else 0))
        facts = _measure(sec.dir, n)
        if not ours:
            # The per-user run base is shared: other programs' starts meanwhile can push it
            # past 100 idents, and the reference's cleanup then stops some of these.
            facts.servers = sum(1 for t in _titles(referring(sec.dir))
                                if t.rstrip().endswith("[server]"))
            n = max(facts.servers, 1)
        if facts.procs < per_server * n:
            logs = ""
            rd = env.get(paths.RUNDIR_ENV)
            for entry in sorted(os.listdir(rd)) if rd else []:
                if entry.endswith(".log"):
                    logs += _tail(os.path.join(rd, entry), 600)
            raise BenchError(f"scale: {facts.procs} processes for {n} idle server(s) "
                             f"({_titles(referring(sec.dir))}); logs:\n{logs}")
        if ours:
            alone_dir = os.path.join(sec.dir, "ra")
            os.mkdir(alone_dir, 0o700)
            alone_env = dict(env, **{paths.RUNDIR_ENV: alone_dir})
            alone = write_script(sec.dir, f"alone.{ext}", shebang, body)
            t = interleaved({"many": first,
                             "alone": Cmd([client, *mode, alone], alone_env, sec.err)}, reps)
            subprocess.run([client, "--kill," + mode[0], alone], env=alone_env, check=False,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60)
            one, many = med_ms(t["alone"]), med_ms(t["many"])
        else:
            many = med_ms(interleaved({"x": first}, reps)["x"])
    return facts, one, many


def _reference_room() -> int:
    """How many new idents the reference's run base takes before its cleanup (more than
    100 idents: it deletes 100 entries, least recently used first -- other users' servers
    too) would run."""
    base = paths.run_base({})
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return paths.MAX_SOCKETS
    idents = {n[1:] for n in names if n[:1] in ("s", "l")}
    return max(0, paths.MAX_SOCKETS - len(idents))


def bench_scale(res: Results, reps: int, counts: Sequence[int] = SCALE_COUNTS) -> None:
    """(i): the idle cost of 1, 10 and 100 servers, ours vs the reference.

    Compared per server: the reference's run base is the per-user one, shared with
    whatever else runs; its servers are started only as far as that fits without its
    cleanup (which would stop other people's servers), and the note says so."""
    s = "(i) idle servers of trivial scripts, all their processes"
    for n in counts:
        ours, one, many = _scale_side("o", n, True, reps)
        n_ref = min(n, _reference_room())
        if n_ref < 1:
            raise BenchError("scale: the reference's run base holds 100 idents already")
        ref, ref_one, ref_many = _scale_side("r", n_ref, False, reps)
        if ref.servers < n:
            res.notes.append(f"(i) {n} servers: {ref.servers} of the reference's were alive "
                             f"when measured (its run base, {paths.run_base({})}, is shared: "
                             "past 100 idents its cleanup stops servers); its figures are "
                             f"for those, scaled to {n}.")
        n_ref = ref.servers
        ours_ps, ref_ps = ours.pss_kib / 1024 / n, ref.pss_kib / 1024 / n_ref
        res.facts[f"i_pss_{n}"] = ours.pss_kib / 1024
        res.facts[f"i_ref_pss_{n}"] = ref_ps * n
        ratio = ours_ps / ref_ps
        scaled_note = "" if n_ref == n else f" (x{n}/{n_ref})"
        res.add(s, f"{n} server(s): reference PSS (USS)",
                f"{ref_ps * n:.1f} MB ({ref.uss_kib / 1024 / n_ref * n:.1f} MB){scaled_note}")
        res.add(s, f"{n} server(s): ours PSS (USS)",
                f"{ours.pss_kib / 1024:.1f} MB ({ours.uss_kib / 1024:.1f} MB)",
                f"{ratio:.2f}", "<= 1.0", verdict(ratio <= 1.0))
        res.add(s, f"{n} server(s): per server, ours / reference",
                f"{ours_ps:.2f} / {ref_ps:.2f} MB")
        res.add(s, f"{n} server(s): processes per server, ours / reference",
                f"{ours.procs / n:.2f} / {ref.procs / n_ref:.2f}"
                + (f" ({ours.spares} spare(s) left)" if ours.spares else ""))
        ref_for = "" if n_ref == n else f" for {n_ref}"
        res.add(s, f"{n} server(s): inotify instances (watches), ours / reference",
                f"{ours.instances} ({ours.watches}) / {ref.instances} ({ref.watches}){ref_for}",
                "", "ours <= 2", verdict(ours.instances <= 2))
        if n == max(counts):
            r = many / one
            res.facts.update(i_warm_one=one, i_warm_many=many)
            res.add(s, f"warm call, ours: 1 server alive / {n} alive",
                    f"{one:.2f} / {many:.2f} ms", f"{r:.2f}", "<= 1.1", verdict(r <= 1.1))
            res.add(s, f"warm call, reference: 1 server alive / {n_ref} alive",
                    f"{ref_one:.2f} / {ref_many:.2f} ms")


# ------------------------------------------------------------------ (r) real programs

#: Real programs from PyPI, each in a venv of its own (never ours: nothing of prefork-interp
#: installed there), built once under .venv-programs/ (tests/programs.py).
REAL_REQUIREMENTS = ["httpie", "docutils", "pygments", "flake8", "pylint", "black"]

#: name -> (program, args): realistic inputs, files from this repository copied into the
#: section's directory (``in.rst``: a manual page's source; ``in.py``: a 230-line module).
REAL_PROGRAMS: dict[str, tuple[str, list[str]]] = {
    "httpie": ("http", ["--offline", "--ignore-stdin", "POST", "api.example.org/items",
                        "name=widget", "count:=3", "tags:=[\"a\",\"b\"]", "X-Token:abc"]),
    "docutils": ("rst2html", ["in.rst"]),
    "pygments": ("pygmentize", ["-l", "python", "-f", "html", "-O", "full", "in.py"]),
    "flake8": ("flake8", ["--max-line-length=100", "in.py"]),
    "pylint": ("pylint", ["-sn", "--disable=C,R", "in.py"]),
    "black": ("black", ["--check", "in.py"]),
}

#: Runs a program's script twice in one process and prints the second run's seconds: what
#: a call costs once everything (imports, lazily built state) is warm.
FLOOR_PY = """\
import os, runpy, sys, time
prog, args = sys.argv[1], sys.argv[2:]
null = os.open(os.devnull, os.O_WRONLY)
saved = os.dup(1), os.dup(2)
def once():
    sys.argv = [prog, *args]
    os.dup2(null, 1); os.dup2(null, 2)
    t0 = time.perf_counter()
    try:
        runpy.run_path(prog, run_name="__main__")
    except SystemExit:
        pass
    for s in (sys.stdout, sys.stderr):
        s.flush()
    dt = time.perf_counter() - t0
    os.dup2(saved[0], 1); os.dup2(saved[1], 2)
    return dt
once()
print(once())
os._exit(0)
"""


def _real_venv() -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from programs import program_venv

    return program_venv(PYTHON, REAL_REQUIREMENTS)


def _result(argv: list[str], env: dict[str, str]) -> tuple[int, bytes, bytes]:
    p = subprocess.run(argv, env=env, capture_output=True, check=False, timeout=300,
                       stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr


def rehearsal_done(run_dir: str, program: str) -> bool:
    """Whether a server of ``program`` in ``run_dir`` logged a rehearsal done."""
    want = f"{program}: rehearsal done"
    for name in os.listdir(run_dir):
        if name.endswith(".log"):
            with open(os.path.join(run_dir, name), encoding="utf-8", errors="replace") as f:
                if want in f.read():
                    return True
    return False


def bench_real(res: Results, reps: int) -> None:
    """(r): real programs from PyPI: direct, warm through a ``--wrap`` wrapper (as it comes,
    and made with ``--wrap NAME -- ARGS``: the run-time imports preloaded), and the floor (a
    warm trivial call plus the program's second run in one process)."""
    venv = _real_venv()
    vpy = str(venv / "bin" / "python")
    with section("r") as sec:
        shutil.copy(REPO / "docs" / "man" / "prefork-server.rst", "in.rst")
        shutil.copy(REPO / "prefork" / "server" / "runner" / "preload.py", "in.py")
        floor_py = write_script(sec.dir, "floor.py", vpy, FLOOR_PY)
        # httpie checks PyPI for a newer version by forking a daemon, on every run while the
        # check fails (no network here; with one, once a week): as a user with network sees
        # it, and a rehearsal must not fork, the section runs it with update warnings off
        # (httpie's own setting), for every column alike.
        os.mkdir("httpie-config")
        with open("httpie-config/config.json", "w", encoding="utf-8") as f:
            f.write('{"disable_update_warnings": true}\n')
        sec.env["HTTPIE_CONFIG_DIR"] = os.path.abspath("httpie-config")
        trivial = write_script(sec.dir, "trivial", vpy, "pass\n")
        server = str(VENV_BIN / "prefork-server")

        def wrap(name: str, target: str, extra: list[str]) -> str:
            path = os.path.join(sec.dir, name)
            with open(path, "wb") as f:
                got = subprocess.run([server, "--wrap", target, *extra], env=sec.env,
                                     stdout=f, stderr=subprocess.PIPE, timeout=600,
                                     check=False, stdin=subprocess.DEVNULL)
            if got.returncode != 0:
                raise BenchError(f"--wrap {target}: {got.stderr.decode()[-2000:]}")
            os.chmod(path, 0o755)
            return path

        # The wrappers' servers (interpreter arguments in their #! lines): all of this
        # section's run directory is stopped at its end.
        sec.kills.append([str(VENV_BIN / "prefork-ctl"), "kill", "--all", "-t", "5"])
        triv_w = wrap("w-trivial", trivial, [])
        triv_cmd = Cmd([triv_w], sec.env, sec.err)
        triv = interleaved({"t": triv_cmd}, reps)["t"]
        trivial_ms = med_ms(triv)
        res.facts["real_trivial"] = trivial_ms
        s = (f"(r) real programs from PyPI, unmodified, in their own venv (nothing of ours "
             f"installed); warm trivial call {trivial_ms:.1f} ms")
        ratios: list[float] = []
        r_ratios: list[float] = []
        shares: list[float] = []
        all_same = True
        for label, (prog, args) in REAL_PROGRAMS.items():
            path = str(venv / "bin" / prog)
            plain = wrap(f"w-{prog}", path, [])
            learned = wrap(f"l-{prog}", path, ["--", *args])
            rehearsed = wrap(f"r-{prog}", path, ["--rehearse", "--", *args])
            want = _result([path, *args], sec.env)
            same = all(_result([w, *args], sec.env) == want
                       for w in (plain, plain, learned, learned, rehearsed, rehearsed,
                                 rehearsed))  # cold, warm each (and rehearsed)
            # The server probes the rehearsal in forks while it serves, and rehearses at
            # the first pause between calls after that: call until it has.
            deadline = time.monotonic() + 300
            while not rehearsal_done(sec.env[RUNDIR_ENV], path) \
                    and time.monotonic() < deadline:
                same = same and _result([rehearsed, *args], sec.env) == want
            all_same = all_same and same
            ok = (want[0] << 8,)
            cmds: dict[str, Callable[[], float]] = {
                "direct": Cmd([path, *args], sec.env, sec.err, ok),
                "plain": Cmd([plain, *args], sec.env, sec.err, ok),
                "learned": Cmd([learned, *args], sec.env, sec.err, ok),
                "rehearsed": Cmd([rehearsed, *args], sec.env, sec.err, ok),
            }
            t = interleaved(cmds, reps)
            same = same and _result([rehearsed, *args], sec.env) == want
            all_same = all_same and same
            second = statistics.median(float(output_of([floor_py, path, *args], sec.env))
                                       for _ in range(max(3, reps // 4))) * 1000
            d, p, lw = med_ms(t["direct"]), med_ms(t["plain"]), med_ms(t["learned"])
            rh = med_ms(t["rehearsed"])
            floor = trivial_ms + second
            ratio, floor_ratio, r_ratio = d / lw, d / floor, d / rh
            share = (ratio - 1) / (floor_ratio - 1) if floor_ratio > 1 else 1.0
            r_share = (r_ratio - 1) / (floor_ratio - 1) if floor_ratio > 1 else 1.0
            ratios.append(ratio)
            r_ratios.append(r_ratio)
            shares.append(share)
            res.facts[f"real_{label}"] = ratio
            res.facts[f"real_rehearsed_{label}"] = r_ratio
            what = f"{label}: {prog} {' '.join(args)}"
            res.add(s, f"{what} -- direct", f"{d:.1f} ms")
            res.add(s, f"{label}: --wrap {prog} (warm)", f"{p:.1f} ms", f"{d / p:.1f}x",
                    "(before)")
            res.add(s, f"{label}: --wrap {prog} -- ARGS (warm, run-time imports preloaded)",
                    f"{lw:.1f} ms", f"{ratio:.1f}x", "share >= 60%",
                    f"{verdict(share >= 0.6)} ({share:.0%})")
            res.add(s, f"{label}: --wrap {prog} --rehearse -- ARGS (warm, rehearsed)",
                    f"{rh:.1f} ms", f"{r_ratio:.1f}x", "share >= 60%",
                    f"{verdict(r_share >= 0.6)} ({r_share:.0%})"
                    + ("" if rehearsal_done(sec.env[RUNDIR_ENV], path) else ", NOT REHEARSED"))
            res.add(s, f"{label}: floor (trivial call + second run in one process)",
                    f"{floor:.1f} ms", f"{floor_ratio:.1f}x", "(floor)",
                    "" if same else "OUTPUT DIFFERS")
        med = statistics.median(ratios)
        r_med = statistics.median(r_ratios)
        res.add(s, "median speed-up, --wrap -- ARGS, warm", "", f"{med:.1f}x", ">= 4x",
                verdict(med >= 4))
        res.add(s, "median speed-up, --wrap --rehearse -- ARGS, warm", "", f"{r_med:.1f}x",
                ">= 4x", verdict(r_med >= 4))
        res.add(s, "output and exit status byte-identical to direct, cold and warm", "",
                "", "all", verdict(all_same))
        res.facts["real_median"] = med
        res.facts["real_rehearsed_median"] = r_med


# ------------------------------------------------------------------ output


def machine() -> list[str]:
    """What this ran on."""
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    pyver = subprocess.run([PYTHON, "-c", "import sys; print(sys.version.split()[0])"],
                           capture_output=True, text=True, check=False).stdout.strip()
    perlver = subprocess.run([PERL, "-e", "print $^V"], capture_output=True, text=True,
                             check=False).stdout.strip()
    chiark = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "chiark-utils-bin"],
                            capture_output=True, text=True, check=False).stdout.strip()
    load = os.getloadavg()
    return [
        f"CPU: {model}, {os.cpu_count()} cores",
        f"kernel: {platform.system()} {platform.release()} ({platform.machine()})",
        f"Python (venv, server and client): {pyver} at {os.path.realpath(PYTHON)}",
        f"Perl: {perlver}; reference: chiark-utils-bin {chiark or '?'}",
        f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
    ]


def table_text(rows: Sequence[Row]) -> str:
    """The table for the terminal."""
    out = []
    last = None
    w = max(len(r.what) for r in rows) + 2
    for r in rows:
        if r.section != last:
            out.append(r.section)
            last = r.section
        out.append(f"  {r.what:<{w}}{r.value:>16}  {r.ratio:>7}  {r.target:<14}{r.verdict}")
    return "\n".join(out)


def table_md(rows: Sequence[Row]) -> str:
    """The table in Markdown."""
    out = ["| measurement | median | ratio | target | |", "| --- | ---: | ---: | --- | --- |"]
    last = None
    for r in rows:
        if r.section != last:
            out.append(f"| **{r.section}** | | | | |")
            last = r.section
        out.append(f"| {r.what} | {r.value} | {r.ratio} | {r.target} | {r.verdict} |")
    return "\n".join(out)


def plot(res: Results, path: Path) -> bool:
    """The heap-size and concurrency series; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [p[0] for p in res.heap]
    ys = [p[1] for p in res.heap]
    ax1.plot(xs, ys, "o", label="our server (median per call)")
    slope, icpt = res.heap_fit
    lo, hi = 0.0, max(xs) * 1.05
    ax1.plot([lo, hi], [icpt + slope * lo, icpt + slope * hi], "--",
             label=f"fit: {slope:.4f} ms/MiB")
    ax1.plot([lo, hi], [icpt, icpt + 0.1 * hi], ":", color="grey",
             label="target slope 0.1 ms/MiB")
    ax1.set_xlabel("server RSS (MiB)")
    ax1.set_ylabel("ms per warm call (our client)")
    ax1.set_title("(e) per-call time vs server heap")
    ax1.set_ylim(bottom=0)
    ax1.legend(fontsize=8)
    for k, label in (("ours", "our server"), ("perl", "Perl server")):
        pts = res.conc.get(k, [])
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    ax2.set_xlabel(f"parallel loops ({CALLS_PER_LOOP} calls each, C client)")
    ax2.set_ylabel("wall ms per call")
    ax2.set_xticks(list(LOOPS))
    ax2.set_title("(f) concurrency (max_servers 4)")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _bounds(f: dict[str, float]) -> list[str]:
    """The "what bounds it" notes, with this run's figures."""
    out = []
    if "a_ours" in f:
        server = f["a_c"] - f["chelp"]
        floor = f["pass_"] + server
        out.append(
            f"**(a)** Our client is a Python process: `python -IS -c pass` alone takes "
            f"{f['pass_']:.2f} ms, the C client's whole start-up (`--help`) "
            f"{f['chelp']:.2f} ms. The C client's call minus its start-up leaves "
            f"{server:.2f} ms for the connection and the server; a Python client that did "
            f"nothing but start would take {floor:.2f} ms, a ratio of "
            f"{floor / f['a_c']:.2f}. Our client takes {f['a_ours'] - floor:.2f} ms above "
            f"that floor (its imports, the ident, the request). Only a faster-starting "
            f"interpreter moves the floor: see the `--client-python` row. Making the server "
            f"faster makes this ratio worse, not better.")
    if "b_ours" in f:
        out.append(
            f"**(b)** CPU per call (server and its children, from /proc, same run): ours "
            f"{f['b_cpu_ours']:.2f} ms, Perl {f['b_cpu_perl']:.2f} ms. Our server forks one "
            f"Python process per call and is its own monitor; the Perl server forks a "
            f"monitor that forks the executor. Our fork comes before the call: the server "
            f"keeps one executor forked and set up ahead (a spare), so the caller waits only "
            f"for the hand-over and the call's own set-up (stdio on its fds, argv), the "
            f"script, the exit and the status. Most of our server's own "
            f"{f['b_cpu_ours_server']:.2f} ms (Perl's: {f['b_cpu_perl_server']:.2f}) is the "
            f"kernel's: copying the page tables at fork() and the copy-on-write faults of "
            f"the pages Python writes afterwards (reference counts), in the server and in "
            f"the executor.")
    if "heavy_warm" in f:
        out.append(
            f"**(c)** A warm call of the heavy script costs {f['heavy_warm']:.2f} ms: the "
            f"client's floor (a) plus what grows with the script: its `atexit` handlers "
            f"(`logging`'s, ...) and the kernel's teardown of a bigger process at its exit, "
            f"which comes before the server learns the status (the fork, and the fork "
            f"handlers of `threading` and `logging`, come before the call). The ratio is the "
            f"script's direct time over that: scripts slower than "
            f"{15 * f['heavy_warm']:.0f} ms to start get 15x or more.")
    if "heap_slope" in f:
        out.append(
            f"**(e)** {f['heap_slope'] * 1000:.0f} us per MiB: the kernel copies the page "
            f"tables of the whole heap at each fork (ahead of the call, but on the same two "
            f"cores) and tears them down at each exit (on the caller's path). The "
            f"executor itself writes to almost none of the inherited heap (`gc.freeze()`, "
            f"and its exit skips the interpreter's teardown: `prefork/server/fastexit.py`).")
    if "f_ours" in f:
        out.append(
            "**(f)** Eight loops on two cores keep the machine busy: this measures CPU per "
            "call more than latency, and at most 4 executors run at once in both servers "
            "(`max_servers`).")
    if "autoreload" in f:
        out.append(
            f"**(g)** With inotify watches on the 2,000 files, a check that finds no change "
            f"is one `read()` of the inotify fd that returns nothing "
            f"({f['autoreload'] * 1000:.1f} us); only after an event are the files "
            f"`stat`-ed again.")
    return out


IS_NOTE = """## The client's `-IS` launcher (venvs, editable installs)

`tools/make_launcher.py` (run by `make venv` and `make bench`) replaces pip's
`prefork-interp` script by `#!<venv>/bin/python -IS` plus `sys.path.append('<where prefork
is>')`, computed at install time. That is safe with venvs and editable installs:

- **venv**: `-S` skips `site`, so site-packages is not on `sys.path`, but the venv's
  interpreter still finds its standard library (`pyvenv.cfg` is read without `site`), and the
  client needs nothing else. `-I` ignores `PYTHON*` variables and the user site: a caller's
  `PYTHONPATH` or `PYTHONHOME` cannot break or shadow the client.
- **editable install** (`pip install -e`): the directory recorded is the repository root, so
  edits take effect at once, with no import hook (`site` never runs the editable finder).
  Moving the repository, or switching between editable and regular installs, needs the
  launcher written again (`make venv`), as does any `pip install` into the venv: pip
  rewrites its own slow launcher.
- The directory is appended to `sys.path`, after the standard library: a file in the
  repository root or a package in site-packages cannot shadow a standard module the client
  imports (with `sys.path.insert(0, ...)` it could).
- `--client-python PATH` (e.g. `/usr/bin/python3`) runs the client on another interpreter
  (>= 3.11): the client needs only the standard library and the `prefork` package. It is
  not the default: if that interpreter is removed or downgraded, the client breaks until the
  launcher is written again.
"""


def results_md(res: Results, table: str, mach: list[str], seconds: float) -> str:
    """docs/bench-results.md."""
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`bench/bench.py`); every figure below comes from one run, "
        "with the A/B variants of each section interleaved (a new random order each round), "
        "many repetitions, medians. Ratios are ours over the reference (heavy script: direct "
        "over warm).",
        "",
        "Machine:",
        "",
        *[f"- {m}" for m in mach],
        f"- bench run time: {seconds:.0f} s",
        "",
        table,
        "",
        "![per-call time vs heap size; concurrency](bench.png)",
        "",
        "## What bounds the figures",
        "",
        *[f"- {n}" for n in _bounds(res.facts)],
        *[f"- {n}" for n in res.notes],
        "",
        IS_NOTE,
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repetitions (a smoke test)")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/")
    ap.add_argument("--only", default="apbcefghir", help="sections to run (default all: "
                    "apbcefghir; c includes d)")
    ns = ap.parse_args()
    for p in (PYTHON, CLIENT, C_CLIENT, PERL):
        if not os.access(p, os.X_OK):
            print(f"bench: {p} is missing (make venv; make deps)", file=sys.stderr)
            return 1
    q = ns.quick
    t0 = time.monotonic()
    res = Results()
    failed = []
    steps: list[tuple[str, Callable[[], None]]] = [
        ("a", lambda: bench_clients(res, 20 if q else 200)),
        ("p", lambda: bench_pip(res, 20 if q else 200)),
        ("b", lambda: bench_servers(res, 20 if q else 300)),
        ("c", lambda: bench_heavy(res, 5 if q else 30, 3 if q else 12)),
        ("e", lambda: bench_heap(res, 5 if q else 60)),
        ("f", lambda: bench_concurrency(res, 1 if q else 3)),
        ("g", lambda: bench_autoreload(res, 200 if q else 5000)),
        ("h", lambda: bench_exceptions(res, 5 if q else 21)),
        ("i", lambda: bench_scale(res, 20 if q else 200, (1, 10) if q else SCALE_COUNTS)),
        ("r", lambda: bench_real(res, 5 if q else 15)),
    ]
    for name, step in steps:
        if name not in ns.only:
            continue
        print(f"bench: section ({name}) ...", file=sys.stderr, flush=True)
        try:
            step()
        except (BenchError, OSError, subprocess.SubprocessError, ValueError) as e:
            failed.append(name)
            print(f"bench: section ({name}) failed: {e}", file=sys.stderr)
    seconds = time.monotonic() - t0
    if LEFTOVERS:
        for name, pids in LEFTOVERS:
            res.notes.append(f"section ({name}) left processes behind (killed): "
                             f"{sorted(pids)}")
            failed.append(name)
    else:
        res.notes.append("No process was left behind by any section (checked after each).")
    mach = machine()
    print()
    print("\n".join(mach))
    print()
    if res.rows:
        print(table_text(res.rows))
    print()
    for n in res.notes:
        print(n)
    if not ns.no_write and res.rows:
        RESULTS_MD.write_text(results_md(res, table_md(res.rows), mach, seconds))
        wrote = [str(RESULTS_MD.relative_to(REPO))]
        if res.heap and res.conc and plot(res, PLOT_PNG):
            wrote.append(str(PLOT_PNG.relative_to(REPO)))
        print(f"\nbench: wrote {', '.join(wrote)} ({seconds:.0f} s)")
    if failed:
        print(f"bench: sections failed: {', '.join(sorted(set(failed)))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
