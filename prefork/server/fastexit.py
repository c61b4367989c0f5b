"""Fast executor exit: finish the call without tearing down the inherited heap.

A normal interpreter shutdown in the executor decrements the reference count of every object
the server built (modules are cleared one by one), and copy-on-write then copies the whole
heap page by page: tens to hundreds of milliseconds for a big server.  Instead, when the
outermost Python frame of the executor returns or unwinds (``sys.monitoring``, Python 3.12+),
we do what the rest of ``Py_RunMain`` does that anyone can observe, in its order, and
``os._exit``:

1. ``flush_io``: flush stderr and stdout, errors ignored;
2. ``PyErr_Print``: the traceback through ``sys.excepthook`` (``sys.last_exc`` set), or a
   ``SystemExit``'s status and message; exit status 1 after an exception;
3. wait for non-daemon threads (``threading._shutdown``);
4. run ``atexit`` handlers (this includes ``weakref.finalize`` and ``logging.shutdown``);
5. flush stdout/stderr (a failure: ``Exception ignored ...`` through
   ``sys.unraisablehook``, status 120);
6. the teardown a direct run would see: release the objects ``__main__`` created during the
   call and collect cycles, so their ``__del__`` methods run; flush every open file object,
   those created since the fork and those open when the server froze its heap (unclosed
   files keep their data); flush stdout/stderr again, quietly (as their deallocation would);
7. after an uncaught ``KeyboardInterrupt`` (exactly that type): death by SIGINT.

Objects the server created before the fork are not finalized (that is the point); an
exception unwinding the deepest frame at the recursion limit is replaced by a new
``RecursionError`` (the unwind callback needs one more frame).  Both are documented.

Who calls ``finish()``:

- the prefork-server runner, which runs the script inside its own ``try`` and says so
  with ``caller_exits()`` before ``initialisation_complete()``: no event is armed at all,
  the script's code runs at direct speed (an exception costs what it costs directly);
- otherwise ``install()``'s callbacks, for a script that called ``initialisation_complete()``
  itself: its ``<module>`` frame is the outermost, and nothing of ours is below it.  Its
  return is a local event on that one code object (free); its unwinding by an exception is
  only seen through the global ``PY_UNWIND`` event, which calls back on every frame any
  exception unwinds (``RAISE``, ``PY_UNWIND``, ``RERAISE``, ``EXCEPTION_HANDLED`` cannot be
  set on one code object, and after the frame has gone a ``SystemExit``'s status is known
  only to C): an exception-heavy loop pays for it (``make bench``, section (h)).

On Python 3.11 (no ``sys.monitoring``) the executor ends with the normal shutdown, after
unfreezing the heap so that the final collection finds the cycles the server made
(``full_teardown_at_exit``).
"""

from __future__ import annotations

import _signal
import _weakref
import atexit
import gc
import io
import os
import sys
import types

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import CodeType, TracebackType
    from typing import Any

AVAILABLE = sys.version_info >= (3, 12)
_TOOL_IDS = (4, 3)


def _outermost_code() -> CodeType:
    frame = sys._getframe()
    while frame.f_back is not None:
        frame = frame.f_back
    return frame.f_code


#: Set by ``caller_exits()``: the process ends each executor itself with ``finish()``.
_caller_exits = False


def caller_exits() -> None:
    """Say, before ``initialisation_complete()``, that this process ends every executor
    itself by calling ``finish()`` from a frame below the script's code (the prefork-server
    runner, which runs the script inside its own ``try``): ``install()`` then arms no
    ``sys.monitoring`` event at all, and the script's code runs at direct speed.

    Without it, ``install()`` must find the end of the outermost frame, the script's own:
    its return is a local event on that one code object (free), but its unwinding by an
    exception is only seen through the global ``PY_UNWIND`` event (``RAISE``,
    ``PY_UNWIND``, ``RERAISE`` and ``EXCEPTION_HANDLED`` cannot be set on one code object),
    which calls back on every frame any exception unwinds."""
    global _caller_exits
    _caller_exits = True


def install() -> bool:
    """Arrange the fast exit in this (executor) process; False if not possible here."""
    if not AVAILABLE:
        return False
    if _caller_exits:
        return True
    mon = sys.monitoring  # type: ignore[attr-defined,unused-ignore]
    tool = None
    for candidate in _TOOL_IDS:
        if mon.get_tool(candidate) is None:
            mon.use_tool_id(candidate, "prefork-fastexit")
            tool = candidate
            break
    if tool is None:
        return False
    main_code = _outermost_code()

    def on_return(code: CodeType, offset: int, retval: object) -> object:
        if code is main_code:
            finish(0, None)
        return mon.DISABLE

    def on_unwind(code: CodeType, offset: int, exc: BaseException) -> object:
        if code is main_code:
            finish(None, exc)
        return None

    mon.register_callback(tool, mon.events.PY_RETURN, on_return)
    mon.register_callback(tool, mon.events.PY_UNWIND, on_unwind)
    mon.set_local_events(tool, main_code, mon.events.PY_RETURN)
    mon.set_events(tool, mon.events.PY_UNWIND)
    return True


def _write_stderr(text: str) -> None:
    """``PySys_WriteStderr``: through ``sys.stderr``, else straight to fd 2."""
    err = getattr(sys, "stderr", None)
    try:
        if err is not None:
            err.write(text)
            return
    except Exception:  # noqa: BLE001 - mirrors CPython's fallback to the C-level stderr
        pass
    try:
        os.write(2, text.encode("utf-8", "backslashreplace"))
    except OSError:
        pass


def _from_c(exc: BaseException) -> BaseException:
    """Drop this module's frames from ``exc``'s traceback: in CPython the call that raised
    it is made from C, so they would not be there."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return exc.with_traceback(tb)


def _unraisable_args_type() -> type:
    """The type of ``sys.unraisablehook``'s argument (not exposed: caught from a real
    unraisable exception, on this rare path only)."""
    seen: list[object] = []
    old = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        class _Raises:
            def __del__(self) -> None:
                raise RuntimeError

        _Raises()
    finally:
        sys.unraisablehook = old
    return type(seen[0])


def _unraisable(exc: BaseException, msg: str, obj: object) -> None:
    """Report ``exc`` as CPython's finalization does: ``PyErr_FormatUnraisable(msg)`` from
    3.13 on, ``PyErr_WriteUnraisable(obj)`` before."""
    exc = _from_c(exc)
    new = sys.version_info >= (3, 13)
    make = _unraisable_args_type()
    args = make((type(exc), exc, exc.__traceback__, msg if new else None, None if new else obj))
    hook = sys.unraisablehook
    try:
        hook(args)
    except BaseException as hook_exc:  # noqa: BLE001 - reported by the default hook instead
        # As ``format_unraisable``: the hook's own failure goes to the default hook, and a
        # failure of that one (stderr a closed pipe too) is ignored: it must not change the
        # exit status (120), nor skip what comes after.
        try:
            sys.__unraisablehook__(make((type(hook_exc), hook_exc, hook_exc.__traceback__,
                                         None, hook)))
        except BaseException:  # noqa: BLE001
            pass


def _flush_io() -> None:
    """``flush_io()`` after the main module ends: stderr then stdout, errors ignored."""
    for name in ("stderr", "stdout"):
        try:
            getattr(sys, name).flush()
        except BaseException:  # noqa: BLE001 - CPython clears whatever it raised
            pass


def _is_closed(stream: object) -> bool:
    try:
        return bool(stream.closed)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - as CPython's file_is_closed()
        return False


def _flush_std_files() -> bool:
    """``flush_std_files()`` of ``Py_FinalizeEx``: False if a flush failed."""
    ok = True
    out = getattr(sys, "stdout", None)
    err = getattr(sys, "stderr", None)
    if out is not None and not _is_closed(out):
        try:
            out.flush()
        except BaseException as e:  # noqa: BLE001
            _unraisable(e, "Exception ignored on flushing sys.stdout", out)
            ok = False
    if err is not None and not _is_closed(err):
        try:
            err.flush()
        except BaseException:  # noqa: BLE001
            ok = False
    return ok


def exit_status_of(exc: SystemExit) -> int:
    """``_Py_HandleSystemExit``: the exit status a ``SystemExit`` gives (printing a
    non-integer code on stderr, status 1)."""
    code: object
    try:
        code = exc.code
    except Exception:  # noqa: BLE001 - CPython then prints the exception itself
        code = exc
    if code is None:
        return 0
    if isinstance(code, int):
        # (int)PyLong_AsLong(code): -1 when it does not fit a C long.
        return code & 0xFF if -(2**63) <= code < 2**63 else 0xFF
    err = getattr(sys, "stderr", None)
    try:
        text = str(code)
        if err is not None:
            err.write(text)
            err.write("\n")
        else:
            os.write(2, (text + "\n").encode("utf-8", "backslashreplace"))
    except Exception:  # noqa: BLE001 - ignored, as in CPython
        pass
    return 1


def _display(exc: BaseException) -> None:
    """``PyErr_DisplayException``: the default traceback print."""
    sys.__excepthook__(type(exc), exc, exc.__traceback__)


def _print_exit(exc: BaseException) -> tuple[int, bool]:
    """``PyErr_Print`` for the exception that ended the main module: (exit status, exit by
    SIGINT).  Sets ``sys.last_exc`` & co. and calls ``sys.excepthook`` as CPython does."""
    if isinstance(exc, SystemExit):
        return exit_status_of(exc), False
    tb: TracebackType | None = exc.__traceback__
    if sys.version_info >= (3, 12):
        sys.last_exc = exc
    sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, tb
    hook = getattr(sys, "excepthook", None)
    try:
        sys.audit("sys.excepthook", hook, type(exc), exc, tb)
    except RuntimeError:
        return 1, type(exc) is KeyboardInterrupt
    except Exception as e:  # noqa: BLE001
        _unraisable(e, "Exception ignored in audit hook", None)
    if hook is None:
        _write_stderr("sys.excepthook is missing\n")
        _display(exc)
    else:
        try:
            hook(type(exc), exc, tb)
        except SystemExit as exit_exc:
            return exit_status_of(exit_exc), False
        except BaseException as exc2:  # noqa: BLE001
            _write_stderr("Error in sys.excepthook:\n")
            _display(_from_c(exc2))
            _write_stderr("\nOriginal exception was:\n")
            _display(exc)
    # Only the exact type makes the interpreter exit by SIGINT (run_eval_code_obj).
    return 1, type(exc) is KeyboardInterrupt


def _flush_open_files() -> None:
    """Flush every open file object, as their deallocation at teardown would: those
    created during the call, and those created before the fork (recorded at freeze time,
    since the frozen heap is invisible to ``gc.get_objects``)."""
    kinds = (io.BufferedWriter, io.BufferedRandom, io.TextIOWrapper)
    files: list[Any] = [o for o in gc.get_objects() if isinstance(o, kinds)]
    files += [o for o in (r() for r in _pre_fork_files) if o is not None]
    # Text layers first: their flush pushes pending text into the buffer below.
    files.sort(key=lambda f: not isinstance(f, io.TextIOWrapper))
    for obj in files:
        if obj is sys.stdout or obj is sys.stderr:
            continue
        try:
            if not obj.closed:
                obj.flush()
        except Exception:  # noqa: BLE001 - as a dealloc would: ignored
            continue


#: Weak references to the file objects open when the server froze its heap.
_pre_fork_files: list[_weakref.ReferenceType[object]] = []


def remember_open_files() -> None:
    """In the server, just before ``gc.freeze()``: note the open file objects, so that an
    executor can flush them at its fast exit."""
    kinds = (io.BufferedWriter, io.BufferedRandom, io.TextIOWrapper)
    _pre_fork_files[:] = [_weakref.ref(o) for o in gc.get_objects()
                          if isinstance(o, kinds) and not o.closed]


def full_teardown_at_exit() -> None:
    """For an executor that ends with the interpreter's own shutdown: unfreeze the heap at
    exit, so that the final collection finds the cycles created before the fork (the
    ``__main__`` globals, their objects and files), as in a direct run."""
    atexit.register(gc.unfreeze)


#: Names of ``__main__`` bound, when the server froze its heap, to a module, class or
#: function: not looked at by ``_release_main_globals``.
_static_main_names: frozenset[str] = frozenset()
_STATIC_KINDS = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType)


def remember_main_globals() -> None:
    """In the server, just before ``gc.freeze()``: note which ``__main__`` globals name
    modules, classes and functions.  Reading a global's value writes to the page of that
    object (its reference count), and copy-on-write then copies the page: for a script
    with a hundred imports, a tenth of a millisecond at every exit, for globals that a call
    does not rebind."""
    global _static_main_names
    main = sys.modules.get("__main__")
    if main is not None:
        _static_main_names = frozenset(
            name for name, value in main.__dict__.items()
            if isinstance(name, str) and isinstance(value, _STATIC_KINDS))


def _release_main_globals() -> None:
    """Drop what __main__ created during the call (objects tracked by the GC since the
    fork: the server's heap is frozen), so finalizers run as they would at shutdown.
    (Names that held a module, class or function in the server are skipped: see
    ``remember_main_globals``.)"""
    main = sys.modules.get("__main__")
    if main is None:
        return
    recent = {id(o) for o in gc.get_objects()}
    d = main.__dict__
    static = _static_main_names
    # Iterating the keys alone writes to nothing: they are interned, immortal strings.
    names = [n for n in list(d)
             if not (isinstance(n, str) and (n in static or n.startswith("__")))]
    for name in [n for n in names if id(d.get(n)) in recent]:
        try:
            del d[name]
        except KeyError:
            pass
    gc.collect()


#: Called last in ``finish()`` (never raising, never blocking): e.g. ``learn.report``.
before_exit: list[Callable[[], None]] = []


def finish(status: int | None, exc: BaseException | None) -> None:
    """Exit the executor now, doing what the rest of ``Py_RunMain`` does that anyone can
    observe, in its order, but without tearing the heap down:

    ``flush_io``; ``PyErr_Print`` (traceback, or SystemExit's status and message);
    ``Py_FinalizeEx``: threading shutdown, atexit, ``flush_std_files`` (a failure: status
    120), the call's ``__main__`` objects released and open files flushed (the teardown),
    a last quiet flush; then exit by SIGINT after an uncaught KeyboardInterrupt.
    """
    sigint = False
    try:
        _flush_io()
        if exc is not None:
            status, sigint = _print_exit(exc)
            del exc
        assert status is not None
        threading = sys.modules.get("threading")
        if threading is not None:
            try:
                threading._shutdown()
            except BaseException as e:  # noqa: BLE001
                _unraisable(e, "Exception ignored on threading shutdown", threading)
        atexit._run_exitfuncs()
        if not _flush_std_files():
            status = 120
        _release_main_globals()
        _flush_open_files()
        # What the teardown printed: at this point of a direct run sys.stdout is gone, and
        # the streams' own deallocation flushes them, failures unreported.
        _flush_io()
        for hook in before_exit:
            hook()
    except BaseException:  # noqa: BLE001 - whatever happens, this process ends here
        if status is None:
            status = 1
    finally:
        if sigint:
            _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
            os.kill(os.getpid(), _signal.SIGINT)
            status = 128 + _signal.SIGINT
        os._exit(status & 0xFF if status is not None else 1)
