"""What follows from the executor having no controlling terminal (declared, inherent: it is
in the server's session), pinned under a pty, and the remedy: ``PREFORK_INTERP_DIRECT=1``
makes the client run the script directly (same as a direct run in every respect)."""

from __future__ import annotations

import pexpect  # type: ignore[import-untyped]
import pytest

from .probes import ProbeFactory, pty_spawn, pty_status

pytestmark = pytest.mark.timeout(120)

GETPASS = r'''
import getpass
try:
    print("got", getpass.getpass("Password: "), flush=True)
except EOFError:
    print("EOFError", flush=True)
'''


def _pty(probe: object, how: str, shell: str, env_extra: dict[str, str], answer: bytes | None
         ) -> tuple[str, bytes]:
    """Run the probe ``how`` inside ``bash -c SHELL`` on a new pty; answer a prompt."""
    probe.prepare(how)  # type: ignore[attr-defined]
    cmd = ["bash", "-c", shell, "bash", *probe.command(how)]  # type: ignore[attr-defined]
    child = pty_spawn(cmd, {**probe.env, **env_extra})  # type: ignore[attr-defined]
    try:
        out = b""
        if answer is not None:
            i = child.expect([b"Password: ", pexpect.EOF])
            out = child.before + (b"Password: " if i == 0 else b"")
            if i == 0:
                child.send(answer)
        child.expect(pexpect.EOF)
        return pty_status(child), out + child.before
    finally:
        child.close(force=True)


def test_getpass_with_stdin_redirected(make_probe: ProbeFactory) -> None:
    """``script </dev/null`` asking for a password: a direct run prompts on the terminal
    (``/dev/tty``) and reads it there; a warm call cannot open /dev/tty, so getpass warns
    and reads stdin.  With PREFORK_INTERP_DIRECT=1, as directly."""
    probe = make_probe(GETPASS)
    shell = '"$@" </dev/null'
    direct = _pty(probe, "direct", shell, {}, b"secret\n")
    assert direct == ("exit 0", b"Password: \r\ngot secret\r\n"), direct
    status, out = _pty(probe, "warm", shell, {}, None)
    assert status == "exit 0" and b"GetPassWarning" in out and out.endswith(b"EOFError\r\n")
    assert _pty(probe, "warm", shell, {"PREFORK_INTERP_DIRECT": "1"}, b"secret\n") == direct


CHILD_TTY = r'''
import subprocess
r = subprocess.run(["sh", "-c", "exec 3<>/dev/tty && echo opened /dev/tty"],
                   capture_output=True, text=True)
print(r.stdout.strip() or r.stderr.strip().rsplit(":", 1)[-1].strip(), flush=True)
'''


def test_children_cannot_open_dev_tty(make_probe: ProbeFactory) -> None:
    """What ssh, sudo and git's credential prompts do (open /dev/tty) fails in the script's
    children (ENXIO); PREFORK_INTERP_DIRECT=1 runs the script directly."""
    probe = make_probe(CHILD_TTY)
    direct = _pty(probe, "direct", '"$@"', {}, None)
    assert direct == ("exit 0", b"opened /dev/tty\r\n"), direct
    assert _pty(probe, "warm", '"$@"', {}, None) == ("exit 0", b"No such device or address\r\n")
    assert _pty(probe, "warm", '"$@"', {"PREFORK_INTERP_DIRECT": "1"}, None) == direct


BASH_I = r'''
import subprocess
r = subprocess.run(["bash", "--norc", "-i", "-c", "echo flags $-"], capture_output=True,
                   text=True)
print("m" in r.stdout.split()[-1], "no job control" in r.stderr, flush=True)
'''


def test_bash_i_has_no_job_control(make_probe: ProbeFactory) -> None:
    """``bash -i`` started by the script: job control (``set -m``) directly; warm, bash
    says "no job control in this shell"."""
    probe = make_probe(BASH_I)
    direct = _pty(probe, "direct", '"$@"', {}, None)
    assert direct == ("exit 0", b"True False\r\n"), direct
    assert _pty(probe, "warm", '"$@"', {}, None) == ("exit 0", b"False True\r\n")
    assert _pty(probe, "warm", '"$@"', {"PREFORK_INTERP_DIRECT": "1"}, None) == direct


SETSID = r'''
try:
    os.setsid()
    print("new session", flush=True)
except PermissionError as e:
    print(e.strerror, flush=True)
'''


def test_setsid_fails(make_probe: ProbeFactory) -> None:
    """``os.setsid()``: a direct run started by a shell (not a process group leader) gets a
    new session; the executor leads its own process group, so it fails with EPERM."""
    probe = make_probe(SETSID)
    direct = _pty(probe, "direct", '"$@"; true', {}, None)
    assert direct == ("exit 0", b"new session\r\n"), direct
    assert _pty(probe, "warm", '"$@"; true', {}, None) == ("exit 0",
                                                            b"Operation not permitted\r\n")
    assert _pty(probe, "warm", '"$@"; true', {"PREFORK_INTERP_DIRECT": "1"}, None) == direct
