"""Where the daemon's messages go: syslog when ``/dev/log`` exists, else a file in the run dir.

The server has no terminal (its stdio is /dev/null), so nothing it says may be lost: the
choice is made once at start-up and every message carries the script and the pid.
"""

from __future__ import annotations

import os
import sys
import time

LOG_MAX_BYTES = 1024 * 1024


class ServerLog:
    """A tiny logger for the server process (no ``logging``: it must be fork-safe and lean)."""

    def __init__(self, script: str, target: str | None, file_path: str | None) -> None:
        """``target``: None/"auto" (syslog if /dev/log exists, else file), "syslog", "file",
        "stderr", or an explicit file path.  ``file_path`` is the run-dir log file."""
        self.script = script
        self._file = None
        self._fd = -1  # a log file: written with os.write (O_APPEND), nothing buffered
        self._syslog = False
        self._size = 0  # bytes in the log file (see _rotate_now)
        self.path: str | None = None
        if target in (None, "auto"):
            target = "syslog" if os.path.exists("/dev/log") else "file"
        if target == "syslog":
            import syslog

            syslog.openlog(f"prefork-interp {os.path.basename(script)}",
                           syslog.LOG_PID | syslog.LOG_NDELAY, syslog.LOG_USER)
            self._syslog = True
        elif target == "stderr":
            self._file = sys.stderr
        else:
            path = file_path if target == "file" else target
            if path is None:
                path = os.devnull
            self.path = path
            self._rotate_if_big()
            self._fd = self._open()
            self._size = os.fstat(self._fd).st_size

    def _open(self) -> int:
        assert self.path is not None
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                       0o600)

    def _rotate_if_big(self) -> None:
        if self.path is None:
            return
        try:
            if os.stat(self.path).st_size > LOG_MAX_BYTES:
                os.replace(self.path, self.path + ".1")
        except FileNotFoundError:
            pass

    def _rotate_now(self) -> None:
        """The file has grown past ``LOG_MAX_BYTES`` while the server runs: it becomes
        ``.1`` (the previous ``.1`` goes) and a fresh file is started, so the log never
        takes more than twice the limit.  Without an fd to spare (EMFILE), the current file
        is emptied instead: bounded either way."""
        self._size = 0
        if self.path is None or self.path == os.devnull:
            return
        try:
            os.replace(self.path, self.path + ".1")
            fd = self._open()
        except OSError:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            return
        os.close(self._fd)
        self._fd = fd

    def _emit(self, level: str, msg: str) -> None:
        if self._syslog:
            import syslog

            prio = {"INFO": syslog.LOG_INFO, "WARNING": syslog.LOG_WARNING}.get(
                level, syslog.LOG_ERR)
            syslog.syslog(prio, msg)
            return
        if self._file is None and self._fd < 0:
            return
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
        line = f"{stamp}.{int(now % 1 * 1000):03d} [{os.getpid()}] {level} {self.script}: {msg}\n"
        try:
            if self._fd >= 0:
                if self._size > LOG_MAX_BYTES:
                    self._rotate_now()
                self._size += os.write(self._fd, line.encode("utf-8", "backslashreplace"))
            elif self._file is not None:
                self._file.write(line)
        except (OSError, ValueError):
            pass

    def info(self, msg: str) -> None:
        """Routine events (start, quit and why)."""
        self._emit("INFO", msg)

    def warning(self, msg: str) -> None:
        """Something was rejected or went wrong for one call."""
        self._emit("WARNING", msg)

    def error(self, msg: str) -> None:
        """The server cannot go on."""
        self._emit("ERROR", msg)

    def close(self) -> None:
        """Release the log's fd (in a forked executor, before user code runs)."""
        if self._syslog:
            import syslog

            syslog.closelog()
            self._syslog = False
        if self._fd >= 0:
            os.close(self._fd)  # no file object: closing costs an executor nothing more
            self._fd = -1
        self._file = None
