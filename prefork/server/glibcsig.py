"""glibc's internal signals (32 ``SIGCANCEL``, 33 ``SIGSETXID``) back at their default.

glibc's ``posix_spawn`` sets them to ``SIG_IGN`` in the child while it prepares the exec,
and exec keeps an ignored signal ignored: the setup process the client spawns (and so the
server, every executor and every child the script starts) would have them ignored, where
a direct run, started by a shell, has them at default.  glibc's ``sigaction`` refuses
them, so the kernel's ``rt_sigaction`` is called directly (system call numbers by
architecture; elsewhere nothing is done).
"""

from __future__ import annotations

import platform

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes

#: ``rt_sigaction``'s number by ``platform.machine()``.
_RT_SIGACTION = {"x86_64": 13, "aarch64": 134, "riscv64": 134, "ppc64le": 173, "ppc64": 173,
                 "s390x": 174, "i686": 174, "i386": 174, "armv7l": 174}
GLIBC_INTERNAL = (32, 33)
_SIG_IGN = 1


#: libc's ``syscall``, kept by ``reset_internal_signals`` for ``set_ignored`` in executors.
_syscall: object = None


def _swap(sig: int, handler: int | None) -> int | None:
    """The handler of ``sig`` (and, unless None, set ``handler``: SIG_DFL 0 or SIG_IGN 1)."""
    nr = _RT_SIGACTION.get(platform.machine())
    syscall = _syscall
    if nr is None or not callable(syscall):
        return None
    import ctypes

    # struct kernel_sigaction: handler, flags, restorer, mask -- all zero but the handler
    # is that handler with no flags and an empty mask, whatever the field order.
    old = (ctypes.c_ulong * 4)()
    if syscall(nr, sig, None, ctypes.byref(old), 8) != 0:
        return None
    if handler is not None and old[0] in (0, _SIG_IGN) and old[0] != handler:
        new = (ctypes.c_ulong * 4)(handler)
        if syscall(nr, sig, ctypes.byref(new), None, 8) != 0:
            return None
    return int(old[0])


def reset_internal_signals(libc: ctypes.CDLL | None) -> list[int]:
    """Set signals 32 and 33 to ``SIG_DFL`` where they are ignored; return those reset."""
    global _syscall
    _syscall = getattr(libc, "syscall", None)
    return [sig for sig in GLIBC_INTERNAL if _swap(sig, 0) == _SIG_IGN]


def set_ignored(sig: int) -> None:
    """In an executor whose caller ignores ``sig`` (32 or 33, which glibc's ``sigaction``
    refuses): ignore it too, as a direct run would inherit it."""
    _swap(sig, _SIG_IGN)
