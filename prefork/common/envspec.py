"""The ``PREFORK_INTERP`` environment contract between the client and the script side.

Format (v1): ``v1,SECS.NSECS LISTEN,CALL,WATCHI,WATCHE`` -- split on ASCII space and take the
first two words; split each on ``,`` and take the first items; anything further is ignored
(room for extensions).  ``SECS.NSECS`` is the listening socket's mtime (``NSECS`` exactly nine
digits): files of the program newer than this make the server stale.

Our extension (ignored by the reference's script side, which reads two words): a third word,
comma-separated tokens.  ``pfw1``: WATCHI/WATCHE lead to the run directory's shared watcher
(``prefork.common.watchwire``), which also watches the files the server names on WATCHI.
"""

from __future__ import annotations

ENV_NAME = "PREFORK_INTERP"


class EnvSpecError(ValueError):
    """``PREFORK_INTERP`` is malformed; the text says how."""


class EnvSpec:
    """Parsed ``PREFORK_INTERP``."""

    __slots__ = ("birth_ns", "call", "listen", "shared_watcher", "watch_err", "watch_in")

    def __init__(self, birth_ns: int, listen: int, call: int, watch_in: int,
                 watch_err: int, shared_watcher: bool = False) -> None:
        self.birth_ns = birth_ns
        self.listen = listen
        self.call = call
        self.watch_in = watch_in
        self.watch_err = watch_err
        #: The ``pfw1`` token: the watcher is the shared one (see the module docstring).
        self.shared_watcher = shared_watcher

    def fds(self) -> tuple[int, int, int, int]:
        """LISTEN, CALL, WATCHI, WATCHE in the contract's order."""
        return (self.listen, self.call, self.watch_in, self.watch_err)


SHARED_WATCHER = "pfw1"


def build(birth_sec: int, birth_nsec: int, listen: int, call: int, watch_in: int,
          watch_err: int, *, shared_watcher: bool = False) -> str:
    """The variable's value for these fds and socket birth time."""
    value = f"v1,{birth_sec}.{birth_nsec:09d} {listen},{call},{watch_in},{watch_err}"
    return value + f" {SHARED_WATCHER}" if shared_watcher else value


#: Largest fd number (a C ``int``) and socket time in seconds (a 64-bit ``time_t``).
_FD_MAX = 2**31 - 1
_SECS_MAX = 2**63 - 1


def _number(word: str, what: str, value: str, limit: int) -> int:
    if not word.isdigit() or not word.isascii():
        raise EnvSpecError(f"{ENV_NAME}={value!r}: {what} {word!r} is not a number")
    if len(word) > len(str(limit)) or int(word) > limit:
        raise EnvSpecError(f"{ENV_NAME}={value!r}: {what} {word!r} is out of range "
                           f"(at most {limit})")
    return int(word)


def parse(value: str) -> EnvSpec:
    """Parse and strictly validate the variable's value."""
    words = value.split(" ")
    if len(words) < 2:
        raise EnvSpecError(f"{ENV_NAME}={value!r}: too few words (need 2)")
    vsn = words[0].split(",")
    if vsn[0] != "v1":
        raise EnvSpecError(f"{ENV_NAME}={value!r}: protocol {vsn[0]!r} is not v1 "
                           "(prefork-interp and the script side are incompatible versions)")
    if len(vsn) < 2:
        raise EnvSpecError(f"{ENV_NAME}={value!r}: no socket time after v1")
    secs, dot, nsecs = vsn[1].partition(".")
    if not dot or len(nsecs) != 9:
        raise EnvSpecError(f"{ENV_NAME}={value!r}: socket time {vsn[1]!r} is not SECS.NNNNNNNNN")
    birth_ns = (_number(secs, "seconds", value, _SECS_MAX) * 1_000_000_000
                + _number(nsecs, "nanoseconds", value, 999_999_999))
    fds = words[1].split(",")
    if len(fds) < 4:
        raise EnvSpecError(f"{ENV_NAME}={value!r}: too few fds (need 4)")
    nums = [_number(f, "fd", value, _FD_MAX) for f in fds[:4]]
    if len(set(nums)) != 4 or min(nums) < 3:
        raise EnvSpecError(f"{ENV_NAME}={value!r}: fds must be four distinct numbers >= 3")
    shared = len(words) > 2 and SHARED_WATCHER in words[2].split(",")
    return EnvSpec(birth_ns, nums[0], nums[1], nums[2], nums[3], shared)
