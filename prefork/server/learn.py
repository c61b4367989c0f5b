"""Learning from calls: the modules a call imported (and the regular expressions it compiled)
that the server lacks are imported (compiled) by the server itself, between calls, so that the
next executors start with them.

Three sides:

- **executor** (``report()``, at its end: the fast exit's ``finish`` or, on 3.11, ``atexit``):
  the names in ``sys.modules`` the server lacked and the new ``re`` cache keys, as one
  datagram (bounded: ``MAX_REPORT`` bytes) sent without blocking to the server's report
  socket (an abstract ``AF_UNIX`` datagram socket; no fd is open in the executor during the
  call, so the script sees none of ours).  A full socket drops the report: the call's exit is
  never held up.
- **probe** (``probe()``): a throwaway fork of the server imports the candidates one by one
  and checks each for what would make it unsafe in a server that forks: threads or child
  processes left running, fds left open, ``atexit`` handlers registered (other than the
  standard library's per-process ones), signal handlers changed, the environment or the
  working directory changed, output written, an exception, or the time budget exceeded.
- **server** (``Learner``): collects reports when a call's executor is reaped; before the
  next spare is forked (no call running) it probes the candidates, imports those found safe,
  compiles the regexes, freezes the new objects (``gc.freeze``), watches the new modules'
  files for autoreload, and saves the state to ``p<IDENT>.learned`` in the run directory
  (JSON: learned, refused with the reason, regexes), read again at the next start of a
  server with the same identity, which then starts warm (after one probe of the lot).

Setup-time side effects that an ``atexit`` handler undoes (``SetupEffects``): the runner
records the ``atexit`` handlers its setup registered and the existing paths they name;
after every call the server checks those paths: one removed by a call (an ``atexit``
handler registered at setup, run at the end of every executor, undid the server's own
state) makes the server quit before it answers that call -- the next call starts a fresh
server -- and is remembered in the state file, so that the next server runs those handlers
only when it exits itself, never in executors.
"""

from __future__ import annotations

import _signal
import _socket
import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from prefork.server.autoreload import Autoreload
    from prefork.server.log import ServerLog
    from prefork.server.rehearse import Probe
    from prefork.server.watchlink import WatchLink

#: Largest report an executor sends (a datagram; what does not fit is dropped).
MAX_REPORT = 60_000
#: Seconds a probe (one learning step) may take before it is killed.
PROBE_BUDGET = 5.0
#: Most modules probed in one step (the rest wait for the next step).
MAX_PER_STEP = 400
#: Most regular expressions kept, and the longest pattern learned.
MAX_REGEXES = 256
MAX_PATTERN = 4096
#: ``atexit`` handlers of the standard library that are right to run in every process
#: (flush and close what that process opened): not a reason to refuse a module.
SAFE_ATEXIT = frozenset({"logging.shutdown", "weakref.finalize._exitfunc",
                         "multiprocessing.util._exit_function"})
STATE_VERSION = 1

# ------------------------------------------------------------------ executor side

#: The server's report socket (abstract name), ``None``: learning is off.
_report_addr: bytes | None = None
#: Module names not to report: the server's own, and those refused already.
_known: frozenset[str] = frozenset()
#: ``re`` cache keys not to report.
_known_re: frozenset[object] = frozenset()


def _encode_regex(key: object) -> str | None:
    if not (isinstance(key, tuple) and len(key) == 3):
        return None
    _kind, pattern, flags = key
    if not isinstance(flags, int):
        return None
    if isinstance(pattern, str):
        raw, tag = pattern.encode("utf-8", "surrogatepass"), "s"
    elif isinstance(pattern, bytes):
        raw, tag = pattern, "b"
    else:
        return None
    if len(raw) > MAX_PATTERN:
        return None
    return f"r {tag} {int(flags)} {raw.hex()}"


def report() -> None:
    """In an executor, at its very end: send the server what this call added (see module
    docstring).  Never raises, never blocks."""
    if _report_addr is None:
        return
    try:
        lines = [f"m {name}" for name in sys.modules.keys() - _known
                 if name != "__main__" and isinstance(name, str)]
        re_mod = sys.modules.get("re")
        if re_mod is not None:
            keys: set[object] = set()
            for cache_name in ("_cache", "_cache2"):
                cache = getattr(re_mod, cache_name, None)
                if isinstance(cache, dict):
                    keys.update(cache)
            for key in keys - _known_re:
                line = _encode_regex(key)
                if line is not None:
                    lines.append(line)
        if not lines:
            return
        data = "\n".join(lines).encode("utf-8", "surrogateescape")
        if len(data) > MAX_REPORT:
            data = data[:data.rfind(b"\n", 0, MAX_REPORT)]
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_NONBLOCK
                              | _socket.SOCK_CLOEXEC)
        try:
            sock.sendto(data, _report_addr)
        finally:
            sock.close()
    except BaseException:  # noqa: BLE001 - a report must never change a call's end
        pass


def _decode(data: bytes) -> tuple[list[str], list[tuple[str, str, int]]]:
    """(module names, regexes as (kind, hex, flags)) from a report; bad lines skipped."""
    mods: list[str] = []
    regexes: list[tuple[str, str, int]] = []
    for raw in data.split(b"\n"):
        line = raw.decode("utf-8", "surrogateescape")
        if line.startswith("m ") and line[2:].isprintable() and " " not in line[2:]:
            mods.append(line[2:])
        elif line.startswith("r "):
            parts = line.split(" ")
            if len(parts) == 4 and parts[1] in ("s", "b") and parts[2].isdigit():
                try:
                    bytes.fromhex(parts[3])
                except ValueError:
                    continue
                regexes.append((parts[1], parts[3], int(parts[2])))
    return mods, regexes


def _pattern(kind: str, hexed: str) -> str | bytes:
    raw = bytes.fromhex(hexed)
    return raw.decode("utf-8", "surrogatepass") if kind == "s" else raw


# ------------------------------------------------------------------ probe


def _qualname(func: object) -> str:
    mod = getattr(func, "__module__", None) or "?"
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    return f"{mod}.{name}"


def _children() -> bool:
    try:
        with open(f"/proc/self/task/{os.getpid()}/children", "rb") as f:
            return bool(f.read().strip())
    except OSError:
        return False


def _open_fds() -> set[str]:
    """The open fds (not the one listing them, closed by then)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        fds.add(name)
    return fds


def _snapshot() -> tuple[int, set[str], int, list[object], dict[str, str], str]:
    import atexit

    return (len(os.listdir("/proc/self/task")), _open_fds(),
            atexit._ncallbacks(),
            [_signal.getsignal(s) for s in sorted(_signal.valid_signals())],
            dict(os.environ), os.getcwd())


def _hazards(before: tuple[int, set[str], int, list[object], dict[str, str], str],
             registered: list[object], out_fd: int, out_before: int) -> list[str]:
    """What importing one module left behind that a forking server must not have."""
    threads, fds, n_atexit, sigs, env, cwd = before
    now = _snapshot()
    why: list[str] = []
    if now[0] > threads:
        why.append(f"left {now[0] - threads} thread(s) running")
    if _children():
        why.append("left a child process running")
    new_fds = now[1] - fds
    if new_fds:
        kinds = sorted({_fd_kind(fd) for fd in new_fds})
        why.append(f"left {len(new_fds)} fd(s) open ({', '.join(kinds)})")
    if now[2] > n_atexit:
        unsafe = [q for q in map(_qualname, registered) if q not in SAFE_ATEXIT]
        if unsafe or len(registered) < now[2] - n_atexit:
            why.append("registered an atexit handler"
                       + (f" ({', '.join(unsafe)})" if unsafe else ""))
    if now[3] != sigs:
        why.append("changed signal handlers")
    if now[4] != env:
        why.append("changed the environment")
    if now[5] != cwd:
        why.append("changed the working directory")
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()  # block-buffered (not a terminal): what it holds counts too
        except (OSError, ValueError):
            pass
    if os.fstat(out_fd).st_size > out_before:
        why.append("wrote output (it would be lost: the server's stdio is /dev/null)")
    return why


def _fd_kind(fd: str) -> str:
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "closed"
    return target.split(":", 1)[0] if ":" in target and not target.startswith("/") else "file"


#: Audit events that change the file system, and where their path is.
_FS_EVENTS = {"os.mkdir": 0, "os.remove": 0, "os.rmdir": 0, "os.rename": 0, "os.symlink": 1,
              "os.link": 1, "os.truncate": 0, "shutil.rmtree": 0, "tempfile.mkdtemp": 0,
              "tempfile.mkstemp": 0}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _written_path(event: str, args: tuple[object, ...]) -> str | None:
    """The path an audit event changes (a file opened for writing, made, removed ...)."""
    path: object = None
    if event == "open":
        if len(args) >= 3 and isinstance(args[2], int) and args[2] & _WRITE_FLAGS:
            path = args[0]
    elif event in _FS_EVENTS and len(args) > _FS_EVENTS[event]:
        path = args[_FS_EVENTS[event]]
    if isinstance(path, (str, bytes)):
        return os.fsdecode(path)
    return None


def _probe_child(names: list[str], out_w: int) -> None:
    """In the throwaway fork: import each name, write a verdict line for each."""
    import atexit
    import importlib

    mem = os.memfd_create("prefork-learn-probe", os.MFD_CLOEXEC)
    os.dup2(mem, 1)
    os.dup2(mem, 2)
    registered: list[object] = []
    original = atexit.register

    def recording(func: Callable[..., object], *args: object, **kwargs: object) -> object:
        registered.append(func)
        return original(func, *args, **kwargs)

    atexit.register = recording  # type: ignore[assignment]
    written: list[str] = []

    def audit(event: str, args: tuple[object, ...]) -> None:
        path = _written_path(event, args)
        if path is not None and "__pycache__" not in path and len(written) < 8:
            written.append(path)

    sys.addaudithook(audit)
    for name in names:
        os.write(out_w, f"start {name}\n".encode("utf-8", "surrogateescape"))
        if name in sys.modules:
            os.write(out_w, f"ok {name}\n".encode("utf-8", "surrogateescape"))
            continue
        registered.clear()
        written.clear()
        before = _snapshot()
        size = os.fstat(mem).st_size
        try:
            importlib.import_module(name)
            why = _hazards(before, registered, mem, size)
            if written:
                why.append(f"changed files at import ({written[0]})")
        except BaseException as e:  # noqa: BLE001 - any failure refuses the module
            why = [f"import failed: {type(e).__name__}: {e}".replace("\n", " ")[:300]]
        line = f"ok {name}\n" if not why else f"no {name}\t{'; '.join(why)}\n"
        os.write(out_w, line.encode("utf-8", "surrogateescape"))


def probe(names: list[str], budget: float = PROBE_BUDGET) -> tuple[list[str], dict[str, str]]:
    """Import ``names`` in a throwaway fork of this process: (the safe ones, in order; the
    refused ones with the reason).  Names the probe did not get to are in neither."""
    import select

    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    old_mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _signal.valid_signals())
    try:
        pid = os.fork()
    except OSError:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)
        os.close(out_r)
        os.close(out_w)
        raise
    if pid == 0:
        try:
            os.close(out_r)
            _probe_child(names, out_w)
        finally:
            os._exit(0)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)
    os.close(out_w)
    ok: list[str] = []
    refused: dict[str, str] = {}
    current: str | None = None
    buf = b""
    deadline = time.monotonic() + budget
    poller = select.poll()
    poller.register(out_r, select.POLLIN)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                if current is not None:
                    refused[current] = f"import took longer than {budget:g}s"
                break
            data = os.read(out_r, 65536)
            if not data:
                if current is not None:
                    refused[current] = "the probe died importing it"
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                verdict, _, rest = raw.decode("utf-8", "surrogateescape").partition(" ")
                if verdict == "start":
                    current = rest
                elif verdict == "ok":
                    ok.append(rest)
                    current = None
                elif verdict == "no":
                    name, _, why = rest.partition("\t")
                    refused[name] = why
                    current = None
    finally:
        os.close(out_r)
        try:
            os.kill(pid, _signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    return ok, refused


# ------------------------------------------------------------------ state file


class State:
    """What a server identity has learned (``p<IDENT>.learned``, JSON)."""

    def __init__(self) -> None:
        self.learned: list[str] = []
        self.refused: dict[str, str] = {}
        self.regexes: list[tuple[str, str, int]] = []
        #: Setup paths a call removed (see ``SetupEffects``): defer setup atexit handlers.
        self.undone: list[str] = []
        #: What the last rehearsal did, or why it was refused (``prefork.server.rehearse``).
        self.rehearsal: str = ""

    @classmethod
    def load(cls, path: str) -> State:
        """The state at ``path``; an empty one if missing or unreadable."""
        state = cls()
        if not os.path.exists(path):
            return state  # (json is not imported into a server that has nothing saved)
        import json

        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return state
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            return state
        state.learned = [m for m in data.get("learned", []) if isinstance(m, str)]
        state.refused = {k: v for k, v in data.get("refused", {}).items()
                         if isinstance(k, str) and isinstance(v, str)}
        state.regexes = [(r[0], r[1], r[2]) for r in data.get("regexes", [])
                         if isinstance(r, list) and len(r) == 3 and r[0] in ("s", "b")
                         and isinstance(r[1], str) and isinstance(r[2], int)]
        state.undone = [p for p in data.get("undone", []) if isinstance(p, str)]
        rehearsal = data.get("rehearsal", "")
        state.rehearsal = rehearsal if isinstance(rehearsal, str) else ""
        return state

    def save(self, path: str) -> None:
        """Write atomically (a temporary ``p...`` file renamed over it)."""
        import json

        tmp = f"{path}.{os.getpid()}.tmp"
        data = {"version": STATE_VERSION, "learned": self.learned, "refused": self.refused,
                "regexes": [list(r) for r in self.regexes], "undone": self.undone,
                "rehearsal": self.rehearsal}
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)


def state_path(log_path: str) -> str:
    """``p<IDENT>.learned`` next to ``p<IDENT>.log``."""
    from prefork.common.consts import LEARNED_SUFFIX, LOG_SUFFIX

    base = log_path[:-len(LOG_SUFFIX)] if log_path.endswith(LOG_SUFFIX) else log_path
    return base + LEARNED_SUFFIX


# ------------------------------------------------------------------ setup side effects


class SetupEffects:
    """The ``atexit`` handlers the setup registered (recorded by the runner around its
    preload with ``start``/``stop``), and the paths they would remove: the existing files
    and directories named by their arguments, defaults or closures (``shutil.rmtree,
    STATE``; ansible's ``cleanup_tmp_file, path``), checked after every call.  (No audit
    hook: it would stay, and cost every audited event of every call.)"""

    def __init__(self) -> None:
        #: (function, args, kwargs) as registered.
        self.handlers: list[tuple[Callable[..., object], tuple[object, ...],
                                  dict[str, object]]] = []
        self.paths: list[str] = []
        self._recording = False
        self._original_register: Callable[..., object] | None = None

    def start(self) -> None:
        """Begin recording ``atexit.register`` calls."""
        import atexit

        self._recording = True
        self._original_register = original = atexit.register

        def recording(func: Callable[..., object], *args: object, **kwargs: object) -> object:
            if self._recording:
                self.handlers.append((func, args, kwargs))
            return original(func, *args, **kwargs)

        atexit.register = recording  # type: ignore[assignment]

    def stop(self) -> None:
        """End recording, put ``atexit.register`` back, find the handlers' paths."""
        import atexit

        self._recording = False
        if self._original_register is not None:
            atexit.register = self._original_register  # type: ignore[assignment]
        seen: dict[str, None] = {}
        for func, args, kwargs in self.unsafe_handlers():
            values: list[object] = [*args, *kwargs.values()]
            values += list(getattr(func, "__defaults__", None) or ())
            for cell in getattr(func, "__closure__", None) or ():
                try:
                    values.append(cell.cell_contents)
                except ValueError:
                    continue
            for value in values:
                raw = os.fspath(value) if isinstance(value, os.PathLike) else value
                if isinstance(raw, (str, bytes)) and len(raw) < 4096:
                    path = os.fsdecode(raw)
                    if os.path.isabs(path) and os.path.lexists(path) and path != "/":
                        seen.setdefault(path, None)
        self.paths = list(seen)[:64]

    def unsafe_handlers(self) -> list[tuple[Callable[..., object], tuple[object, ...],
                                            dict[str, object]]]:
        """The handlers the setup registered, but the standard library's per-process ones."""
        return [h for h in self.handlers if _qualname(h[0]) not in SAFE_ATEXIT]

    def describe(self) -> str:
        names = ", ".join(_qualname(h[0]) for h in self.unsafe_handlers())
        return f"atexit handler(s) registered during setup: {names}"

    def removed(self) -> list[str]:
        """The handlers' paths that are gone now."""
        return [p for p in self.paths if not os.path.lexists(p)]


#: Set by the runner before ``initialisation_complete()``.
setup_effects: SetupEffects | None = None


# ------------------------------------------------------------------ server side


class Learner:
    """The server's side (see module docstring).  One per server; ``close()`` in spares."""

    def __init__(self, path: str, log: ServerLog, *, learn: bool) -> None:
        self.path = path
        self.log = log
        self.enabled = learn
        self.state = State.load(path)
        self.pending: dict[str, None] = {}
        self.pending_re: dict[tuple[str, str, int], None] = {}
        self.sock: _socket.socket | None = None
        self.autoreload: Autoreload | WatchLink | None = None
        self.effects = setup_effects
        self.deferred: list[tuple[Callable[..., object], tuple[object, ...],
                                  dict[str, object]]] = []
        #: A rehearsal's probe, running (``prefork.server.rehearse``).
        self.probing: Probe | None = None
        #: The script's own fds (a probe's forks keep them, as executors do; set by api).
        self.keep_fds: set[int] = set()

    # --------------------------------------------------- set-up (in the server, before freeze)

    def start(self, autoreload: Autoreload | WatchLink | None) -> None:
        """Open the report socket, start warm from the saved state, deal with the setup's
        atexit handlers."""
        self.autoreload = autoreload
        self._setup_atexit()
        if not self.enabled:
            return
        global _report_addr
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_NONBLOCK
                              | _socket.SOCK_CLOEXEC)
        addr = b"\0prefork-learn-" + os.urandom(8).hex().encode()
        sock.bind(addr)
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_PASSCRED, 1)
        self.sock = sock
        _report_addr = addr
        if self.state.learned:
            self.pending = dict.fromkeys(self.state.learned)
            self.state.learned = []
            self.pending_re = dict.fromkeys(self.state.regexes)
            self.state.regexes = []
            self.step(initial=True)
        else:
            self._refresh_known()

    def _setup_atexit(self) -> None:
        import atexit

        effects = self.effects
        if effects is not None:
            unsafe = effects.unsafe_handlers()
            if not unsafe:
                return
            if self.state.undone:
                for h in unsafe:
                    atexit.unregister(h[0])
                self.deferred = unsafe
                self.log.warning(f"{effects.describe()}: run when the server exits, not "
                                 f"after every call (a call removed {self.state.undone[0]}, "
                                 "made during setup)")
            else:
                self.log.info(f"{effects.describe()}: run at the end of every call; "
                              f"setup paths checked after each: {effects.paths[:5]}")
        elif atexit._ncallbacks():
            self.log.info(f"{atexit._ncallbacks()} atexit handler(s) registered during setup "
                          "run at the end of every call")

    def close(self) -> None:
        """In a spare: let go of the server's socket and a probe's pipes and pidfds (the
        module globals stay, for ``report``)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.probing is not None:
            for fd in [*self.probing.open_ends, *self.probing.pidfds]:
                os.close(fd)
            self.probing = None

    # --------------------------------------------------- between calls

    def after_call(self) -> str | None:
        """An executor was reaped: collect reports; a reason to quit if the call undid the
        setup's state (see ``SetupEffects``)."""
        self._collect()
        effects = self.effects
        if effects is None or self.deferred or not effects.paths \
                or not effects.unsafe_handlers():
            return None
        gone = effects.removed()
        if not gone:
            return None
        self.log.warning(f"a call removed {gone[0]}, made during setup ({effects.describe()}):"
                         " the server restarts; the next one runs those handlers only when it "
                         "exits")
        self.state.undone = gone
        self._save()
        return f"a call removed {gone[0]}, made during setup"

    def _collect(self) -> None:
        if self.sock is None:
            return
        uid = os.getuid()
        while True:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(
                    MAX_REPORT + 1, _socket.CMSG_SPACE(12))
            except BlockingIOError:
                return
            except OSError as e:
                self.log.warning(f"reading a learning report failed: {e}")
                return
            sender = None
            for level, kind, cdata in anc:
                if level == _socket.SOL_SOCKET and kind == _socket.SCM_CREDENTIALS \
                        and len(cdata) >= 12:
                    sender = int.from_bytes(cdata[4:8], sys.byteorder)
            if sender != uid:
                self.log.warning(f"ignored a learning report from uid {sender}")
                continue
            mods, regexes = _decode(data)
            refused = self.state.refused
            for m in mods:
                if m not in sys.modules and m not in refused:
                    self.pending.setdefault(m, None)
            for r in regexes:
                if len(self.state.regexes) + len(self.pending_re) < MAX_REGEXES:
                    self.pending_re.setdefault(r, None)

    def due(self) -> bool:
        from prefork.server import rehearse

        plan = rehearse.planned
        if plan is None or plan.outcome is not None:
            return bool(self.pending or self.pending_re)
        # Not rehearsed yet: start the probe, or see if it is done (without blocking).
        return bool(self.pending or self.pending_re) or self.probing is None \
            or self.probing.poll()

    def step(self, *, initial: bool = False) -> None:
        """Probe, import and compile what is pending (no call runs); save the state."""
        names = [m for m in self.pending if m not in sys.modules][:MAX_PER_STEP]
        self.pending = {m: None for m in self.pending if m not in names and m not in sys.modules}
        learned_now: list[str] = []
        t0 = time.monotonic()
        rounds = 0
        while names and rounds < 3:
            rounds += 1
            try:
                ok, refused = probe(names)
            except OSError as e:
                self.log.warning(f"learning: cannot fork a probe: {e}")
                return
            for name, why in refused.items():
                self.state.refused[name] = why
                self.log.info(f"learning: refused {name}: {why}")
            if not refused and len(ok) == len(names):
                learned_now = self._import(ok)
                break
            # Again, without the refused ones: one that imports a refused module must be
            # judged with that import's side effects, in a fresh probe.
            names = [n for n in names if n not in refused]
        self._compile_regexes()
        if not initial:  # (not at start: the first call would wait for it)
            self._rehearse()
        if learned_now:
            self.log.info(f"learning: imported {len(learned_now)} module(s) in "
                          f"{time.monotonic() - t0:.3f}s" + (" (from the saved state)"
                                                             if initial else ""))
        self._refresh_known()
        self._save()

    def _rehearse(self) -> None:
        """Once per server, after its first call: start the probe (in forks: calls go on
        meanwhile); at a later step, once it is done, rehearse here or refuse."""
        from prefork.server import rehearse

        plan = rehearse.planned
        if plan is None or plan.outcome is not None:
            return
        probing = self.probing
        if probing is None:
            try:
                self.probing = rehearse.Probe(plan, keep_fds=self.keep_fds)
            except OSError as e:
                plan.outcome = f"refused: cannot fork a probe: {e}"
                self.log.warning(f"rehearsal {plan.outcome}")
                self.state.rehearsal = plan.outcome
            return
        if not probing.poll():
            return
        self.probing = None
        why, denied, _seconds = probing.verdict()
        probe_s = time.monotonic() - probing.started
        if len(why) == 1 and why[0].startswith(rehearse.TOO_SLOW) \
                and plan.slow + 1 < rehearse.TRIES:
            plan.slow += 1  # a busy machine: probe again at the next step
            self.log.info(f"rehearsal: probe {plan.slow} of {rehearse.TRIES}: {why[0]}")
            return
        if why:
            plan.outcome = f"refused: {'; '.join(why)}"
            self.log.warning(f"rehearsal with {plan.args!r} {plan.outcome}")
        else:
            before = set(sys.modules)
            took = rehearse.perform(plan)
            plan.outcome = (f"done with {plan.args!r} in {took:.3f}s (probe {probe_s:.3f}s: "
                            "the next call's output is identical)"
                            + (f"; denied: {', '.join(denied)}" if denied else ""))
            self.log.info(f"rehearsal {plan.outcome}")
            if self.autoreload is not None:
                self.autoreload.add_files(
                    [f for f in (getattr(sys.modules.get(m), "__file__", None)
                                 for m in set(sys.modules) - before) if isinstance(f, str)])
        self.state.rehearsal = plan.outcome

    def owns(self, pid: int) -> bool:
        """Whether ``pid`` is a child of the learner's (a rehearsal probe's fork)."""
        return self.probing is not None and self.probing.owns(pid)

    def _import(self, names: list[str]) -> list[str]:
        import gc
        import importlib

        before = set(sys.modules)
        done: list[str] = []
        for name in names:
            if name in sys.modules:
                if name not in self.state.learned:
                    done.append(name)
                continue
            try:
                importlib.import_module(name)
            except BaseException as e:  # noqa: BLE001 - it worked in the probe; not here
                self.state.refused[name] = f"import failed in the server: {type(e).__name__}"
                continue
            done.append(name)
        self.state.learned.extend(n for n in done if n not in self.state.learned)
        if self.autoreload is not None:
            files = [f for f in (getattr(sys.modules.get(m), "__file__", None)
                                 for m in set(sys.modules) - before) if isinstance(f, str)]
            self.autoreload.add_files(files)
        gc.collect()
        gc.freeze()
        return done

    def _compile_regexes(self) -> None:
        import re

        for kind, hexed, flags in self.pending_re:
            try:
                re.compile(_pattern(kind, hexed), flags)
            except (re.error, ValueError, TypeError, OverflowError, RecursionError):
                continue
            self.state.regexes.append((kind, hexed, flags))
        self.pending_re = {}
        del self.state.regexes[:-MAX_REGEXES]

    def _refresh_known(self) -> None:
        global _known, _known_re
        _known = frozenset(sys.modules) | frozenset(self.state.refused)
        re_mod = sys.modules.get("re")
        keys: set[object] = set()
        if re_mod is not None:
            for cache_name in ("_cache", "_cache2"):
                cache = getattr(re_mod, cache_name, None)
                if isinstance(cache, dict):
                    keys.update(cache)
        _known_re = frozenset(keys)

    def _save(self) -> None:
        try:
            self.state.save(self.path)
        except OSError as e:
            self.log.warning(f"learning: cannot save {self.path}: {e}")

    def server_exit(self) -> None:
        """The server quits: run the setup's atexit handlers deferred to now."""
        for func, args, kwargs in reversed(self.deferred):
            try:
                func(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - reported, the others still run
                self.log.warning(f"atexit handler {_qualname(func)} failed: {e!r}")
        self.deferred = []


def load_for_show(path: str) -> State | None:
    """For ``prefork-ctl show``: the state file, if there is one."""
    return State.load(path) if os.path.exists(path) else None
