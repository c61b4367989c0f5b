"""Facts every role shares, defined once.  Hot-path safe: imports only ``_signal``.

Each constant here was once written out in several files; a role that needs one imports it
from here rather than repeating the number.
"""

import _signal

#: Exit status when prefork-interp itself (client, setup, or a server that cannot serve)
#: fails, as the reference: a script's own status is passed through unchanged.
EXIT_FAILED = 127

#: ``sizeof(sockaddr_un.sun_path)`` on Linux: a socket path (with its NUL) must fit.
SUN_PATH_MAX = 108

#: Signals the client forwards to the executor under extension x1: every signal a caller can
#: send and a script can catch, but the synchronous faults (SIGSEGV, SIGBUS, SIGILL, SIGFPE: a
#: handler for a real fault of the client's own would loop on the faulting instruction).
#: SIGCHLD too: the client has no child left by then, so any it gets was sent to it.
FORWARDED_SIGNALS: tuple[int, ...] = (
    _signal.SIGHUP, _signal.SIGINT, _signal.SIGQUIT, _signal.SIGUSR1, _signal.SIGUSR2,
    _signal.SIGPIPE, _signal.SIGALRM, _signal.SIGTERM, _signal.SIGCONT, _signal.SIGTSTP,
    _signal.SIGTTIN, _signal.SIGTTOU, _signal.SIGWINCH, _signal.SIGURG, _signal.SIGXCPU,
    _signal.SIGXFSZ, _signal.SIGVTALRM, _signal.SIGPROF, _signal.SIGPWR, _signal.SIGCHLD,
    _signal.SIGABRT, _signal.SIGSYS, _signal.SIGTRAP, _signal.SIGIO, _signal.SIGSTKFLT,
    *range(_signal.SIGRTMIN, _signal.SIGRTMAX + 1),
)

#: Signals a server accepts in a client's ``S`` record: the forwarded ones, plus those a
#: client never forwards itself but a peer may still ask for (the faults, KILL and STOP).
DELIVERABLE_SIGNALS: frozenset[int] = frozenset(FORWARDED_SIGNALS) | frozenset((
    _signal.SIGBUS, _signal.SIGFPE, _signal.SIGSEGV, _signal.SIGILL,
    _signal.SIGKILL, _signal.SIGSTOP,
))

#: Names of a run directory's entries for one server identity.  The reference's cleanup
#: treats names starting ``s`` or ``l`` as its own entries, so our extra files use ``p``.
SOCKET_PREFIX = "s"
LOCK_PREFIX = "l"
LOG_PREFIX = "p"
LOG_SUFFIX = ".log"
#: Our server's record of its calls (``prefork.server.stats``), ``p<IDENT>.stat``.
STAT_SUFFIX = ".stat"
#: What a server learned from calls (``prefork.server.learn``), ``p<IDENT>.learned``.
LEARNED_SUFFIX = ".learned"

#: Second or third line of a ``prefork-server --wrap`` wrapper: the program it stands for.
WRAP_MARKER = b"# prefork-server-wrap: "


def socket_name(ident: str) -> str:
    """The server's listening socket, ``s<IDENT>``."""
    return SOCKET_PREFIX + ident


def lock_name(ident: str) -> str:
    """The lock serialising start-up and cleanup for ``ident``, ``l<IDENT>``."""
    return LOCK_PREFIX + ident


def log_name(ident: str) -> str:
    """Our server's log file, ``p<IDENT>.log``."""
    return LOG_PREFIX + ident + LOG_SUFFIX


def stat_name(ident: str) -> str:
    """Our server's call statistics, ``p<IDENT>.stat`` (``prefork/server/stats.py``)."""
    return LOG_PREFIX + ident + STAT_SUFFIX


#: The run directory's shared watcher (``prefork-watcher --shared``): its socket, and the
#: lock under which one is started or retired.
WATCHER_SOCKET_NAME = "pwatcher.sock"
WATCHER_LOCK_NAME = "pwatcher.lock"
#: Held (flock) by the run directory's one server that watches itself
#: (``prefork/server/selfwatch.py``).
WATCHER_SELF_NAME = "pwatcher.self"
