"""Running the script directly, when no server can run the call as a direct run would.

Used when even the server of the caller's own context answered with an ``R`` record (see
``prefork.server.context``): rather than a silently different result, the client execs the
interpreter on the script, in the caller's environment exactly, as a direct run does.
"""

import posix

from prefork.client.wire import ClientError, caller_env

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn


def run_directly(argv: list[str], closed: int) -> "NoReturn":
    """Exec ``argv`` (interpreter, its arguments, script, arguments) found through the
    caller's ``PATH``, with the caller's environment, and the std fds it left ``closed``
    closed again."""
    env = {}
    for entry in caller_env():
        name, _, value = entry.partition(b"=")
        env[name] = value
    for fd in (0, 1, 2):
        if closed & (1 << fd):
            posix.close(fd)
    interp = argv[0]
    if "/" in interp:
        candidates = [interp]
    else:
        path = env.get(b"PATH", b"/bin:/usr/bin").decode("utf-8", "surrogateescape")
        candidates = [f"{d or '.'}/{interp}" for d in path.split(":")]
    error: OSError | None = None
    for candidate in candidates:
        try:
            posix.execve(candidate, argv, env)
        except (FileNotFoundError, NotADirectoryError) as e:
            error = error or e
        except OSError as e:
            error = e
    reason = error.strerror if error is not None else "not found"
    raise ClientError(f"execute {interp}: {reason}")
