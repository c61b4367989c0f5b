"""The child side of the server's fork: a spare executor, waiting for its call.

``become_spare()`` is all a freshly forked child of the server runs of the server's code:
everything it needs comes in as arguments (as ``_serve_one`` in CPython's
``multiprocessing/forkserver.py``), nothing is read off the server's objects.  It either
returns -- the spare has taken on its call and is now the executor, which goes on into the
script -- or ends the process with ``os._exit()``: let go by the server, the server already
gone, or a set-up that failed.
"""

from __future__ import annotations

import _signal
import os
import sys

from prefork.common import fdio, protocol
from prefork.common.consts import EXIT_FAILED
from prefork.server import context, executor, percall

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket as socket
    from collections.abc import Callable, Iterable, Mapping
    from typing import Protocol

    class Closable(Protocol):
        """Anything of the server's the child must let go of (sockets, selector, log)."""

        def close(self) -> None: ...


def become_spare(handover_sock: socket.socket, *, server_pid: int,
                 server_objects: Iterable[Closable], keep_fds: Iterable[int],
                 saved_signals: Mapping[int, object], prctl: Callable[..., int] | None,
                 title: str | None, set_title: Callable[[str], None] | None,
                 environ: list[tuple[bytes, bytes]] | None) -> None:
    """In the new child, every signal blocked: drop what is the server's, wait for a call on
    ``handover_sock`` and take it on.  Returns only as that call's executor.

    ``server_objects``: the server's objects holding fds (closed here, so that nothing
    closes their numbers later); ``keep_fds``: the script's own fds (every other one is
    closed); ``saved_signals``: the script's dispositions, given back; ``environ``: the
    last call's environment, set here before the call (never in the server, whose C
    environ would keep every string), or None to keep the server's.
    """
    status: int | None = EXIT_FAILED
    try:
        os.setpgid(0, 0)
        executor.set_pdeathsig(_signal.SIGKILL, prctl)
        if os.getppid() != server_pid:  # the server died before PDEATHSIG was set
            status = 1
            return
        executor.restore_signals(saved_signals)
        for obj in server_objects:
            obj.close()
        executor.close_fds_except({*keep_fds, 0, 1, 2, handover_sock.fileno()})
        if set_title is not None and title is not None:
            set_title(title)
        environ_skipped = executor.replace_environ(environ) if environ is not None else []
        # The stdio settings for the environment the spare has (usually the call's), and
        # the pages building the streams touches, before the call.
        plan: executor.StdioPlan | None
        try:
            plan = executor.plan_stdio()
            executor.warm_stdio(plan)
        except Exception:  # noqa: BLE001 - e.g. an unknown PYTHONIOENCODING: decided
            plan = None    # again with the call, whose stderr then gets the error
        handed = _receive_call(handover_sock)
        if handed is None:
            status = 0  # let go by the server
            return
        _take_call(*handed, plan, environ_skipped, prctl)
        status = None  # the executor: back into the script
    except BaseException as e:  # noqa: BLE001 - the child must never run on as a server
        os.write(2, f"prefork: failed to set up the executor: {e!r}\n".encode())
    finally:
        if status is not None:
            os._exit(status)


def _receive_call(handover_sock: socket.socket) -> tuple[protocol.Request, bool] | None:
    """The call the server hands over (see ``protocol.encode_handover``), and whether its
    environment came with it; None at EOF (the server let this spare go)."""
    size = protocol.HANDOVER_HEAD.size
    head, fds = fdio.recv_with_fds(handover_sock, size, protocol.X1_FDS)
    if not head and not fds:
        return None
    if len(head) < size:
        head += fdio.read_exactly(handover_sock, size - len(head))
    body = fdio.read_exactly(handover_sock, protocol.decode_handover_head(head))
    fds += fdio.recv_fd_chunks(handover_sock, protocol.handover_passed_count(head),
                               protocol.SCM_MAX_FD)
    handover_sock.close()
    return protocol.decode_handover(head, body, fds)


def _take_call(req: protocol.Request, with_env: bool, plan: executor.StdioPlan | None,
               environ_skipped: list[bytes], prctl: Callable[..., int] | None = None) -> None:
    """Become the executor of ``req``: the caller's fds, cwd, umask, argv, environment (if
    it differs from the one this spare has), stdio and, last, its signal mask."""
    # The caller's fds first, while the server's fd limit holds: a caller's fd at or above
    # its own soft limit (``exec 200>x; ulimit -n 64``) is inherited across exec as well.
    not_passed = executor.install_fds(req)
    blocked = executor.inherit_from_client(req.client_pid, prctl) if req.extended else []
    if with_env:
        skipped = executor.replace_environ(req.env)
        plan = None  # decided for this environment by rebuild_stdio, errors to the caller
    else:
        skipped = environ_skipped
    context.sync_timezone()
    if req.passed:
        executor.adopt_listen_pid(req.client_pid)
    if req.umask is not None:
        os.umask(req.umask)
    executor.set_argv(req)
    executor.rebuild_stdio(req.flags, plan)
    if skipped:
        print(f"prefork: warning: environment entries with invalid names dropped: "
              f"{skipped!r}", file=sys.stderr)
    if not_passed:
        print(f"prefork: warning: the caller's fds {not_passed} are not open in the script: "
              "the script opened its own there before initialisation_complete(), or the "
              "fd limit is lower", file=sys.stderr)
    # Blocked since before the fork; now the caller's mask, as across exec.
    _signal.pthread_sigmask(_signal.SIG_SETMASK, blocked)
    percall.at_call()
