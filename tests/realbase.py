"""Tests that run the reference C client use the real run base (it has no override).

``RealBase`` remembers every ident a test may create there and, at teardown, removes exactly
those entries (``s<IDENT>``, ``l<IDENT>``, ``p<IDENT>.log``) and kills the processes that still
listen on those sockets -- never anything else in that shared directory.  Tests also keep
their scripts and working directories inside their own ``rundir``, so the ``rundir`` fixture's
teardown finds any straggler (server, monitor, watcher) by its cwd or command line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from harness import kill_processes
from procfs import socket_holders

from prefork.common import paths
from prefork.common.ident import RUNDIR_ENV, compute_ident, lock_path, log_path, socket_path


class RealBase:
    """The per-user run base the C client uses, and the idents this test put there."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env.pop(RUNDIR_ENV, None)
        self.base = paths.run_base(env)
        self.idents: set[str] = set()

    def track(self, ident: str) -> str:
        """Remember ``ident`` for clean-up; returns it."""
        self.idents.add(ident)
        return ident

    def ident(self, interp: str, script: str | None, cwd: str,
              interp_args: Sequence[str] = ()) -> str:
        """The ident a plain ``-U INTERP SCRIPT`` call from ``cwd`` uses (tracked)."""
        return self.track(compute_ident(
            self.base, os.fsencode(interp), None if script is None else os.fsencode(script),
            [], cwd=cwd, extra=[b"a" + os.fsencode(a) for a in interp_args]))

    def sock_path(self, ident: str) -> str:
        """``BASE/s<IDENT>``."""
        return socket_path(self.base, ident)

    def cleanup(self) -> None:
        """Remove the tracked entries and kill whatever still listens on their sockets."""
        holders: set[int] = set()
        for ident in self.idents:
            sock = socket_path(self.base, ident)
            holders |= socket_holders(sock)
            for p in (sock, lock_path(self.base, ident), log_path(self.base, ident),
                      log_path(self.base, ident) + ".1"):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
        if holders:
            kill_processes(holders)
