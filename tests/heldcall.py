"""A call held running by its script (it reports ``pids EXECUTOR [CHILD] SERVER`` and runs
until its stdin is closed), for the tests that act on a server while calls run."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Any

from harness import Lines, ProcRegistry, scaled


@dataclass
class Held:
    """A running call: its client, executor and server, and the executor's child (or 0)."""

    proc: subprocess.Popen[bytes]
    lines: Lines
    executor: int
    server: int
    exit_code: int
    child: int = 0

    def finish(self) -> None:
        """Let it end; it must end normally, with its own output and exit status."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.lines.line() == f"done {self.server}".encode()
        assert self.proc.wait(timeout=scaled(10)) == self.exit_code
        assert self.proc.stderr is not None
        assert self.proc.stderr.read() == b""


def start_held(procs: ProcRegistry, argv: list[str], exit_code: int, **kw: Any) -> Held:
    """Start ``argv`` (a call of a script that holds) and read its pids line."""
    p = procs.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, **kw)
    assert p.stdout is not None
    lines = Lines(p.stdout.fileno())
    word, *pids = lines.line(timeout=30).split()
    assert word == b"pids"
    exe, *child, server = (int(x) for x in pids)
    return Held(p, lines, exe, server, exit_code, child[0] if child else 0)
