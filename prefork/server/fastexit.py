"""Fast executor exit: finish the call without tearing down the inherited heap.

A normal interpreter shutdown in the executor decrements the reference count of every object
the server built (modules are cleared one by one), and copy-on-write then copies the whole
heap page by page: tens to hundreds of milliseconds for a big server.  Instead, when the
outermost Python frame of the executor returns or unwinds (``sys.monitoring``, Python 3.12+),
we do what ``Py_FinalizeEx`` does that anyone can observe, and ``os._exit``:

1. the exit status as CPython computes it (``SystemExit`` code, traceback + 1, or
   ``KeyboardInterrupt`` → traceback + death by SIGINT);
2. wait for non-daemon threads (``threading._shutdown``);
3. run ``atexit`` handlers (this includes ``weakref.finalize`` and ``logging.shutdown``);
4. release objects the script's ``__main__`` created during the call and collect cycles, so
   their ``__del__`` methods run; flush every open file object created since the fork
   (unclosed files keep their data, as after a direct run);
5. flush stdout/stderr; a failing flush prints ``Exception ignored ...`` and gives 120.

On Python 3.11 (no ``sys.monitoring``) the executor ends with the normal shutdown.
"""

from __future__ import annotations

import gc
import os
import signal
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import CodeType, TracebackType

AVAILABLE = sys.version_info >= (3, 12)
_TOOL_IDS = (4, 3)


def _outermost_code() -> CodeType:
    frame = sys._getframe()
    while frame.f_back is not None:
        frame = frame.f_back
    return frame.f_code


def install() -> bool:
    """Arrange the fast exit in this (executor) process; False if not possible here."""
    if not AVAILABLE:
        return False
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
    err = sys.stderr
    try:
        if err is not None:
            err.write(text)
            err.flush()
            return
    except Exception:  # noqa: BLE001 - mirrors CPython's fallback to the C-level stderr
        pass
    try:
        os.write(2, text.encode("utf-8", "backslashreplace"))
    except OSError:
        pass


def _status_of(exc: BaseException) -> tuple[int, bool]:
    """(exit status, died of KeyboardInterrupt) as CPython's PyErr_Print would give."""
    if isinstance(exc, SystemExit):
        code = exc.code
        if code is None:
            return 0, False
        if isinstance(code, int):
            return code & 0xFF, False
        _write_stderr(f"{code}\n")
        return 1, False
    tb: TracebackType | None = exc.__traceback__
    try:
        sys.excepthook(type(exc), exc, tb)
    except Exception:  # noqa: BLE001
        pass
    return 1, isinstance(exc, KeyboardInterrupt)


def _flush_post_fork_files() -> None:
    import io

    kinds = (io.BufferedWriter, io.BufferedRandom, io.TextIOWrapper)
    for obj in gc.get_objects():
        if isinstance(obj, kinds) and obj not in (sys.stdout, sys.stderr):
            try:
                if not obj.closed:
                    obj.flush()
            except Exception:  # noqa: BLE001, S112 - as a dealloc would: ignored
                continue


def _release_main_globals() -> None:
    """Drop what __main__ created during the call (objects tracked by the GC since the
    fork: the server's heap is frozen), so finalizers run as they would at shutdown."""
    main = sys.modules.get("__main__")
    if main is None:
        return
    recent = {id(o) for o in gc.get_objects()}
    d = main.__dict__
    for name in [n for n, v in d.items() if id(v) in recent and not n.startswith("__")]:
        try:
            del d[name]
        except KeyError:
            pass
    gc.collect()


def finish(status: int | None, exc: BaseException | None) -> None:
    """Exit the executor now, as the end of the interpreter would, but without teardown."""
    sigint = False
    try:
        if exc is not None:
            status, sigint = _status_of(exc)
            del exc
        assert status is not None
        threading = sys.modules.get("threading")
        if threading is not None:
            try:
                threading._shutdown()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001
                pass
        import atexit

        atexit._run_exitfuncs()
        _release_main_globals()
        _flush_post_fork_files()
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if stream is None:
                continue
            try:
                if not stream.closed:
                    stream.flush()
            except Exception as e:  # noqa: BLE001
                _write_stderr(f"Exception ignored in: {stream!r}\n"
                              f"{type(e).__name__}: {e}\n")
                if status == 0:
                    status = 120
    except BaseException:  # noqa: BLE001 - whatever happens, this process ends here
        if status is None:
            status = 1
    finally:
        if sigint:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            status = 128 + signal.SIGINT
        os._exit(status if status is not None else 1)
