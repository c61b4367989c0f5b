"""prefork-interp for Python: make a slow-starting script fast by forking a warm copy per call.

A script opts in with ``#!/usr/bin/prefork-interp -U,python3`` and one call to
``prefork.initialisation_complete()``.  This module imports nothing at load time: the
client (the hot path) imports ``prefork.common`` through it.
"""

__version__ = "0.1.0"

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
