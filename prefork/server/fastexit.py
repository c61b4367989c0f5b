"""Fast executor exit: finish the call without tearing down the inherited heap.

A normal interpreter shutdown in the executor decrements the reference count of every object
the server built (modules are cleared one by one), and copy-on-write then copies the whole
heap page by page: tens to hundreds of milliseconds for a big server.  Instead, when the
outermost Python frame of the executor ends (Python 3.12+), we do what the rest of
``Py_RunMain`` does that anyone can observe, in its order, and ``os._exit``:

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

Objects the server created before the fork are not finalized (that is the point; documented
in docs/transparency.md).

Who calls ``finish()``:

- the prefork-server runner, which runs the script inside its own ``try`` and says so
  with ``caller_exits()`` before ``initialisation_complete()``: no event is armed at all;
- otherwise, for a script that called ``initialisation_complete()`` itself (its ``<module>``
  frame is the outermost, nothing of ours below it), ``install()`` arms what costs the
  script's code nothing per exception (no global ``sys.monitoring`` event while it runs):

  * its return: a local ``PY_RETURN`` event on that one code object;
  * an uncaught exception other than ``SystemExit``: ``PyErr_Print`` calls ``sys.excepthook``
    from C, with no Python frame below it.  ``sys.excepthook`` (and ``sys.__excepthook__``
    when it is the default) is a wrapper that, so called in the main thread, calls the hook
    it stands for and finishes (step 3 on; C has done steps 1 and 2 up to the hook);
  * ``SystemExit`` is handled in C without the hook, and its status is then known only to
    C: ``sys.exit`` (looked up at call time by argparse, click...; also rebound in the
    modules that did ``from sys import exit`` before the fork, under ``_EXIT_NAMES``) is
    a wrapper, the builtins ``exit()``/``quit()`` have a local ``PY_START`` event, and the
    code objects of the main module's file that name ``SystemExit`` a local ``CALL`` event
    (each call site not making a ``SystemExit`` disabled at its first call): these turn on
    the global ``PY_UNWIND`` and ``EXCEPTION_HANDLED`` events only while that
    ``SystemExit`` is in flight: the unwinding of the main module's frame finishes; once
    the exception has been caught and dropped (the next exception not raised while
    handling it), they are turned off again.  The wrapper's own frame is taken out of the
    traceback; the exception is followed by its id (and its args, held: an id is reused),
    not referenced, so that its frames die when a direct run's would.

  What none of these sees ends with the interpreter's own, slower, shutdown, after
  unfreezing the heap (as on 3.11, below), with the status and output of a direct run: a
  ``SystemExit`` raised directly outside the main module's file (``raise SystemExit(n)`` in
  another module, or a ``sys.exit`` bound under another name before the fork), an uncaught
  exception when the script has replaced ``sys.excepthook`` itself
  (``rich.traceback.install()``) or calls ours from its own.

On Python 3.11 (no ``sys.monitoring``) the executor ends with the normal shutdown, after
unfreezing the heap so that the final collection finds the cycles the server made
(``full_teardown_at_exit``).
"""

from __future__ import annotations

import _signal
import _thread
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
#: The interpreter's own ``sys.exit`` and default ``sys.excepthook``.
_REAL_EXIT = sys.exit
_DEFAULT_HOOK = sys.__excepthook__


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
    runner, which runs the script inside its own ``try``): ``install()`` then arms nothing
    and wraps nothing."""
    global _caller_exits
    _caller_exits = True


class _Watch:
    """What ``install()`` armed, and the ``SystemExit`` it follows while in flight."""

    tool = 0
    main_code: CodeType | None = None
    #: The thread that runs the script's module (the server's, the executor's main thread).
    main_thread = 0
    #: In an executor (``started()``): nothing is armed in the server itself.
    active = False
    #: ``finish()`` has begun: nothing more to watch.
    finishing = False
    #: The global events are on.
    armed = False
    #: The main thread called ``sys.exit``/``exit()``; its exception has not left it yet.
    main_pending = False
    #: ``id()`` of the exception that call raised, while it is followed (0: none).  Not a
    #: reference: its traceback's frames must die when a direct run's would.
    exiting = 0
    #: Its ``args``, held (a new exception can take the address of a dead one), when they
    #: are plain values whose lifetime nobody can see; else None (the id alone).
    exiting_args: tuple[object, ...] | None = None
    #: That exception was last seen entering a handler (``except``, ``finally``, ``with``).
    handled = False
    #: Other threads' ``sys.exit`` calls whose wrapper frame is still to take out.
    other_exits = 0


_watch = _Watch()
_EVENTS_WHILE_EXITING = 0


def install() -> bool:
    """Arrange the fast exit in this (server) process for its executors; False if not
    possible here.  Nothing is armed until ``started()`` (in the executor)."""
    global _EVENTS_WHILE_EXITING
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
    w = _watch
    w.tool = tool
    w.main_code = _outermost_code()
    w.main_thread = _thread.get_ident()
    events = mon.events
    _EVENTS_WHILE_EXITING = events.PY_UNWIND | events.EXCEPTION_HANDLED
    mon.register_callback(tool, events.PY_RETURN, _on_return)
    mon.register_callback(tool, events.PY_UNWIND, _on_unwind)
    mon.register_callback(tool, events.EXCEPTION_HANDLED, _on_handled)
    mon.register_callback(tool, events.PY_START, _on_quit)
    mon.register_callback(tool, events.CALL, _on_call)
    for code in _raisers(w.main_code):
        mon.set_local_events(tool, code, events.CALL)
    mon.set_local_events(tool, w.main_code, events.PY_RETURN | (
        events.CALL if w.main_code in _raisers(w.main_code) else 0))
    quitter = getattr(sys.modules.get("_sitebuiltins"), "Quitter", None)
    quit_code = getattr(vars(quitter).get("__call__") if quitter else None, "__code__", None)
    if quit_code is not None:
        _EXIT_CODES[quit_code] = False
        mon.set_local_events(tool, quit_code, events.PY_START)
    _wrap_exit()
    _wrap_excepthook()
    # Ended by the interpreter after all (what the above does not see): as on 3.11.
    atexit.register(_normal_exit)
    return True


def started() -> None:
    """In the executor, once forked: the wrappers and callbacks act from now on."""
    _watch.active = True


def _on_return(code: CodeType, offset: int, retval: object) -> object:
    if code is _watch.main_code and _watch.active and not _watch.finishing:
        finish(0, None)
    return sys.monitoring.DISABLE  # type: ignore[attr-defined,unused-ignore]


def _arm() -> None:
    """Turn the global events on (a ``SystemExit`` is about to be raised)."""
    w = _watch
    if not w.armed:
        w.armed = True
        sys.monitoring.set_events(w.tool, _EVENTS_WHILE_EXITING)  # type: ignore[attr-defined,unused-ignore]


def _disarm_if_idle() -> None:
    w = _watch
    if w.armed and not w.main_pending and not w.exiting and not w.other_exits:
        w.armed = False
        sys.monitoring.set_events(w.tool, 0)  # type: ignore[attr-defined,unused-ignore]


def _exit_called() -> None:
    """``sys.exit`` or ``exit()`` is about to raise ``SystemExit`` in this thread."""
    w = _watch
    if not w.active or w.finishing:
        return
    if _thread.get_ident() == w.main_thread:
        w.main_pending = True
    else:
        w.other_exits += 1
    _arm()


def _on_quit(code: CodeType, offset: int) -> object:
    _exit_called()
    return None


def _exit(*args: Any, **kwargs: Any) -> Any:
    """``sys.exit`` in an executor: arms the events, then raises as ``sys.exit``."""
    _exit_called()
    return _REAL_EXIT(*args, **kwargs)


#: Code objects that raise the ``SystemExit`` followed, each saying whether its own frame
#: is taken out of the traceback (``sys.exit`` is a C function: no frame of its own).
_EXIT_CODES: dict[CodeType, bool] = {_exit.__code__: True}


def _raisers(code: CodeType) -> list[CodeType]:
    """The code objects of the main module (the module's and every function's, class's...
    in it) that name ``SystemExit``: where ``raise SystemExit(n)`` may be written."""
    found = []
    todo = [code]
    while todo:
        c = todo.pop()
        if "SystemExit" in c.co_names:
            found.append(c)
        todo.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return found


def _on_call(code: CodeType, offset: int, callable: object, arg0: object) -> object:
    """A call made by the main module's code that names ``SystemExit``: the events are
    armed if it makes a ``SystemExit`` (in the main thread), else this call site is not
    watched again."""
    if isinstance(callable, type) and issubclass(callable, SystemExit):
        w = _watch
        if w.active and not w.finishing and _thread.get_ident() == w.main_thread:
            w.main_pending = True
            _arm()
        return None
    return sys.monitoring.DISABLE  # type: ignore[attr-defined,unused-ignore]


def _adopt(exc: BaseException) -> None:
    """In the main thread, after a ``SystemExit`` was made (``_on_call``): the first one
    seen raised is followed."""
    w = _watch
    if w.main_pending and isinstance(exc, SystemExit) and not _is_followed(exc):
        w.main_pending = False
        w.exiting = id(exc)
        args = exc.args
        w.exiting_args = args if all(type(a) in _PLAIN for a in args) else None
        w.handled = False


def _on_unwind(code: CodeType, offset: int, exc: BaseException) -> object:
    w = _watch
    if w.finishing:
        return None
    if code is w.main_code:
        finish(None, exc)
    strip = _EXIT_CODES.get(code)
    if strip is not None:
        tb = exc.__traceback__
        if strip and tb is not None and tb.tb_frame.f_code is code:
            exc.__traceback__ = tb.tb_next
        if _thread.get_ident() == w.main_thread:
            w.main_pending = False
            w.exiting = id(exc)
            args = exc.args
            w.exiting_args = args if all(type(a) in _PLAIN for a in args) else None
            w.handled = False
        else:
            w.other_exits = max(0, w.other_exits - 1)
            _disarm_if_idle()
    elif _thread.get_ident() == w.main_thread:
        _adopt(exc)
        if _is_followed(exc):
            w.handled = False
        elif w.handled:
            _check_dropped(exc)
    return None


def _on_handled(code: CodeType, offset: int, exc: BaseException) -> object:
    w = _watch
    if w.finishing or _thread.get_ident() != w.main_thread:
        return None
    _adopt(exc)
    if _is_followed(exc):
        w.handled = True
    elif w.handled:
        _check_dropped(exc)
    return None


_PLAIN = (int, str, bool, float, bytes, type(None))


def _is_followed(exc: BaseException) -> bool:
    w = _watch
    return id(exc) == w.exiting and (w.exiting_args is None or exc.args is w.exiting_args)


def _check_dropped(exc: BaseException) -> None:
    """Another exception while the followed one was last seen entering a handler: if it is
    not raised while handling that one (a ``finally`` or ``__exit__`` cleaning up), the
    followed one was caught and the script goes on: stop following it."""
    w = _watch
    ctx: BaseException | None = exc
    for _ in range(100):
        if ctx is None:
            break
        if _is_followed(ctx):
            return
        ctx = ctx.__context__
    now = sys.exception()  # type: ignore[attr-defined,unused-ignore]
    if now is not None and _is_followed(now):
        return
    w.exiting = 0
    w.exiting_args = None
    w.handled = False
    _disarm_if_idle()


def _like(wrapper: Callable[..., Any], real: Any) -> None:
    """Give ``wrapper`` the name, module and documentation of the callable it stands for
    (a builtin, or a hook the script set: maybe an object without them)."""
    for attr in ("__name__", "__qualname__", "__module__", "__doc__"):
        try:
            setattr(wrapper, attr, getattr(real, attr))
        except (AttributeError, TypeError):
            pass
    wrapper.__wrapped__ = real  # type: ignore[attr-defined]


#: Names under which a module may have bound ``sys.exit`` (``from sys import exit``).
_EXIT_NAMES = ("exit", "sys_exit")


def _wrap_exit() -> None:
    """``sys.exit`` becomes ``_exit``, there and in the modules that bound it under one of
    ``_EXIT_NAMES`` (a look-up per module: a scan of every global took 7 ms at start-up)."""
    _like(_exit, _REAL_EXIT)
    for mod in list(sys.modules.values()):
        try:  # (a module: no lazy module's __getattr__ is called)
            names = object.__getattribute__(mod, "__dict__")
        except AttributeError:
            continue
        if type(names) is not dict or names is globals():
            continue
        for name in _EXIT_NAMES:
            if names.get(name) is _REAL_EXIT:
                names[name] = _exit


def _hook_wrapper(hook: Callable[..., Any]) -> Callable[..., Any]:
    """A ``sys.excepthook`` standing for ``hook``: called from C with no Python frame below
    (``PyErr_Print`` after the main module ended with an exception), in the main thread of
    an executor, it calls ``hook`` and finishes; otherwise it is ``hook``."""
    def excepthook(typ: type[BaseException], value: BaseException,
                   tb: TracebackType | None) -> Any:
        w = _watch
        if w.active and not w.finishing and _thread.get_ident() == w.main_thread:
            try:
                sys._getframe(1)
                top = False
            except ValueError:
                top = True
            if top:  # (not from the except clause: the hook runs with no exception set)
                _finish(None, value, hook)
        return hook(typ, value, tb)

    _like(excepthook, hook)
    return excepthook


def _wrap_excepthook() -> None:
    default = _hook_wrapper(_DEFAULT_HOOK)
    hook = getattr(sys, "excepthook", None)
    if hook is None:
        return
    sys.excepthook = default if hook is _DEFAULT_HOOK else _hook_wrapper(hook)
    if sys.__excepthook__ is _DEFAULT_HOOK:
        sys.__excepthook__ = default


def _normal_exit() -> None:
    """At ``atexit`` of an executor ending with the interpreter's own shutdown: as on 3.11,
    let the final collection find the server's cycles; then what ``finish()`` runs last."""
    if not _watch.active or _watch.finishing:
        return
    gc.unfreeze()
    for hook in before_exit:
        hook()


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
    _DEFAULT_HOOK(type(exc), exc, exc.__traceback__)


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
        return 1, type(exc) is KeyboardInterrupt
    return _call_hook(hook, exc)


def _call_hook(hook: Callable[..., Any], exc: BaseException) -> tuple[int, bool]:
    """``PyErr_Print`` from the call of ``sys.excepthook`` on: (exit status, exit by
    SIGINT)."""
    try:
        hook(type(exc), exc, exc.__traceback__)
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
    _finish(status, exc, None)


def _finish(status: int | None, exc: BaseException | None,
            hook: Callable[..., Any] | None) -> None:
    """``finish()``; with ``hook``, from the call of ``sys.excepthook`` by ``PyErr_Print``
    on (C has flushed, set ``sys.last_exc`` and audited): ``hook`` is called as C would."""
    _watch.finishing = True
    sigint = False
    try:
        if hook is not None:
            assert exc is not None
            status, sigint = _call_hook(hook, exc)
            exc = None
        else:
            _flush_io()
            if exc is not None:
                status, sigint = _print_exit(exc)
                exc = None
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
        for report in before_exit:
            report()
    except BaseException:  # noqa: BLE001 - whatever happens, this process ends here
        if status is None:
            status = 1
    finally:
        if sigint:
            _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
            os.kill(os.getpid(), _signal.SIGINT)
            status = 128 + _signal.SIGINT
        os._exit(status & 0xFF if status is not None else 1)
