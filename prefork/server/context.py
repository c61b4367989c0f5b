"""Context fidelity: can a fork of this server run a call as a direct run by its caller would?

A fork inherits the server's process, not the caller's: what a direct run would have taken
from the caller at exec (the interpreter's start-up settings, the loaded libraries, the
namespaces, credentials, seccomp, cgroup) is the server's.  Some of it the executor sets
for the call (``executor.inherit_from_client``: limits, nice, affinity, ignored signals,
NoNewPrivs; ``sync_timezone``: TZ and /etc/localtime).  The rest cannot be changed after
exec; when it differs, the call has a *context mismatch*: the server answers it with an x1
``R code`` record (``code``: a digest of the caller's context) and the client retries with
the server of the ident qualified by that code (``ident.context_ident``), starting one in
its own context when there is none -- so calls from one context share one server.  The
server started by such a call has the caller's facts, so it serves that context.

The server records its own facts once (``ServerContext``, at start: ``/proc/self/environ``
is the environment the interpreter started with); per call it compares the caller's, read
from the client's ``/proc/PID`` and the request's environment (no client cost):

- start-up settings from the environment: every ``PYTHON*`` variable the interpreter reads
  once at start (not under ``-E``/``-I``), the locale that decides LC_CTYPE coercion and
  UTF-8 mode (``LC_ALL``/``LC_CTYPE``/``LANG``, reduced to its codeset), ``LD_*``,
  ``GLIBC_TUNABLES``, ``MALLOC_*``;
- the interpreter a direct run would exec (the request's ``argv[0]`` through the caller's
  ``PATH``: only looked at when that ``PATH`` differs from the server's);
- namespaces (``/proc/PID/ns/*``), credentials, capabilities, seccomp (``/proc/PID/status``),
  the cgroup (``/proc/PID/cgroup``);
- limits the server cannot grant: a hard limit above its own (without CAP_SYS_RESOURCE), a
  nice value below its own (without CAP_SYS_NICE or RLIMIT_NICE room); NoNewPrivs set in
  the server but not in the caller (it cannot be unset).
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from prefork.common.protocol import Request

#: PYTHON* variables not (only) read at start-up: the executor follows them per call
#: (stdio), or the interpreter reads them later, or only in interactive mode.
_PER_CALL = frozenset((
    b"PYTHONIOENCODING", b"PYTHONUNBUFFERED", b"PYTHONBREAKPOINT", b"PYTHONSTARTUP",
    b"PYTHONINSPECT", b"PYTHONASYNCIODEBUG", b"PYTHONLEGACYWINDOWSFSENCODING",
    b"PYTHONLEGACYWINDOWSSTDIO",
))
#: /proc/PID/status lines that must be equal (NoNewPrivs is handled on its own).
_STATUS_KEYS = frozenset((
    b"Uid", b"Gid", b"Groups", b"CapInh", b"CapPrm", b"CapEff", b"CapBnd", b"CapAmb",
    b"Seccomp", b"Seccomp_filters",
))
_NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts")
_CAP_SYS_NICE = 23
_CAP_SYS_RESOURCE = 24
_UNLIMITED = 1 << 64


def _read(path: str) -> bytes | None:
    """A small /proc file in one read, None if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 65536)
    except OSError:
        return None
    finally:
        os.close(fd)


def parse_environ(raw: bytes) -> list[tuple[bytes, bytes]]:
    """``/proc/PID/environ`` as ``[(name, value)]``."""
    env = []
    for entry in raw.split(b"\0"):
        name, eq, value = entry.partition(b"=")
        if eq and name:
            env.append((name, value))
    return env


def _ctype_class(value: bytes) -> bytes:
    """What an LC_CTYPE setting decides at start-up: the C locale (coerced, UTF-8 mode) or
    the codeset of the locale named (``en_US.UTF-8`` and ``C.utf8`` both ``utf8``)."""
    if value in (b"", b"C", b"POSIX"):
        return b"C"
    name, dot, codeset = value.partition(b"@")[0].partition(b".")
    if not dot:
        return b"name:" + name
    return b"codeset:" + codeset.lower().replace(b"-", b"").replace(b"_", b"")


def startup_key(env: Sequence[tuple[bytes, bytes]], ignore_python: bool) -> bytes:
    """The start-up settings an environment gives an interpreter (see module docstring)."""
    items = []
    locale: dict[bytes, bytes] = {}
    for name, value in env:
        if not value:
            continue  # an empty value counts as unset, for Python and the loader alike
        if name.startswith(b"PYTHON"):
            if not ignore_python and name not in _PER_CALL:
                items.append(name + b"=" + value)
        elif name.startswith((b"LD_", b"MALLOC_")) or name == b"GLIBC_TUNABLES":
            items.append(name + b"=" + value)
        elif name in (b"LC_ALL", b"LC_CTYPE", b"LANG"):
            locale[name] = value
    ctype = locale.get(b"LC_ALL") or locale.get(b"LC_CTYPE") or locale.get(b"LANG") or b""
    items.append(b"ctype=" + _ctype_class(ctype))
    items.sort()
    return b"\0".join(items)


def _env_get(env: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in env:
        if key == name:
            return value
    return None


def resolve_interp(argv0: bytes, path: bytes | None) -> bytes:
    """Which interpreter ``execvp(argv0)`` runs with this ``PATH``: the identity of the
    directory it is found in (what decides a venv: its ``pyvenv.cfg``) and its name."""
    if b"/" in argv0:
        return argv0
    dirs = (path if path is not None else b"/bin:/usr/bin").split(b":")
    for directory in dirs:
        candidate = os.path.join(directory or b".", argv0)
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if st.st_mode & 0o170000 != 0o100000 or not os.access(candidate, os.X_OK):
            continue
        try:
            dst = os.stat(directory or b".")
        except OSError:
            continue
        return b"%d:%d/%s" % (dst.st_dev, dst.st_ino, argv0)
    return b"?" + argv0


def _status_slices(raw: bytes) -> bytes:
    """The lines of ``/proc/PID/status`` that must match, as they are (quick to compare):
    Uid and Gid, Groups, and CapInh .. Seccomp_filters (NoNewPrivs among them)."""
    parts = []
    for first, last in ((b"\nUid:", b"\nGid:"), (b"\nGroups:", b"\nGroups:"),
                        (b"\nCapInh:", b"\nSeccomp_filters:")):
        start = raw.find(first)
        end = raw.find(b"\n", raw.find(last, start) + 1)
        parts.append(raw[start:end])
    return b"".join(parts)


def _status_facts(raw: bytes) -> tuple[dict[bytes, bytes], bool]:
    """The lines of ``/proc/PID/status`` that must match, and NoNewPrivs."""
    facts = {}
    nnp = False
    for line in raw.splitlines():
        key, _, value = line.partition(b":")
        if key in _STATUS_KEYS:
            facts[key] = b" ".join(value.split())
        elif key == b"NoNewPrivs":
            nnp = value.strip() == b"1"
    return facts, nnp


def _hard_limits(raw: bytes) -> dict[bytes, int]:
    """The hard limits of ``/proc/PID/limits`` by name (unlimited as 2**64)."""
    limits = {}
    for line in raw.splitlines()[1:]:
        # "Max open files            1024                 1048576              files"
        name = line[:26].strip()
        fields = line[26:].split()
        if len(fields) < 2:
            continue
        hard = fields[1]
        limits[name] = _UNLIMITED if hard == b"unlimited" else int(hard)
    return limits


def _namespaces(pid: int | str) -> bytes:
    links = []
    for ns in _NAMESPACES:
        try:
            links.append(os.readlink(f"/proc/{pid}/ns/{ns}"))
        except OSError:
            links.append("?")
    return " ".join(links).encode()


_start_environ: bytes | None = None


def remember_start_environ() -> None:
    """Keep ``/proc/self/environ`` as the interpreter started with it (call before the
    process title is set: setting it reuses that memory)."""
    global _start_environ
    _start_environ = _read("/proc/self/environ")


class ServerContext:
    """This server's own facts (recorded once, at start) and the per-call check."""

    def __init__(self) -> None:
        raw_env = _start_environ if _start_environ is not None else _read("/proc/self/environ")
        env = parse_environ(raw_env) if raw_env is not None else [
            (k, v) for k, v in os.environb.items()]
        self.ignore_python = bool(sys.flags.ignore_environment)
        self.startup = startup_key(env, self.ignore_python)
        self.path = _env_get(env, b"PATH")
        self.interps: dict[bytes, bytes] = {}
        self.redirected: set[int] = set()
        status = _read("/proc/self/status") or b""
        self.status, self.nnp = _status_facts(status)
        self.status_raw = _status_slices(status)
        self.env_seen: object = None
        self.env_same = True
        cap_eff = int(self.status.get(b"CapEff", b"0"), 16)
        self.can_raise_limits = bool(cap_eff >> _CAP_SYS_RESOURCE & 1)
        self.can_renice = bool(cap_eff >> _CAP_SYS_NICE & 1)
        self.limits_raw = _read("/proc/self/limits") or b""
        self.hard = _hard_limits(self.limits_raw)
        self.nice = os.getpriority(os.PRIO_PROCESS, 0)
        self.namespaces = _namespaces("self")
        self.cgroup = _read("/proc/self/cgroup") or b""
        note_timezone()

    def _interp(self, argv0: bytes) -> bytes:
        """What ``argv0`` resolves to through the server's start-up PATH (first asked on
        the first call, just after start)."""
        key = self.interps.get(argv0)
        if key is None:
            key = self.interps[argv0] = resolve_interp(argv0, self.path)
        return key

    def _nice_grantable(self, nice: int) -> bool:
        if nice >= self.nice or self.can_renice:
            return True
        import resource

        return 20 - resource.getrlimit(resource.RLIMIT_NICE)[0] <= nice

    def mismatch(self, req: Request, pid: int) -> str | None:
        """What of the caller's context (``pid``: the client) a fork of this server cannot
        reproduce, in words; None when it can run the call."""
        if pid <= 0:
            # SO_PEERCRED gives 0 for a caller outside this server's pid namespace.
            return "caller not visible (another pid namespace)"
        why = []
        if req.env != self.env_seen:  # most calls bring the environment of the one before
            self.env_seen = req.env
            self.env_same = startup_key(req.env, self.ignore_python) == self.startup
        if not self.env_same:
            why.append("start-up environment")
        path = _env_get(req.env, b"PATH")
        if path != self.path and req.argv and \
                resolve_interp(req.argv[0], path) != self._interp(req.argv[0]):
            why.append("interpreter")
        status = _read(f"/proc/{pid}/status")
        if status is None:
            return None  # the client is gone: the call ends anyway
        if _status_slices(status) != self.status_raw:
            facts, nnp = _status_facts(status)
            if facts != self.status:
                why.append("credentials")
            if self.nnp and not nnp:
                why.append("NoNewPrivs")
        if _namespaces(pid) != self.namespaces:
            why.append("namespaces")
        if (_read(f"/proc/{pid}/cgroup") or b"") != self.cgroup:
            why.append("cgroup")
        limits = _read(f"/proc/{pid}/limits") or b""
        if limits != self.limits_raw and not self.can_raise_limits:
            for name, hard in _hard_limits(limits).items():
                if hard > self.hard.get(name, _UNLIMITED):
                    why.append(f"limit {name.decode()!r}")
        try:
            if not self._nice_grantable(os.getpriority(os.PRIO_PROCESS, pid)):
                why.append("nice")
        except OSError:
            pass
        return ", ".join(why) if why else None


    def first_redirect(self, code: int) -> bool:
        """Whether calls from context ``code`` are sent away for the first time (logged)."""
        if code in self.redirected:
            return False
        self.redirected.add(code)
        return True

    def code(self, req: Request, pid: int) -> int:
        """A 32-bit digest of the caller's context (only of what the executor cannot set):
        the same for every call from one context, whichever server it reached first."""
        return context_code(req, pid, self.ignore_python)


def context_code(req: Request, pid: int, ignore_python: bool) -> int:
    """See ``ServerContext.code``."""
    from hashlib import sha256

    parts = [startup_key(req.env, ignore_python)]
    if req.argv:
        parts.append(resolve_interp(req.argv[0], _env_get(req.env, b"PATH")))
    status = _read(f"/proc/{pid}/status") or b""
    facts, nnp = _status_facts(status)
    parts += [k + b"=" + v for k, v in sorted(facts.items())]
    parts.append(b"nnp=%d" % nnp)
    parts.append(_namespaces(pid))
    parts.append(_read(f"/proc/{pid}/cgroup") or b"")
    hard = _hard_limits(_read(f"/proc/{pid}/limits") or b"")
    parts += [k + b"=%d" % v for k, v in sorted(hard.items())]
    return int.from_bytes(sha256(b"\0\n".join(parts)).digest()[:4], "big")


# ---------------------------------------------------------------- in the executor

_localtime_seen: tuple[int, int, int] | None = None
_tz_seen: str | None = None


def _localtime_stamp() -> tuple[int, int, int] | None:
    try:
        st = os.stat("/etc/localtime")
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def note_timezone() -> None:
    """Record the TZ and /etc/localtime the server's C library has loaded (at start)."""
    global _localtime_seen, _tz_seen
    _tz_seen = os.environ.get("TZ")
    _localtime_seen = _localtime_stamp()


def sync_timezone() -> None:
    """In the executor, with the caller's environment set: load the time zone a direct run
    would (its TZ; /etc/localtime as it is now), as ``time.tzset()`` does."""
    tz = os.environ.get("TZ")
    stamp = _localtime_stamp() if tz is None or tz.startswith(":") else _localtime_seen
    if tz == _tz_seen and stamp == _localtime_seen:
        return
    if tz == _tz_seen:
        # The C library re-reads the zone only when TZ changes: change it and back.
        os.environ["TZ"] = "UTC0"
        time.tzset()
        if tz is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = tz
    time.tzset()
