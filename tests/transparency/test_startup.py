"""Smaller start-up facts of a direct run (issue 12, item 9): ``python -m mod`` through the
client, glibc's internal signals 32 and 33 at their default (not left ignored by the cold
path's ``posix_spawn``), and ``/proc/PID/environ`` (``ps e``, psutil) showing the call's
environment.  Direct, cold and warm (the server started by another call), under pipes and
a pty, on 3.13 and 3.11."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from harness import CLIENT

from .probes import INTERPRETERS, PYTHONS, ProbeFactory, Run, run_pty, status_text

pytestmark = pytest.mark.timeout(120)

MODULE = '''\
import json, os, sys
sys.path.insert(0, {repo!r})
import prefork
prefork.initialisation_complete()
if os.environ.get("PROBE_WARMUP"):
    raise SystemExit(0)
print(json.dumps({{"argv": sys.argv, "orig_argv": sys.orig_argv, "name": __name__,
                  "file": __file__, "path0": sys.path[0]}}), flush=True)
'''


def _run(cmd: list[str], env: dict[str, str], cwd: Path, io: str, procs: object) -> Run:
    if io == "pty":
        return run_pty(cmd, env, cwd, b"", None, 30.0)
    rc, out, err = procs.run(cmd, env=env, cwd=cwd)  # type: ignore[attr-defined]
    return Run(status_text(rc), out, err)


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("io", ["pipe", "pty"])
@pytest.mark.parametrize("form", ["plain", "shebang"])
def test_python_dash_m(make_probe: ProbeFactory, tmp_path: Path, python: str, io: str,
                       form: str) -> None:
    """``prefork-interp -U python -m mod args`` (or ``-U,python,-m mod args``): sys.argv[0]
    is the module's file and sys.orig_argv is ``[python, -m, mod, args]``, as for
    ``python -m mod args``; another module gets its own server."""
    from harness import REPO

    interp = INTERPRETERS[python]
    probe = make_probe("")  # only for its environment and process registry
    for name in ("pmod", "othermod"):
        (tmp_path / f"{name}.py").write_text(MODULE.format(repo=str(REPO)))

    def client(name: str, *args: str) -> list[str]:
        if form == "plain":
            return [str(CLIENT), "-U", interp, "-m", name, *args]
        return [str(CLIENT), f"-U,{interp},-m", name, *args]

    for name in ("pmod", "othermod"):  # cold: no server for either module
        rc, _, err = probe.procs.run([str(CLIENT), "--kill", "-U", interp, "-m", name],
                                     env=probe.env, cwd=tmp_path)
        assert rc == 0, err
    want = _run([interp, "-m", "pmod", "a b", ""], probe.env, tmp_path, io, probe.procs)
    seen = json.loads(want.out.decode().strip().splitlines()[-1])
    assert seen["argv"] == [str(tmp_path / "pmod.py"), "a b", ""]
    assert seen["orig_argv"] == [interp, "-m", "pmod", "a b", ""]
    for _ in ("cold", "warm"):
        assert _run(client("pmod", "a b", ""), probe.env, tmp_path, io, probe.procs) == want
    other = _run(client("othermod", "x"), probe.env, tmp_path, io, probe.procs)
    assert json.loads(other.out.decode().strip().splitlines()[-1])["argv"] == [
        str(tmp_path / "othermod.py"), "x"]


SIGNALS = r'''
import subprocess
def ignored(text):
    line = [l for l in text.splitlines() if l.startswith("SigIgn:")][0]
    mask = int(line.split()[1], 16)
    return [n + 1 for n in range(64) if mask >> n & 1]
with open("/proc/self/status") as f:
    mine = ignored(f.read())
child = ignored(subprocess.run(["cat", "/proc/self/status"], capture_output=True,
                               text=True, check=True).stdout)
print(mine, child, flush=True)
'''


#: The caller: sets signals 32 and 33 to SIG_DFL or SIG_IGN (glibc's sigaction refuses
#: them: the kernel's rt_sigaction, x86-64 and arm64 numbers) and execs the rest.
CALLER = r'''
import ctypes, os, platform, shutil, sys
nr = {"x86_64": 13, "aarch64": 134}[platform.machine()]
libc = ctypes.CDLL(None)
for sig in (32, 33):
    act = (ctypes.c_ulong * 4)(1 if sys.argv[1] == "ignored" else 0)
    assert libc.syscall(nr, sig, ctypes.byref(act), None, 8) == 0
os.execv(shutil.which(sys.argv[2]), sys.argv[2:])
'''


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("io", ["pipe", "pty"])
@pytest.mark.parametrize("caller", ["default", "ignored"])
def test_glibc_internal_signals_as_the_caller_left_them(
        make_probe: ProbeFactory, python: str, io: str, caller: str) -> None:
    """Signals 32 and 33 as the caller left them, in the script and its children: at
    default (posix_spawn had left them ignored in the server, so in every call), or
    ignored (the executor copies that from the client, as exec would have kept it)."""
    import sys

    probe = make_probe(SIGNALS, python=INTERPRETERS[python])
    runs = {}
    for how in ("direct", "cold", "warm"):
        probe.prepare(how)
        cmd = [sys.executable, "-c", CALLER, caller, *probe.command(how)]
        runs[how] = _run(cmd, probe.env, Path.cwd(), io, probe.procs)
    expect = b"[13, 25] []" if caller == "default" else b"[13, 25, 32, 33] [32, 33]"
    assert runs["direct"].out.strip() == expect, runs["direct"]
    assert runs["cold"] == runs["direct"] and runs["warm"] == runs["direct"], runs


ENVIRON = r'''
import json
with open("/proc/self/environ", "rb") as f:
    raw = f.read()
shown = {}
for entry in raw.split(b"\0"):
    if not entry:
        break          # as psutil and procps read it: an empty string ends the block
    k, _, v = entry.partition(b"=")
    shown[k.decode()] = v.decode()
import psutil
print(json.dumps({"shown_is_environ": shown == dict(os.environ),
                  "psutil": psutil.Process().environ() == dict(os.environ),
                  "callvar": shown.get("CALLVAR")}), flush=True)
'''


@pytest.mark.parametrize("python", ["py3"])
@pytest.mark.parametrize("io", ["pipe", "pty"])
def test_proc_environ_is_the_calls(make_probe: ProbeFactory, python: str, io: str) -> None:
    """``/proc/self/environ`` (``ps e``, psutil) shows the call's environment when it fits
    the server's original environment block (here: one variable less than the warm-up
    call that started the server, one of another value)."""
    probe = make_probe(ENVIRON, python=INTERPRETERS[python])
    env = {**probe.env, "CALLVAR": "x"}
    want = probe.differential(env=env, io=io)
    assert json.loads(want.out.decode().strip().splitlines()[-1]) == {
        "shown_is_environ": True, "psutil": True, "callvar": "x"}


def test_proc_environ_too_large_shows_none(make_probe: ProbeFactory) -> None:
    """Remaining difference: a call whose environment is larger than the block the server
    was started with shows an empty ``/proc/PID/environ`` (never another environment)."""
    probe = make_probe(ENVIRON)
    env = {**probe.env, "CALLVAR": "x" * 100_000}
    probe.prepare("warm")
    rc, out, err = probe.procs.run(probe.command("warm"), env=env)
    assert rc == 0, err
    assert json.loads(out) == {"shown_is_environ": False, "psutil": False, "callvar": None}
    assert os.environ.get("CALLVAR") is None
