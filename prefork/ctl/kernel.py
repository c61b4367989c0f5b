"""Kernel facts for prefork-ctl: listening Unix sockets, who holds which fd, fd access modes.

Nothing here trusts what a server says about itself. Three sources:

- ``unix_listeners()``: every listening AF_UNIX socket with the path it was bound to and, from
  ``NETLINK_SOCK_DIAG`` with ``UDIAG_SHOW_VFS``, the device and inode of the file that bind
  created. That tells the current server (whose socket is the file now at ``s<IDENT>``) from an
  old one still draining after ``-f`` (bound to the same name, but to a file since replaced).
  Without sock_diag (a kernel without ``unix_diag``) it falls back to ``/proc/net/unix``, which
  has the name and the listening flag but not the file.
- ``scan_fds()``: one pass over ``/proc/PID/fd`` of the processes of one uid, keeping the fds
  that point at sockets, pipes or files under given directories: socket inode -> holders (the
  server holds its listening socket), pipe inode -> holders (the watcher holds the other ends of
  the server's WATCHI/WATCHE pipes), log file -> holders.
- ``fd_access()``: read or write end, from ``/proc/PID/fdinfo/FD`` (a pipe fd's link does not say).

Linux only; every reader tolerates processes that vanish or deny access meanwhile.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

# <linux/netlink.h>, <linux/sock_diag.h>, <linux/unix_diag.h>
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_UDIAG_SHOW_NAME = 0x1
_UDIAG_SHOW_VFS = 0x2
_UNIX_DIAG_NAME = 0
_UNIX_DIAG_VFS = 1
_TCP_LISTEN = 10
_NLMSGHDR = struct.Struct("=IHHII")
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")
_UNIX_DIAG_MSG = struct.Struct("=BBBBIII")
_RTATTR = struct.Struct("=HH")
_UNIX_DIAG_VFS_S = struct.Struct("=II")
_KERNEL_MINORBITS = 20  # the kernel's internal dev_t is major << 20 | minor
_SO_ACCEPTCON = 0x10000  # "Flags" column of /proc/net/unix for a listening socket
_O_ACCMODE = 0o3


@dataclass(frozen=True)
class UnixListener:
    """A listening AF_UNIX socket bound to a path."""

    inode: int
    """sockfs inode: ``/proc/PID/fd/N`` of a holder reads ``socket:[inode]``."""
    path: str
    """the name it was bound to (kept by the kernel after the file is unlinked)."""
    vfs: tuple[int, int] | None
    """(st_dev, st_ino) of the file bind() created, or None when the kernel did not say."""


@dataclass
class FdTable:
    """Who holds what, for the processes of one uid at one moment."""

    sockets: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    """socket inode -> [(pid, fd)]."""
    pipes: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    """pipe inode -> [(pid, fd)]."""
    files: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """path (under the directories asked for) -> [(pid, fd)]."""
    by_pid: dict[int, dict[int, str]] = field(default_factory=dict)
    """pid -> {fd: link target} for every fd kept above."""


# --------------------------------------------------------------------------- listeners


def unix_listeners(under: str) -> list[UnixListener]:
    """Listening Unix sockets whose bound path is directly in directory ``under``."""
    prefix = under.rstrip("/") + "/"
    try:
        found = _listeners_sock_diag()
    except OSError:
        found = _listeners_proc_net_unix()
    return [s for s in found if s.path.startswith(prefix) and "/" not in s.path[len(prefix):]]


def _listeners_sock_diag() -> list[UnixListener]:
    """All listening path-bound Unix sockets, from a NETLINK_SOCK_DIAG dump (raises OSError)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                       _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(5.0)
        req = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 1 << _TCP_LISTEN, 0,
                                  _UDIAG_SHOW_NAME | _UDIAG_SHOW_VFS, 0xFFFFFFFF, 0xFFFFFFFF)
        nl.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(req), _SOCK_DIAG_BY_FAMILY,
                               _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + req)
        found: list[UnixListener] = []
        while True:
            data = nl.recv(1 << 16)
            if not data:
                raise OSError("sock_diag: empty reply")
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size:
                    raise OSError("sock_diag: malformed reply")
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + _NLMSGHDR.size)
                    raise OSError(-err, f"sock_diag: {os.strerror(-err)}")
                listener = _decode_diag(data[off + _NLMSGHDR.size:off + length])
                if listener is not None:
                    found.append(listener)
                off += (length + 3) & ~3


def _decode_diag(msg: bytes) -> UnixListener | None:
    """One ``unix_diag_msg`` and its attributes; None for an unnamed or abstract socket."""
    _fam, _type, _state, _pad, inode, _c1, _c2 = _UNIX_DIAG_MSG.unpack_from(msg, 0)
    name: bytes | None = None
    vfs: tuple[int, int] | None = None
    off = _UNIX_DIAG_MSG.size
    while off + _RTATTR.size <= len(msg):
        rlen, rtype = _RTATTR.unpack_from(msg, off)
        if rlen < _RTATTR.size:
            break
        payload = msg[off + _RTATTR.size:off + rlen]
        if rtype == _UNIX_DIAG_NAME:
            name = payload
        elif rtype == _UNIX_DIAG_VFS and len(payload) >= _UNIX_DIAG_VFS_S.size:
            ino, kdev = _UNIX_DIAG_VFS_S.unpack_from(payload)
            vfs = (os.makedev(kdev >> _KERNEL_MINORBITS, kdev & ((1 << _KERNEL_MINORBITS) - 1)),
                   ino)
        off += (rlen + 3) & ~3
    if not name or name.startswith(b"\0"):
        return None
    return UnixListener(inode, os.fsdecode(name.rstrip(b"\0")), vfs)


def _proc_net_unix_rows() -> list[list[bytes]]:
    """The rows of ``/proc/net/unix`` that have a path, split in their 8 fields (the
    path last); empty if it cannot be read."""
    rows = []
    try:
        with open("/proc/net/unix", "rb") as f:
            next(f, None)
            for line in f:
                parts = line.rstrip(b"\n").split(None, 7)
                if len(parts) == 8 and parts[7].startswith(b"/"):
                    rows.append(parts)
    except OSError:
        return []
    return rows


def _listeners_proc_net_unix() -> list[UnixListener]:
    """The fallback: ``/proc/net/unix`` rows with the listening flag (no file identity)."""
    return [UnixListener(int(parts[6]), os.fsdecode(parts[7]), None)
            for parts in _proc_net_unix_rows() if int(parts[3], 16) & _SO_ACCEPTCON]


def named_unix_sockets() -> set[int]:
    """Inodes of the Unix sockets with a path name (bound ones, and the connections accepted
    on them), from ``/proc/net/unix``; empty if it cannot be read."""
    return {int(parts[6]) for parts in _proc_net_unix_rows()}


# --------------------------------------------------------------------------- fds


def pids_of_uid(uid: int) -> list[int]:
    """Pids of the live processes owned by ``uid`` (``/proc/PID`` owner), in numeric order."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid == uid:
                pids.append(int(name))
        except OSError:
            continue
    return sorted(pids)


def scan_fds(pids: Iterable[int], dirs: Iterable[str],
             progress: Callable[[int], None] | None = None) -> FdTable:
    """Read the fds of ``pids``: sockets, pipes, and files under any of ``dirs``.

    ``progress`` is called with the number of processes read so far, now and then.
    """
    prefixes = tuple(d.rstrip("/") + "/" for d in dirs)
    table = FdTable()
    for n, pid in enumerate(pids, 1):
        if progress is not None and n % 64 == 0:
            progress(n)
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to read
            continue
        kept: dict[int, str] = {}
        for name in names:
            try:
                target = os.readlink(f"{fd_dir}/{name}")
            except OSError:
                continue
            fd = int(name)
            if target.startswith("socket:["):
                table.sockets.setdefault(int(target[8:-1]), []).append((pid, fd))
            elif target.startswith("pipe:["):
                table.pipes.setdefault(int(target[6:-1]), []).append((pid, fd))
            elif target.startswith(prefixes):
                table.files.setdefault(target, []).append((pid, fd))
            else:
                continue
            kept[fd] = target
        if kept:
            table.by_pid[pid] = kept
    return table


def process_fds(pid: int) -> dict[int, str]:
    """All fds of ``pid`` and their link targets (empty if the process is gone or not ours)."""
    fd_dir = f"/proc/{pid}/fd"
    found: dict[int, str] = {}
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return found
    for name in names:
        try:
            found[int(name)] = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
    return dict(sorted(found.items()))


def fd_access(pid: int, fd: int) -> str | None:
    """``"r"``, ``"w"`` or ``"rw"``: how ``pid`` opened ``fd`` (None if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"flags:"):
                    mode = int(line.split()[1], 8) & _O_ACCMODE
                    return {os.O_RDONLY: "r", os.O_WRONLY: "w"}.get(mode, "rw")
    except (OSError, ValueError, IndexError):
        return None
    return None


def raw_title(pid: int) -> str | None:
    """The process title: ``/proc/PID/cmdline`` with NULs as spaces, trailing padding dropped.

    A title set with setproctitle (our server) or Perl's ``$0`` is one string with spaces;
    psutil's ``cmdline()`` would split it on those spaces.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return os.fsdecode(data.rstrip(b"\0").replace(b"\0", b" "))


def proc_stat(pid: int) -> tuple[int, str] | None:
    """(ppid, state letter) from ``/proc/PID/stat``, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data.rpartition(b")")[2].split()
    if len(fields) < 2:
        return None
    return int(fields[1]), fields[0].decode("ascii", "replace")
