"""Turning a freshly forked child of the server into the executor of one call.

Everything here runs in the child between ``fork()`` and the return into the script: it
must leave the process looking like a fresh run of the script by the caller -- the caller's
fds 0/1/2, argv, environment (C level too), cwd and umask (extension x1), stdio objects built
as CPython builds them, signal handlers as the script had them, no fd of the server's.
"""

from __future__ import annotations

import io
import os
import signal
import sys

from prefork.common import protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable


def replace_environ(env: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Make ``os.environ`` (and the C ``environ``) exactly ``env``; return names skipped."""
    skipped = []
    environb = os.environb
    for name in list(environb):
        del environb[name]
    for name, value in env:
        if not name or b"\0" in name or b"=" in name:
            skipped.append(name)
            continue
        environb[name] = value
    return skipped


def _io_encoding(environ: dict[str, str]) -> tuple[str | None, str | None]:
    """(encoding, errors) from PYTHONIOENCODING, as CPython reads it at start-up."""
    spec = environ.get("PYTHONIOENCODING", "")
    if sys.flags.ignore_environment or not spec:
        return None, None
    enc, _, err = spec.partition(":")
    return enc or None, err or None


def _locale_encoding() -> tuple[str, bool]:
    """The locale's encoding for the new environment, and whether it is the C/POSIX locale."""
    import locale

    if sys.flags.utf8_mode:
        return "utf-8", False
    try:
        name = locale.setlocale(locale.LC_CTYPE, "")
    except locale.Error:
        name = locale.setlocale(locale.LC_CTYPE, None)
    enc = locale.getencoding() if hasattr(locale, "getencoding") else \
        locale.getpreferredencoding(False)
    return enc, name in ("C", "POSIX")


def make_stdio(fd: int, write: bool, encoding: str, errors: str, unbuffered: bool,
               is_stderr: bool = False) -> io.TextIOWrapper:
    """A text stream on ``fd`` built like CPython's ``create_stdio``."""
    buffering = 0 if (unbuffered and write) else -1
    buf = io.open(fd, "wb" if write else "rb", buffering, closefd=False)  # noqa: SIM115
    line_buffering = False
    if not unbuffered:
        try:
            line_buffering = is_stderr or os.isatty(fd)
        except OSError:
            line_buffering = is_stderr
    stream = io.TextIOWrapper(buf, encoding, errors, "\n", line_buffering,  # type: ignore[arg-type]
                              unbuffered and write)
    stream.mode = "w" if write else "r"  # type: ignore[misc]
    return stream


def _interpreter_unbuffered() -> bool:
    """Was the interpreter itself started with ``-u``?  (``sys.flags`` does not say.)"""
    for arg in getattr(sys, "orig_argv", [])[1:]:
        if arg == "--" or not arg.startswith("-") or arg.startswith("--"):
            break
        if arg in ("-c", "-m") or arg.startswith(("-W", "-X")):
            break
        if "u" in arg[1:]:
            return True
    return False


def rebuild_stdio(closed_flags: int) -> None:
    """Re-create sys.stdin/stdout/stderr for fds 0/1/2 and the current os.environ."""
    environ = dict(os.environ)
    enc_override, err_override = _io_encoding(environ)
    loc_enc, c_locale = _locale_encoding()
    encoding = enc_override or loc_enc
    strict = "surrogateescape" if (c_locale or sys.flags.utf8_mode) else "strict"
    errors = err_override or strict
    unbuffered = _interpreter_unbuffered() or (
        not sys.flags.ignore_environment and bool(environ.get("PYTHONUNBUFFERED")))
    streams: list[io.TextIOWrapper | None] = []
    for fd, write in ((0, False), (1, True), (2, True)):
        if closed_flags & (1 << fd):
            streams.append(None)
            continue
        try:
            os.fstat(fd)
        except OSError:
            streams.append(None)
            continue
        err = (err_override or "backslashreplace") if fd == 2 else errors
        streams.append(make_stdio(fd, write, encoding, err, unbuffered, fd == 2))
    sys.stdin, sys.stdout, sys.stderr = streams  # type: ignore[assignment]
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams  # type: ignore[misc]


def install_fds(req: protocol.Request) -> None:
    """Put the caller's fds on 0/1/2, enter its cwd (x1), close what was received."""
    fds = req.fds
    for target in (0, 1, 2):
        if fds[target] != target:
            os.dup2(fds[target], target, inheritable=True)
        else:
            os.set_inheritable(target, True)
    if req.extended:
        os.fchdir(fds[3])
    for fd in set(fds):
        if fd > 2:
            os.close(fd)
    for target in (0, 1, 2):
        if req.flags & (1 << target):
            os.close(target)


def close_fds_except(keep: Iterable[int]) -> None:
    """Close every fd not in ``keep`` (the server's leftovers nobody owns an object for)."""
    keep = set(keep)
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        names = [str(n) for n in range(3, 1024)]
    for name in names:
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def set_pdeathsig(sig: int, prctl: Callable[..., int] | None) -> None:
    """Ask the kernel to send ``sig`` when the server dies (no executor outlives it)."""
    if prctl is not None:
        prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG


def restore_signals(saved: dict[int, object]) -> None:
    """Give back the dispositions the script had before initialisation_complete()."""
    signal.set_wakeup_fd(-1)
    for sig, handler in saved.items():
        try:
            signal.signal(sig, handler)  # type: ignore[arg-type]
        except (OSError, ValueError, TypeError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def set_argv(req: protocol.Request) -> None:
    """``sys.argv == [script, *args]`` as in a direct run (the message starts with interp)."""
    argv = [os.fsdecode(a) for a in req.argv]
    sys.argv[:] = argv[1:] if len(argv) > 1 else [""]
    if hasattr(sys, "orig_argv"):
        try:
            sys.orig_argv[:] = argv
        except TypeError:
            pass
