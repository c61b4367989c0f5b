"""Start the client with its hot-path modules loaded straight from their byte code.

The fast launcher (``tools/make_launcher.py``) calls :func:`run`.  Each module the client
needs on every call costs the import system about 40 microseconds of searching, checking and
bookkeeping in Python code before its byte code runs; for the seven modules of the warm path
that is a few tenths of a millisecond of a call of about ten.  :func:`preload` does what the
import system would do for exactly these modules, with their file names known in advance: it
reads each ``__pycache__`` file, checks it against its source the way the import system checks
a timestamp-based ``.pyc`` (magic number, source mtime and size), and runs it in a module
object with the same attributes the import system sets.  At the first module it cannot
vouch for (no ``.pyc`` yet, a stale one, a hash-based one, an unreadable file) it stops, and
the normal import takes over from there, writing the ``.pyc`` for next time.

Imports only what a fresh ``python -IS`` already has loaded (``sys``, ``posix``, ``marshal``
and the import system's own frozen modules).
"""

import marshal
import posix
import sys

#: The client's warm-path modules in import order (each after the ones it imports);
#: ``tests/test_client_fastpath.py`` checks this against what a warm call imports.
HOT_MODULES = (
    "prefork.common",
    "prefork.common.consts",
    "prefork.common.protocol",
    "prefork.common.fdio",
    "prefork.common.ident",
    "prefork.client.wire",
    "prefork.client.main",
)
_PACKAGES = frozenset(("prefork", "prefork.common", "prefork.client"))


def preload(root: str, names: "tuple[str, ...]" = HOT_MODULES) -> "list[str]":
    """Load ``names`` (not yet imported) from the byte code under ``root`` (the directory
    holding the ``prefork`` package), in order, stopping at the first that cannot be vouched
    for; returns the names loaded.  A module whose code raises is removed again and the
    exception propagates, as with a normal import."""
    external = sys.modules["_frozen_importlib_external"]
    bootstrap = sys.modules["_frozen_importlib"]
    magic = external.MAGIC_NUMBER
    tag = sys.implementation.cache_tag
    loaded: list[str] = []
    for name in names:
        if name in sys.modules:
            continue
        parts = name.split(".")
        package = name in _PACKAGES
        directory = root + "/" + "/".join(parts if package else parts[:-1])
        stem = "__init__" if package else parts[-1]
        source = f"{directory}/{stem}.py"
        cached = f"{directory}/__pycache__/{stem}.{tag}.pyc"
        try:
            st = posix.stat(source)
            fd = posix.open(cached, posix.O_RDONLY | posix.O_CLOEXEC)
            try:
                data = posix.read(fd, posix.fstat(fd).st_size)
            finally:
                posix.close(fd)
        except OSError:
            break
        if (data[:4] != magic or data[4:8] != b"\0\0\0\0"
                or int.from_bytes(data[8:12], "little") != int(st.st_mtime) & 0xFFFFFFFF
                or int.from_bytes(data[12:16], "little") != st.st_size & 0xFFFFFFFF):
            break
        try:
            code = marshal.loads(memoryview(data)[16:])
        except (EOFError, ValueError, TypeError):
            break
        loader = external.SourceFileLoader(name, source)
        spec = bootstrap.ModuleSpec(name, loader, origin=source, is_package=package)
        spec.has_location = True
        spec.cached = cached
        module = type(sys)(name)
        module.__spec__ = spec
        module.__loader__ = loader
        module.__file__ = source
        module.__cached__ = cached  # type: ignore[attr-defined]
        module.__package__ = name if package else name.rpartition(".")[0]
        if package:
            spec.submodule_search_locations = [directory]
            module.__path__ = [directory]
        sys.modules[name] = module
        try:
            exec(code, module.__dict__)
        except BaseException:
            del sys.modules[name]
            raise
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, module)
        loaded.append(name)
    return loaded


def run(root: str) -> None:
    """The launcher's body: preload what can be, then the client's ``main``."""
    preload(root)
    from prefork.client.main import main

    main()
