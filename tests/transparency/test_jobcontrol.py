"""Job control through a real interactive bash on a real pty: Ctrl-Z stops the script (the
executor itself, not just the client) and bash reports a stopped job; ``fg`` and ``bg``
resume it; the script ends with its own status."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pexpect  # type: ignore[import-untyped]
import procfs
import pytest
from harness import scaled, wait_for

from .probes import Probe, ProbeFactory

pytestmark = pytest.mark.timeout(120)

TICKER = r'''
import time
print("pid", os.getpid(), flush=True)
stop = sys.argv[1]
i = 0
while not os.path.exists(stop):
    i += 1
    print("tick", i, flush=True)
    time.sleep(0.02)
print("type something:", flush=True)
line = sys.stdin.readline()
print("got", line.strip(), flush=True)
sys.exit(7)
'''

PROMPT = "PFPROMPT> "


class Shell:
    """An interactive ``bash --norc -i`` on a pty, driven line by line."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        env = {**env, "PS1": PROMPT, "HISTFILE": "/dev/null", "TERM": "dumb"}
        self.bash = pexpect.spawn("bash", ["--norc", "--noprofile", "-i"], env=env,
                                  cwd=str(cwd), timeout=scaled(20), dimensions=(24, 200))
        self.prompt()

    def prompt(self) -> None:
        self.bash.expect_exact(PROMPT)

    def run(self, line: str) -> None:
        self.bash.sendline(line)

    def expect(self, pattern: str) -> re.Match[bytes]:
        self.bash.expect(pattern)
        match = self.bash.match
        assert isinstance(match, re.Match)
        return match

    def close(self) -> None:
        self.bash.sendline("exit")
        self.bash.close(force=True)


def _job_pid(sh: Shell) -> int:
    """The pid bash knows the job by (the process it started: the client, or python)."""
    sh.run("jobs -p")
    pid = int(sh.expect(r"\r\n(\d+)\r\n").group(1))
    sh.prompt()
    return pid


def stop_and_resume(probe: Probe, how: str, tmp_path: Path, resume: str) -> dict[str, object]:
    """Run the ticker under bash, Ctrl-Z it, check that it is really stopped, resume it with
    ``resume`` ("fg" or "bg" then "fg"), let it finish; what was seen."""
    seen: dict[str, object] = {}
    stop = tmp_path / f"stop-{how}-{resume}"
    probe.prepare(how, tmp_path)
    sh = Shell(probe.env, tmp_path)
    try:
        sh.run("CMD=(" + shlex.join([*probe.command(how), str(stop)]) + ")")
        sh.prompt()
        sh.run('"${CMD[@]}"')
        pid = int(sh.expect(r"pid (\d+)\r\n").group(1))
        sh.expect(r"tick 3\r\n")
        sh.bash.send(b"\x1a")
        sh.expect(r"\[1\]\+\s+Stopped\s+\"\$\{CMD\[@\]\}\"")
        sh.prompt()
        job = _job_pid(sh)
        # The script's process itself is stopped (and so is the job's process, the client).
        seen["script stopped"] = wait_for(lambda: procfs.state(pid) == "T", what="stopped")
        seen["job stopped"] = procfs.state(job) == "T"
        if resume == "bg":
            sh.run("bg")
            sh.expect(r"\[1\]\+ \"\$\{CMD\[@\]\}\" &")
            sh.expect(r"tick \d+\r\n")
            seen["running in background"] = procfs.state(pid) in ("R", "S")
        sh.run("fg")
        sh.expect(r"tick \d+\r\n")
        seen["running again"] = procfs.state(pid) in ("R", "S")
        stop.touch()
        sh.expect("type something:")
        sh.run("hello")
        sh.expect(r"got hello\r\n")
        sh.prompt()
        sh.run('echo "status=$?"')
        seen["status"] = sh.expect(r"status=(\d+)").group(1)
        sh.prompt()
    finally:
        sh.close()
    return seen


@pytest.mark.parametrize("how", ["cold", "warm"])
@pytest.mark.parametrize("resume", ["fg", "bg"])
def test_ctrl_z_then_fg_through_bash(make_probe: ProbeFactory, tmp_path: Path, how: str,
                                     resume: str) -> None:
    probe = make_probe(TICKER)
    want = stop_and_resume(probe, "direct", tmp_path, resume)
    got = stop_and_resume(probe, how, tmp_path, resume)
    assert got == want
    assert want["script stopped"] and want["job stopped"] and want["status"] == b"7"


SELF_STOP = r'''
import signal
print("pid", os.getpid(), flush=True)
os.kill(os.getpid(), getattr(signal, sys.argv[1]))
print("continued", flush=True)
'''


@pytest.mark.parametrize("sig", ["SIGTSTP", "SIGSTOP"])
def test_script_stopping_itself(make_probe: ProbeFactory, tmp_path: Path, sig: str) -> None:
    """A script that stops itself (SIGTSTP, or the uncatchable SIGSTOP) is a stopped job for
    the shell too; ``fg`` continues it."""
    probe = make_probe(SELF_STOP)
    results = {}
    for how in ("direct", "warm"):
        probe.prepare(how, tmp_path)
        sh = Shell(probe.env, tmp_path)
        try:
            sh.run("CMD=(" + shlex.join([*probe.command(how), sig]) + ")")
            sh.prompt()
            sh.run('"${CMD[@]}"')
            pid = int(sh.expect(r"pid (\d+)\r\n").group(1))
            sh.expect(r"\[1\]\+\s+Stopped")
            sh.prompt()
            stopped = procfs.state(pid) == "T"
            sh.run("fg")
            sh.expect(r"continued\r\n")
            sh.prompt()
            sh.run('echo "status=$?"')
            results[how] = (stopped, sh.expect(r"status=(\d+)").group(1))
        finally:
            sh.close()
    assert results["warm"] == results["direct"] == (True, b"0")


def test_bash_is_really_interactive(tmp_path: Path, probe_env: dict[str, str]) -> None:
    """The harness itself: job control is on in this bash (else the tests above prove
    nothing)."""
    sh = Shell(probe_env, tmp_path)
    try:
        sh.run('case $- in *m*) echo "monitor=on";; esac')
        sh.expect("monitor=on")
    finally:
        sh.close()
    assert os.environ.get("PREFORK_INTERP") is None
