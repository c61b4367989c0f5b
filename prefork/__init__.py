"""prefork-interp for Python: make a slow-starting script fast by forking a warm copy per call.

A script opts in with ``#!/usr/bin/prefork-interp -U,python3`` and one call to
``prefork.initialisation_complete()``.  This module imports nothing at load time: the
client (the hot path) imports ``prefork.common`` through it.
"""

__version__ = "0.1.0"


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
