"""Running a script as ``__main__``: the file to run (or the program a ``--wrap`` wrapper stands
for), the process made to look like ``python SCRIPT ARGS``, and the run itself, ended as CPython
ends a file it runs (traceback from the script's own frame, status 1, SIGINT death)."""

from __future__ import annotations

import os
import sys
import types

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import CodeType, TracebackType

PROG = "prefork-server"
#: A usage error, or a script that cannot be opened (as ``python``).
EXIT_USAGE = 2
#: A failed ``--wrap`` / ``--explain``.
EXIT_ERROR = 1

#: Second or third line of a wrapper made by ``--wrap``: the program it stands for.
WRAP_MARKER = b"# prefork-server-wrap: "
#: Marks the modules a wrapper preloads in setup (learned by ``--wrap NAME -- ARGS``).
PRELOAD_MARKER = b"# prefork-server-preload:"
#: Marks the arguments a wrapper's server rehearses with (``--wrap NAME --rehearse -- ARGS``):
#: a JSON list of strings.
REHEARSE_MARKER = b"# prefork-server-rehearse:"
#: How many bytes of a program are read to find its ``#!`` line and our marker.
HEAD = 4096


class RunnerError(Exception):
    """A failure; the text is the whole message (``prefork-server: ...``; ``bare``: as
    given, to imitate the interpreter's own), ``status`` the exit status."""

    def __init__(self, message: str, status: int = EXIT_ERROR, *, bare: bool = False) -> None:
        super().__init__(message if bare else f"{PROG}: {message}")
        self.status = status


def _read(path: str) -> tuple[bytes, OSError | None]:
    """The file's bytes, or why it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(), None
    except OSError as e:
        return b"", e


class Script:
    """The file to run, as a direct ``python SCRIPT`` would see it."""

    def __init__(self, given: str) -> None:
        self.given = given
        self.wrapper: str | None = None
        path = os.path.abspath(given)
        source, e = _read(path)
        if e is not None:
            raise RunnerError(f"{sys.executable}: can't open file {path!r}: "
                              f"[Errno {e.errno}] {e.strerror}", EXIT_USAGE, bare=True)
        target = wrapped_target(source)
        #: Modules the wrapper names for setup to preload.
        self.preload: list[str] = []
        #: The arguments the wrapper's server rehearses with (None: no rehearsal).
        self.rehearse: list[str] | None = None
        if target is not None:
            self.wrapper = path
            self.preload = wrapper_preloads(source)
            self.rehearse = wrapper_rehearsal(source)
            path = os.path.abspath(target)
            source, e = _read(path)
            if e is not None:
                raise RunnerError(f"{given} is a wrapper for {target}, which cannot "
                                  f"be opened: {e.strerror}", EXIT_USAGE)
        #: What ``sys.argv[0]`` is: as given, or the wrapped program's path.
        self.argv0 = given if target is None else target
        #: ``__file__`` and the code's file name: absolute, symlinks kept (as CPython).
        self.path = path
        #: ``sys.path[0]`` of a direct run: the directory of the real path.
        self.path0 = os.path.dirname(os.path.realpath(path))
        self.source = source
        self.code: CodeType | None = None

    def compile(self) -> CodeType:
        """The script's code, as CPython compiles ``__main__`` (no inherited future flags)."""
        if self.code is None:
            self.code = compile(self.source, self.path, "exec", dont_inherit=True)
        return self.code

    def reload_paths(self) -> list[str]:
        """Files whose change makes a server of this script stale."""
        return [p for p in (self.wrapper, self.path) if p is not None]


def wrapped_target(source: bytes) -> str | None:
    """The program a ``--wrap`` wrapper stands for (its marker line), else None."""
    for line in source[:HEAD].split(b"\n")[1:4]:
        if line.startswith(WRAP_MARKER):
            return os.fsdecode(line[len(WRAP_MARKER):].rstrip(b"\r"))
    return None


def wrapper_preloads(source: bytes) -> list[str]:
    """The modules a wrapper's preload lines name (the comment block after its ``#!``)."""
    names: list[str] = []
    for line in source.split(b"\n")[1:]:
        if line.startswith(PRELOAD_MARKER):
            names += os.fsdecode(line[len(PRELOAD_MARKER):]).split()
        elif not line.startswith(b"#"):
            break
    return names


def wrapper_rehearsal(source: bytes) -> list[str] | None:
    """The arguments a wrapper's rehearse line gives (the comment block after its ``#!``)."""
    import json

    for line in source.split(b"\n")[1:]:
        if line.startswith(REHEARSE_MARKER):
            try:
                args = json.loads(line[len(REHEARSE_MARKER):].decode("utf-8", "surrogateescape"))
            except ValueError:
                return None
            if isinstance(args, list) and all(isinstance(a, str) for a in args):
                return args
            return None
        if not line.startswith(b"#"):
            break
    return None


def main_module(path: str) -> types.ModuleType:
    """A fresh ``__main__`` with the globals CPython gives a script run from a file."""
    import builtins
    from importlib.machinery import SourceFileLoader

    mod = types.ModuleType("__main__")
    d = mod.__dict__
    d["__loader__"] = SourceFileLoader("__main__", path)
    if sys.version_info < (3, 14):
        d["__annotations__"] = {}
    d["__builtins__"] = builtins
    d["__file__"] = path
    d["__cached__"] = None
    return mod


def enter(script: Script, args: list[str]) -> types.ModuleType:
    """Make the process look like ``python SCRIPT ARGS`` at its first line."""
    sys.argv[:] = [script.argv0, *args]
    if not sys.flags.safe_path:
        # The interpreter put its own entry first (the launcher's directory, or the cwd for
        # -m/-c): a direct run has the script's directory there instead.
        if sys.path:
            sys.path[0] = script.path0
        else:
            sys.path.insert(0, script.path0)
    mod = main_module(script.path)
    sys.modules["__main__"] = mod
    return mod


def _silent_hook(etype: type[BaseException], value: BaseException,
                 tb: TracebackType | None) -> None:
    """Stands in for ``sys.excepthook`` once the real one has printed the exception."""


def run(script: Script, module: types.ModuleType) -> None:
    """Run the script in ``module``; an uncaught exception ends it as CPython would."""
    code = None
    # The script's <module> runs below our frames (launcher, main, run ...): allow that
    # many more, so that it recurses exactly as deep as in a direct run.
    # (Before 3.12 the C calls of exec() count too.)
    depth = 0 if sys.version_info >= (3, 12) else 2
    frame: types.FrameType | None = sys._getframe()
    while frame is not None:
        depth += 1
        frame = frame.f_back
    sys.setrecursionlimit(sys.getrecursionlimit() + depth)
    try:
        code = script.compile()
        exec(code, module.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:  # reported as the interpreter reports it
        # Drop our own frames (this one, and none at all for a SyntaxError from compile):
        # the traceback starts at the script's <module>, as in a direct run.
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code is not code:
            tb = tb.tb_next
        exc = exc.with_traceback(tb)
        sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, tb
        if sys.version_info >= (3, 12):
            sys.last_exc = exc
        sys.excepthook(type(exc), exc, tb)
        if isinstance(exc, KeyboardInterrupt):
            # The interpreter (or prefork's fast exit) ends by dying of SIGINT after atexit;
            # the traceback is already out.
            sys.excepthook = _silent_hook
            raise
        raise SystemExit(1) from None
