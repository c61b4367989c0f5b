"""Helpers for the differential transparency probes (issue 3); the fixtures are in conftest.py.

A *probe* is one small script, written once with the shebang ``#!CLIENT -U,INTERP``, that
reports what it observes (JSON or raw bytes on stdout, text on stderr, its exit status).
``Probe.run(how, ...)`` runs it one of three ways, and a test asserts the observations equal:

- ``"direct"``: ``INTERP script args`` -- what the script does without prefork-interp;
- ``"cold"``:   through the client with no server running (``--kill`` first), so this call
  starts the server and is served by its first executor;
- ``"warm"``:   through the client with a server already running (a warm-up call first,
  started from the test's base environment, which may differ from the call's).

Each way runs under pipes (``io="pipe"``: stdout and stderr apart) or under a pseudo-terminal
that is the controlling terminal of what is started (``io="pty"``: one transcript).

Every probe script starts with the same prologue (so line numbers match in both runs)::

    import sys; sys.path.insert(0, REPO)     # the 3.11 interpreter has no prefork installed
    <pre>                                     # runs once per server (or once, directly)
    import prefork; prefork.initialisation_complete(<init>)
    if os.environ.get("PROBE_WARMUP"): exit   # the warm-up call ends here
    <body>                                    # runs once per call
"""

from __future__ import annotations

import difflib
import json
import os
import pprint
import re
import signal
import subprocess
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pexpect  # type: ignore[import-untyped]
import pytest
from harness import CLIENT, PYTHON, REPO, Deadline, ProcRegistry, find_python, scaled

#: The interpreter of the normal-shutdown path (no sys.monitoring), looked for (PATH, pyenv,
#: /usr/local, /usr; ``$PREFORK_TEST_PYTHON311`` first): "" if this machine has none.
PY311 = find_python("3.11") or ""
NO_PY311 = ("no Python 3.11 found ($PREFORK_TEST_PYTHON311, python3.11 on PATH, pyenv's "
            "versions/3.11.*, /usr/local/bin/python3.11, /usr/bin/python3.11): "
            "set PREFORK_TEST_PYTHON311 to one")
#: Marks a test that runs a probe on ``PY311``: skipped, saying why, where there is none.
needs_py311 = pytest.mark.skipif(not PY311, reason=NO_PY311)
#: Interpreters the probes run on, by test id.
INTERPRETERS = {"py3": str(PYTHON), "py311": PY311}
#: ``sorted(INTERPRETERS)`` as parameters, the 3.11 one marked ``needs_py311``.
PYTHONS = [pytest.param(name, marks=[needs_py311] if name == "py311" else [])
           for name in sorted(INTERPRETERS)]
HOWS = ("direct", "cold", "warm")
RUN_TIMEOUT = 30.0

PROLOGUE = """\
import os, sys
sys.path.insert(0, {repo!r})
{pre}
import prefork
prefork.initialisation_complete({init})
if os.environ.get("PROBE_WARMUP"):
    raise SystemExit(0)
"""


def status_text(returncode: int) -> str:
    """``exit N`` or ``signal NAME`` from a subprocess return code."""
    if returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return f"exit {returncode}"


@dataclass(frozen=True)
class Run:
    """What one run of a probe showed."""

    status: str
    out: bytes
    err: bytes = b""

    def json(self) -> Any:
        """stdout parsed as JSON (the observation probes print one object)."""
        try:
            return json.loads(self.out)
        except ValueError:
            raise AssertionError(f"probe output is not JSON: {self}") from None


def base_env(env: Mapping[str, str]) -> dict[str, str]:
    """The harness environment made deterministic: no PYTHON* settings but
    PYTHONDONTWRITEBYTECODE, an explicit UTF-8 locale, no terminal size hints."""
    e = {k: v for k, v in env.items()
         if not k.startswith(("PYTHON", "LC_")) and k not in ("COLUMNS", "LINES", "TERM")}
    e["PYTHONDONTWRITEBYTECODE"] = "1"
    e["LANG"] = "C.UTF-8"
    e["TERM"] = "dumb"
    return e


class Probe:
    """One probe script and the three ways to run it (see the module docstring)."""

    def __init__(self, path: Path, python: str, env: dict[str, str], procs: ProcRegistry,
                 python_args: tuple[str, ...] = ()) -> None:
        self.path = path
        self.python = python
        self.python_args = python_args
        #: cwds where this probe's server is known to be running (no warm-up call needed).
        self.warm: set[str] = set()
        self.env = env
        self.procs = procs

    # ------------------------------------------------------------ commands

    def command(self, how: str, *args: str) -> list[str]:
        """The argv of a run: the interpreter on the script, or the script (its #! line)."""
        if how == "direct":
            return [self.python, *self.python_args, str(self.path), *args]
        return [str(self.path), *args]

    def client(self, *opts: str) -> list[str]:
        """The client with ``opts`` on this probe, in the #! line's combined form (so the
        identity is the #! line's)."""
        return [str(CLIENT), ",".join([*opts, "-U", self.python, *self.python_args]),
                str(self.path)]

    def prepare(self, how: str, cwd: str | os.PathLike[str] | None = None) -> None:
        """Before a run: no server for ``cold``; a running server for ``warm`` (started by
        a warm-up call from the base environment unless this probe already started one
        there)."""
        key = os.path.realpath(cwd if cwd is not None else os.getcwd())
        if how == "cold":
            rc, out, err = self.procs.run(self.client("--kill"), cwd=cwd, env=self.env)
            assert rc == 0, (out, err)
            self.warm.add(key)  # the cold run starts one
        elif how == "warm" and key not in self.warm:
            rc, out, err = self.procs.run(self.command("warm"), cwd=cwd,
                                          env={**self.env, "PROBE_WARMUP": "1"})
            assert rc == 0, f"warm-up call failed: {rc} {out!r} {err!r}"
            self.warm.add(key)

    # ------------------------------------------------------------ running

    def run(self, how: str, *args: str, io: str = "pipe", input: bytes | None = None,
            env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
            umask: int | None = None, timeout: float = RUN_TIMEOUT) -> Run:
        """Run the probe ``how`` under ``io`` and return what it showed."""
        self.prepare(how, cwd)
        cmd = self.command(how, *args)
        e = dict(self.env if env is None else env)
        if io == "pty":
            return run_pty(cmd, e, cwd, input or b"", umask, timeout)
        kw: dict[str, Any] = {}
        if umask is not None:
            kw["umask"] = umask
        rc, out, err = self.procs.run(cmd, input=input, env=e, cwd=cwd, timeout=timeout, **kw)
        return Run(status_text(rc), out, err)

    def popen(self, how: str, *args: str, env: Mapping[str, str] | None = None,
              **kw: Any) -> subprocess.Popen[bytes]:
        """Start the probe ``how`` with pipes on stdin/stdout/stderr (for interactive probes)."""
        self.prepare(how, kw.get("cwd"))
        kw.setdefault("stdin", subprocess.PIPE)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return self.procs.popen(self.command(how, *args),
                                env=dict(self.env if env is None else env), **kw)

    def differential(self, *args: str, hows: tuple[str, ...] = ("cold", "warm"),
                     normalise: Callable[[Run], Any] = lambda r: r, **kw: Any) -> Any:
        """Run directly, then each of ``hows``; assert all equal; return the direct result."""
        want = normalise(self.run("direct", *args, **kw))
        for how in hows:
            got = normalise(self.run(how, *args, **kw))
            assert got == want, f"{how} run differs from the direct run:\n{explain(want, got)}"
        return want


def read_line(proc: subprocess.Popen[bytes], timeout: float = 10.0, eof_ok: bool = False
              ) -> bytes:
    """One line from ``proc``'s stdout, unbuffered (select + os.read of one byte, so what
    follows stays in the pipe), or fail (at EOF too, unless ``eof_ok``: then what came before
    it)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = Deadline(timeout, "a complete line from the probe")
    line = b""
    while not line.endswith(b"\n"):
        if deadline.readable(fd, f"got {line!r}"):
            chunk = os.read(fd, 1)
            if not chunk and eof_ok:
                return line
            assert chunk, f"EOF from the probe after {line!r}"
            line += chunk
    return line


def explain(want: object, got: object) -> str:
    """A readable diff of two runs (or of any two reprs)."""
    if isinstance(want, Run) and isinstance(got, Run):
        parts = []
        if want.status != got.status:
            parts.append(f"status: direct {want.status}, preforked {got.status}")
        for field in ("out", "err"):
            a, b = getattr(want, field), getattr(got, field)
            if a != b:
                lines = difflib.unified_diff(
                    a.decode("utf-8", "backslashreplace").splitlines(),
                    b.decode("utf-8", "backslashreplace").splitlines(),
                    "direct", "preforked", lineterm="", n=2)
                parts.append(f"{field}:\n" + "\n".join(lines))
        return "\n".join(parts)
    return "\n".join(difflib.unified_diff(pprint.pformat(want).splitlines(),
                                          pprint.pformat(got).splitlines(),
                                          "direct", "preforked", lineterm=""))


def run_pty(cmd: list[str], env: dict[str, str], cwd: str | os.PathLike[str] | None,
            input: bytes, umask: int | None, timeout: float) -> Run:
    """Run ``cmd`` as the session leader of a new pty (its controlling terminal), feed it
    ``input`` and return its transcript (stdout and stderr together, as a terminal shows)."""
    child = pty_spawn(cmd, env, cwd, umask, timeout)
    try:
        if input:
            child.send(input)
        child.expect(pexpect.EOF)
        out = child.before
        return Run(pty_status(child), out)
    finally:
        child.close(force=True)


def pty_spawn(cmd: list[str], env: dict[str, str], cwd: str | os.PathLike[str] | None = None,
              umask: int | None = None, timeout: float = RUN_TIMEOUT) -> pexpect.spawn:
    """``pexpect.spawn`` with echo off, a fixed window size and an optional umask."""
    preexec = None if umask is None else (lambda: os.umask(umask))
    return pexpect.spawn(cmd[0], cmd[1:], env=env, cwd=None if cwd is None else str(cwd),
                         echo=False, timeout=scaled(timeout), dimensions=(24, 80),
                         preexec_fn=preexec)


def pty_status(child: pexpect.spawn) -> str:
    """Wait for a pexpect child (after its EOF) and describe its status."""
    if child.isalive():
        child.wait()
    if child.signalstatus is not None:
        return f"signal {signal.Signals(child.signalstatus).name}"
    return f"exit {child.exitstatus}"


def write_probe(directory: Path, name: str, body: str, python: str, pre: str = "",
                init: str = "", python_args: tuple[str, ...] = ()) -> Path:
    """Write an executable probe script (the module docstring shows its shape)."""
    text = PROLOGUE.format(repo=str(REPO), pre=textwrap.dedent(pre).strip(), init=init)
    text += textwrap.dedent(body).lstrip("\n")
    path = directory / name
    shebang = ",".join([f"#!{CLIENT} -U", python, *python_args])
    path.write_text(f"{shebang}\n{text}")
    path.chmod(0o755)
    return path


ProbeFactory = Callable[..., Probe]


_PID_IN_BASH = re.compile(rb"(bash: (?:line \d+: )?)\s*\d+ ")


def normalise_bash(text: bytes) -> bytes:
    """bash's job messages name the pid of the dead process: mask it."""
    return _PID_IN_BASH.sub(rb"\1PID ", text)
