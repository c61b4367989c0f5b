"""The server ident, the names of its files, and the fast run-directory check (the hot path).

Everything here must agree with the reference C client (``/usr/bin/prefork-interp``), so that
both clients find the same server for the same script: see "Run directory and socket names" in
PROTOCOL.md.  Two things the reference does that PROTOCOL.md's wording leaves open, seen with
strace and kept here:

- The per-user run base is the string ``/var/run/user/UID/prefork-interp`` (the C client
  ``lstat``s ``/var/run/user/UID`` and builds its paths from that).  The string matters beyond
  the file it names: the ident is cut to ``108 - len(base) - 12`` hex digits, 63 for a
  four-digit uid, so spelling it ``/run/user/...`` would give a different socket name.
- The C client hashes the raw ``struct utsname`` from ``uname(2)``; its domainname field is
  ``/proc/sys/kernel/domainname`` (``(none)`` when unset), which is what we read.

``fast_run_base`` answers only when the run directory already exists and passes the check;
anything else (a directory to create, refuse or fall back from, with a reason to word) is
``prefork.common.paths``, which builds on the pieces here.

Imported by the client on every call: only ``posix``, ``sys``, the C sha256 module (``_sha2``;
``_sha256`` before 3.12) and ``consts``.  Not even ``os`` (over a millisecond of imports).
"""

import posix
import sys

from prefork.common import consts

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from hashlib import sha256 as _sha256
    from typing import Any
elif sys.version_info >= (3, 12):
    from _sha2 import sha256 as _sha256
else:
    from _sha256 import sha256 as _sha256

RUNDIR_ENV = "PREFORK_INTERP_RUNDIR"
USER_RUN_DIR = "/var/run/user/{uid}"  # the reference's spelling (see the module docstring)
USER_RUN_SUBDIR = "prefork-interp"
HOME_RUN_SUBDIR = ".prefork-interp"
PASSWD_PATH = "/etc/passwd"

_RUNDIR_ENV_B = RUNDIR_ENV.encode()
_IDENT_FULL = 64  # hex digits of a sha256
_IDENT_MIN = 33
_SOCKET_NAME_ROOM = 12  # the reference's cut leaves this much of sun_path unused
_UTS_FIELD = 65  # _UTSNAME_LENGTH on Linux/glibc: 64 bytes + NUL
_UTSNAME_SIZE = 6 * _UTS_FIELD  # sizeof(struct utsname) on glibc: 390
_DOMAINNAME_FILE = "/proc/sys/kernel/domainname"
_DOMAINNAME_UNSET = b"(none)"  # what the kernel reports when no domainname is set
_PASSWD_FIELDS = 7  # name:password:uid:gid:gecos:dir:shell
_HOST_MAX = 32
_S_IFMT = 0o170000
_S_IFDIR = 0o040000
_S_IFLNK = 0o120000
_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()

IdentOption = tuple[str, bytes]  # ("E", VAR) or ("G", STRING), in command-line order


class RunDirError(Exception):
    """A run directory we must not use; the message names the path and what is wrong."""

    def __init__(self, path: str, reason: str) -> None:
        """Keep ``path`` and ``reason`` for callers; the message is "run directory PATH: REASON"."""
        super().__init__(f"run directory {path}: {reason}")
        self.path = path
        self.reason = reason


def fsencode(name: str) -> bytes:
    """``os.fsencode`` for a ``str``, without importing ``os``."""
    return name.encode(_FS_ENCODING, _FS_ERRORS)


def fsdecode(name: bytes) -> str:
    """``os.fsdecode`` for ``bytes``, without importing ``os``."""
    return name.decode(_FS_ENCODING, _FS_ERRORS)


def read_small_file(path: str) -> bytes:
    """The whole contents of a small file (``/etc/passwd``, ``/proc``), with plain system calls."""
    fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
    try:
        chunks = []
        while chunk := posix.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        posix.close(fd)


# --- the run-directory check ---------------------------------------------------------------


def dir_problem(st: posix.stat_result, uid: int) -> str | None:
    """What makes a directory with this ``lstat`` unsafe for ``uid``, or ``None`` if it is fine.

    The sockets in a run directory are its only access control: anyone who can reach them runs
    code as us.  So it must be a real directory (not a symlink), ours, with mode ``0700``.
    """
    kind = st.st_mode & _S_IFMT
    if kind == _S_IFLNK:
        return "is a symlink"
    if kind != _S_IFDIR:
        return "is not a directory"
    if st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by us (uid {uid})"
    if st.st_mode & 0o077:
        return f"mode {st.st_mode & 0o7777:04o} allows group/other access"
    return None


_S_ISVTX = 0o1000
_MAX_SYMLINKS = 40  # as the kernel's path walk


def unsafe_ancestor(path: str, uid: int) -> tuple[str, str] | None:
    """The first directory above ``path`` that someone but us or root could change, and
    why; ``None`` if there is none (OpenSSH's StrictModes rule).

    Whoever can rename entries in an ancestor can swap the run directory for their own
    between our check and our use of it: every directory the kernel walks through to reach
    ``path``'s last component (symlinks followed) must be owned by us or root and writable by
    no one else, unless sticky (``/tmp``: others cannot rename or delete what is not theirs).
    A component that does not exist yet (to be created by us), or is not a directory, ends
    the walk.
    """
    pending = [c for c in path.split("/")[:-1] if c]
    current = "/"
    links = 0
    problem = _ancestor_problem("/", uid)
    if problem is not None:
        return "/", problem
    while pending:
        name = pending.pop(0)
        if name == ".":
            continue
        if name == "..":
            current = current.rsplit("/", 1)[0] or "/"
            continue
        step = current.rstrip("/") + "/" + name
        try:
            st = posix.lstat(step)
        except FileNotFoundError:
            return None
        except OSError as e:
            return step, f"cannot be checked ({e.strerror})"
        if st.st_mode & _S_IFMT == _S_IFLNK:
            links += 1
            if links > _MAX_SYMLINKS:
                return step, "is a symlink loop"
            target = fsdecode(posix.readlink(fsencode(step)))
            pending[:0] = [c for c in target.split("/") if c]
            if target.startswith("/"):
                current = "/"
            continue
        if st.st_mode & _S_IFMT != _S_IFDIR:
            return None  # no directory can be there: using the path fails, and says so
        problem = _ancestor_problem(step, uid, st)
        if problem is not None:
            return step, problem
        current = step
    return None


def _ancestor_problem(path: str, uid: int, st: posix.stat_result | None = None) -> str | None:
    if st is None:
        st = posix.lstat(path)
    if st.st_mode & _S_IFMT != _S_IFDIR:
        return "is not a directory"
    if st.st_uid not in (0, uid):
        return f"is owned by uid {st.st_uid}, neither us (uid {uid}) nor root"
    if st.st_mode & 0o022 and not st.st_mode & _S_ISVTX:
        return (f"mode {st.st_mode & 0o7777:04o} lets others rename what is in it "
                "(only a sticky directory, such as /tmp, may be writable by others)")
    return None


def open_run_dir(base: str) -> tuple[int, str]:
    """Open the checked run directory once: its fd (close-on-exec; the caller closes it),
    and the prefix to name entries in it by, ``/proc/self/fd/N``, which keeps meaning this
    directory whatever is renamed meanwhile (``connect`` has no ``*at`` form).  Without
    ``/proc``, the prefix is ``base`` itself."""
    fd = posix.open(base, posix.O_PATH | posix.O_DIRECTORY | posix.O_NOFOLLOW | posix.O_CLOEXEC)
    try:
        st = posix.fstat(fd)
        problem = dir_problem(st, posix.getuid())
        if problem is not None:
            raise RunDirError(base, problem)
        prefix = f"/proc/self/fd/{fd}"
        try:
            via = posix.stat(prefix)
        except OSError:
            return fd, base
        if (via.st_dev, via.st_ino) != (st.st_dev, st.st_ino):
            return fd, base
        return fd, prefix
    except BaseException:
        posix.close(fd)
        raise


def is_private_dir(path: str, uid: int) -> bool:
    """Whether ``path`` exists and passes ``dir_problem``."""
    try:
        st = posix.lstat(path)
    except OSError:
        return False
    return dir_problem(st, uid) is None


def user_run_dir(uid: int) -> str:
    """``/var/run/user/UID``: the per-user directory the run base goes in when it is usable."""
    return USER_RUN_DIR.format(uid=uid)


def home_run_base(home: str) -> str:
    """The fallback run base ``HOME/.prefork-interp/HOST``."""
    return f"{home}/{HOME_RUN_SUBDIR}/{host_name()}"


def host_name() -> str:
    """The node name cut at the first ``.`` and at 32 bytes, as the reference does."""
    node = fsencode(posix.uname().nodename)
    return fsdecode(node.split(b".", 1)[0][:_HOST_MAX])


def passwd_home(passwd: bytes, uid: int) -> str | None:
    """The home directory of ``uid`` in the text of a password file, or ``None``.

    As glibc's files backend for ``getpwuid``: NIS compat lines (a name starting ``+`` or ``-``,
    e.g. ``+::::::`` or ``+@group``) are not anyone's entry, so they are skipped and the search
    goes on; the first line with the uid wins.
    """
    want = b"%d" % uid
    for line in passwd.split(b"\n"):
        if line.startswith((b"+", b"-")):
            continue
        fields = line.split(b":")
        if len(fields) >= _PASSWD_FIELDS and fields[2] == want:
            return fsdecode(fields[5])
    return None


def fast_run_base(environ: "Mapping[bytes, bytes]") -> str | None:
    """``paths.run_base(environ)`` when that directory exists already and passes the check;
    ``None`` in every other case (``paths`` then creates it, falls back, or words a refusal)."""
    uid = posix.getuid()
    override = environ.get(_RUNDIR_ENV_B)
    if override:
        if not override.startswith(b"/"):
            return None
        base = fsdecode(override.rstrip(b"/") or b"/")
        return base if _usable(base, uid) else None
    user_dir = user_run_dir(uid)
    try:
        st = posix.lstat(user_dir)
    except FileNotFoundError:
        try:
            home = passwd_home(read_small_file(PASSWD_PATH), uid)
        except OSError:
            return None
        if home is None:
            return None  # an NSS user: ``paths`` asks ``pwd``
        base = home_run_base(home)
    except OSError:
        return None
    else:
        if dir_problem(st, uid) is not None:
            return None
        base = f"{user_dir}/{USER_RUN_SUBDIR}"
    return base if _usable(base, uid) else None


def _usable(base: str, uid: int) -> bool:
    """A private directory of ours, in directories no one else can change."""
    return is_private_dir(base, uid) and unsafe_ancestor(base, uid) is None


# --- ident and file names ------------------------------------------------------------------


def ident_max_len(base: str) -> int:
    """How many hex digits of the ident fit in a socket name in ``base`` (the reference's cut)."""
    return min(_IDENT_FULL, consts.SUN_PATH_MAX - len(fsencode(base)) - _SOCKET_NAME_ROOM)


def ident_bytes(
    interp: bytes,
    script: bytes | None,
    ident_opts: "Sequence[IdentOption]",
    *,
    cwd: str | None = ".",
    extra: "Sequence[bytes]" = (),
    environb: "Mapping[bytes, bytes] | None" = None,
) -> bytes:
    """The exact bytes whose sha256 is the ident (PROTOCOL.md, "Run directory and socket names").

    ``ident_opts`` are the ``-E VAR`` / ``-G STRING`` options as ``("E", VAR)`` / ``("G",
    STRING)``; ``-E`` values come from ``environb`` (default: the process environment).
    ``cwd=None`` leaves the cwd out (our ``--any-cwd``).  ``extra`` are our own extensions, each
    appended after everything else as ``X`` + item + NUL: with none, the bytes are the
    reference's.
    """
    env = _process_environb() if environb is None else environb
    parts = [b"\x01", b"u", _u64(_UTSNAME_SIZE), b"u", _utsname_raw()]
    if cwd is not None:
        cwd_st = posix.stat(cwd)
        parts += [b".", _u64(cwd_st.st_dev), b"i", _u64(cwd_st.st_ino)]
    root_st = posix.stat("/")
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


def compute_ident(base: str, interp: bytes, script: bytes | None,
                  ident_opts: "Sequence[IdentOption]", **options: "Any") -> str:
    """The ident: lower-case hex sha256 of ``ident_bytes`` (``options``: its keywords
    ``cwd``, ``extra``, ``environb``), cut to ``ident_max_len(base)``.

    Raises ``RunDirError`` when ``base`` is too long to leave room for a usable ident.
    """
    length = ident_max_len(base)
    if length < _IDENT_MIN:
        raise RunDirError(
            base,
            f"path too long for a socket name ({len(fsencode(base))} bytes; "
            f"at most {consts.SUN_PATH_MAX - _SOCKET_NAME_ROOM - _IDENT_MIN})",
        )
    data = ident_bytes(interp, script, ident_opts, **options)
    return _sha256(data).hexdigest()[:length]


def context_ident(base: str, ident: str, code: int) -> str:
    """The ident of the server for ``ident``'s script in another context (``code`` from an
    x1 ``R`` record): a hash of both, as long as a computed ident."""
    data = b"prefork-context\0" + fsencode(ident) + b"\0" + _u64(code & 0xFFFFFFFF)
    return _sha256(data).hexdigest()[:ident_max_len(base)]


def socket_path(base: str, ident: str) -> str:
    """The server's listening socket, ``BASE/s<IDENT>``."""
    return f"{base}/{consts.socket_name(ident)}"


def lock_path(base: str, ident: str) -> str:
    """The lock file serialising server start-up and cleanup for ``ident``, ``BASE/l<IDENT>``."""
    return f"{base}/{consts.lock_name(ident)}"


def log_path(base: str, ident: str) -> str:
    """Our server's log file, ``BASE/p<IDENT>.log``."""
    return f"{base}/{consts.log_name(ident)}"


def _process_environb() -> "Mapping[bytes, bytes]":
    """The process environment: ``os.environb`` once ``os`` is loaded (it sees changes made
    through ``os.environ``), else ``posix.environ`` (the client, which changes nothing)."""
    os_module = sys.modules.get("os")
    if os_module is None:
        return posix.environ
    environb: Mapping[bytes, bytes] = os_module.environb
    return environb


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
    u = posix.uname()
    try:
        domain = read_small_file(_DOMAINNAME_FILE).removesuffix(b"\n")
    except OSError:
        domain = _DOMAINNAME_UNSET
    fields = [fsencode(f) for f in (u.sysname, u.nodename, u.release, u.version, u.machine)]
    fields.append(domain)
    return b"".join(f[: _UTS_FIELD - 1].ljust(_UTS_FIELD, b"\0") for f in fields)
