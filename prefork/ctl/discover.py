"""Find the servers of a run directory from kernel facts, as plain dataclasses.

An *entry* is one ident of the run directory (``s<IDENT>`` socket, ``l<IDENT>`` lock,
``p<IDENT>.log`` log; PROTOCOL.md "Run directory and socket names") together with the
processes found behind it:

- the **server** is the process holding the listening socket bound to ``s<IDENT>`` (for the
  socket file now at that path: see ``kernel.unix_listeners``); our one-fork server's children
  are executors; the Perl side's children are monitors (title ``SCRIPT [monitor]``), each with
  its executor;
- the **watcher** is the process holding the other ends of the server's pipes (WATCHI, WATCHE):
  ``prefork-watcher SOCKET`` started by our client, or the forked copy of the C client
  (``/usr/bin/prefork-interp ...``) for the reference;
- the script comes from the server's title (``SCRIPT [server]``: ours via setproctitle, the Perl
  side's ``$0``), made absolute with the server's cwd; the interpreter is ``/proc/PID/exe``.

States: ``live`` (a process listens on the socket at the path), ``draining`` (a server of this
ident no longer owns the path: it was replaced (``-f``), removed, or the server was told to
stop, and it is finishing its calls; found by its old listening socket or its open log file),
``stale`` (a socket file nobody listens on), ``dead`` (only a lock and/or log file is left).

Everything here reads; nothing signals or deletes (see ``prefork.ctl.actions``).
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass, field, replace

import psutil

from prefork.common import consts, paths
from prefork.common.ident import RunDirError, compute_ident, lock_path, log_path, socket_path
from prefork.ctl import kernel

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    #: progress(what, done, total): called during long lookups
    Progress = Callable[[str, int, int], None]

LIVE = "live"
DRAINING = "draining"
STALE = "stale"
DEAD = "dead"
STATE_ORDER = {LIVE: 0, DRAINING: 1, STALE: 2, DEAD: 3}

SERVER_SUFFIX = " [server]"
#: Our server's ready executor, waiting for its call (it has the server's title until it has
#: set its own, just after the fork).
SPARE_SUFFIX = " [spare]"
_HEX = frozenset("0123456789abcdef")
_LOG_SUFFIX = consts.LOG_SUFFIX
_ROTATED_SUFFIX = consts.LOG_SUFFIX + ".1"
_STAT_MAX = 65536


class LookupFailed(Exception):
    """A name given on the command line matches no entry, or more than one ident."""


@dataclass(frozen=True)
class FdNote:
    """One fd of interest of a process: its number, what it points at, and what it is for."""

    fd: int
    target: str
    note: str


@dataclass(frozen=True)
class ProcInfo:
    """One process of a server's tree (or its watcher), as seen at scan time."""

    pid: int
    ppid: int
    role: str
    """server, monitor, executor, spare (our ready executor, no call yet), process (a
    descendant of an executor) or watcher."""
    title: str
    create_time: float
    zombie: bool
    rss: int | None = None
    pss: int | None = None
    uss: int | None = None
    fds: tuple[FdNote, ...] = ()
    children: tuple[ProcInfo, ...] = ()

    def walk(self) -> Iterator[ProcInfo]:
        """This process and all its descendants, parents first."""
        yield self
        for child in self.children:
            yield from child.walk()

    def to_dict(self, now: float) -> dict[str, object]:
        """A JSON-ready view."""
        return {
            "pid": self.pid, "ppid": self.ppid, "role": self.role, "title": self.title,
            "create_time": self.create_time, "age_seconds": round(now - self.create_time, 3),
            "zombie": self.zombie, "rss": self.rss, "pss": self.pss, "uss": self.uss,
            "fds": [{"fd": n.fd, "target": n.target, "note": n.note} for n in self.fds],
            "children": [c.to_dict(now) for c in self.children],
        }


@dataclass(frozen=True)
class Entry:
    """One row of ``prefork-ctl list``: an ident of the run directory and what runs behind it."""

    ident: str
    run_dir: str
    state: str
    socket_path: str
    lock_path: str
    log_path: str
    has_socket: bool
    has_lock: bool
    has_log: bool
    socket_id: tuple[int, int] | None = None
    """(st_dev, st_ino) of the socket file when scanned: kill/clean unlink only that file."""
    born: float | None = None
    """the socket file's mtime: the server's birth time as PREFORK_INTERP gives it."""
    last_used: float | None = None
    """the socket file's atime: connecting touches it (subject to the mount's relatime)."""
    listen_inode: int | None = None
    server: ProcInfo | None = None
    watcher: ProcInfo | None = None
    script: str | None = None
    script_path: str | None = None
    cwd: str | None = None
    interpreter: str | None = None
    side: str | None = None
    client: str | None = None
    self_watching: bool = False
    """no watcher: the run directory's self-watching server (``pwatcher.self``)."""
    calls: int = 0
    stat_path: str | None = None
    stats: dict[str, object] | None = None
    """our server's ``p<IDENT>.stat`` (``prefork/server/stats.py``), if there is one."""
    via: str | None = None
    """how the script runs: ``script`` (it calls initialisation_complete itself),
    ``prefork-server``, or ``wrapper for PROGRAM`` (``prefork-server --wrap``)."""
    any_cwd: bool | None = None
    """whether the ident leaves the cwd out (``--any-cwd``), when it can be worked out."""

    def processes(self) -> list[ProcInfo]:
        """Every process found for this entry: the server's tree, then the watcher -- unless
        that is the run directory's shared watcher, which serves other servers too."""
        procs = list(self.server.walk()) if self.server is not None else []
        if self.watcher is not None and not is_shared_watcher(self.watcher.title):
            procs.append(self.watcher)
        return procs

    def stat_number(self, key: str) -> float | None:
        """A number from the stat file, or None."""
        value = (self.stats or {}).get(key)
        return float(value) if isinstance(value, (int, float)) else None

    def last_call(self) -> float | None:
        """When the last call ended, as the server recorded it; else the socket's atime
        (connecting touches it, subject to the mount's relatime); None if unknown."""
        recorded = self.stat_number("last_call")
        if recorded is None and self.stats is not None:
            recorded = self.stat_number("started")  # no call yet but the first
        if recorded is not None:
            return recorded
        return self.last_used

    def idle_seconds(self, now: float) -> float | None:
        """Seconds since the last call ended (0 while a call runs), or None if unknown."""
        if self.calls:
            return 0.0
        last = self.last_call()
        if last is None:
            return None
        return max(0.0, now - last)

    def saved_seconds(self) -> float | None:
        """Roughly the time the server saved: calls served x its setup's duration."""
        calls, setup = self.stat_number("calls"), self.stat_number("setup_seconds")
        if calls is None or setup is None:
            return None
        return calls * setup

    def to_dict(self, now: float) -> dict[str, object]:
        """A JSON-ready view (``list --json`` and ``show --json``)."""
        idle = self.idle_seconds(now)
        return {
            "ident": self.ident, "state": self.state, "run_dir": self.run_dir,
            "socket": self.socket_path, "socket_exists": self.has_socket,
            "lock": self.lock_path, "lock_exists": self.has_lock,
            "log": self.log_path, "log_exists": self.has_log,
            "born": self.born, "last_used": self.last_used,
            "idle_seconds": None if idle is None else round(idle, 3),
            "script": self.script, "script_path": self.script_path, "cwd": self.cwd,
            "interpreter": self.interpreter, "side": self.side, "client": self.client,
            "calls": self.calls, "listen_inode": self.listen_inode,
            "via": self.via, "any_cwd": self.any_cwd, "last_call": self.last_call(),
            "stat": self.stat_path, "stats": self.stats,
            "saved_seconds": self.saved_seconds(),
            "server": None if self.server is None else self.server.to_dict(now),
            "watcher": None if self.watcher is None else self.watcher.to_dict(now),
            "self_watching": self.self_watching,
        }


@dataclass
class _Scan:
    """What one pass over /proc found, shared by every entry of the run directory."""

    run_dir: str
    detail: bool
    table: kernel.FdTable
    stats: dict[int, tuple[int, str]] = field(default_factory=dict)
    children: dict[int, list[int]] = field(default_factory=dict)
    listeners: dict[int, kernel.UnixListener] = field(default_factory=dict)
    _named: set[int] | None = None

    def named_unix_sockets(self) -> set[int]:
        """Inodes of the Unix sockets that have a path name (read once, when needed)."""
        if self._named is None:
            self._named = kernel.named_unix_sockets()
        return self._named


# --------------------------------------------------------------------------- the scan


def resolve_run_dir(run_dir: str | None) -> str:
    """``run_dir`` if given (it must exist and pass ``paths.check_run_dir``), else the default
    run base (``paths.run_base()``, honouring ``PREFORK_INTERP_RUNDIR``). Raises RunDirError."""
    if run_dir is None:
        return paths.run_base()
    path = os.path.abspath(run_dir)
    paths.check_run_dir(path)
    return path


def scan(run_dir: str, *, detail: bool = False, progress: Progress | None = None
         ) -> list[Entry]:
    """Every entry of ``run_dir``, live ones first. ``detail`` adds fds and per-process memory
    (``show``); without it only the server's memory is read (``list``)."""
    names = _dir_names(run_dir)
    idents = {_ident_of(n) for n in names} - {None}
    listeners = {s.inode: s for s in kernel.unix_listeners(run_dir)
                 if _ident_of(os.path.basename(s.path), socket_only=True) is not None}
    idents |= {os.path.basename(s.path)[1:] for s in listeners.values()}
    pids = kernel.pids_of_uid(os.getuid())
    total = len(pids)

    def fd_progress(done: int) -> None:
        if progress is not None:
            progress("reading /proc", done, total)

    table = kernel.scan_fds(pids, [run_dir], fd_progress)
    ctx = _Scan(run_dir=run_dir, detail=detail, table=table, listeners=listeners)
    for pid in pids:
        st = kernel.proc_stat(pid)
        if st is not None:
            ctx.stats[pid] = st
            ctx.children.setdefault(st[0], []).append(pid)
    entries: list[Entry] = []
    for n, ident in enumerate(sorted(i for i in idents if i is not None), 1):
        if progress is not None:
            progress("inspecting servers", n, len(idents))
        entries.extend(_entries_for(ctx, ident))
    entries.sort(key=lambda e: (STATE_ORDER[e.state], e.script_path or "~", e.ident))
    return entries


def _dir_names(run_dir: str) -> list[str]:
    try:
        return os.listdir(run_dir)
    except FileNotFoundError:
        return []


def _ident_of(name: str, *, socket_only: bool = False) -> str | None:
    """The ident in a run-directory file name (``s``/``l`` + hex, ``p`` + hex + ``.log`` or
    ``.stat``)."""
    if len(name) < 2:
        return None
    kind, rest = name[0], name[1:]
    if not socket_only and kind == "p":
        for suffix in (_LOG_SUFFIX, _ROTATED_SUFFIX, consts.STAT_SUFFIX):
            if rest.endswith(suffix):
                rest = rest[: -len(suffix)]
                break
        else:
            return None
    elif kind != "s" and (socket_only or kind != "l"):
        return None
    return rest if rest and _HEX.issuperset(rest) else None


def _entries_for(ctx: _Scan, ident: str) -> list[Entry]:
    """The entry (or entries: a live server and older draining ones) of one ident."""
    sock = socket_path(ctx.run_dir, ident)
    lock = lock_path(ctx.run_dir, ident)
    log = log_path(ctx.run_dir, ident)
    stat_path = os.path.join(ctx.run_dir, consts.stat_name(ident))
    try:
        st: os.stat_result | None = os.lstat(sock)
    except OSError:
        st = None
    is_sock = st is not None and stat.S_ISSOCK(st.st_mode)
    sock_id = (st.st_dev, st.st_ino) if st is not None else None
    files = Entry(
        ident=ident, run_dir=ctx.run_dir, state=DEAD, socket_path=sock, lock_path=lock,
        log_path=log, has_socket=st is not None, has_lock=os.path.lexists(lock),
        has_log=os.path.lexists(log), socket_id=sock_id,
        born=st.st_mtime if st is not None else None,
        last_used=st.st_atime if st is not None else None,
        stat_path=stat_path, stats=read_stat(stat_path))
    mine = [s for s in ctx.listeners.values() if s.path == sock]
    current: kernel.UnixListener | None = None
    if is_sock and mine:
        exact = [s for s in mine if s.vfs == sock_id]
        if exact:
            current = exact[0]
        elif all(s.vfs is None for s in mine):  # no sock_diag: the newest listener
            current = max(mine, key=lambda s: _holder_start(ctx, s.inode))
    rows: list[Entry] = []
    seen: set[int] = set()
    if current is not None:
        server = _server_pid(ctx, current.inode)
        if server is not None:
            rows.append(_with_server(ctx, files, LIVE, server, current.inode, seen))
    for old in mine:
        server = _server_pid(ctx, old.inode) if old is not current else None
        if server is not None and server not in seen:
            rows.append(_with_server(ctx, files, DRAINING, server, old.inode, seen))
    for pid, _fd in ctx.table.files.get(log, []):
        # our server holds its log file open (its executors close it before user code runs)
        if pid not in seen and ctx.stats.get(pid, (0, "Z"))[1] != "Z":
            rows.append(_with_server(ctx, files, DRAINING, pid, None, seen))
    if st is not None and not any(r.state == LIVE for r in rows):
        rows.append(replace(files, state=STALE))
    if not rows and (files.has_lock or files.has_log or files.stats is not None):
        rows.append(files)
    return [_identity(r) for r in rows]


def read_stat(path: str) -> dict[str, object] | None:
    """Our server's stat file (a JSON object), or None if missing or unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read(_STAT_MAX)
        value = json.loads(data)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _identity(e: Entry) -> Entry:
    """``e`` with how its script runs (``via``) and ``any_cwd`` worked out, where the
    stat file (ours) or the script tells: a stat file of another server pid is ignored."""
    stats = e.stats
    if stats is not None and e.server is not None and stats.get("pid") != e.server.pid:
        stats = None
        e = replace(e, stats=None)
    via = None
    candidates = [e.script_path]
    if stats is not None and isinstance(stats.get("setup_script"), str):
        cwd = stats.get("cwd")
        setup_script = str(stats["setup_script"])
        candidates.insert(0, os.path.join(cwd, setup_script) if isinstance(cwd, str)
                          else setup_script)
    for path in candidates:
        target = _wrapped_target(path) if path is not None else None
        if target is not None:
            via = f"wrapper for {target}"
            break
    if via is None and stats is not None:
        via = "prefork-server" if stats.get("runner") else "script"
    if e.server is None and stats is not None and isinstance(stats.get("script"), str):
        # a server gone: its script, as it recorded it (``logs NAME`` still finds it)
        script = str(stats["script"])
        cwd = stats.get("cwd")
        path = os.path.normpath(os.path.join(cwd, script)) if isinstance(cwd, str) else script
        e = replace(e, script=script, script_path=path,
                    cwd=cwd if isinstance(cwd, str) else None)
    return replace(e, via=via, any_cwd=_any_cwd(e, stats))


def _wrapped_target(path: str) -> str | None:
    """The program a ``prefork-server --wrap`` wrapper stands for (its marker line)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    for line in head.split(b"\n")[1:3]:
        if line.startswith(consts.WRAP_MARKER):
            return os.fsdecode(line[len(consts.WRAP_MARKER):].strip())
    return None


def _any_cwd(e: Entry, stats: dict[str, object] | None) -> bool | None:
    """Whether the entry's ident was computed without the cwd (``--any-cwd``): the ident
    computed again from the setup's interpreter, options, script and cwd, both ways.  None
    when it matches neither (``-E``/``-G``/``-g`` options) or the facts are missing."""
    if stats is None:
        return None
    interp_argv, script, cwd = stats.get("interp_argv"), stats.get("script"), stats.get("cwd")
    if not (isinstance(interp_argv, list) and interp_argv and isinstance(script, str)
            and isinstance(cwd, str) and all(isinstance(a, str) for a in interp_argv)):
        return None
    extra = [b"a" + os.fsencode(a) for a in interp_argv[1:]]
    interp, script_b = os.fsencode(interp_argv[0]), os.fsencode(script)
    try:
        if compute_ident(e.run_dir, interp, script_b, [], cwd=None,
                               extra=[*extra, b"any-cwd"]) == e.ident:
            return True
        if compute_ident(e.run_dir, interp, script_b, [], cwd=cwd,
                               extra=extra) == e.ident:
            return False
    except (OSError, ValueError, RunDirError):
        return None
    return None


def _holder_start(ctx: _Scan, inode: int) -> float:
    pid = _server_pid(ctx, inode)
    return _create_time(pid) if pid is not None else 0.0


def _server_pid(ctx: _Scan, inode: int) -> int | None:
    """The server among the holders of a listening socket: a holder whose parent is not one,
    preferring a ``... [server]`` title (during start-up the client and setup hold it too)."""
    holders = {pid for pid, _fd in ctx.table.sockets.get(inode, [])
               if ctx.stats.get(pid, (0, "Z"))[1] != "Z"}
    roots = sorted(p for p in holders if ctx.stats[p][0] not in holders)
    if not roots:
        return None
    for pid in roots:
        title = kernel.raw_title(pid) or ""
        if title.endswith(SERVER_SUFFIX):
            return pid
    return roots[-1]


def _with_server(ctx: _Scan, files: Entry, state: str, pid: int,
                 listen_inode: int | None, seen: set[int]) -> Entry:
    """``files`` with the server ``pid``: its tree, watcher, script, interpreter, calls."""
    tree_pids = _descendants(ctx, pid)
    seen.update(tree_pids)
    watcher_pid = _watcher_pid(ctx, pid, tree_pids, files.socket_path)
    exe = _safe(lambda: str(psutil.Process(pid).exe()))
    side = _side(exe)
    server = _proc_info(ctx, pid, "server", listen_inode, watcher_pid, pid, mem=True,
                        monitors=side == "perl")
    if side is None and any(c.role == "monitor" for c in server.children):
        side = "perl"
    watcher = None
    if watcher_pid is not None:
        watcher = _proc_info(ctx, watcher_pid, "watcher", listen_inode, watcher_pid, pid,
                             mem=ctx.detail, with_children=False)
    title = server.title
    script = (title[: -len(SERVER_SUFFIX)] if title.endswith(SERVER_SUFFIX)
              else _script_from_argv(pid))
    cwd = _safe(lambda: str(psutil.Process(pid).cwd()))
    script_path = None
    if script is not None:
        script_path = os.path.normpath(os.path.join(cwd, script)) if cwd else script
    client = None
    self_watching = watcher is None and _holds_self_lock(pid, ctx.run_dir)
    if self_watching:
        client = "prefork-interp (Python)"  # only our client's servers watch themselves
    if watcher is not None:
        first = watcher.title.split(" ", 1)[0]
        client = ("prefork-interp (Python)"
                  if first == "prefork-watcher" or is_shared_watcher(watcher.title)
                  else "prefork-interp (C)" if "prefork-interp" in first else None)
    calls = sum(1 for c in server.children if not c.zombie and c.role != "spare")
    return replace(files, state=state, listen_inode=listen_inode, server=server,
                   watcher=watcher, script=script, script_path=script_path, cwd=cwd,
                   interpreter=exe, side=side, client=client, calls=calls,
                   self_watching=self_watching)


def _holds_self_lock(pid: int, run_dir: str) -> bool:
    """Whether ``pid`` holds the run directory's ``pwatcher.self`` open: the server that
    watches itself (``prefork/server/selfwatch.py``)."""
    want = os.path.join(run_dir, consts.WATCHER_SELF_NAME)
    return want in kernel.process_fds(pid).values()


def _script_from_argv(pid: int) -> str | None:
    """For a server without the ``SCRIPT [server]`` title (no setproctitle): ``INTERP [OPTION..]
    SCRIPT``'s SCRIPT, the first argument after the interpreter that is not an option."""
    try:
        argv = psutil.Process(pid).cmdline()
    except psutil.Error:
        return None
    return next((a for a in argv[1:] if not a.startswith("-")), None)


def _side(exe: str | None) -> str | None:
    """Which script side runs, from the interpreter's file name: python, perl, or that name."""
    if exe is None:
        return None
    name = os.path.basename(exe)
    for known in ("python", "perl"):
        if name.startswith(known):
            return known
    return name


def _descendants(ctx: _Scan, pid: int) -> list[int]:
    out = [pid]
    for child in ctx.children.get(pid, []):
        out.extend(_descendants(ctx, child))
    return out


def is_shared_watcher(title: str | None) -> bool:
    """Whether a process title is the run directory's shared watcher's
    (``prefork-watcher --shared RUNDIR``, or the same code started by a server)."""
    return bool(title) and " --shared " in f"{title} " and "prefork" in (title or "")


def _watcher_pid(ctx: _Scan, server: int, tree: list[int], sock: str) -> int | None:
    """The watcher: outside the server's tree, its fd 0 (WATCHI) and fds 1/2 (WATCHE) are the
    other ends of pipes the server holds (stray pipes inherited by both do not count), or
    the shared watcher holding them at any fd. Failing that (no pipe left), our watcher by
    its title ``prefork-watcher SOCKET``."""
    inside = set(tree)
    counts: dict[int, int] = {}
    for fd_target in ctx.table.by_pid.get(server, {}).values():
        if not fd_target.startswith("pipe:["):
            continue
        for pid, fd in ctx.table.pipes.get(int(fd_target[6:-1]), []):
            if pid in inside or ctx.stats.get(pid, (0, "Z"))[1] == "Z":
                continue
            if fd <= 2 or is_shared_watcher(kernel.raw_title(pid)):
                counts[pid] = counts.get(pid, 0) + 1
    if counts:
        return max(counts, key=lambda p: (counts[p], -p))
    want = f"prefork-watcher {sock}"
    for pid in ctx.stats:
        if ctx.stats[pid][1] != "Z" and kernel.raw_title(pid) == want:
            return pid
    return None


def _watch_pipes(ctx: _Scan, watcher: int | None, server: int
                 ) -> tuple[str | None, str | None]:
    """The watcher's WATCHI pipe (its fd 0) and WATCHE pipe (its fd 1), as link targets; for
    the shared watcher, the pipes it shares with ``server``: the one the server writes is
    WATCHI, the one it reads WATCHE."""
    if watcher is None:
        return None, None
    fds = ctx.table.by_pid.get(watcher, {})
    if is_shared_watcher(kernel.raw_title(watcher)):
        theirs = {t for t in fds.values() if t.startswith("pipe:[")}
        watchi = watche = None
        for fd, target in ctx.table.by_pid.get(server, {}).items():
            if target in theirs:
                if kernel.fd_access(server, fd) == "w":
                    watchi = target
                else:
                    watche = target
        return watchi, watche
    watchi, watche = fds.get(0), fds.get(1)
    return (watchi if watchi and watchi.startswith("pipe:[") else None,
            watche if watche and watche.startswith("pipe:[") else None)


def _proc_info(ctx: _Scan, pid: int, role: str, listen_inode: int | None,
               watcher: int | None, server: int, *, mem: bool,
               with_children: bool = True, monitors: bool = False) -> ProcInfo:
    stat_ = ctx.stats.get(pid) or kernel.proc_stat(pid) or (0, "?")
    zombie = stat_[1] == "Z"
    title = kernel.raw_title(pid) or ""
    rss = pss = uss = None
    if (mem or ctx.detail) and not zombie:
        rss, pss, uss = _memory(pid)
    fds: tuple[FdNote, ...] = ()
    if ctx.detail and not zombie:
        fds = tuple(_fd_notes(ctx, pid, role, listen_inode, watcher, server))
    children: tuple[ProcInfo, ...] = ()
    if with_children:
        kids = []
        for child in ctx.children.get(pid, []):
            child_title = kernel.raw_title(child) or ""
            if role == "server":
                # a zombie's title is empty: the Perl side's children are all monitors
                is_monitor = monitors or "[monitor" in child_title
                is_spare = not is_monitor and child_title.endswith((SPARE_SUFFIX,
                                                                    SERVER_SUFFIX))
                child_role = ("monitor" if is_monitor else "spare" if is_spare
                              else "executor")
            elif role == "monitor":
                child_role = "executor"
            else:
                child_role = "process"
            kids.append(_proc_info(ctx, child, child_role, listen_inode, watcher, server,
                                   mem=False))
        children = tuple(kids)
    return ProcInfo(pid=pid, ppid=stat_[0], role=role, title=title,
                    create_time=_create_time(pid), zombie=zombie, rss=rss, pss=pss, uss=uss,
                    fds=fds, children=children)


def _memory(pid: int) -> tuple[int | None, int | None, int | None]:
    """RSS, PSS and USS in bytes (PSS/USS need ``smaps``: None when it cannot be read)."""
    try:
        proc = psutil.Process(pid)
    except psutil.Error:
        return None, None, None
    try:
        full = proc.memory_full_info()
        return int(full.rss), int(full.pss), int(full.uss)
    except psutil.AccessDenied:
        pass
    except psutil.Error:
        return None, None, None
    try:
        return int(proc.memory_info().rss), None, None
    except psutil.Error:
        return None, None, None


def _create_time(pid: int) -> float:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return 0.0


def _safe(get: Callable[[], str]) -> str | None:
    try:
        return get()
    except (psutil.Error, OSError):
        return None


_STDIO = {0: "stdin", 1: "stdout", 2: "stderr"}


def _fd_notes(ctx: _Scan, pid: int, role: str, listen_inode: int | None,
              watcher: int | None, server: int) -> list[FdNote]:
    """The fds worth showing, each with what it is for."""
    watchi, watche = _watch_pipes(ctx, watcher, server)
    shared = watcher is not None and is_shared_watcher(kernel.raw_title(watcher))
    notes = []
    for fd, target in kernel.process_fds(pid).items():
        note = None
        if target.startswith("socket:["):
            inode = int(target[8:-1])
            if inode == listen_inode:
                note = "LISTEN: the server's listening socket"
            elif inode in ctx.listeners:
                note = f"listening socket {ctx.listeners[inode].path}"
            elif role == "spare":
                note = "hand-over socket: its call comes through it"
            elif role == "server" and inode not in ctx.named_unix_sockets():
                # The calls' connections were accepted on the bound socket and carry its name.
                note = ("hand-over socket of its spare (or, during the first call, that "
                        "call's connection from setup)")
            elif role in ("server", "monitor"):
                note = "a call's connection"
        elif target in (watchi, watche) and (role != "watcher" or fd <= 2 or shared):
            access = kernel.fd_access(pid, fd)
            if shared and role != "watcher":
                note = (f"WATCHI: shared watcher {watcher}'s sentinel, {access or '?'} end"
                        if target == watchi else
                        f"WATCHE: from shared watcher {watcher}, {access or '?'} end")
            elif role == "watcher":
                note = (f"WATCHI: sentinel, EOF when server {server} is gone"
                        if target == watchi else
                        f"WATCHE: server {server} reads it (EOF = socket gone)")
            elif target == watchi:
                note = f"WATCHI: watcher {watcher}'s stdin (sentinel), {access or '?'} end"
            else:
                note = f"WATCHE: watcher {watcher}'s stderr, {access or '?'} end"
        elif target.startswith(ctx.run_dir + "/p") and target.endswith(_LOG_SUFFIX):
            note = "server log"
        elif role == "server" and target == os.path.join(ctx.run_dir, consts.WATCHER_SELF_NAME):
            note = "self-watch lock: this server watches itself (no watcher)"
        elif role == "server" and target == "anon_inode:inotify" and watcher is None:
            note = "its own inotify instance (its files, the run directory)"
        if note is None and fd in _STDIO and (role != "server" or target != os.devnull):
            note = _STDIO[fd]
        if note is not None:
            notes.append(FdNote(fd, target, note))
    return notes


# --------------------------------------------------------------------------- lookups


def select(entries: list[Entry], name: str) -> list[Entry]:
    """The entries ``name`` designates: a unique prefix of an ident (hex), else a script.

    A script matches by path (resolved against the current directory, symlinks followed) or,
    when ``name`` has no ``/``, by file name. Raises ``LookupFailed`` when nothing matches or a
    prefix fits several idents.
    """
    low = name.lower()
    if low and _HEX.issuperset(low):
        idents = sorted({e.ident for e in entries if e.ident.startswith(low)})
        if len(idents) == 1:
            return [e for e in entries if e.ident == idents[0]]
        if len(idents) > 1:
            listed = ", ".join(i[:16] for i in idents[:6])
            raise LookupFailed(f"'{name}' is a prefix of {len(idents)} idents ({listed}"
                               f"{', ...' if len(idents) > 6 else ''}): give more of it")
    if "/" in name:
        want = os.path.realpath(name)
        found = [e for e in entries if e.script_path is not None
                 and os.path.realpath(e.script_path) == want]
    else:
        found = [e for e in entries if e.script is not None
                 and (e.script == name or os.path.basename(e.script) == name)]
    if not found:
        where = entries[0].run_dir if entries else "the run directory"
        raise LookupFailed(f"no server matches '{name}' (an ident prefix or a script) in {where}")
    return found


def short_idents(entries: list[Entry], minimum: int = 12) -> dict[str, str]:
    """The shortest prefix (at least ``minimum`` digits) that tells each ident apart."""
    idents = sorted({e.ident for e in entries})
    short = {}
    for i, ident in enumerate(idents):
        n = minimum
        for other in (idents[i - 1] if i else "", idents[i + 1] if i + 1 < len(idents) else ""):
            pairs = zip(ident, other, strict=False)
            common = next((k for k, (a, b) in enumerate(pairs) if a != b),
                          min(len(ident), len(other)))
            n = max(n, common + 1)
        short[ident] = ident[:n]
    return short


def now() -> float:
    """Wall-clock time, the scale of create_time and file times."""
    return time.time()


def read_learned(e: Entry) -> dict[str, object] | None:
    """What the server of ``e`` learned from calls (``p<IDENT>.learned``, written by
    ``prefork.server.learn``): learned modules, refused ones with the reason, regexes
    compiled, setup paths a call removed, the rehearsal's outcome; None if there is no such
    file (or unreadable)."""
    import json

    from prefork.common.consts import LEARNED_SUFFIX

    path = os.path.join(e.run_dir, f"p{e.ident}{LEARNED_SUFFIX}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return {"path": path, "learned": list(data.get("learned") or []),
            "refused": dict(data.get("refused") or {}),
            "regexes": len(data.get("regexes") or []),
            "undone": list(data.get("undone") or []),
            "rehearsal": str(data.get("rehearsal") or "")}
