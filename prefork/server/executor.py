"""Turning a freshly forked child of the server into the executor of one call.

Everything here runs in the child between ``fork()`` and the return into the script: it
must leave the process looking like a fresh run of the script by the caller -- the caller's
fds 0/1/2, argv, environment (C level too), cwd and umask (extension x1), stdio objects built
as CPython builds them, signal handlers as the script had them, no fd of the server's.
"""

from __future__ import annotations

import _signal
import fcntl
import io
import os
import resource
import sys

from prefork.common import protocol
from prefork.server import glibcsig

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping


def replace_environ(env: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Make ``os.environ`` (and the C ``environ``) exactly ``env``, in its order; return
    names skipped.

    Calls usually bring the names the server already has, in the same order (the same
    user's environment): then only the values that differ are set, each a ``putenv`` that
    keeps its place; otherwise everything is replaced.
    """
    skipped = []
    want = []
    for name, value in env:
        if not name or b"\0" in name or b"=" in name:
            skipped.append(name)
            continue
        want.append((name, value))
    environb = os.environb
    if list(environb) == [name for name, _ in want]:
        for name, value in want:
            if environb[name] != value:
                environb[name] = value
        return skipped
    for name in list(environb):
        del environb[name]
    for name, value in want:
        environb[name] = value
    return skipped


#: Locales CPython coerces the C locale to (PEP 538), in its order of preference.
_COERCION_TARGETS = ("C.UTF-8", "C.utf8", "UTF-8")
_COERCION_WARNING = ("Python detected LC_CTYPE=C: LC_CTYPE coerced to {} (set another locale "
                     "or PYTHONCOERCECLOCALE=0 to disable this locale coercion behavior).\n")
_C_LOCALE_WARNING = ("Python runtime initialized with LC_CTYPE=C (a locale with default ASCII "
                     "encoding), which may cause Unicode compatibility problems. Using C.UTF-8, "
                     "C.utf8, or UTF-8 (if available) as alternative Unicode-compatible locales "
                     "is recommended.\n")


def _startup_env(name: str) -> str | None:
    """A start-up setting from the (new) environment as CPython reads one: ignored under
    ``-E``/``-I``, and an empty value counts as unset."""
    if sys.flags.ignore_environment:
        return None
    return os.environ.get(name) or None


def configure_locale() -> tuple[bool, str, list[bytes]]:
    """Set LC_CTYPE from the caller's environment as a fresh interpreter does at start-up:
    the C locale is coerced to a UTF-8 locale, which also puts ``LC_CTYPE`` in the
    environment (PEP 538), and UTF-8 mode is decided for this call (PEP 540).

    Returns ``(utf8_mode, LC_CTYPE locale name, warnings for stderr)``.
    ``sys.flags.utf8_mode`` itself, the filesystem encoding and the default encoding of
    ``open()`` stay the server's.

    ``_locale`` (C) rather than ``locale``: for these calls they are the same, and
    ``locale`` imports ``re`` (1.3 MB in every idle server of a script that does not).
    """
    import _locale as locale

    def from_env() -> str:
        try:
            return locale.setlocale(locale.LC_CTYPE, "")
        except locale.Error:  # type: ignore[attr-defined]  # (missing from typeshed)
            return locale.setlocale(locale.LC_CTYPE, "C")

    warnings: list[bytes] = []
    ctype = from_env()
    setting = _startup_env("PYTHONUTF8")
    if "utf8" in sys._xoptions:
        utf8 = bool(sys.flags.utf8_mode)
    elif setting in ("0", "1"):
        utf8 = setting == "1"
    else:
        utf8 = ctype in ("C", "POSIX")
    coerce = _startup_env("PYTHONCOERCECLOCALE")
    if coerce != "0" and ctype == "C" and not os.environ.get("LC_ALL"):
        for target in _COERCION_TARGETS:
            try:
                locale.setlocale(locale.LC_CTYPE, target)
            except locale.Error:  # type: ignore[attr-defined]
                continue
            if not locale.nl_langinfo(locale.CODESET):
                continue
            os.environ["LC_CTYPE"] = target
            ctype = from_env()
            if coerce == "warn":
                warnings.append(_COERCION_WARNING.format(target).encode())
            break
        else:
            locale.setlocale(locale.LC_CTYPE, "C")
    if coerce == "warn" and ctype == "C":
        warnings.append(_C_LOCALE_WARNING.encode())
    return utf8, ctype, warnings


def stdio_encoding(utf8: bool, ctype: str) -> tuple[str, str]:
    """(encoding, errors) of stdin/stdout as CPython's ``config_init_stdio_encoding``
    chooses them: PYTHONIOENCODING, then UTF-8 mode, then the LC_CTYPE locale; the encoding
    is normalised to its codec name."""
    import _locale as locale
    import codecs

    encoding = errors = None
    spec = _startup_env("PYTHONIOENCODING")
    if spec is not None:
        enc, _, err = spec.partition(":")
        errors = err or None
        if enc:
            encoding = enc
            errors = errors or "strict"
    if encoding is None:
        encoding = "utf-8" if utf8 else (locale.nl_langinfo(locale.CODESET) or "utf-8")
    if errors is None:
        lenient = utf8 or ctype in ("C", "POSIX") or ctype in _COERCION_TARGETS
        errors = "surrogateescape" if lenient else "strict"
    return codecs.lookup(encoding).name, errors


def make_stdio(fd: int, write: bool, encoding: str, errors: str, unbuffered: bool,
               name: str) -> io.TextIOWrapper:
    """A text stream on ``fd`` built like CPython's ``create_stdio`` (``name`` is
    ``"<stdin>"``, ``"<stdout>"`` or ``"<stderr>"``)."""
    buffering = 0 if (unbuffered and write) else -1
    buf = open(fd, "wb" if write else "rb", buffering, closefd=False)  # noqa: SIM115
    raw = buf if buffering == 0 else buf.raw  # type: ignore[attr-defined]
    raw.name = name  # type: ignore[misc]
    line_buffering = not unbuffered and (fd == 2 or raw.isatty())
    stream = io.TextIOWrapper(buf, encoding, errors, "\n", line_buffering, unbuffered)
    stream.mode = "w" if write else "r"  # type: ignore[misc]
    return stream


def interpreter_options(orig_argv: list[str]) -> list[str]:
    """The interpreter's own options in an ``orig_argv`` (the words before the script)."""
    opts: list[str] = []
    i = 1
    while i < len(orig_argv):
        arg = orig_argv[i]
        if arg == "-" or not arg.startswith("-"):
            break
        opts.append(arg)
        i += 1
        if arg == "--":
            break
        if arg.startswith("--"):
            if arg == "--check-hash-based-pycs" and i < len(orig_argv):
                opts.append(orig_argv[i])
                i += 1
            continue
        for j, letter in enumerate(arg[1:], 1):
            if letter in "cmWX":
                if j == len(arg) - 1 and i < len(orig_argv):
                    opts.append(orig_argv[i])
                    i += 1
                break
    return opts


def _interpreter_unbuffered() -> bool:
    """Was the interpreter itself started with ``-u``?  (``sys.flags`` does not say.)"""
    for arg in interpreter_options(getattr(sys, "orig_argv", [])):
        if arg.startswith("-") and not arg.startswith("--"):
            letters = arg[1:]
            for stop in "cmWX":
                letters = letters.split(stop, 1)[0]
            if "u" in letters:
                return True
    return False


#: What ``plan_stdio`` decides: encoding, errors, unbuffered, start-up warnings for stderr.
StdioPlan = tuple[str, str, bool, list[bytes]]


def plan_stdio() -> StdioPlan:
    """The locale (set now) and the stdio settings for the current os.environ, as a fresh
    interpreter started with this environment would decide them.  Depends on the
    environment only, so a spare decides it before its call when the call brings the
    environment it already has."""
    utf8, ctype, warnings = configure_locale()
    encoding, errors = stdio_encoding(utf8, ctype)
    unbuffered = _interpreter_unbuffered() or _startup_env("PYTHONUNBUFFERED") is not None
    return encoding, errors, unbuffered, warnings


def warm_stdio(plan: StdioPlan) -> None:
    """Build (and drop) stdio objects once on the fds 0/1/2 there are now: the pages this
    touches are copied before the call rather than during it."""
    encoding, errors, unbuffered, _warnings = plan
    for fd, write in ((0, False), (1, True), (2, True)):
        try:
            make_stdio(fd, write, encoding, errors, unbuffered, "<warm>").detach()
        except (OSError, ValueError):
            pass


#: The streams replaced by ``rebuild_stdio``, kept: freeing the server's would write to
#: (copy) their pages for nothing, and they hold no fd of their own (closefd=False).
_replaced_stdio: list[object] = []


def rebuild_stdio(closed_flags: int, plan: StdioPlan | None = None) -> None:
    """Re-create sys.stdin/stdout/stderr for fds 0/1/2 and the current os.environ, as a
    fresh interpreter started with this environment would (``create_stdio``); ``plan``:
    from ``plan_stdio`` for this environment, if already made."""
    encoding, errors, unbuffered, warnings = plan if plan is not None else plan_stdio()
    for text in warnings:
        try:
            os.write(2, text)
        except OSError:
            pass
    streams: list[io.TextIOWrapper | None] = []
    for fd, write, name in ((0, False, "<stdin>"), (1, True, "<stdout>"), (2, True, "<stderr>")):
        if closed_flags & (1 << fd):
            streams.append(None)
            continue
        try:
            os.fstat(fd)
        except OSError:
            streams.append(None)
            continue
        err = "backslashreplace" if fd == 2 else errors
        streams.append(make_stdio(fd, write, encoding, err, unbuffered, name))
    _replaced_stdio.extend((sys.stdin, sys.stdout, sys.stderr,
                            sys.__stdin__, sys.__stdout__, sys.__stderr__))
    sys.stdin, sys.stdout, sys.stderr = streams
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams  # type: ignore[misc]


def install_fds(req: protocol.Request) -> list[int]:
    """Put the caller's fds on 0/1/2 and its other passed fds on their numbers (x1), enter
    its cwd (x1), close what was received; return the passed fds' numbers that could not be
    installed (held by the script since before initialisation, or over the fd limit)."""
    fds = req.fds
    for target in (0, 1, 2):
        if fds[target] != target:
            os.dup2(fds[target], target, inheritable=True)
        else:
            os.set_inheritable(target, True)
    if req.extended:
        os.fchdir(fds[3])
    nfds = len(fds) - len(req.passed)
    for fd in set(fds[:nfds]):
        if fd > 2:
            os.close(fd)
    not_passed = install_passed(req.passed, fds[nfds:]) if req.passed else []
    for target in (0, 1, 2):
        if req.flags & (1 << target):
            os.close(target)
    return not_passed


def adopt_listen_pid(client_pid: int) -> None:
    """Socket activation (``LISTEN_FDS`` from fd 3) is addressed to the pid the caller
    started, ``LISTEN_PID``: the client's.  The script is that program, in this process:
    make it its pid, or ``sd_listen_fds()`` ignores the passed sockets."""
    if client_pid > 0 and os.environb.get(b"LISTEN_PID") == str(client_pid).encode():
        os.environb[b"LISTEN_PID"] = str(os.getpid()).encode()


def install_passed(targets: tuple[int, ...], received: list[int]) -> list[int]:
    """``dup2`` each received fd onto its caller's number, inheritable (as it was in the
    caller: the client inherited it), and close the received one.  A received fd sitting on
    another's target number is first moved above them all.  A number the script already
    holds keeps the script's fd: returned, with those over the fd limit."""
    wanted = set(targets)
    top = max(targets) + 1
    moved = list(received)
    for i, fd in enumerate(received):
        if fd in wanted and fd != targets[i]:
            moved[i] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top)
            os.close(fd)
    not_passed = []
    # A caller's fd at or above the fd limit (``exec 200>x; ulimit -n 64``, and the server
    # started from there) is inherited across exec all the same: lift the soft limit to the
    # hard one while they are put in place (the caller's own limit is set afterwards).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if top > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            pass
    for fd, target in zip(moved, targets, strict=True):
        if fd == target:
            os.set_inheritable(fd, True)
            continue
        try:
            try:
                os.get_inheritable(target)
            except OSError:
                os.dup2(fd, target, inheritable=True)
            else:
                not_passed.append(target)  # the script's own
        except OSError:
            not_passed.append(target)  # e.g. over RLIMIT_NOFILE
        finally:
            os.close(fd)
    if top > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        except (OSError, ValueError):
            pass
    return not_passed


def close_fds_except(keep: Iterable[int]) -> None:
    """Close every fd not in ``keep`` (the server's leftovers nobody owns an object for).

    ``os.closerange`` over the gaps between the kept fds and above the last one up to the
    fd limit: one ``close_range`` system call each (Linux >= 5.9), no ``/proc`` listing.
    """
    low = 0
    for fd in sorted(set(keep)):
        if fd > low:
            os.closerange(low, fd)
        low = max(low, fd + 1)
    os.closerange(low, max(os.sysconf("SC_OPEN_MAX"), low))


def set_pdeathsig(sig: int, prctl: Callable[..., int] | None) -> None:
    """Ask the kernel to send ``sig`` when the server dies (no executor outlives it)."""
    if prctl is not None:
        prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG


def restore_signals(saved: Mapping[int, object]) -> None:
    """Give back the dispositions the script had before initialisation_complete().  (Every
    signal is blocked meanwhile: the server unblocks them when the executor is ready.)"""
    _signal.set_wakeup_fd(-1)
    for sig, saved_handler in saved.items():
        handler = saved_handler
        if isinstance(handler, int):  # signal.Handlers.SIG_DFL/SIG_IGN: _signal wants its own
            handler = _signal.SIG_IGN if handler == _signal.SIG_IGN else _signal.SIG_DFL
        try:
            # _signal: _signal.signal would turn the old handler into an enum member.
            _signal.signal(sig, handler)
        except (OSError, ValueError, TypeError):
            pass


def _python_default(sig: int) -> object:
    """The disposition Python gives ``sig`` at start-up when the caller left it at default."""
    if sig == _signal.SIGINT:
        return _signal.default_int_handler
    if sig in (_signal.SIGPIPE, _signal.SIGXFSZ):
        return _signal.SIG_IGN
    return _signal.SIG_DFL


_PR_SET_NO_NEW_PRIVS = 38

_RLIMITS = tuple(getattr(resource, n) for n in (
    "RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_LOCKS",
    "RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_NOFILE", "RLIMIT_NPROC",
    "RLIMIT_RSS", "RLIMIT_RTPRIO", "RLIMIT_RTTIME", "RLIMIT_SIGPENDING", "RLIMIT_STACK",
) if hasattr(resource, n))


def inherit_from_client(pid: int, prctl: Callable[..., int] | None = None) -> list[int]:
    """Take on what a direct run would have inherited from the caller across exec, read off
    the client (which inherited it from that caller): ignored signals, resource limits, nice
    value, CPU affinity, NoNewPrivs (with ``prctl``).  Returns the caller's blocked signals,
    for the final mask.

    Best effort: what cannot be read or set (a limit above the server's hard limit, a higher
    priority without privilege) stays the server's.  A signal the script gave a handler of
    its own before initialisation keeps it, as it would have directly.
    """
    if pid <= 0:
        return []
    try:
        fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            status = os.read(fd, 65536)
        finally:
            os.close(fd)
    except OSError:
        return []
    masks = {}
    for line in status.splitlines():
        key, _, value = line.partition(b":")
        if key in (b"SigIgn", b"SigBlk"):
            masks[key] = int(value.strip(), 16)
        elif key == b"NoNewPrivs" and value.strip() == b"1" and prctl is not None:
            prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # one-way, and needs no privilege
    for sig in _signals_in(masks.get(b"SigIgn", 0)):
        if sig in (_signal.SIGKILL, _signal.SIGSTOP):
            continue
        if sig in glibcsig.GLIBC_INTERNAL:
            glibcsig.set_ignored(sig)
            continue
        try:
            if _signal.getsignal(sig) == _python_default(sig):
                _signal.signal(sig, _signal.SIG_IGN)
        except (OSError, ValueError):
            pass
    for res in _RLIMITS:
        try:
            want = resource.prlimit(pid, res)
            have = resource.getrlimit(res)
            if want != have:
                resource.setrlimit(res, want)
        except (OSError, ValueError):
            pass
    try:
        nice = os.getpriority(os.PRIO_PROCESS, pid)
        if nice != os.getpriority(os.PRIO_PROCESS, 0):
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError:
        pass
    try:
        cpus = os.sched_getaffinity(pid)
        if cpus != os.sched_getaffinity(0):
            os.sched_setaffinity(0, cpus)
    except OSError:
        pass
    return _signals_in(masks.get(b"SigBlk", 0))


def _signals_in(mask: int) -> list[int]:
    """The signal numbers of a /proc signal mask (bit n-1 is signal n)."""
    return [n + 1 for n in range(mask.bit_length()) if mask >> n & 1]


def module_option(opts: list[str]) -> str | None:
    """The module of ``-m MOD`` (or ``-mMOD``) among interpreter options, if any."""
    for i, arg in enumerate(opts):
        if arg.startswith("-") and not arg.startswith("--"):
            for j, letter in enumerate(arg[1:], 2):
                if letter in "cWX":
                    break
                if letter == "m":
                    if j < len(arg):
                        return arg[j:]
                    return opts[i + 1] if i + 1 < len(opts) else None
    return None


def _module_args(argv: list[str], module: str) -> list[str] | None:
    """The arguments of a call to run ``module`` (``INTERP -m MOD ARGS`` through the
    client's plain form, ``INTERP MOD ARGS`` through ``-U,INTERP,-m``); None if the call
    names another."""
    rest = argv[1:]
    if rest[:2] == ["-m", module]:
        return rest[2:]
    if rest[:1] == ["-m" + module] or rest[:1] == [module]:
        return rest[1:]
    return None


def set_argv(req: protocol.Request) -> None:
    """``sys.argv == [script, *args]`` as in a direct run (the message starts with interp);
    ``sys.orig_argv`` keeps the server's interpreter options (they are part of its ident).
    A server running a module (``-m MOD``) keeps ``sys.argv[0]``, the module's path as the
    interpreter set it, as a direct ``python -m MOD`` has it."""
    argv = [os.fsdecode(a) for a in req.argv]
    orig = getattr(sys, "orig_argv", None)
    opts = interpreter_options(orig) if orig is not None else []
    module = module_option(opts)
    args = _module_args(argv, module) if module is not None else None
    if args is not None:
        sys.argv[1:] = args
        if orig is not None:
            orig[:] = [*argv[:1], *opts, *args]
        return
    sys.argv[:] = argv[1:] if len(argv) > 1 else [""]
    if orig is not None:
        try:
            orig[:] = [*argv[:1], *opts, *argv[1:]]
        except TypeError:
            pass
