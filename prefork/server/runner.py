"""prefork-server: run an unmodified Python script, or an installed program, through prefork-interp.

Usage::

    #!/usr/bin/prefork-interp -U,prefork-server              first line of an unmodified script
    prefork-interp -U prefork-server "$(command -v some-cli)" ARGS...   an installed program
    prefork-server --wrap some-cli > ~/bin/some-cli          a ready #! wrapper for it
    #!/usr/bin/prefork-interp -U,/opt/venv/bin/python,-m,prefork.server   another environment

Under prefork-interp (``PREFORK_INTERP`` set), in setup::

    read SCRIPT (a wrapper made by --wrap names the program it stands for)
    sys.argv = [SCRIPT, *ARGS]; sys.path[0] = SCRIPT's directory; a fresh __main__ module
    ┌ fds 1 and 2 captured (memfd) ─────────────────────────────────────────────────────┐
    │ compile SCRIPT (its SyntaxWarnings land in the capture)                             │
    │ import the module-level imports found by ``ast`` (failures skipped: the script     │
    │ raises them itself later), then every --preload MODULE                              │
    └─────────────────────────────────────────────────────────────────────────────────────┘
    prefork.initialisation_complete(autoreload_extra=[SCRIPT, program, --reload-also...])

and in each executor: replay the captured output (import-time warnings and prints appear
on every call, as in a direct run), then run the compiled script as ``__main__``.  A
direct run by hand (no ``PREFORK_INTERP``) takes the same path without the server and the
preload, so a script can be checked to behave the same with and without the helper.

The script runs as CPython runs a file: ``__file__`` absolute, ``sys.argv[0]`` as given,
``sys.path[0]`` the directory of the real path (unless ``-P``/``-I``/``PYTHONSAFEPATH``),
the same ``__main__`` globals, code compiled without our ``__future__`` flags.  An uncaught
exception is printed by ``sys.excepthook`` with a traceback starting at the script's own
frame; the status is 1, or death by SIGINT for ``KeyboardInterrupt``, after ``atexit``.

Exit statuses: the script's own; 2 for a usage error or a script that cannot be opened
(as ``python``); 1 for a failed ``--wrap``/``--explain``; 127 when the server cannot serve.
"""

from __future__ import annotations

import ast
import os
import sys
import time
import types

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator
    from types import CodeType, TracebackType

PROG = "prefork-server"
EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_CANNOT_SERVE = 127

#: Second or third line of a wrapper made by ``--wrap``: the program it stands for.
WRAP_MARKER = b"# prefork-server-wrap: "
#: Options that take a value (the first word that is neither these nor an option is SCRIPT).
_VALUE_OPTIONS = frozenset({"--preload", "--reload-also", "--wrap", "--client"})
#: How many bytes of a program are read to find its ``#!`` line and our marker.
_HEAD = 4096
#: Longest ``#!`` line Linux reads whole (BINPRM_BUF_SIZE, since Linux 5.1).
SHEBANG_MAX = 255


class RunnerError(Exception):
    """A failure; the text is the whole message (``prefork-server: ...``; ``bare``: as
    given, to imitate the interpreter's own), ``status`` the exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED, *, bare: bool = False) -> None:
        super().__init__(message if bare else f"{PROG}: {message}")
        self.status = status


# ------------------------------------------------------------------ the script


class Script:
    """The file to run, as a direct ``python SCRIPT`` would see it."""

    def __init__(self, given: str) -> None:
        self.given = given
        self.wrapper: str | None = None
        path = os.path.abspath(given)
        try:
            with open(path, "rb") as f:
                source = f.read()
        except OSError as e:
            raise RunnerError(f"{sys.executable}: can't open file {path!r}: "
                              f"[Errno {e.errno}] {e.strerror}", EXIT_USAGE, bare=True) from None
        target = wrapped_target(source)
        if target is not None:
            self.wrapper = path
            path = os.path.abspath(target)
            try:
                with open(path, "rb") as f:
                    source = f.read()
            except OSError as e:
                raise RunnerError(f"{given} is a wrapper for {target}, which cannot "
                                  f"be opened: {e.strerror}", EXIT_USAGE) from None
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
    for line in source[:_HEAD].split(b"\n")[1:4]:
        if line.startswith(WRAP_MARKER):
            return os.fsdecode(line[len(WRAP_MARKER):].rstrip(b"\r"))
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


# ------------------------------------------------------------------ running it


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


# ------------------------------------------------------------------ finding imports


class Found:
    """One module to preload and the reason: the source line, or an option."""

    __slots__ = ("name", "quiet", "why")

    def __init__(self, name: str, why: str, quiet: bool = False) -> None:
        self.name = name
        self.why = why
        #: ``from X import name``: X.name may be a submodule, or just an attribute.
        self.quiet = quiet


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements run at module level: top level, and inside top-level if / try /
    with blocks (not under ``if TYPE_CHECKING:``; not in functions or classes)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try | ast.TryStar):
            yield from _module_level(node.body)
            for handler in node.handlers:
                yield from _module_level(handler.body)
            yield from _module_level(node.orelse)
            yield from _module_level(node.finalbody)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)


def find_imports(source: bytes, filename: str) -> list[Found]:
    """The modules ``source`` imports at module level, in order, without running it.

    Relative imports are skipped (a script has no package).  ``from X import a`` gives X and
    the quiet candidate ``X.a``.  A source that does not parse gives nothing.
    """
    import warnings

    with warnings.catch_warnings():
        # The parser's SyntaxWarnings belong to the real compile, not to this look-ahead.
        warnings.simplefilter("ignore")
        try:
            tree = ast.parse(source, filename)
        except (SyntaxError, ValueError):
            return []
    lines = source.decode("utf-8", "replace").splitlines()
    found: list[Found] = []
    seen: set[str] = set()

    def add(name: str, why: str, quiet: bool = False) -> None:
        if name not in seen:
            seen.add(name)
            found.append(Found(name, why, quiet))

    for node in _module_level(tree.body):
        text = lines[node.lineno - 1].strip() if node.lineno <= len(lines) else ""
        why = f"line {node.lineno}: {text}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, why)
        elif node.level == 0 and node.module:
            add(node.module, why)
            for alias in node.names:
                if alias.name != "*":
                    add(f"{node.module}.{alias.name}", why, quiet=True)
    return found


# ------------------------------------------------------------------ preloading


class Result:
    """How one preload went."""

    __slots__ = ("error", "found", "ns", "skipped")

    def __init__(self, found: Found) -> None:
        self.found = found
        self.ns = 0
        self.error: str | None = None
        #: Not attempted: already loaded, or X.a where ``a`` is not a submodule.
        self.skipped: str | None = None


def preload_one(found: Found) -> Result:
    """Import one module; a failure is recorded, never raised (the script raises it itself).

    After a failure every module that import loaded is dropped from ``sys.modules`` too, so
    that the script's own import runs them again, as in a direct run (their import-time
    output included)."""
    import importlib

    res = Result(found)
    name = found.name
    if name in sys.modules:
        res.skipped = "already loaded"
        return res
    if found.quiet:
        parent_name, _, attr = name.rpartition(".")
        parent = sys.modules.get(parent_name)
        if parent is None or not hasattr(parent, "__path__"):
            res.skipped = "not a package's submodule"
            return res
        if hasattr(parent, attr) and not isinstance(getattr(parent, attr), types.ModuleType):
            res.skipped = "an attribute, not a module"
            return res
    before = set(sys.modules)
    t0 = time.perf_counter_ns()
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if found.quiet and e.name == name:
            res.skipped = "an attribute, not a module"
        else:
            res.error = f"{type(e).__name__}: {e}"
    except (Exception, SystemExit) as e:  # noqa: BLE001 - any failure: the script meets it
        res.error = f"{type(e).__name__}: {e}"
    res.ns = time.perf_counter_ns() - t0
    if res.error is not None:
        for mod in set(sys.modules) - before:
            del sys.modules[mod]
    return res


class Capture:
    """Holds what fds 1 and 2 receive (Python- or C-level) in anonymous memory files, so
    that import-time output can be replayed on every call; a failed import's output is
    dropped (the script runs that import again itself)."""

    FDS = (1, 2)

    def __init__(self) -> None:
        self.saved: dict[int, int] = {}
        self.mem: dict[int, int] = {}
        _flush_std()
        for fd in self.FDS:
            try:
                saved = os.dup(fd)
            except OSError:
                continue
            try:
                mem = os.memfd_create(f"prefork-preload-{fd}", os.MFD_CLOEXEC)
            except (OSError, AttributeError):
                os.close(saved)
                continue
            os.dup2(mem, fd, inheritable=True)
            self.saved[fd] = saved
            self.mem[fd] = mem

    def mark(self) -> dict[int, int]:
        """Where each capture stands now."""
        _flush_std()
        return {fd: os.lseek(m, 0, os.SEEK_CUR) for fd, m in self.mem.items()}

    def rewind(self, mark: dict[int, int]) -> None:
        """Forget what was captured since ``mark``."""
        _flush_std()
        for fd, m in self.mem.items():
            os.ftruncate(m, mark[fd])
            os.lseek(m, mark[fd], os.SEEK_SET)

    def finish(self) -> dict[int, bytes]:
        """Put fds 1 and 2 back; return what each received."""
        _flush_std()
        out: dict[int, bytes] = {}
        for fd, m in self.mem.items():
            os.dup2(self.saved[fd], fd, inheritable=True)
            os.close(self.saved[fd])
            size = os.fstat(m).st_size
            out[fd] = os.pread(m, size, 0) if size else b""
            os.close(m)
        self.saved.clear()
        self.mem.clear()
        return out


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


def replay(captured: dict[int, bytes]) -> None:
    """Write the captured import-time output to this call's fds 1 and 2."""
    for fd, data in captured.items():
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except OSError:
                break
            view = view[n:]


def plan_preload(script: Script, preload: list[str], scan: bool) -> list[Found]:
    """What setup imports: the script's module-level imports (unless ``scan`` is off), then
    the ``--preload`` modules."""
    found = find_imports(script.source, script.path) if scan else []
    names = {f.name for f in found}
    found += [Found(m, "--preload") for m in preload if m not in names]
    return found


# ------------------------------------------------------------------ modes


def serve(script: Script, opts: argparse.Namespace) -> None:
    """Setup under prefork-interp: preload, become the server; returns in each executor."""
    import prefork

    module = enter(script, opts.args)
    capture = Capture()
    try:
        try:
            script.compile()
        except (SyntaxError, ValueError):
            pass  # raised again, and reported, when the script runs
        for found in plan_preload(script, opts.preload, not opts.no_preload):
            mark = capture.mark()
            if preload_one(found).error is not None:
                capture.rewind(mark)
    finally:
        captured = capture.finish()
    prefork.initialisation_complete(
        autoreload_extra=[*script.reload_paths(), *opts.reload_also])
    # In the executor: sys.argv is [SCRIPT as the client gave it, *ARGS].
    if sys.argv and os.path.abspath(sys.argv[0]) != os.path.abspath(script.given):
        raise RunnerError(f"{sys.argv[0]} is not the script this server was started for "
                          f"({script.given}): give an absolute path when using --any-cwd",
                          EXIT_CANNOT_SERVE)
    if sys.argv:
        sys.argv[0] = script.argv0
    replay(captured)
    run(script, module)


def run_direct(script: Script, opts: argparse.Namespace) -> None:
    """By hand: the same start as under prefork-interp, without server or preload."""
    run(script, enter(script, opts.args))


def explain(script: Script, opts: argparse.Namespace) -> int:
    """Print what setup would preload and why, what each import costs, and fork hazards."""
    out = sys.stdout
    title = script.given if script.wrapper is None else \
        f"{script.given} (wrapper for {script.path})"
    out.write(f"{PROG}: {title}\n")
    interp = shebang_python(script.source)
    if interp is not None and not _same_python(interp[0]):
        out.write(f"warning: its #! names {interp[0]}, not this interpreter "
                  f"({sys.executable}): its imports may fail here; "
                  f"`{PROG} --wrap` makes a wrapper that uses the right one\n")
    plan = plan_preload(script, opts.preload, not opts.no_preload)
    enter(script, opts.args)
    threads_before = _task_count()
    fds_before = _fd_targets()
    total = 0
    results = [preload_one(f) for f in plan]
    out.write("preload (module-level imports, in order; time includes what each pulls in):\n")
    if not results:
        out.write("  nothing\n")
    for res in results:
        total += res.ns
        if res.skipped is not None:
            if res.skipped == "already loaded":
                what = "loaded"
            elif res.found.quiet:
                continue
            else:
                what = "skip"
        elif res.error is not None:
            what = "FAILS"
        else:
            what = f"{res.ns / 1e6:7.1f} ms"
        out.write(f"  {what:>10}  {res.found.name:<32} {res.found.why}\n")
        if res.error is not None:
            out.write(f"  {'':>10}  -> {res.error} (not preloaded: the script meets it "
                      "itself)\n")
    out.write(f"total {total / 1e6:.1f} ms, {len(sys.modules)} modules loaded\n")
    hazards = 0
    threads = _task_count() - threads_before
    if threads > 0:
        hazards += 1
        names = _thread_names()
        out.write(f"warning: {threads} thread(s) started during preload{names}: after the "
                  "fork only the calling thread exists in each call (see README, fork "
                  "hazards)\n")
    new_fds = {fd: t for fd, t in _fd_targets().items() if fds_before.get(fd) != t}
    for fd, target in sorted(new_fds.items()):
        hazards += 1
        out.write(f"warning: fd {fd} ({target}) opened during preload is shared by every "
                  "call (see README, fork hazards)\n")
    if not hazards:
        out.write("no threads started and no files or sockets left open by the preload\n")
    out.write("modules the script imports only while it runs are not preloaded: "
              "`python -X importtime SCRIPT ARGS` lists them; add them with --preload\n")
    return 0


def _task_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _thread_names() -> str:
    threading = sys.modules.get("threading")
    if threading is None:
        return ""
    names = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    return f" ({', '.join(names)})" if names else ""


def _fd_targets() -> dict[int, str]:
    targets = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return {}
    for name in names:
        try:
            targets[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    return targets


# ------------------------------------------------------------------ --wrap


def shebang_python(source: bytes) -> tuple[str, list[str]] | None:
    """(interpreter, its arguments) from a ``#!`` line, resolving ``/usr/bin/env [-S] NAME``
    on PATH; None without a ``#!`` line."""
    import shutil

    if not source.startswith(b"#!"):
        return None
    line = os.fsdecode(source[2:].split(b"\n", 1)[0].rstrip(b"\r")).strip()
    interp, _, rest = line.partition(" ")
    rest = rest.strip()
    args = [rest] if rest else []
    if os.path.basename(interp) == "env" and rest:
        words = rest.split()
        if words[0] == "-S":
            words = words[1:]
        while words and ("=" in words[0] or words[0].startswith("-")):
            words = words[1:]
        if not words:
            return None
        found = shutil.which(words[0])
        interp = found if found is not None else words[0]
        args = words[1:]
    return interp, args


def _same_python(interp: str) -> bool:
    try:
        return os.path.samefile(interp, sys.executable)
    except OSError:
        return False


def find_program(name: str) -> str:
    """The program NAME on PATH (or NAME itself if it has a ``/``), skipping our own output
    file (``--wrap x > ~/bin/x`` truncates it before we look) and empty files, and seeing
    through an existing wrapper to the program it stands for."""
    try:
        out_st: os.stat_result | None = os.fstat(1)
    except OSError:
        out_st = None
    if "/" in name:
        candidates = [name]
    else:
        candidates = [os.path.join(d or ".", name)
                      for d in os.environ.get("PATH", os.defpath).split(os.pathsep)]
    for cand in candidates:
        try:
            st = os.stat(cand)
        except OSError:
            continue
        if not (os.path.isfile(cand) and os.access(cand, os.X_OK)):
            continue
        if out_st is not None and (st.st_dev, st.st_ino) == (out_st.st_dev, out_st.st_ino):
            continue
        if st.st_size == 0:
            continue
        with open(cand, "rb") as f:
            head = f.read(_HEAD)
        target = wrapped_target(head)
        return os.path.abspath(cand if target is None else target)
    raise RunnerError(f"{name}: no such program" + ("" if "/" in name else " on PATH"))


def find_client(explicit: str | None) -> str:
    """Our prefork-interp (the reference C client cannot pass interpreter arguments)."""
    import shutil
    import subprocess

    if explicit is not None:
        candidates = [explicit]
    else:
        here = os.path.dirname(os.path.abspath(sys.argv[0])) if sys.argv else ""
        candidates = [os.path.join(here, "prefork-interp"),
                      os.path.join(os.path.dirname(sys.executable), "prefork-interp")]
        on_path = shutil.which("prefork-interp")
        if on_path is not None:
            candidates.append(on_path)
    for cand in candidates:
        if not (os.path.isfile(cand) and os.access(cand, os.X_OK)):
            continue
        try:
            got = subprocess.run([cand, "--version"], capture_output=True, timeout=30,
                                 check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if got.returncode == 0 and got.stdout.startswith(b"prefork-interp (Python)"):
            return os.path.abspath(cand)
    raise RunnerError("cannot find prefork-interp for Python (the C client cannot pass "
                      "interpreter arguments): give it with --client PATH")


def make_wrapper(name: str, client: str | None, options: list[str] | None = None) -> str:
    """The text of a ``#!`` wrapper running program NAME through a warm server; ``options``
    (``--preload MODULE`` ...) go into the ``#!`` line, for the server's setup."""
    import subprocess

    program = find_program(name)
    with open(program, "rb") as f:
        head = f.read(_HEAD)
    got = shebang_python(head)
    if got is None:
        raise RunnerError(f"{program} is not a script (no #! line): not a Python program")
    interp, interp_args = got
    options = options or []
    if "\n" in program or "\n" in name:
        raise RunnerError(f"{program!r}: a newline in the name cannot go in a wrapper")
    if any(c in w for w in (interp, *interp_args) for c in ",\n"):
        raise RunnerError(f"{program}: its #! line has a comma: it cannot be put in a "
                          "prefork-interp #! line")
    if any(c in w for w in options for c in ", \n"):
        raise RunnerError(f"options for the #! line cannot hold commas or spaces: {options}")
    check = subprocess.run([interp, *interp_args, "-c", "import prefork.server.runner"],
                           capture_output=True, timeout=60, check=False)
    if check.returncode != 0:
        why = check.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RunnerError(f"{program} runs with {interp}, which cannot import prefork "
                          f"({why[-1] if why else f'status {check.returncode}'}): install "
                          "prefork-interp in that environment")
    client_path = find_client(client)
    shebang = f"#!{client_path} -U," + ",".join(
        [interp, *interp_args, "-m", "prefork.server", *options])
    if len(shebang) > SHEBANG_MAX or " " in client_path:
        raise RunnerError(f"the #! line would be unusable (longer than {SHEBANG_MAX} "
                          f"bytes, or a space in the client's path): {shebang}")
    return (f"{shebang}\n"
            f"{WRAP_MARKER.decode()}{program}\n"
            f"# Made by `{PROG} --wrap {name}`: runs the program above through a\n"
            "# warm prefork server (the first call starts it); run any other way\n"
            "# (python WRAPPER ...), it just runs the program.\n"
            "import os, sys\n"
            f"os.execv({program!r}, [{program!r}, *sys.argv[1:]])\n")


# ------------------------------------------------------------------ command line

USAGE = f"""\
{PROG} [OPTIONS] SCRIPT [ARGS ...]
       {PROG} --explain [OPTIONS] SCRIPT [ARGS ...]
       {PROG} --wrap NAME [--client PATH] [--preload MODULE ..] > WRAPPER"""

DESCRIPTION = """\
Runs an unmodified Python script (or an installed program's script) fast under prefork-interp:
setup imports the modules the script imports at module level (found with ast, without running
it), then each call forks a warm copy that runs the script as __main__.  Use as

  #!/usr/bin/prefork-interp -U,prefork-server                (first line of a script)
  prefork-interp -U prefork-server "$(command -v PROGRAM)" ARGS ...
  prefork-server --wrap PROGRAM > ~/bin/PROGRAM && chmod +x ~/bin/PROGRAM

Without PREFORK_INTERP in the environment (run by hand) it runs the script directly."""


def _parser() -> argparse.ArgumentParser:
    import argparse

    from prefork import __version__

    p = argparse.ArgumentParser(prog=PROG, usage=USAGE, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--preload", action="append", default=[], metavar="MODULE",
                   help="also import MODULE in setup (repeatable)")
    p.add_argument("--no-preload", action="store_true",
                   help="do not import the script's own imports in setup")
    p.add_argument("--reload-also", action="append", default=[], metavar="PATH",
                   help="restart the server when PATH changes too (repeatable)")
    p.add_argument("--explain", action="store_true",
                   help="print what setup would preload and why, the time each import "
                        "takes, and threads or files left by the preload; run nothing")
    p.add_argument("--wrap", metavar="NAME",
                   help="print a #! wrapper running program NAME (on PATH, or a path) "
                        "through prefork-interp with its own environment's Python")
    p.add_argument("--client", metavar="PATH",
                   help="with --wrap: the prefork-interp to put in the #! line")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(our options, [SCRIPT, *ARGS]): options end at the first word that is not one."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return argv[:i], argv[i + 1:]
        if not word.startswith("-") or word == "-":
            break
        if word in _VALUE_OPTIONS:
            i += 1
        i += 1
    return argv[:i], argv[i:]


def parse(argv: list[str]) -> argparse.Namespace:
    """Options and the script; exits 2 (argparse) on a usage error."""
    ours, rest = split_argv(argv)
    parser = _parser()
    opts = parser.parse_args(ours)
    opts.script = rest[0] if rest else None
    opts.args = rest[1:]
    if opts.wrap is None and opts.script is None:
        parser.error("no SCRIPT given")
    if opts.wrap is not None and opts.script is not None:
        parser.error("--wrap takes no SCRIPT")
    if opts.client is not None and opts.wrap is None:
        parser.error("--client goes with --wrap")
    if opts.wrap is not None and opts.explain:
        parser.error("--explain takes a SCRIPT, not --wrap")
    return opts


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``prefork-server`` (and ``python -m prefork.server``)."""
    from prefork.common import envspec

    opts = parse(sys.argv[1:] if argv is None else argv)
    try:
        if opts.wrap is not None:
            passed = [w for m in opts.preload for w in ("--preload", m)]
            passed += ["--no-preload"] if opts.no_preload else []
            passed += [w for p in opts.reload_also for w in ("--reload-also", p)]
            sys.stdout.write(make_wrapper(opts.wrap, opts.client, passed))
            return 0
        script = Script(opts.script)
        if opts.explain:
            return explain(script, opts)
        if envspec.ENV_NAME in os.environ:
            serve(script, opts)
        else:
            run_direct(script, opts)
    except RunnerError as e:
        sys.stderr.write(f"{e}\n")
        return e.status
    return 0


if __name__ == "__main__":
    sys.exit(main())
