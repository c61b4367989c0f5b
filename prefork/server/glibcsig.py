"""glibc's internal signals (32 ``SIGCANCEL``, 33 ``SIGSETXID``) back at their default.

glibc's ``posix_spawn`` sets them to ``SIG_IGN`` in the child while it prepares the exec,
and exec keeps an ignored signal ignored: the setup process the client spawns (and so the
server, every executor and every child the script starts) would have them ignored, where
a direct run, started by a shell, has them at default.  glibc's ``sigaction`` refuses
them, so the kernel's ``rt_sigaction`` is called directly (system call numbers by
architecture; elsewhere nothing is done), through ``prefork.common.cfunc`` (the ``ctypes``
package, or ``platform`` for the machine's name, would cost every idle server 0.8 and
1.6 MB).
"""

from __future__ import annotations

import _struct
import os

from prefork.common import cfunc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

#: ``rt_sigaction``'s number by ``os.uname().machine``.
_RT_SIGACTION = {"x86_64": 13, "aarch64": 134, "riscv64": 134, "ppc64le": 173, "ppc64": 173,
                 "s390x": 174, "i686": 174, "i386": 174, "armv7l": 174}
GLIBC_INTERNAL = (32, 33)
_SIG_IGN = 1
#: struct kernel_sigaction: handler, flags, restorer, mask (4 unsigned longs).
_SIGACTION = _struct.Struct("4L")


#: libc's ``syscall``, kept by ``reset_internal_signals`` for ``set_ignored`` in executors.
_syscall: Callable[..., int] | None = None


def _swap(sig: int, handler: int | None) -> int | None:
    """The handler of ``sig`` (and, unless None, set ``handler``: SIG_DFL 0 or SIG_IGN 1)."""
    nr = _RT_SIGACTION.get(os.uname().machine)
    syscall = _syscall
    if nr is None or syscall is None:
        return None
    # The new action is the handler with no flags and an empty mask, whatever the field
    # order: all the other fields are zero.
    old = cfunc.buffer(_SIGACTION.size)
    if syscall(nr, sig, None, cfunc.byref(old), 8) != 0:
        return None
    current = int(_SIGACTION.unpack(old.raw)[0])
    if (handler is not None and current in (0, _SIG_IGN) and current != handler
            and syscall(nr, sig, _SIGACTION.pack(handler, 0, 0, 0), None, 8) != 0):
        return None
    return current


def reset_internal_signals() -> list[int]:
    """Set signals 32 and 33 to ``SIG_DFL`` where they are ignored; return those reset."""
    global _syscall
    try:
        _syscall = cfunc.function("syscall")
    except AttributeError:
        return []
    return [sig for sig in GLIBC_INTERNAL if _swap(sig, 0) == _SIG_IGN]


def set_ignored(sig: int) -> None:
    """In an executor whose caller ignores ``sig`` (32 or 33, which glibc's ``sigaction``
    refuses): ignore it too, as a direct run would inherit it."""
    _swap(sig, _SIG_IGN)
