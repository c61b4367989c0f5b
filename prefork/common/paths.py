"""Run directory, server ident, and the names of a server's files; cleanup of stale entries.

Everything here must agree with the reference C client (``/usr/bin/prefork-interp``), so that
both clients find the same server for the same script: see "Run directory and socket names" in
PROTOCOL.md. Two things the reference does that PROTOCOL.md's wording leaves open, seen with
strace and kept here:

- The per-user run base is the string ``/var/run/user/UID/prefork-interp`` (the C client
  ``lstat``s ``/var/run/user/UID`` and builds its paths from that). The string matters beyond
  the file it names: the ident is cut to ``108 - len(base) - 12`` hex digits, 63 for a
  four-digit uid, so spelling it ``/run/user/...`` would give a different socket name.
- The C client hashes the raw ``struct utsname`` from ``uname(2)``; its domainname field is
  ``/proc/sys/kernel/domainname`` (``(none)`` when unset), which is what we read.

Unlike the reference we check the run base itself (a real directory, ours, mode ``0700``) and
fall back to the home directory when the ``/var/run/user`` one fails that check.

Imported by the client on every call: only ``os``, ``stat``, ``sys``, ``fcntl`` and the C sha256
module (``_sha256``, ``_sha2`` from 3.12).
"""

from __future__ import annotations

import os
import stat
import sys

from prefork.common.locking import lock_file

TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from hashlib import sha256 as _sha256
elif sys.version_info >= (3, 12):
    from _sha2 import sha256 as _sha256
else:
    from _sha256 import sha256 as _sha256

RUNDIR_ENV = "PREFORK_INTERP_RUNDIR"
MAX_SOCKETS = 100

_SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path) on Linux
_IDENT_FULL = 64  # hex digits of a sha256
_IDENT_MIN = 33
_UTS_FIELD = 65  # _UTSNAME_LENGTH on Linux/glibc: 64 bytes + NUL
_UTSNAME_SIZE = 6 * _UTS_FIELD  # sizeof(struct utsname) on glibc: 390
_DOMAINNAME_FILE = "/proc/sys/kernel/domainname"
_DOMAINNAME_UNSET = b"(none)"  # what the kernel reports when no domainname is set
_PASSWD_PATH = "/etc/passwd"
_PASSWD_FIELDS = 7  # name:password:uid:gid:gecos:dir:shell
_HOST_MAX = 32
_DIR_MODE = 0o700
_HEX_DIGITS = frozenset("0123456789abcdef")

IdentOption = tuple[str, bytes]  # ("E", VAR) or ("G", STRING), in command-line order


class RunDirError(Exception):
    """A run directory we must not use; the message names the path and what is wrong."""

    def __init__(self, path: str, reason: str) -> None:
        """Keep ``path`` and ``reason`` for callers; the message is "run directory PATH: REASON"."""
        super().__init__(f"run directory {path}: {reason}")
        self.path = path
        self.reason = reason


# --- run directory -------------------------------------------------------------------------


def run_base(environ: Mapping[str, str] | None = None) -> str:
    """The run base directory, created if missing and checked; see ``run_base_with_reason``."""
    return run_base_with_reason(environ)[0]


def run_base_with_reason(environ: Mapping[str, str] | None = None) -> tuple[str, str | None]:
    """The run base, and why the per-user ``/var/run/user/UID`` one was passed over (or ``None``).

    ``$PREFORK_INTERP_RUNDIR`` if set and non-empty (an absolute path; created mode 0700 with
    any missing parents); else ``/var/run/user/UID/prefork-interp`` when ``/var/run/user/UID``
    is a directory owned by us without group/other permissions; else
    ``HOME/.prefork-interp/HOST`` with HOME from the password database (not ``$HOME``). The
    reason is ``None`` when the per-user directory was used or simply does not exist; it says
    what is wrong when it exists but was refused. Raises ``RunDirError`` when the chosen
    directory cannot be created or fails ``check_run_dir``.
    """
    env = os.environ if environ is None else environ
    override = env.get(RUNDIR_ENV)
    if override:
        if not override.startswith("/"):
            raise RunDirError(override, f"${RUNDIR_ENV} must be an absolute path")
        base = override.rstrip("/") or "/"
        _create_private(base, parents=True)
        check_run_dir(base)
        return base, None

    uid = os.getuid()
    reason: str | None = None
    user_dir = f"/var/run/user/{uid}"
    try:
        user_st: os.stat_result | None = os.lstat(user_dir)
    except FileNotFoundError:
        user_st = None
    except OSError as e:
        user_st = None
        reason = f"run directory {user_dir}: cannot stat: {e.strerror}"
    if user_st is not None:
        problem = _dir_problem(user_st, uid)
        if problem is None:
            base = f"{user_dir}/prefork-interp"
            try:
                _create_private(base, parents=False)
                check_run_dir(base)
            except RunDirError as e:
                reason = str(e)
            else:
                return base, None
        else:
            reason = f"run directory {user_dir}: {problem}"

    home = _home_dir(uid)
    _create_private(f"{home}/.prefork-interp", parents=False)
    base = f"{home}/.prefork-interp/{_host_name()}"
    _create_private(base, parents=False)
    check_run_dir(base)
    return base, reason


def check_run_dir(path: str) -> None:
    """Refuse (``RunDirError``) unless ``path`` is a real directory of ours with mode ``0700``.

    The sockets in it are the only access control: anyone who can reach them runs code as us.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise RunDirError(path, "does not exist") from None
    except OSError as e:
        raise RunDirError(path, f"cannot stat: {e.strerror}") from e
    problem = _dir_problem(st, os.getuid())
    if problem is not None:
        raise RunDirError(path, problem)


def _dir_problem(st: os.stat_result, uid: int) -> str | None:
    """What makes a directory with this ``lstat`` unsafe for us, or ``None`` if it is fine."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by us (uid {uid})"
    if st.st_mode & 0o077:
        return f"mode {stat.S_IMODE(st.st_mode):04o} allows group/other access"
    return None


def _create_private(path: str, *, parents: bool) -> None:
    """``mkdir`` ``path`` mode 0700 if missing (with missing parents, also 0700, if asked)."""
    try:
        _mkdir(path, parents=parents)
    except OSError as e:
        raise RunDirError(path, f"cannot create: {e.strerror or e}") from e


def _mkdir(path: str, *, parents: bool) -> None:
    """``os.makedirs`` without its 3.7+ habit of creating parents with the default mode."""
    try:
        os.mkdir(path, _DIR_MODE)
    except FileExistsError:
        return
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if not parents or parent == path:
            raise
        _mkdir(parent, parents=True)
        try:
            os.mkdir(path, _DIR_MODE)
        except FileExistsError:
            return


def _home_dir(uid: int) -> str:
    """Our home directory from the password database, as the C client's ``getpwuid`` gives it.

    ``/etc/passwd`` first (cheap, no ``pwd`` import); ``pwd`` only if the uid is not there.
    """
    want = str(uid).encode()
    try:
        data = _read_file(_PASSWD_PATH)
    except OSError:
        data = b""
    for line in data.split(b"\n"):
        if line.startswith((b"+", b"-")):  # NIS compat entries: leave them to pwd
            continue
        fields = line.split(b":")
        if len(fields) >= _PASSWD_FIELDS and fields[2] == want:
            return os.fsdecode(fields[5])
    import pwd  # rare path (NSS users): kept off the hot path

    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        reason = f"no password database entry for uid {uid}"
        raise RunDirError("~/.prefork-interp", reason) from None


def _host_name() -> str:
    """The node name cut at the first ``.`` and at 32 bytes, as the reference does."""
    node = os.fsencode(os.uname().nodename)
    return os.fsdecode(node.split(b".", 1)[0][:_HOST_MAX])


def _read_file(path: str) -> bytes:
    """The whole contents of a small file, with plain ``os`` calls."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# --- ident and file names ------------------------------------------------------------------


def ident_max_len(base: str) -> int:
    """How many hex digits of the ident fit in a socket name in ``base`` (the reference's cut)."""
    return min(_IDENT_FULL, _SUN_PATH_MAX - len(os.fsencode(base)) - 12)


def ident_bytes(
    interp: bytes,
    script: bytes | None,
    ident_opts: Sequence[IdentOption],
    *,
    cwd: str | None = ".",
    extra: Sequence[bytes] = (),
    environb: Mapping[bytes, bytes] | None = None,
) -> bytes:
    """The exact bytes whose sha256 is the ident (PROTOCOL.md, "Run directory and socket names").

    ``ident_opts`` are the ``-E VAR`` / ``-G STRING`` options as ``("E", VAR)`` / ``("G",
    STRING)``; ``-E`` values come from ``environb`` (default ``os.environb``). ``cwd=None``
    leaves the cwd out (our ``--any-cwd``). ``extra`` are our own extensions, each appended
    after everything else as ``X`` + item + NUL: with none, the bytes are the reference's.
    """
    env = os.environb if environb is None else environb
    parts = [b"\x01", b"u", _u64(_UTSNAME_SIZE), b"u", _utsname_raw()]
    if cwd is not None:
        cwd_st = os.stat(cwd)
        parts += [b".", _u64(cwd_st.st_dev), b"i", _u64(cwd_st.st_ino)]
    root_st = os.stat("/")
    parts += [b"/", _u64(root_st.st_dev), b"i", _u64(root_st.st_ino)]
    for kind, item in ident_opts:
        if kind == "E":
            parts += [b"E", _c_string(item)]
            value = env.get(item)
            parts += [b"\0"] if value is None else [b"v", _c_string(value)]
        elif kind == "G":
            parts += [b"G", _c_string(item)]
        else:
            raise ValueError(f"unknown ident option {kind!r} (expected 'E' or 'G')")
    parts += [b"i", _c_string(interp)]
    if script is not None:
        parts += [b"s", _c_string(script)]
    for item in extra:
        parts += [b"X", _c_string(item)]
    return b"".join(parts)


def compute_ident(
    base: str,
    interp: bytes,
    script: bytes | None,
    ident_opts: Sequence[IdentOption],
    *,
    cwd: str | None = ".",
    extra: Sequence[bytes] = (),
    environb: Mapping[bytes, bytes] | None = None,
) -> str:
    """The ident: lower-case hex sha256 of ``ident_bytes``, cut to ``ident_max_len(base)``.

    Raises ``RunDirError`` when ``base`` is too long to leave room for a usable ident.
    """
    length = ident_max_len(base)
    if length < _IDENT_MIN:
        raise RunDirError(
            base,
            f"path too long for a socket name ({len(os.fsencode(base))} bytes; "
            f"at most {_SUN_PATH_MAX - 12 - _IDENT_MIN})",
        )
    data = ident_bytes(interp, script, ident_opts, cwd=cwd, extra=extra, environb=environb)
    return _sha256(data).hexdigest()[:length]


def socket_path(base: str, ident: str) -> str:
    """The server's listening socket."""
    return f"{base}/s{ident}"


def lock_path(base: str, ident: str) -> str:
    """The lock file serialising server start-up and cleanup for ``ident``."""
    return f"{base}/l{ident}"


def log_path(base: str, ident: str) -> str:
    """Our server's log file (not ``l``/``s``: the reference's cleanup would count it)."""
    return f"{base}/p{ident}.log"


def _u64(n: int) -> bytes:
    """``n`` as 8 little-endian bytes (the reference hashes raw ``size_t``/``dev_t``/``ino_t``)."""
    return n.to_bytes(8, "little")


def _c_string(item: bytes) -> bytes:
    """``item`` + NUL; refuse an embedded NUL, which would make the encoding ambiguous."""
    if b"\0" in item:
        raise ValueError(f"ident item contains a NUL byte: {item!r}")
    return item + b"\0"


def _utsname_raw() -> bytes:
    """The raw ``struct utsname`` of glibc on Linux: six NUL-padded 65-byte fields."""
    u = os.uname()
    try:
        domain = _read_file(_DOMAINNAME_FILE).removesuffix(b"\n")
    except OSError:
        domain = _DOMAINNAME_UNSET
    fields = [os.fsencode(f) for f in (u.sysname, u.nodename, u.release, u.version, u.machine)]
    fields.append(domain)
    return b"".join(f[: _UTS_FIELD - 1].ljust(_UTS_FIELD, b"\0") for f in fields)


# --- cleanup -------------------------------------------------------------------------------


def preclean(base: str, max_sockets: int = MAX_SOCKETS) -> int:
    """Delete the least recently used entries so that at most ``max_sockets`` idents remain.

    An entry is the pair ``s<IDENT>`` / ``l<IDENT>`` (IDENT lower-case hex; other names are
    left alone); its age is the socket's atime (0 if there is no socket). Each is deleted
    under its lock, and only if the atime has not changed since the listing (a client used it
    meanwhile). Unlike the reference, which deletes ``max_sockets`` entries at once, only the
    excess goes; and an entry whose socket a server still listens on is never deleted (its
    atime says little: relatime updates it at most daily) -- the next oldest goes instead.
    Returns the number of idents deleted.
    """
    if max_sockets < 0:
        raise ValueError(f"max_sockets must be >= 0, not {max_sockets}")
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return 0
    idents = {name[1:] for name in names if _is_entry_name(name)}
    excess = len(idents) - max_sockets
    if excess <= 0:
        return 0
    by_age = sorted((_socket_atime(base, ident), ident) for ident in idents)
    deleted = 0
    for atime, ident in by_age:
        if excess <= 0:
            break
        outcome = _delete_entry(base, ident, atime)
        if outcome is None:
            continue  # a live server: in use whatever its atime says; try the next oldest
        excess -= 1
        deleted += outcome
    return deleted


def _is_entry_name(name: str) -> bool:
    """Whether ``name`` is ``s`` or ``l`` followed by lower-case hex digits, and nothing else."""
    return len(name) > 1 and name[0] in "ls" and _HEX_DIGITS.issuperset(name[1:])


def _socket_atime(base: str, ident: str) -> int:
    """The socket's atime in ns (its last use), or 0 if it does not exist."""
    try:
        return os.lstat(socket_path(base, ident)).st_atime_ns
    except FileNotFoundError:
        return 0


def _delete_entry(base: str, ident: str, atime: int) -> bool | None:
    """Under the entry's lock, delete socket and lock file if the socket's atime is ``atime``.

    Returns whether it deleted them, or None (nothing deleted) when a server listens there.
    """
    lock = lock_path(base, ident)
    fd = lock_file(lock)
    try:
        if _socket_atime(base, ident) != atime:
            return False  # used since we listed it: keep it
        if _listening(socket_path(base, ident)):
            return None
        for path in (socket_path(base, ident), lock):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return True
    finally:
        os.close(fd)


def _listening(path: str) -> bool:
    """Whether a server listens on the socket at ``path``: a connect succeeds, or fails only
    because the backlog is full.  (The server takes the probe for a client gone at once.)"""
    import _socket  # cold path only: preclean runs before starting a server

    sock = _socket.socket(_socket.AF_UNIX,
                          _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC | _socket.SOCK_NONBLOCK)
    try:
        sock.connect(path)
    except BlockingIOError:
        return True  # EAGAIN: listening, backlog full
    except OSError:
        return False  # ECONNREFUSED (nobody listens; or not a socket), ENOENT, ...
    finally:
        sock.close()
    return True
