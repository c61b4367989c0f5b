"""The executor's ``/proc/PID/environ`` (what ``ps e`` and psutil show) as the call's
environment.

The kernel shows the bytes between the process's ``env_start`` and ``env_end``: the
environment block the setup process was exec'd with (the first caller's), which
setproctitle has wiped (it moved the C ``environ`` strings to the heap first, so nothing
points into the block any more).  Moving the block needs ``prctl(PR_SET_MM)`` and
``CAP_SYS_RESOURCE``; instead the call's environment is written into it, NUL-padded,
when it fits.  When it does not (a call with a larger environment than the server's
first caller), the block stays empty: ``ps e`` shows no environment rather than a wrong
one.  A title longer than the argument area is cut there, so that the kernel does not
read the title on into the environment.
"""

from __future__ import annotations

import os

from prefork.common import cfunc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


def _stat_fields() -> list[bytes]:
    with open("/proc/self/stat", "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2:].split()


def _lookup() -> tuple[cfunc.Pointer | None, Callable[..., int] | None]:
    """libc's ``environ`` variable and its ``memmove``, through ``prefork.common.cfunc``
    (the ``ctypes`` package would cost every idle server 0.8 MB)."""
    try:
        return cfunc.variable("environ"), cfunc.function("memmove")
    except (OSError, AttributeError):
        return None, None


#: libc's ``environ`` variable and ``memmove``, looked up once in the server (this module
#: is imported there, before the fork); None: unknown, nothing is written.
_environ_var, _memmove = _lookup()


def _environ_points_into(start: int, end: int, count: int) -> bool:
    """Does any string of the C ``environ`` (about ``count`` of them) lie in the block?"""
    if _environ_var is None:
        return True
    base = _environ_var.value
    if not base:
        return False
    for i in range(count + 1):
        p = cfunc.read_pointer(base + i * cfunc.POINTER_SIZE)
        if not p:
            return False
        if start <= p < end:
            return True
    return True  # more strings than os.environ has: do not guess


def show_environ(environ: os._Environ[bytes]) -> bool:
    """Write ``environ`` into this process's original environment block; False if it does
    not fit (or the kernel does not say where the block is)."""
    memmove = _memmove
    if memmove is None:
        return False
    try:
        fields = _stat_fields()
        # Fields 48..51 of /proc/PID/stat (1-based; index 0 here is field 3): arg_start,
        # arg_end, env_start, env_end.
        arg_end, env_start, env_end = (int(fields[i]) for i in (46, 47, 48))
    except (OSError, ValueError, IndexError):
        return False
    if not env_start or env_end <= env_start:
        return False
    size = env_end - env_start
    if _environ_points_into(env_start, env_end, len(environ)):
        return False  # setproctitle did not move the strings: they must stay
    blob = b"".join(k + b"=" + v + b"\0" for k, v in environ.items())
    if len(blob) > size:
        blob = b""
    if arg_end:
        memmove(cfunc.Pointer(arg_end - 1), b"\0", 1)
    memmove(cfunc.Pointer(env_start), blob + b"\0" * (size - len(blob)), size)
    return bool(blob) or not environ
