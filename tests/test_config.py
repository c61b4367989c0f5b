"""The server's configuration and set-up steps, without forking.

``ServerConfig`` (``prefork.server.config``): defaults, every check with its message, the
normalisations, frozen.  ``adopt_endpoints`` (``prefork.server.api``): the contract's fds
checked on real sockets and pipes in a per-test run directory.
"""

from __future__ import annotations

import os
import pathlib
import socket
from collections.abc import Iterator

import pytest

from prefork.common import envspec
from prefork.server import api
from prefork.server.config import ConfigError, ServerConfig

pytestmark = pytest.mark.timeout(30)

SPEC = "v1,1700000000.000000005 3,4,5,6"


def _config(**options: object) -> ServerConfig:
    return ServerConfig.from_contract(SPEC, "script.py", (), **options)


def test_defaults() -> None:
    config = _config()
    assert (config.max_servers, config.idle_timeout, config.autoreload, config.reload_paths,
            config.log, config.fast_exit) == (4, 3600.0, True, (), None, True)
    assert config.script == "script.py"
    spec = config.spec
    assert (spec.birth_ns, spec.fds()) == (1700000000_000000005, (3, 4, 5, 6))


def test_options_are_the_defaults_of_a_plain_run() -> None:
    """The plain-run check and the server's config share one list of options."""
    options = ServerConfig.options()
    config = _config()
    assert options.pop("autoreload_extra") == config.reload_paths == ()
    assert {name: getattr(config, name) for name in options} == options


def test_given_options_are_kept() -> None:
    config = _config(max_servers=-1, idle_timeout=0.5, autoreload=False,
                     autoreload_extra=["a.dat", pathlib.Path("/b/c.dat"), b"d.dat"],
                     log="stderr", fast_exit=False)
    assert (config.max_servers, config.idle_timeout, config.autoreload, config.log,
            config.fast_exit) == (-1, 0.5, False, "stderr", False)
    assert config.reload_paths == ("a.dat", "/b/c.dat", "d.dat")


def test_autoreload_also_check_paths_come_first() -> None:
    """As before: ``autoreload_also_check()``'s paths, then ``autoreload_extra``."""
    config = ServerConfig.from_contract(SPEC, "s", ["also.txt"], autoreload_extra=["x"])
    assert config.reload_paths == ("also.txt", "x")


@pytest.mark.parametrize(("given", "kept"), [
    (-1, None), (-0.001, None), (float("inf"), None), (float("-inf"), None), (None, None),
    (0, 0), (7, 7), (2.5, 2.5),
])
def test_idle_timeout_never_is_none(given: float | None, kept: float | None) -> None:
    assert _config(idle_timeout=given).idle_timeout == kept


def test_log_path_like_is_a_path() -> None:
    assert _config(log=pathlib.Path("/tmp/x.log")).log == "/tmp/x.log"
    assert _config(log="file").log == "file"


@pytest.mark.parametrize(("options", "match"), [
    ({"max_servers": "4"}, r"max_servers must be an int \(negative: no limit\), not '4'"),
    ({"max_servers": 2.0}, "max_servers must be an int"),
    ({"max_servers": True}, "max_servers must be an int"),
    ({"max_servers": None}, "max_servers must be an int"),
    ({"idle_timeout": "60"}, "idle_timeout must be a number of seconds or None, not '60'"),
    ({"idle_timeout": float("nan")}, "idle_timeout must be a number"),
    ({"idle_timeout": False}, "idle_timeout must be a number"),
    ({"autoreload_extra": "data.txt"}, "autoreload_extra must be a list of paths, not one"),
    ({"autoreload_extra": pathlib.Path("d")}, "must be a list of paths, not one path"),
    ({"autoreload_extra": 3}, "autoreload_extra must be a list of paths, not 3"),
    ({"autoreload_extra": ["ok", ""]}, "each path in autoreload_extra must be a non-empty"),
    ({"autoreload_extra": ["ok", None]}, "each path in autoreload_extra must be a non-empty"),
    ({"log": ""}, r"log \(None, 'auto', 'syslog', 'file', 'stderr' or a file path\)"),
    ({"log": 2}, "log .* must be a non-empty path, not 2"),
])
def test_bad_options_are_refused_clearly(options: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        _config(**options)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigError, match=match):  # a plain run checks the same way
        ServerConfig.options(**options)  # type: ignore[arg-type]


def test_unknown_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="max_server"):
        _config(max_server=4)


def test_bad_contract_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"PREFORK_INTERP='v2,1\.000000000 3,4,5,6': "
                                          "protocol 'v2' is not v1"):
        ServerConfig.from_contract("v2,1.000000000 3,4,5,6", "s")


def test_frozen() -> None:
    config = _config()
    with pytest.raises(AttributeError, match="frozen"):
        config.max_servers = 8  # type: ignore[misc]
    with pytest.raises(AttributeError, match="frozen"):
        del config.log  # type: ignore[misc]
    assert config.max_servers == 4
    assert "max_servers=4" in repr(config)


# ------------------------------------------------------------------ adopt_endpoints


class Fds:
    """Real fds for a contract: a listening socket bound in the run dir, a connected pair,
    two pipes; every one closed at the end."""

    def __init__(self, rundir: str, sock_name: str = "sABCDEF") -> None:
        self.path = os.path.join(rundir, sock_name)
        self.listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listen.bind(self.path)
        self.listen.listen()
        self.call, self.peer = socket.socketpair()
        self.watch_in = os.pipe()
        self.watch_err = os.pipe()

    def spec(self, **swap: int) -> envspec.EnvSpec:
        fds = {"listen": self.listen.fileno(), "call": self.call.fileno(),
               "watch_in": self.watch_in[0], "watch_err": self.watch_err[0], **swap}
        return envspec.EnvSpec(1, fds["listen"], fds["call"], fds["watch_in"],
                               fds["watch_err"])

    def close(self) -> None:
        for s in (self.listen, self.call, self.peer):
            s.close()
        for fd in (*self.watch_in, *self.watch_err):
            try:
                os.close(fd)
            except OSError:
                pass  # adopted and closed by the test


@pytest.fixture
def fds(rundir: str) -> Iterator[Fds]:
    made = Fds(rundir)
    yield made
    made.close()


def test_adopt_endpoints(fds: Fds, rundir: str) -> None:
    spec = fds.spec()
    ends = api.adopt_endpoints(spec)
    try:
        assert ends.listen_sock.fileno() == spec.listen
        assert ends.call_sock.fileno() == spec.call
        assert ends.listen_sock.getblocking() is False
        assert ends.log_path == os.path.join(rundir, "pABCDEF.log")
        for fd in spec.fds():
            assert not os.get_inheritable(fd)
            assert fd not in ends.keep_fds
        assert os.get_blocking(spec.watch_err) is False
        assert {0, 1, 2, fds.peer.fileno()} <= ends.keep_fds
    finally:
        # The socket objects were given the contract's fds: detach them, Fds closes them.
        ends.listen_sock.detach()
        ends.call_sock.detach()


@pytest.mark.parametrize(("role", "which", "match"), [
    ("listen", "pipe", r"LISTEN fd \d+ from PREFORK_INTERP is not a socket"),
    ("call", "pipe", r"CALL fd \d+ from PREFORK_INTERP is not a socket"),
    ("watch_in", "socket", r"WATCHI fd \d+ from PREFORK_INTERP is not a pipe"),
    ("watch_err", "socket", r"WATCHE fd \d+ from PREFORK_INTERP is not a pipe"),
    ("call", "closed", r"CALL fd \d+ from PREFORK_INTERP is not open: Bad file descriptor"),
])
def test_adopt_endpoints_refuses_wrong_fds(fds: Fds, role: str, which: str,
                                           match: str) -> None:
    if which == "pipe":
        fd = fds.watch_in[1]
    elif which == "socket":
        fd = fds.peer.fileno()
    else:
        fd = os.dup(fds.watch_in[1])
        os.close(fd)
    with pytest.raises(api.PreforkSetupError, match=match):
        api.adopt_endpoints(fds.spec(**{role: fd}))


def test_adopt_endpoints_refuses_a_socket_not_named_like_ours(rundir: str) -> None:
    other = Fds(rundir, "other")
    try:
        with pytest.raises(api.PreforkSetupError, match="not bound to a prefork socket"):
            api.adopt_endpoints(other.spec())
    finally:
        other.close()
