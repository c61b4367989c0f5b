"""The run directory: choose it, create it, refuse an unsafe one, fall back; clean stale entries.

The cold-path half of the run-directory knowledge.  The hot-path half (the ident, the names of
a server's files, the check a directory must pass, and ``fast_run_base`` for a run directory
that is already there) is ``prefork.common.ident``; this module builds on it, so that the two
cannot disagree.

Unlike the reference we check the run base itself (a real directory, ours, mode ``0700``) and
fall back to the home directory when the ``/var/run/user`` one fails that check.
"""

from __future__ import annotations

import os

from prefork.common import consts
from prefork.common.ident import (
    HOME_RUN_SUBDIR,
    PASSWD_PATH,
    RUNDIR_ENV,
    USER_RUN_SUBDIR,
    RunDirError,
    dir_problem,
    home_run_base,
    lock_path,
    passwd_home,
    read_small_file,
    socket_path,
    unsafe_ancestor,
    user_run_dir,
)
from prefork.common.locking import lock_existing_file, lock_file

TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Mapping

MAX_SOCKETS = 100

_DIR_MODE = 0o700
_HEX_DIGITS = frozenset("0123456789abcdef")


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
        _check_ancestors(base)  # before creating anything there
        _create_private(base, parents=True)
        check_run_dir(base)
        return base, None

    uid = os.getuid()
    reason: str | None = None
    user_dir = user_run_dir(uid)
    try:
        user_st: os.stat_result | None = os.lstat(user_dir)
    except FileNotFoundError:
        user_st = None
    except OSError as e:
        user_st = None
        reason = f"run directory {user_dir}: cannot stat: {e.strerror}"
    if user_st is not None:
        problem = dir_problem(user_st, uid)
        if problem is None:
            base = f"{user_dir}/{USER_RUN_SUBDIR}"
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
    _create_private(f"{home}/{HOME_RUN_SUBDIR}", parents=False)
    base = home_run_base(home)
    _create_private(base, parents=False)
    check_run_dir(base)
    return base, reason


def check_run_dir(path: str) -> None:
    """Refuse (``RunDirError``) unless ``path`` is a real directory of ours with mode ``0700``.

    The sockets in it are the only access control: anyone who can reach them runs code as us.
    Nor may anyone else be able to change a directory above it (``_check_ancestors``).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise RunDirError(path, "does not exist") from None
    except OSError as e:
        raise RunDirError(path, f"cannot stat: {e.strerror}") from e
    problem = dir_problem(st, os.getuid())
    if problem is not None:
        raise RunDirError(path, problem)
    _check_ancestors(path)


def _check_ancestors(path: str) -> None:
    """Refuse ``path`` if another user could change a directory above it
    (``ident.unsafe_ancestor``)."""
    unsafe = unsafe_ancestor(path, os.getuid())
    if unsafe is not None:
        above, problem = unsafe
        raise RunDirError(path, f"{above} above it {problem}")


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
    try:
        home = passwd_home(read_small_file(PASSWD_PATH), uid)
    except OSError:
        home = None
    if home is not None:
        return home
    import pwd  # rare path (NSS users)

    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        reason = f"no password database entry for uid {uid}"
        raise RunDirError(f"~/{HOME_RUN_SUBDIR}", reason) from None


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
    return (len(name) > 1 and name[0] in (consts.SOCKET_PREFIX, consts.LOCK_PREFIX)
            and _HEX_DIGITS.issuperset(name[1:]))


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
    # An entry whose lock file is gone is gone (deleted by another cleanup while we waited)
    # unless its socket is there (a reference client's entry): its lock is created then.
    fd = lock_existing_file(lock)
    if fd is None:
        if _socket_atime(base, ident) == 0:
            return False
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
