"""C functions of the running program (libc), called through ``_ctypes`` alone.

The ``ctypes`` package builds dozens of classes when imported (0.7 MB of heap in every
process that imports it, for a server: in every idle server); its C core ``_ctypes`` with
the one result type needed here costs 0.1 MB.  Arguments are passed as Python ``int`` and
``bytes`` (converted to C ``int``/``long`` and ``char *`` by ``_ctypes`` itself); every
function returns a C ``int``, and keeps ``errno`` for ``errno()``.  A pointer argument is
a ``Pointer`` (an address), ``None`` (NULL), ``bytes`` (read-only memory) or ``byref(buffer(n))``
(memory the function writes).
"""

from __future__ import annotations

import _ctypes
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class _CInt(_ctypes._SimpleCData):  # type: ignore[misc, name-defined, type-arg, unused-ignore]
    _type_ = "i"


class Pointer(_ctypes._SimpleCData):  # type: ignore[misc, name-defined, type-arg, unused-ignore]
    """A C ``void *``: ``Pointer(address)`` passes an address; ``.value`` reads one."""

    _type_ = "P"


POINTER_SIZE: int = _ctypes.sizeof(Pointer)
byref = _ctypes.byref


class _CChar(_ctypes._SimpleCData):  # type: ignore[misc, name-defined, type-arg, unused-ignore]
    _type_ = "c"


def buffer(size: int) -> Any:
    """``size`` zeroed bytes a C function can write (``byref(buf)``); ``buf.raw`` reads them."""
    array = type("_CBuffer", (_ctypes.Array,), {"_type_": _CChar, "_length_": size})
    return array()


class _CFunc(_ctypes.CFuncPtr):  # type: ignore[misc, name-defined, unused-ignore]
    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = _CInt


class _Program:
    """What ``CFuncPtr((name, library))`` wants of a library: its ``dlopen`` handle."""

    def __init__(self) -> None:
        # The running program: libc and everything else it has loaded.
        self._handle = _ctypes.dlopen(None, os.RTLD_NOW)  # type: ignore[arg-type, unused-ignore]


_program: _Program | None = None


def function(name: str) -> Callable[..., int]:
    """The C function ``name`` (returning int); ``AttributeError`` if there is none."""
    global _program
    if _program is None:
        _program = _Program()
    f: Callable[..., int] = _CFunc((name, _program))  # type: ignore[arg-type, unused-ignore]
    return f


def variable(name: str) -> Pointer | None:
    """The program's global pointer variable ``name`` (e.g. libc's ``environ``), live: its
    ``.value`` is the pointer's value whenever read; None if there is no such symbol."""
    global _program
    if _program is None:
        _program = _Program()
    try:
        var: Pointer = Pointer.in_dll(_program, name)  # type: ignore[arg-type, attr-defined, unused-ignore]
    except ValueError:
        return None
    return var


def read_pointer(address: int) -> int:
    """The pointer stored at ``address`` (0 for NULL)."""
    return int(Pointer.from_address(address).value or 0)  # type: ignore[attr-defined, unused-ignore]


def errno() -> int:
    """``errno`` as the last call through ``function`` left it."""
    return int(_ctypes.get_errno())


def malloc_trim() -> None:
    """Give the heap's free pages back to the kernel (glibc; nothing elsewhere)."""
    try:
        function("malloc_trim")(0)
    except AttributeError:
        pass
