#!/usr/bin/env python3
"""``make demo``: time a slow-starting script run directly and through ``prefork-interp``.

1. Makes a short temporary directory with a private run directory (``PREFORK_INTERP_RUNDIR``)
   and a copy of ``examples/slowreport.py`` whose first line is
   ``#!<repo>/.venv/bin/prefork-interp -U,<repo>/.venv/bin/python``.
2. Runs it directly with the venv's Python (5 times), then through prefork-interp: once cold
   (starts the server) and 5 times warm; prints the medians, the speed-up, and checks that
   every run printed the same thing and exited with the same status.
3. Stops the server with ``prefork-interp -U --kill`` (same interpreter, script, cwd and run
   directory, hence the same ident), waits until no process of the demo is left, and removes
   the directory.

Exit status 0 when all of that worked.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = VENV_BIN / "python"
CLIENT = VENV_BIN / "prefork-interp"
SOURCE = REPO / "examples" / "slowreport.py"

ARGS = ["--exit", "3", "alpha", "beta"]
STDIN = b"the quick brown fox\njumps over the lazy dog\n"
WARM_RUNS = 5
CALL_TIMEOUT = 120.0  # a cold start may take a while on a loaded machine
STOP_TIMEOUT = 15.0


class DemoError(Exception):
    pass


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int, bytes, bytes]:
    """Run once; (seconds, exit status, stdout, stderr)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, input=STDIN, capture_output=True, env=env, cwd=cwd,
                           timeout=CALL_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as e:
        raise DemoError(f"{cmd[0]} did not finish within {CALL_TIMEOUT:.0f} s") from e
    return time.perf_counter() - t0, p.returncode, p.stdout, p.stderr


# ------------------------------------------------------------------ finding our processes


def _socket_inodes_under(d: str) -> set[str]:
    """Inodes of Unix sockets bound to a path under ``d`` (from /proc/net/unix)."""
    inodes = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[7].startswith(d + "/"):
                inodes.add(parts[6])
    return inodes


def demo_processes(d: str) -> set[int]:
    """Live processes holding a socket bound under ``d`` or naming ``d`` in their command
    line or environment (server, watcher, executors); never this process."""
    inodes = _socket_inodes_under(d)
    needle = re.compile(re.escape(os.fsencode(d)) + rb"(?:/|\x00|$)")
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        pid = int(name)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue  # a zombie is gone, just not yet reaped by its parent
            for fn in ("cmdline", "environ"):
                with open(f"/proc/{pid}/{fn}", "rb") as f:
                    if needle.search(f.read()):
                        found.add(pid)
            if inodes and pid not in found:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        found.add(pid)
                        break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def wait_until_gone(d: str, timeout: float) -> set[int]:
    """Poll until no demo process is left or the deadline passes; the leftovers."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        left = demo_processes(d)
        remaining = deadline - time.monotonic()
        if not left or remaining <= 0:
            return left
        select.select([], [], [], min(delay, remaining))
        delay = min(delay * 2, 0.2)


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------ the demo


def ms(s: float) -> str:
    return f"{s * 1000:8.1f} ms"


def demo(tmp: Path) -> None:
    rundir = tmp / "run"
    rundir.mkdir(mode=0o700)
    script = tmp / "slowreport.py"
    body = SOURCE.read_text().split("\n", 1)[1]  # drop its own #! line
    script.write_text(f"#!{CLIENT} -U,{PYTHON}\n{body}")
    script.chmod(0o755)

    env = dict(os.environ)
    env.pop("PREFORK_INTERP", None)
    env["PREFORK_INTERP_RUNDIR"] = str(rundir)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"

    print(f"script: {script}  (first line: #!{CLIENT} -U,{PYTHON})")
    print(f"call:   {script.name} {' '.join(ARGS)} < {len(STDIN)} bytes\n")

    direct = [run([str(PYTHON), str(script), *ARGS], env, tmp) for _ in range(WARM_RUNS)]
    via = [str(script), *ARGS]  # the kernel reads the #! line and starts prefork-interp
    cold = run(via, env, tmp)
    if cold[1] != direct[0][1] or cold[2] != direct[0][2]:
        raise DemoError(
            f"the first call through prefork-interp failed (status {cold[1]}):\n"
            + cold[3].decode(errors="replace")
        )
    warm = [run(via, env, tmp) for _ in range(WARM_RUNS)]

    t_direct = statistics.median(r[0] for r in direct)
    t_warm = statistics.median(r[0] for r in warm)
    print(f"  {'run':<28}{'time':>11}  runs")
    print(f"  {'direct (python script)':<28}{ms(t_direct)}  {WARM_RUNS} (median)")
    print(f"  {'prefork-interp, cold':<28}{ms(cold[0])}  1")
    print(f"  {'prefork-interp, warm':<28}{ms(t_warm)}  {WARM_RUNS} (median)")
    print(f"\n  speed-up, direct / warm: {t_direct / t_warm:.1f}x\n")

    outputs = {(r[1], r[2]) for r in (*direct, cold, *warm)}
    if len(outputs) != 1:
        raise DemoError(f"runs differ: {sorted(outputs)}")
    status, out = outputs.pop()
    print(f"every run printed the same and exited {status}:\n  {out.decode().strip()}\n")

    servers = demo_processes(str(tmp))
    kill = run([str(CLIENT), "-U", "--kill", str(PYTHON), str(script)], env, tmp)
    if kill[1] != 0:
        raise DemoError(f"prefork-interp --kill failed: {kill[3].decode(errors='replace')}")
    left = wait_until_gone(str(tmp), STOP_TIMEOUT)
    if left:
        raise DemoError(f"processes still running {STOP_TIMEOUT:.0f} s after --kill: "
                        f"{sorted(left)}")
    print(f"server stopped with --kill ({len(servers)} process(es) of the demo gone)")


def main() -> int:
    for f in (PYTHON, CLIENT):
        if not os.access(f, os.X_OK):
            print(f"demo: {f} is missing: run `make venv` first", file=sys.stderr)
            return 1
    tmp = Path(tempfile.mkdtemp(prefix="pfdemo", dir="/tmp"))
    try:
        demo(tmp)
        return 0
    except DemoError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    finally:
        left = demo_processes(str(tmp))
        if left:
            print(f"demo: killing leftover processes {sorted(left)}", file=sys.stderr)
            kill_all(left)
            wait_until_gone(str(tmp), STOP_TIMEOUT)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
