"""``--explain``: what setup would preload and why, what each import costs, and the fork
hazards (threads started, files or sockets left open) the preload leaves."""

from __future__ import annotations

import os
import sys

from prefork.server.runner.preload import plan_preload, preload_one
from prefork.server.runner.script import PROG, Script, enter
from prefork.server.runner.wrap import same_python, shebang_python

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse


def explain(script: Script, opts: argparse.Namespace) -> int:
    """Print what setup would preload and why, what each import costs, and fork hazards."""
    out = sys.stdout
    title = script.given if script.wrapper is None else \
        f"{script.given} (wrapper for {script.path})"
    out.write(f"{PROG}: {title}\n")
    interp = shebang_python(script.source)
    if interp is not None and not same_python(interp[0]):
        out.write(f"warning: its #! names {interp[0]}, not this interpreter "
                  f"({sys.executable}): its imports may fail here; "
                  f"`{PROG} --wrap` makes a wrapper that uses the right one\n")
    plan = plan_preload(script, opts.preload, not opts.no_preload)
    enter(script, opts.args)
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
    out.write("modules the script imports only while it runs are not preloaded: "
              "`python -X importtime SCRIPT ARGS` lists them; add them with --preload\n")
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

