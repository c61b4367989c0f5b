"""``--explain``: what setup would preload and why, what each import costs, and the fork
hazards (threads started, files or sockets left open) the preload leaves; with ``-- ARGS``,
also one real run of the program in a fork of that state: what it imported while running,
what each import cost, and what preloading those would add or risk (``learn``)."""

from __future__ import annotations

import os
import sys
import time

from prefork.server.runner.preload import plan_preload, preload_one
from prefork.server.runner.script import PROG, Script, enter, run

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    import types
    from typing import Any


def explain(script: Script, opts: argparse.Namespace) -> int:
    """Print what setup would preload and why, what each import costs, and fork hazards;
    with ``-- ARGS`` (``opts.run_args`` not None) run the script once and add what it
    imported while running.  ``opts.json``: one JSON object instead (for ``--wrap``)."""
    import io
    import json

    real_out = sys.stdout
    out = io.StringIO() if opts.json else real_out
    title = script.given if script.wrapper is None else \
        f"{script.given} (wrapper for {script.path})"
    out.write(f"{PROG}: {title}\n")
    plan = plan_preload(script, opts.preload, not opts.no_preload)
    args = opts.args if opts.run_args is None else opts.run_args
    module = enter(script, args)
    threads_before = _task_count()
    fds_before = _fd_targets()
    total = 0
    results = [preload_one(f) for f in plan]
    out.write("preload (module-level imports, in order; time includes what each pulls in):\n")
    if not results:
        out.write("  nothing\n")
    for res in results:
        total += res.ns
        if res.skipped is not None:
            if res.skipped == "already loaded":
                what = "loaded"
            elif res.found.quiet:
                continue
            else:
                what = "skip"
        elif res.error is not None:
            what = "FAILS"
        else:
            what = f"{res.ns / 1e6:7.1f} ms"
        out.write(f"  {what:>10}  {res.found.name:<32} {res.found.why}\n")
        if res.error is not None:
            out.write(f"  {'':>10}  -> {res.error} (not preloaded: the script meets it "
                      "itself)\n")
    out.write(f"total {total / 1e6:.1f} ms, {len(sys.modules)} modules loaded\n")
    hazards = 0
    threads = _task_count() - threads_before
    if threads > 0:
        hazards += 1
        names = _thread_names()
        out.write(f"warning: {threads} thread(s) started during preload{names}: after the "
                  "fork only the calling thread exists in each call (see "
                  "docs/prefork-server.md, fork hazards)\n")
    new_fds = {fd: t for fd, t in _fd_targets().items() if fds_before.get(fd) != t}
    for fd, target in sorted(new_fds.items()):
        hazards += 1
        out.write(f"warning: fd {fd} ({target}) opened during preload is shared by every "
                  "call (see docs/prefork-server.md, fork hazards)\n")
    if not hazards:
        out.write("no threads started and no files or sockets left open by the preload\n")
    if opts.run_args is None:
        out.write("modules the script imports only while it runs are not preloaded: "
                  f"`{PROG} --explain SCRIPT -- ARGS` runs it once and lists them\n")
        if isinstance(out, io.StringIO):
            json.dump({"text": out.getvalue()}, real_out)
        return 0
    if sys.stdout is not real_out:  # pragma: no cover - the preload replaced it
        sys.stdout = real_out
    report = observe_run(script, module)
    if opts.json:
        learn, refused = learnable(report)
        report["learn"] = learn
        report["refused"] = refused
        json.dump(report, real_out)
        real_out.write("\n")
        return 0
    write_run_report(report, args)
    return 0


def _task_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _thread_names() -> str:
    threading = sys.modules.get("threading")
    if threading is None:
        return ""
    names = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    return f" ({', '.join(names)})" if names else ""


def _fd_targets() -> dict[int, str]:
    targets = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return {}
    for name in names:
        try:
            targets[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    return targets



# ------------------------------------------------------------------ one real run (-- ARGS)


class _Recorder:
    """Times every import that runs (the hook ``-X importtime`` uses: the import system's
    ``_find_and_load``, called only for a module not yet loaded) and notes, for each
    outermost one, the threads and fds it left behind, the ``atexit`` handlers it
    registered, and (by an audit hook) the files and directories it created: a handler
    that removes those at exit would, in a server, undo the import's work after the
    first call (ansible's ``ansible-local-<pid>`` directory)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.stack: list[int] = []
        self.atexit_names: list[str] = []
        self.original: Any = None
        #: The record of the outermost import running now (None between imports).
        self.current: dict[str, Any] | None = None
        #: Paths removed while the atexit handlers ran.
        self.removed: list[str] = []
        self.exiting = False

    def install(self) -> None:
        import atexit

        bootstrap: Any = sys.modules["_frozen_importlib"]
        original = bootstrap._find_and_load
        original_register = atexit.register
        perf = time.perf_counter_ns

        def find_and_load(*args: object, **kw: object) -> object:
            outer = not self.stack
            before = _hazard_state() if outer else None
            record: dict[str, Any] = {"name": args[0], "depth": len(self.stack)}
            if outer:
                record["created"] = []
                self.current = record
            self.records.append(record)
            self.stack.append(0)
            t0 = perf()
            try:
                return original(*args, **kw)
            except BaseException as e:
                record["error"] = f"{type(e).__name__}: {e}"
                raise
            finally:
                total = perf() - t0
                children = self.stack.pop()
                if self.stack:
                    self.stack[-1] += total
                record["self_ns"] = total - children
                record["total_ns"] = total
                if before is not None:
                    self.current = None
                    record["hazards"], record["atexit"] = _hazards_since(before)

        def register(func: Any, *args: object, **kw: object) -> Any:
            self.atexit_names.append(_callable_name(func))
            return original_register(func, *args, **kw)

        self.original = original
        bootstrap._find_and_load = find_and_load
        atexit.register = register  # type: ignore[assignment]
        sys.addaudithook(self._audit)

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        """Paths made during an outermost import; paths removed by atexit handlers."""
        if self.current is None and not self.exiting:
            return
        path: object = None
        if event in ("os.mkdir", "tempfile.mkdtemp", "tempfile.mkstemp"):
            path = args[0] if self.current is not None else None
            if path is not None and isinstance(path, str | bytes):
                self.current["created"].append(os.path.abspath(os.fsdecode(path)))  # type: ignore[index]
        elif event == "open" and self.current is not None and len(args) >= 2 \
                and isinstance(args[1], str) and any(c in args[1] for c in "wax+") \
                and isinstance(args[0], str | bytes):
            self.current["created"].append(os.path.abspath(os.fsdecode(args[0])))
        elif self.exiting and event in ("os.remove", "os.rmdir", "shutil.rmtree",
                                        "os.rename"):
            path = args[0]
            if isinstance(path, str | bytes):
                self.removed.append(os.path.abspath(os.fsdecode(path)))

    def run_exit_handlers(self) -> None:
        """Run the ``atexit`` handlers (as the end of a call does) and mark each outermost
        import whose files they remove."""
        import atexit

        self.exiting = True
        try:
            atexit._run_exitfuncs()
        finally:
            self.exiting = False
        for record in self.records:
            undone = sorted({r for r in self.removed for c in record.get("created", ())
                             if r == c or c.startswith(r + os.sep)})
            if undone:
                record["hazards"].append(
                    "an atexit handler removes what importing it made ("
                    + ", ".join(undone[:3]) + "): in a server that is undone after the "
                    "first call")

    def uninstall(self) -> None:
        bootstrap: Any = sys.modules["_frozen_importlib"]
        bootstrap._find_and_load = self.original


def _callable_name(func: object) -> str:
    module = getattr(func, "__module__", None) or "?"
    name = getattr(func, "__qualname__", None) or repr(func)
    return f"{module}.{name}"


def _hazard_state() -> tuple[int, int, dict[int, str]]:
    import atexit

    return _task_count(), atexit._ncallbacks(), _fd_targets()


def _hazards_since(before: tuple[int, int, dict[int, str]]) -> tuple[list[str], int]:
    """(what an import left that makes importing it in the server unsafe to fork, how many
    atexit handlers it registered)."""
    threads, callbacks, fds = before
    now_threads, now_callbacks, now_fds = _hazard_state()
    out = []
    if now_threads > threads:
        out.append(f"started {now_threads - threads} thread(s){_thread_names()}")
    opened = sorted(fd for fd, t in now_fds.items() if fds.get(fd) != t)
    if opened:
        out.append("left open " + ", ".join(f"fd {fd} ({now_fds[fd]})" for fd in opened))
    return out, max(0, now_callbacks - callbacks)


def observe_run(script: Script, module: types.ModuleType) -> dict[str, Any]:
    """Run the script once, in a fork of this (preloaded) process, as a call would, its
    stdout and stderr kept apart; return what it imported and left behind."""
    import json

    report_r, report_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.perf_counter_ns()
    pid = os.fork()
    if pid == 0:  # the child: run the program, report, end
        status = 70
        try:
            os.close(report_r)
            status = _child_run(script, module, report_w)
        finally:
            os._exit(status)
    os.close(report_w)
    with open(report_r, "rb") as report_in:  # read to EOF before reaping: no pipe stall
        data = report_in.read()
    _, wait_status = os.waitpid(pid, 0)
    elapsed = time.perf_counter_ns() - t0
    try:
        report: dict[str, Any] = json.loads(data) if data else {}
    except ValueError:
        report = {}
    if not report:
        report = {"status": os.waitstatus_to_exitcode(wait_status), "records": [],
                  "failed": "the run ended before reporting (killed, or os._exit)"}
    report["elapsed_ns"] = elapsed
    return report


def _child_run(script: Script, module: types.ModuleType, report_w: int) -> int:
    """In the child: stdout/stderr to memory, hooks on, the script run; the report sent."""
    import json
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    outs = {}
    for fd in (1, 2):
        mem = os.memfd_create(f"prefork-explain-{fd}", os.MFD_CLOEXEC)
        os.dup2(mem, fd)
        outs[fd] = mem
    recorder = _Recorder()
    before = _hazard_state()
    recorder.install()
    status = 0
    try:
        run(script, module)
    except SystemExit as e:
        code = e.code
        if code is None:
            status = 0
        elif isinstance(code, int):
            status = code & 0xFF
        else:
            status = 1
    except KeyboardInterrupt:
        status = 130
    recorder.uninstall()
    threads, _callbacks, fds = before
    threads_left = max(0, _task_count() - threads)
    thread_names = _thread_names()
    fds_left = [f"fd {fd} ({t})" for fd, t in sorted(_fd_targets().items())
                if fds.get(fd) != t and fd not in outs.values() and fd != report_w]
    recorder.run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    for rec in recorder.records:
        rec.pop("created", None)
    report = {
        "status": status,
        "records": recorder.records,
        "stdout_bytes": os.fstat(outs[1]).st_size,
        "stderr_tail": os.pread(outs[2], 400, max(0, os.fstat(outs[2]).st_size - 400))
        .decode("utf-8", "replace"),
        "threads": threads_left,
        "thread_names": thread_names,
        "atexit": recorder.atexit_names,
        "fds": fds_left,
    }
    data = json.dumps(report).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(report_w, view):]
    os.close(report_w)
    return 0


def learnable(report: dict[str, Any]) -> tuple[list[str], list[tuple[str, str]]]:
    """(modules a server could import in setup: the outermost imports of the run that
    succeeded and left nothing behind; refused ones with the reason)."""
    learn: list[str] = []
    refused: list[tuple[str, str]] = []
    for rec in report.get("records", []):
        if rec.get("depth") != 0:
            continue
        name = str(rec["name"])
        if name == "__main__" or name in learn:
            continue
        if rec.get("error"):
            refused.append((name, f"fails: {rec['error']}"))
        elif rec.get("hazards"):
            refused.append((name, "; ".join(rec["hazards"])))
        else:
            learn.append(name)
    return learn, refused


def write_run_report(report: dict[str, Any], args: list[str], top: int = 15) -> None:
    """The human-readable part of ``--explain ... -- ARGS``."""
    out = sys.stdout
    records = report.get("records", [])
    out.write(f"\nrun with {args!r} (in a fork of the preloaded state, output kept apart): "
              f"exit status {report['status']}, {report.get('stdout_bytes', 0)} bytes on "
              f"stdout, {report['elapsed_ns'] / 1e6:.1f} ms\n")
    if report.get("failed"):
        out.write(f"warning: {report['failed']}\n")
    tail = str(report.get("stderr_tail") or "").strip()
    if tail:
        out.write("  its stderr ends: " + tail.splitlines()[-1][:200] + "\n")
    roots = [r for r in records if r.get("depth") == 0]
    total = sum(int(r.get("total_ns", 0)) for r in roots)
    out.write(f"imported while running (not at setup): {len(records)} modules, "
              f"{total / 1e6:.1f} ms; outermost imports (time includes what each pulls in):\n")
    if not roots:
        out.write("  nothing\n")
    for rec in roots:
        mark = " FAILS" if rec.get("error") else ""
        out.write(f"  {int(rec.get('total_ns', 0)) / 1e6:8.1f} ms  {rec['name']}{mark}\n")
    if records:
        costly = sorted(records, key=lambda r: -int(r.get("self_ns", 0)))[:top]
        out.write("costliest by own time (as python -X importtime's 'self'):\n")
        for rec in costly:
            out.write(f"  {int(rec.get('self_ns', 0)) / 1e6:8.1f} ms  {rec['name']}\n")
    learn, refused = learnable(report)
    saved = sum(int(r.get("total_ns", 0)) for r in roots if r["name"] in learn)
    out.write(f"learning would add {len(learn)} module(s) to setup, saving about "
              f"{saved / 1e6:.1f} ms a call" + (":" if learn else "") + "\n")
    for name in learn:
        out.write(f"  {name}\n")
    for name, why in refused:
        out.write(f"  refused {name}: {why}\n")
    noted = [f"{r['name']} ({r['atexit']})" for r in roots
             if r.get("atexit") and r["name"] in learn]
    if noted:
        out.write("atexit handlers registered while importing (run at the end of every call "
                  "in a server, as in a direct run; none removes what the import made): "
                  + ", ".join(noted) + "\n")
    hazards = []
    if report.get("threads"):
        hazards.append(f"{report['threads']} thread(s) still running at the end"
                       f"{report.get('thread_names', '')}")
    if report.get("atexit"):
        hazards.append("atexit handlers registered while running: "
                       + ", ".join(report["atexit"]))
    if report.get("fds"):
        hazards.append("fds left open: " + ", ".join(report["fds"]))
    for h in hazards:
        out.write(f"fork hint: {h}\n")
    if learn:
        out.write(f"`{PROG} --wrap PROGRAM -- ARGS` makes a wrapper that preloads them; or "
                  + " ".join(f"--preload {n}" for n in learn[:5])
                  + (" ..." if len(learn) > 5 else "") + "\n")
