"""Finding and preloading a script's imports: the module-level imports found with ``ast``
(without running the script), imported in setup one by one, failures left for the script to
meet; their import-time output captured, to be replayed on every call."""

from __future__ import annotations

import ast
import os
import sys
import time
import types

from prefork.server.runner.script import Script

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator


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
    names |= set(preload)
    found += [Found(m, "the wrapper (learned from a run)") for m in script.preload
              if m not in names]
    return found
