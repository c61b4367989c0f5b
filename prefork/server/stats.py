"""What the server records about its calls, for ``prefork-ctl`` and for the log.

- ``p<IDENT>.stat`` in the run directory (``prefork.common.consts.stat_name``): a small
  JSON object, replaced atomically (temporary file, then ``rename``) at start and after
  calls have ended -- at the top of the loop's next turn, after the next spare has been
  forked, so never on a call's path.  ``prefork-ctl`` reads the last call from here rather
  than from the socket's atime, which ``relatime`` mounts update at most daily.
  ``setup_seconds`` is the time from the socket's birth (just before the client spawned
  setup) to ``initialisation_complete()``: about what every direct start of the script
  would cost, so ``calls x setup_seconds`` is roughly the time saved (less the warm
  calls' own few milliseconds).  It also keeps what tells servers of one program apart:
  the interpreter as the client gave it and its options (``sys.orig_argv`` up to the
  script), the script as given, its cwd, and whether ``prefork-server`` runs the script
  (``prefork-ctl`` works out ``--any-cwd`` from these and the ident).
- one log line per ended call (when it ended, the script's ``sys.argv[0]``, the client's
  pid if known, the wait status, the duration), at a bounded rate: a token bucket for calls
  that succeeded and a larger one for calls that failed; what a bucket drops is counted and
  said in the next line that gets through.  The arguments are not logged (they may hold
  secrets).
"""

from __future__ import annotations

import os
import sys
import time

from prefork.common import protocol
from prefork.common.consts import stat_name

TYPE_CHECKING = False
if TYPE_CHECKING:
    from prefork.common.protocol import Request
    from prefork.server.log import ServerLog

#: Token buckets (burst, lines per second) for the per-call log lines.
OK_BUCKET = (20.0, 1.0)
FAILED_BUCKET = (50.0, 5.0)
_ARGV0_MAX = 200


class _Bucket:
    """A token bucket: ``take()`` is True while there is a token (refilled over time)."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, burst: float, rate: float) -> None:
        self.burst = burst
        self.rate = rate
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def _interp_argv() -> list[str] | None:
    """The setup's command line up to the script: the interpreter as the client gave it and
    its options (the arguments are left out: they may hold secrets).  None if unknown."""
    orig = getattr(sys, "orig_argv", None)
    n = len(orig) - len(sys.argv) if orig is not None else -1
    if orig is None or n < 1 or not sys.argv:
        return None
    return [os.fsdecode(a) for a in orig[:n]]


def _setup_script() -> str | None:
    """The script file the interpreter was started on (``prefork-server``'s own argument,
    e.g. a ``--wrap`` wrapper, where ``sys.argv[0]`` names the program it stands for)."""
    orig = getattr(sys, "orig_argv", None)
    n = len(orig) - len(sys.argv) if orig is not None else -1
    if orig is None or n < 1 or n >= len(orig):
        return None
    return os.fsdecode(orig[n])


_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def _json_str(text: str) -> str:
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:  # a surrogate pair, as json.dumps(ensure_ascii=True) writes it
            code -= 0x10000
            out.append(f"\\u{0xD800 | code >> 10:04x}\\u{0xDC00 | code & 0x3FF:04x}")
    out.append('"')
    return "".join(out)


def to_json(value: object) -> str:
    """``json.dumps(value, ensure_ascii=True)`` for the file's types (None, bool, int, float,
    str, list, dict with str keys): ``json`` would cost every idle server 1.4 MB."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if not -_INF < value < _INF:  # NaN or infinite
            raise ValueError(f"not a JSON number: {value!r}")
        return float.__repr__(value)
    if isinstance(value, str):
        return _json_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(to_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_json_str(str(k))}: {to_json(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


_INF = float("inf")


class CallStats:
    """Counts the server's calls, writes ``p<IDENT>.stat`` and the per-call log lines."""

    def __init__(self, run_dir: str, ident: str, birth_ns: int, log: ServerLog) -> None:
        self.path = os.path.join(run_dir, stat_name(ident))
        self.log = log
        self.started = time.time()
        self.setup_seconds = max(0.0, self.started - birth_ns / 1e9)
        self.calls = 0
        self.failed = 0
        self.busy_seconds = 0.0
        self.last: tuple[float, str, int, float] | None = None  # end, argv0, status, secs
        self.running: dict[int, tuple[float, str, int]] = {}  # pid: start, argv0, client
        self.ok_bucket = _Bucket(*OK_BUCKET)
        self.failed_bucket = _Bucket(*FAILED_BUCKET)
        self.dropped = 0
        self.dropped_failed = 0
        #: Calls ended, not yet logged nor written (see ``flush``).
        self.pending: list[tuple[int, str, int, int, float, bool, float]] = []
        try:
            cwd: str | None = os.getcwd()
        except OSError:
            cwd = None
        #: Facts of the server's start, the same in every write.
        self.fixed: dict[str, object] = {
            "pid": os.getpid(), "started": round(self.started, 3),
            "setup_seconds": round(self.setup_seconds, 3), "cwd": cwd,
            "interp_argv": _interp_argv(), "script": sys.argv[0] if sys.argv else None,
            "setup_script": _setup_script(),
            "executable": sys.executable,
            "runner": "prefork.server.runner" in sys.modules,
        }
        self.write()

    @classmethod
    def for_socket(cls, sock_path: object, birth_ns: int, log: ServerLog) -> CallStats | None:
        """For the server listening on ``sock_path`` (``RUN_DIR/s<IDENT>``); None if it is
        not such a path."""
        if not isinstance(sock_path, str):
            return None
        run_dir, name = os.path.split(sock_path)
        if not name.startswith("s") or len(name) < 2:
            return None
        return cls(run_dir, name[1:], birth_ns, log)

    def call_started(self, pid: int, req: Request) -> None:
        """A call was handed to executor ``pid``."""
        argv = req.argv[1:] or req.argv[:1]
        argv0 = os.fsdecode(argv[0])[:_ARGV0_MAX] if argv else "?"
        self.running[pid] = (time.monotonic(), argv0, req.client_pid)

    def call_ended(self, pid: int, status: int) -> None:
        """Executor ``pid`` ended with ``status`` (its client has been told already).  Only
        counted here: the log line and the file wait for ``flush``, so that nothing delays
        the next spare's fork."""
        start = self.running.pop(pid, None)
        if start is None:
            return
        began, argv0, client = start
        now = time.monotonic()
        secs = now - began
        ok = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        self.calls += 1
        self.failed += not ok
        self.busy_seconds += secs
        self.last = (time.time(), argv0, status, secs)
        self.pending.append((pid, argv0, client, status, secs, ok, now))

    def flush(self) -> None:
        """Log the calls ended since the last flush (within the rate limit) and write the
        file once; nothing to do (one test) when no call has ended.  Called by the server
        loop at the top of each turn: after the spare's fork, before it waits."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        for pid, argv0, client, status, secs, ok, now in pending:
            bucket = self.ok_bucket if ok else self.failed_bucket
            if not bucket.take(now):
                self.dropped += 1
                self.dropped_failed += not ok
                continue
            note = ""
            if self.dropped:
                note = (f" ({self.dropped} earlier call(s) not logged, "
                        f"{self.dropped_failed} of them failed)")
                self.dropped = self.dropped_failed = 0
            who = f" client {client}" if client else ""
            how = protocol.describe_status(status, short=True)
            line = f"call {argv0!r}{who} executor {pid}: {how} in {secs * 1000:.1f} ms{note}"
            if ok:
                self.log.info(line)
            else:
                self.log.warning(line)
        self.write()

    def text(self) -> str:
        """The file's contents: one JSON object."""
        facts = dict(self.fixed, calls=self.calls, failed=self.failed,
                     busy_seconds=round(self.busy_seconds, 3))
        if self.last is not None:
            end, argv0, status, secs = self.last
            facts.update(last_call=round(end, 3), last_argv0=argv0,
                         last_status=protocol.describe_status(status, short=True),
                         last_seconds=round(secs, 4))
        return to_json(facts) + "\n"

    def write(self) -> None:
        """Replace the file (temporary file in the same directory, then rename); a failure
        is ignored: statistics never stop a server."""
        # hidden while it exists (a listing of the run directory need not show it)
        head, name = os.path.split(self.path)
        tmp = os.path.join(head, f".{name}.{os.getpid()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, self.text().encode("utf-8", "backslashreplace"))
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass

