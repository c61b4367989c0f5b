"""What a server is built from, checked once: ``initialisation_complete()``'s options and
the ``PREFORK_INTERP`` contract.

``ServerConfig.options()`` is the one place an option is named, given its default and
checked; everything else reads the frozen ``ServerConfig``.  Pure: no fds are touched here
(``api`` adopts them), so all of it is testable without processes.
"""

from __future__ import annotations

import os

from prefork.common import envspec

_INF = float("inf")  # (no ``math``: NaN is the one value outside [-inf, inf])

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any, NoReturn

#: The ``log`` targets with a meaning of their own; any other string is a file path.
LOG_TARGETS = ("auto", "syslog", "file", "stderr")


class ConfigError(ValueError):
    """An option of ``initialisation_complete()`` or the contract is unusable; says which."""


def _path(value: object, what: str) -> str:
    if isinstance(value, (str, bytes, os.PathLike)):
        path = os.fspath(value)
        path = os.fsdecode(path) if isinstance(path, bytes) else path
        if path:
            return path
    raise ConfigError(f"{what} must be a non-empty path, not {value!r}")


def _max_servers(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"max_servers must be an int (negative: no limit), not {value!r}")
    return value


def _idle_timeout(value: object, what: str = "idle_timeout") -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -_INF <= value <= _INF:
        raise ConfigError(f"{what} must be a number of seconds or None, not {value!r}")
    if value < 0 or value == _INF:
        return None  # never
    return value


def _spare_idle(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -_INF <= value <= _INF:
        raise ConfigError(f"spare_idle must be a number of seconds or None, not {value!r}")
    if value < 0 or value == _INF:
        return None  # never let go
    return value


def _reload_paths(value: object) -> tuple[str, ...]:
    if isinstance(value, (str, bytes, os.PathLike)):
        raise ConfigError(f"autoreload_extra must be a list of paths, not one path: {value!r}")
    try:
        items = list(value)  # type: ignore[call-overload]
    except TypeError:
        raise ConfigError(f"autoreload_extra must be a list of paths, not {value!r}") from None
    return tuple(_path(item, "each path in autoreload_extra") for item in items)


def _log(value: object) -> str | None:
    if value is None:
        return None
    return _path(value, f"log (None, {', '.join(map(repr, LOG_TARGETS))} or a file path)")


class ServerConfig:
    """Everything the server is built from (frozen).

    ``spec``: the parsed ``PREFORK_INTERP`` (fds and socket birth time); ``script``: the
    script's name as the server reports it; ``reload_paths``: extra files that make the
    server stale (``autoreload_also_check()``'s, then ``autoreload_extra``); the rest as
    ``initialisation_complete()``'s keywords (see ``options``).
    """

    __slots__ = ("autoreload", "fast_exit", "idle_timeout", "learn", "log", "max_servers",
                 "max_wait", "reload_paths", "script", "spare_idle", "spec")

    spec: envspec.EnvSpec
    script: str
    max_servers: int
    max_wait: float | None
    idle_timeout: float | None
    autoreload: bool
    reload_paths: tuple[str, ...]
    log: str | None
    fast_exit: bool
    learn: bool
    spare_idle: float | None

    def __init__(self, spec: envspec.EnvSpec, script: str, also_check: Iterable[str] = (),
                 **options: Any) -> None:
        values = self.options(**options)
        extra = values.pop("autoreload_extra")
        values["reload_paths"] = (*also_check, *extra)
        values["spec"] = spec
        values["script"] = script
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @staticmethod
    def options(*, max_servers: int = 4, max_wait: float | None = 1.0,
                idle_timeout: float | None = 3600.0,
                autoreload: bool = True, autoreload_extra: Iterable[str] = (),
                log: str | None = None, fast_exit: bool = True,
                learn: bool = False, spare_idle: float | None = 30.0) -> dict[str, Any]:
        """``initialisation_complete()``'s keywords, checked (``ConfigError``; an unknown
        keyword is a ``TypeError``, as for any call) and normalised.

        ``max_servers``: calls started at once (negative: no limit); more wait their turn.
        ``max_wait``: seconds a waiting call waits without any call starting or ending
        before it is started past ``max_servers`` (so that a pipeline of the script, or a
        script calling itself, never deadlocks); None: wait for a slot, however long.
        ``idle_timeout``: seconds without calls before the server quits (None, negative or
        infinite: never).  ``autoreload``: quit when the script, a loaded module or a path
        of ``autoreload_extra`` changes.  ``log``: None (syslog if /dev/log exists, else
        ``p<IDENT>.log`` in the run directory), "syslog", "file", "stderr" or a file path.
        ``fast_exit``: end each call without tearing down the inherited heap (Python 3.12+;
        see ``prefork.server.fastexit``).  ``learn``: after each call, import in the server
        the modules the call imported (if fork-safe) and compile its regexes, remembered for
        the next server of this identity (``prefork.server.learn``); off by default for a
        script, whose own setup decides what its server holds (``prefork-server`` turns it
        on).  ``spare_idle``: seconds without calls after which the executor forked ahead of
        the next call (the spare) is let go, the next call forking one (None, negative or
        infinite: never): an idle server is smaller.
        """
        return {"max_servers": _max_servers(max_servers),
                "max_wait": _idle_timeout(max_wait, "max_wait"),
                "idle_timeout": _idle_timeout(idle_timeout),
                "autoreload": bool(autoreload),
                "autoreload_extra": _reload_paths(autoreload_extra),
                "log": _log(log),
                "fast_exit": bool(fast_exit),
                "learn": bool(learn), "spare_idle": _spare_idle(spare_idle)}

    @classmethod
    def from_contract(cls, value: str, script: str, also_check: Iterable[str] = (),
                      **options: Any) -> ServerConfig:
        """The configuration for ``PREFORK_INTERP=value`` (``ConfigError`` if malformed)."""
        try:
            spec = envspec.parse(value)
        except envspec.EnvSpecError as e:
            raise ConfigError(str(e)) from None
        return cls(spec, script, also_check, **options)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"ServerConfig is frozen: cannot set {name}")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"ServerConfig is frozen: cannot delete {name}")

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"ServerConfig({fields})"
