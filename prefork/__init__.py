"""prefork-interp for Python: make a slow-starting script fast by forking a warm copy per call.

A script opts in with ``#!/usr/bin/prefork-interp -U,python3`` and one call to
``prefork.initialisation_complete()``.  This module imports nothing at load time (but
``sys``): the client (the hot path) imports ``prefork.common`` through it.  It watches for
``random`` to be imported, to see the seeds a script sets (``prefork.server.percall``).
"""

__version__ = "0.1.0"

import sys


def _protect_contract_fds() -> None:
    """Under ``prefork-interp`` (``PREFORK_INTERP`` set), make the protocol's fds
    close-on-exec as soon as the script imports us: a program the set-up runs
    (``os.system("helper &")``) must not hold the listening socket or the watcher's pipes
    for ever.  Checked strictly later, by ``initialisation_complete()``; here only
    well-formed numbers of open fds are touched.  Cheap: the client imports this too."""
    import posix

    value = posix.environ.get(b"PREFORK_INTERP")
    if not value:
        return
    words = value.split(b" ")
    if len(words) < 2 or not words[0].startswith(b"v1,"):
        return
    for word in words[1].split(b",")[:4]:
        if word.isdigit() and 2 < int(word) < 1 << 31:
            try:
                posix.set_inheritable(int(word), False)
            except OSError:
                pass


_protect_contract_fds()

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def initialisation_complete(**kwargs: "Any") -> None:
    """See ``prefork.server.api.initialisation_complete``; its keywords are described and
    checked in ``prefork.server.config.ServerConfig.options``."""
    from prefork.server.api import initialisation_complete as _f

    _f(**kwargs)


def autoreload_also_check(*paths: "Any") -> None:
    """See ``prefork.server.api.autoreload_also_check``."""
    from prefork.server.api import autoreload_also_check as _f

    _f(*paths)


def after_fork(callback: "Any") -> None:
    """See ``prefork.server.percall.after_fork``: ``callback()`` runs in every executor once
    it has taken on its call (e.g. to reseed a third-party random generator)."""
    from prefork.server.percall import after_fork as _f

    _f(callback)


class _RandomWatch:
    """Sees ``random`` being imported (after ``import prefork``), so that explicit seeds are
    recorded (``prefork.server.percall``); one ``find_spec`` call per later import."""

    @classmethod
    def find_spec(cls, name: str, path: "Any" = None, target: "Any" = None) -> "Any":
        if name != "random":
            return None
        sys.meta_path.remove(cls)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        loader = spec.loader

        class _Loader:
            def create_module(self, spec: "Any") -> "Any":
                return loader.create_module(spec)

            def exec_module(self, module: "Any") -> None:
                module.__loader__ = module.__spec__.loader = loader
                loader.exec_module(module)
                _watch(module)

        spec.loader = _Loader()
        return spec


def _watch(module: "Any") -> None:
    from prefork.server.percall import watch_random

    watch_random(module)


if "random" in sys.modules:
    _watch(sys.modules["random"])
else:
    sys.meta_path.insert(0, _RandomWatch)
