"""The tests' readers of /proc: one place that knows the layout of each file.

Everything reads the live kernel's view; nothing is mocked.  Readers of one process raise
``FileNotFoundError``/``ProcessLookupError`` when it is gone unless they say otherwise (those
that answer "gone" return None, "" or an empty collection).  (``prefork/ctl/kernel.py`` has
the product's own reader; these are the tests'.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple


def pids() -> Iterator[int]:
    """Every pid in /proc now."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


# ------------------------------------------------------------------ /proc/PID/stat


class Stat(NamedTuple):
    """The fields of ``/proc/PID/stat`` the tests use (proc(5) numbering in comments)."""

    state: str  # (3) R, S, D, T, t, Z...
    ppid: int  # (4)
    pgrp: int  # (5)
    session: int  # (6)
    tty_nr: int  # (7)
    tpgid: int  # (8)
    starttime: int  # (22) clock ticks after boot


def stat(pid: int) -> Stat | None:
    """``pid``'s stat fields, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # comm, field 2, is in parentheses and may hold anything: split after the last ")"
            fields = f.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return Stat(state=fields[0].decode(), ppid=int(fields[1]), pgrp=int(fields[2]),
                session=int(fields[3]), tty_nr=int(fields[4]), tpgid=int(fields[5]),
                starttime=int(fields[19]))


def state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (``R``, ``S``, ``Z``...), or None if it does not exist."""
    st = stat(pid)
    return None if st is None else st.state


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie (its parent, maybe init, has yet to reap it)."""
    return state(pid) in (None, "Z")


def ppid(pid: int) -> int | None:
    """The parent of ``pid``, or None if it is gone."""
    st = stat(pid)
    return None if st is None else st.ppid


def children(pid: int) -> list[tuple[int, str]]:
    """``(child pid, state)`` of every process whose parent is ``pid``."""
    found = []
    for child in pids():
        st = stat(child)
        if st is not None and st.ppid == pid:
            found.append((child, st.state))
    return found


# ------------------------------------------------------------------ command line, environment


def cmdline(pid: int) -> bytes:
    """``/proc/PID/cmdline``: the arguments, each ended by a NUL."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def environ(pid: int) -> bytes:
    """``/proc/PID/environ``: ``NAME=VALUE`` entries, each ended by a NUL."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read()


def cwd(pid: int) -> str:
    """The working directory of ``pid``."""
    return os.readlink(f"/proc/{pid}/cwd")


def title(pid: int) -> str:
    """``pid``'s command line (its process title), words joined by spaces; "" if gone."""
    try:
        return cmdline(pid).replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def cmdline_pids(*needles: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains every one of ``needles``."""
    found = []
    for pid in pids():
        cmd = title(pid)
        if cmd and all(n in cmd for n in needles) and not gone(pid):
            found.append(pid)
    return found


# ------------------------------------------------------------ /proc/PID/status, wchan, syscall


def status(pid: int) -> dict[str, str]:
    """``/proc/PID/status`` as ``{name: value}`` (values stripped)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def signal_mask(pid: int, name: str) -> int:
    """A signal set of ``/proc/PID/status`` (``SigBlk``, ``ShdPnd``, ``SigPnd``...): bit
    ``n - 1`` for signal ``n``."""
    value = status(pid).get(name)
    if value is None:
        raise AssertionError(f"no {name} in /proc/{pid}/status")
    return int(value, 16)


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB."""
    value = status(pid).get("VmRSS")
    if value is None:
        raise AssertionError(f"no VmRSS for pid {pid}")
    return int(value.split()[0])


def wchan(pid: int) -> str:
    """Where in the kernel ``pid`` sleeps ("" if it runs or is gone)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read()
    except FileNotFoundError:
        return ""


#: The read(2) system call's number, by machine (for /proc/PID/syscall).
_READ_SYSCALL = {"x86_64": "0", "aarch64": "63", "riscv64": "63", "ppc64le": "3",
                 "s390x": "3"}.get(os.uname().machine)


def reading_fd(pid: int, fd: int = 0) -> bool:
    """Is ``pid`` asleep in read(2) on ``fd``?  (Past any job-control check of a terminal
    read.)  On a machine not in the table, asleep at all."""
    if state(pid) != "S":
        return False
    if _READ_SYSCALL is None:
        return True
    try:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return len(fields) > 1 and fields[0] == _READ_SYSCALL and int(fields[1], 16) == fd


# ------------------------------------------------------------------ fds


def fd_links(pid: int) -> dict[int, str]:
    """``{fd: link target}`` of ``pid``'s open fds (``socket:[INODE]``, ``pipe:[INODE]``,
    a path...)."""
    links = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            links[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue
    return links


def fd_count(pid: int) -> int:
    """How many fds ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_flags(pid: int, fd: int) -> int:
    """The open-file flags (``O_NONBLOCK``...) of ``pid``'s ``fd`` (``/proc/PID/fdinfo``)."""
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return int(next(line for line in f if line.startswith("flags:")).split()[1], 8)


def inotify_watches(pid: int) -> list[int]:
    """Inodes watched by the inotify fds of ``pid`` (``/proc/PID/fdinfo``); [] if gone."""
    inodes = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fdinfo"):
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("inotify wd:"):
                        fields = dict(w.split(":", 1) for w in line.split()[1:])
                        inodes.append(int(fields["ino"], 16))
    except OSError:
        pass
    return inodes


def pids_holding(targets: set[str], exclude_self: bool = True) -> list[int]:
    """Pids (not us, unless told) with an fd whose link is one of ``targets``
    (``pipe:[INODE]``, ``socket:[INODE]``, a path)."""
    me = os.getpid()
    found = []
    for pid in pids():
        if exclude_self and pid == me:
            continue
        try:
            if targets & set(fd_links(pid).values()):
                found.append(pid)
        except OSError:  # gone meanwhile, not ours, or a thread of ours
            continue
    return found


def holders_of(path: str) -> list[int]:
    """Pids (not us) holding an fd on the file ``path``."""
    return pids_holding({path})


# ------------------------------------------------------------------ /proc/net/unix


#: The "Flags" column of a listening socket (``__SO_ACCEPTCON``).
SO_ACCEPTCON = 0x10000
#: The "St" column of a connected socket (``SS_CONNECTED``).
SS_CONNECTED = 3


class UnixSocket(NamedTuple):
    """One row of ``/proc/net/unix``."""

    inode: str
    flags: int
    state: int
    path: str  # "" for an unbound socket; a bound name, whether or not the file still exists

    @property
    def link(self) -> str:
        """How an fd on this socket reads in ``/proc/PID/fd``."""
        return f"socket:[{self.inode}]"

    @property
    def listening(self) -> bool:
        return bool(self.flags & SO_ACCEPTCON)


def unix_sockets() -> list[UnixSocket]:
    """Every AF_UNIX socket of this network namespace."""
    found = []
    with open("/proc/net/unix") as f:
        next(f)  # Num RefCount Protocol Flags Type St Inode Path
        for line in f:
            parts = line.split()
            if len(parts) >= 7:
                found.append(UnixSocket(parts[6], int(parts[3], 16), int(parts[5], 16),
                                        parts[7] if len(parts) >= 8 else ""))
    return found


def connected_unix_inodes() -> set[str]:
    """``socket:[INODE]`` of every connected AF_UNIX socket (state SS_CONNECTED)."""
    return {s.link for s in unix_sockets() if s.state == SS_CONNECTED}


def has_connected_socket(pid: int) -> bool:
    """Whether ``pid`` holds a connected AF_UNIX socket (a client that reached a server)."""
    try:
        links = set(fd_links(pid).values())
    except FileNotFoundError:
        return False
    return bool(links & connected_unix_inodes())


def socket_holders(sock_path: str, listening: bool = False) -> set[int]:
    """Pids (not us) holding a Unix socket bound to exactly ``sock_path`` (only a listening
    one, if told)."""
    links = {s.link for s in unix_sockets()
             if s.path == sock_path and (s.listening or not listening)}
    return set(pids_holding(links)) if links else set()


def listening_pid(sock_path: str) -> int | None:
    """The process holding the listening socket bound at ``sock_path`` (the server)."""
    found = socket_holders(sock_path, listening=True)
    return min(found) if found else None


# ------------------------------------------------------------------ /proc/locks


def flock_waited_for(path: str) -> bool:
    """Whether some process is blocked waiting for a flock on ``path``'s inode."""
    suffix = f":{os.stat(path).st_ino}"
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields and "FLOCK" in fields and any(x.endswith(suffix) for x in fields):
                return True
    return False
