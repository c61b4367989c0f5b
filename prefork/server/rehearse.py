"""Rehearsal (opt-in, ``prefork-server --wrap NAME --rehearse -- ARGS``): the program runs once
with ARGS in the server itself, between calls, so that every later call starts with what a
run builds lazily on first use -- not only modules and regular expressions but lexer tables
(pygments), plugin and entry-point scans (httpie, flake8), parsed-module caches (pylint's
astroid) -- the state a program's second run in one process starts with.

It is a run the user did not ask for, in the process every call is forked from, so it is
done only when a probe proves it harmless, and sandboxed:

- **probe** (``Probe``): two throwaway forks of the server at once, while the server goes
  on serving calls.  The *reference* runs
  one call with ARGS as an executor would (fresh stdio on memory files): its exit status,
  stdout and stderr.  The *rehearsal* runs the program with ARGS under the guard (below),
  checks what the run left (threads or child processes running, fds open, ``atexit``
  handlers registered, signal handlers, the environment, the working directory, changed),
  then runs the same call again: its status, stdout and stderr must be byte-identical to
  the reference's.  Anything else refuses the rehearsal (the reason is logged and saved).
- **guard** (``_guard``, an audit hook): while a rehearsal runs, changing files (opening
  for writing, making, removing, renaming ...), the network (``connect``, ``bind``,
  ``sendto``), processes (``fork``, ``exec``, ``subprocess``, ``kill``) and the
  environment are denied (``PermissionError``): the probe records what was denied (pylint
  saving its statistics, httpie spawning its update check).  The hook stays installed in a
  server that rehearsed (it cannot be removed) and returns at once outside a rehearsal.
- **server** (``perform()``): signals blocked, stdio on the server's ``/dev/null``, the run
  ends as a call's would (``SystemExit``, an exception: printed to ``/dev/null``), then
  ``sys.argv``, ``__main__``, the recursion limit and ``sys.excepthook`` are put back and
  the new objects frozen (``gc.freeze``).

Standard library only (runs under any program's Python, see ``runner/boot.py``).
"""

from __future__ import annotations

import _signal
import os
import sys
import time

from prefork.server.learn import _hazards, _snapshot, _written_path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

#: Seconds the probe (both forks) may take.
PROBE_BUDGET = 120.0
#: Longest rehearsal (as timed in the probe, two runs at once) done in the server: calls
#: arriving meanwhile wait for it, and a client that gets no greeting for 10 s starts a
#: fresh server (correct, but the rehearsal is lost).
MAX_BLOCK = 9.0
#: Probes per server before a rehearsal found too slow is refused.
TRIES = 3
#: How a refusal for a run too slow starts.
TOO_SLOW = "a run takes "

#: Audit events a rehearsal may not cause (beyond files changed, see learn._written_path).
_DENIED_EVENTS = frozenset({
    "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
    "os.forkpty", "os.kill", "os.killpg", "os.putenv", "os.unsetenv", "os.chdir",
    "os.chmod", "os.chown", "os.utime", "os.chflags", "os.lchmod", "os.lchown",
    "os.mkfifo", "os.mknod", "os.setxattr", "os.removexattr", "sqlite3.connect",
    "webbrowser.open", "pty.spawn"})

#: A rehearsal is running (the guard denies); the guard hook is installed in this process.
_guarding = False
_hook_installed = False
#: What the guard denied in this rehearsal (for the probe's report).
_denied: list[str] = []
#: In a probe's fork: where the guard also writes each denial at once (a program may end
#: the process when denied: httpie ``os._exit(1)``s when its ``fork`` fails).
_live_fd: int | None = None


class Plan:
    """A rehearsal to do: ``run(args)`` runs the program once in this process, as a call
    (the runner's; it restores what it changes), returning its exit status."""

    def __init__(self, run: Callable[[list[str]], int], args: list[str]) -> None:
        self.run = run
        self.args = args
        #: None: not done yet; else what happened (for the log and ``prefork-ctl show``).
        self.outcome: str | None = None
        #: Probes that found a run too slow (a busy machine): tried again up to ``TRIES``.
        self.slow = 0


#: Set by the runner before ``initialisation_complete()`` (``--rehearse``).
planned: Plan | None = None


def _guard(event: str, args: tuple[object, ...]) -> None:
    """The audit hook: outside a rehearsal, return at once.  (It imports nothing: an
    import is an audited event.)"""
    if not _guarding:
        return
    what: str | None = None
    path = _written_path(event, args)
    if path is not None:
        if path != os.devnull:
            what = f"{event} {path}"
    elif event in _DENIED_EVENTS:
        what = event
    if what is None:
        return
    if len(_denied) < 16:
        _denied.append(what)
        if _live_fd is not None:
            os.write(_live_fd, f"live {what}\n".encode("utf-8", "surrogateescape"))
    raise PermissionError(f"prefork-server: denied during a rehearsal: {what}")


def _install_guard() -> None:
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_guard)
        _hook_installed = True


def guarded(plan: Plan, args: list[str]) -> int:
    """One run under the guard: its exit status."""
    global _guarding
    _install_guard()
    _denied.clear()
    _guarding = True
    try:
        return plan.run(args)
    finally:
        _guarding = False


# ------------------------------------------------------------------ probe


def _fresh_stdio() -> tuple[int, int]:
    """stdin on /dev/null, stdout and stderr on new memory files, new ``sys`` streams on
    them (as an executor's): the two memory files."""
    from prefork.server import executor

    out = os.memfd_create("prefork-rehearse-out", os.MFD_CLOEXEC)
    err = os.memfd_create("prefork-rehearse-err", os.MFD_CLOEXEC)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(out, 1)
    os.dup2(err, 2)
    executor.rebuild_stdio(0)
    return out, err


def _digest(fd: int) -> str:
    import hashlib

    os.lseek(fd, 0, os.SEEK_SET)
    h = hashlib.sha256()
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return f"{os.fstat(fd).st_size}:{h.hexdigest()[:32]}"


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


def _one_call(plan: Plan) -> str:
    """A call's result, as a line: status, stdout's and stderr's sizes and digests, and
    what the guard denied (so that no run of the probe changes anything, and a rehearsal
    that made the program stop trying something is seen)."""
    out, err = _fresh_stdio()
    status = guarded(plan, plan.args)
    _flush()
    return f"{status} {_digest(out)} {_digest(err)} denied={_denied!r}"


def _reference_child(plan: Plan, w: int) -> None:
    os.write(w, f"result {_one_call(plan)}\n".encode())


def _rehearsal_child(plan: Plan, w: int) -> None:
    import atexit

    _fresh_stdio()
    scratch = os.memfd_create("prefork-rehearse-scratch", os.MFD_CLOEXEC)
    n_atexit = atexit._ncallbacks()
    before = _snapshot()
    t0 = time.monotonic()
    guarded(plan, plan.args)
    _flush()
    os.write(w, f"took {time.monotonic() - t0:.6f}\n".encode())
    why = _hazards(before, [], scratch, 0)
    if atexit._ncallbacks() > n_atexit and not any("atexit" in x for x in why):
        why.append("registered an atexit handler")
    for what in _denied:
        os.write(w, f"denied {what}\n".encode("utf-8", "surrogateescape"))
    for what in why:
        os.write(w, f"hazard {what}\n".encode("utf-8", "surrogateescape"))
    os.write(w, f"result {_one_call(plan)}\n".encode())


def _detach_child(server_pid: int, keep_fds: Iterable[int], w: int) -> None:
    """In a probe's fork: die with the server (PDEATHSIG), let go of its fds (listening
    socket, watcher pipes ...: held here, they would outlive it), as a spare does."""
    from prefork.common import cfunc
    from prefork.server import executor

    try:
        prctl = cfunc.function("prctl")
    except AttributeError:
        prctl = None
    executor.set_pdeathsig(_signal.SIGKILL, prctl)
    if os.getppid() != server_pid:
        os._exit(0)
    try:
        _signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    executor.close_fds_except({0, 1, 2, w, *keep_fds})


def _fork(child: Callable[[Plan, int], None], plan: Plan,
          keep_fds: Iterable[int]) -> tuple[int, int]:
    """(pid, read end) of a throwaway fork running ``child``; signals stay blocked in it."""
    server_pid = os.getpid()
    r, w = os.pipe2(os.O_CLOEXEC)
    old_mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _signal.valid_signals())
    try:
        pid = os.fork()
    except OSError:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)
        os.close(r)
        os.close(w)
        raise
    if pid == 0:
        global _live_fd
        try:
            _detach_child(server_pid, keep_fds, w)
            _live_fd = w
            child(plan, w)
        except BaseException as e:  # noqa: BLE001 - reported to the server
            try:
                os.write(w, f"hazard the probe failed: {e!r}"[:300].encode() + b"\n")
            except OSError:
                pass
        finally:
            os._exit(0)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)
    os.close(w)
    return pid, r


class Probe:
    """The probe (see the module docstring), running in two forks while the server goes on
    serving calls: ``poll()`` reads what they wrote without blocking; once ``done``,
    ``verdict()`` says what they found.  The server's loop reaps them like any child
    (``owns`` tells it they are ours): they are killed through pidfds, never by a pid that
    may have been reused."""

    def __init__(self, plan: Plan, budget: float = PROBE_BUDGET,
                 keep_fds: Iterable[int] = ()) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + budget
        self.budget = budget
        self.pids: list[int] = []
        self.pidfds: list[int] = []
        self.texts = [b"", b""]
        self.open_ends: dict[int, int] = {}
        self.timed_out = False
        try:
            for i, child in enumerate((_reference_child, _rehearsal_child)):
                pid, r = _fork(child, plan, keep_fds)
                self.pids.append(pid)
                self.open_ends[r] = i
                try:
                    self.pidfds.append(os.pidfd_open(pid))
                except OSError:
                    pass
                os.set_blocking(r, False)
        except OSError:
            self.close()
            raise

    @property
    def done(self) -> bool:
        return not self.open_ends

    def owns(self, pid: int) -> bool:
        return pid in self.pids

    def poll(self) -> bool:
        """Read what is there; True once both forks are done (or the budget is spent)."""
        for r, i in list(self.open_ends.items()):
            while True:
                try:
                    data = os.read(r, 65536)
                except BlockingIOError:
                    break
                if not data:
                    os.close(r)
                    del self.open_ends[r]
                    break
                self.texts[i] += data
        if self.open_ends and time.monotonic() > self.deadline:
            self.timed_out = True
            self.close()
        return self.done

    def close(self) -> None:
        """Kill the forks (if still there), close the pipes and pidfds."""
        for r in self.open_ends:
            os.close(r)
        self.open_ends = {}
        for fd in self.pidfds:
            try:
                _signal.pidfd_send_signal(fd, _signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass
            os.close(fd)
        self.pidfds = []
        for pid in self.pids:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass  # reaped by the server's loop already

    def verdict(self) -> tuple[list[str], list[str], float]:
        """(reasons to refuse, events the guard denied in the rehearsal, the rehearsal's
        seconds in the probe)."""
        self.close()
        if self.timed_out:
            return [f"the probe took longer than {self.budget:g}s"], [], 0.0
        lines = [t.decode("utf-8", "surrogateescape").splitlines() for t in self.texts]
        results = [[x[7:] for x in ls if x.startswith("result ")] for ls in lines]
        hazards = [x[7:] for x in lines[1] if x.startswith("hazard ")]
        hazards += [x[7:] for x in lines[0] if x.startswith("hazard ")]
        denied = [x[7:] for x in lines[1] if x.startswith("denied ")]
        took = [float(x[5:]) for x in lines[1] if x.startswith("took ")]
        why = list(hazards)
        if not results[0] or not results[1]:
            live = [x[5:] for x in lines[0] + lines[1] if x.startswith("live ")]
            if not why:
                why.append("the program ended the probe's process" + (
                    f" after the guard denied {live[-1]}" if live else ""))
        elif results[0] != results[1]:
            why.append(f"the call after a rehearsal differs from one without "
                       f"(status, stdout, stderr: {results[1][0]} instead of {results[0][0]})")
        seconds = took[0] if took else 0.0
        if not why and seconds > MAX_BLOCK:
            why.append(f"{TOO_SLOW}{seconds:.1f}s: calls cannot wait that long for the "
                       f"server (at most {MAX_BLOCK:g}s)")
        return why, denied, seconds


def probe(plan: Plan, budget: float = PROBE_BUDGET,
          keep_fds: Iterable[int] = ()) -> tuple[list[str], list[str]]:
    """The probe, waited for (for tools and tests): (reasons to refuse, denied events)."""
    import select

    p = Probe(plan, budget, keep_fds)
    while not p.poll():
        poller = select.poll()
        for r in p.open_ends:
            poller.register(r, select.POLLIN)
        poller.poll(max(0.0, p.deadline - time.monotonic()) * 1000 + 10)
    why, denied, _seconds = p.verdict()
    return why, denied


# ------------------------------------------------------------------ in the server


def perform(plan: Plan) -> float:
    """Rehearse in this process (the server: stdio on /dev/null), every signal blocked,
    under the guard (a run may not do what the probe's did).  The seconds it took."""
    import gc

    old_mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _signal.valid_signals())
    t0 = time.monotonic()
    try:
        guarded(plan, plan.args)
        _flush()
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)
    gc.collect()
    gc.freeze()
    return time.monotonic() - t0
