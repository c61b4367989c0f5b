"""The client's warm path: its lean copies of ``paths``/``fdio`` agree with the originals, and
it imports nothing costly (no ``os``, no ``paths``) on a warm call.

``prefork.client.main`` keeps ``os`` (over a millisecond of imports) off the warm path, so it
has its own run-directory check and ident computation; everything unusual falls back to
``prefork.common.paths``.  These tests pin the two together.
"""

from __future__ import annotations

import os
import posix
import re
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from harness import CLIENT, PYTHON, write_script
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork.client import main as client
from prefork.common import paths

TRIVIAL = """\
import prefork
prefork.initialisation_complete()
print("warm" if os.environ.get("X") else "?")
"""


def _environb(**kw: str) -> dict[bytes, bytes]:
    return {os.fsencode(k): os.fsencode(v) for k, v in kw.items()}


# ------------------------------------------------------------------ run directory


def test_run_base_override_agrees(rundir: str) -> None:
    """An existing private override directory: both give it (trailing slashes dropped)."""
    for value in (rundir, rundir + "/", rundir + "//"):
        env = {paths.RUNDIR_ENV: value}
        assert client._fast_run_base(_environb(**env)) == paths.run_base(env) == rundir


def test_run_base_unusual_cases_go_to_paths(rundir: str) -> None:
    """Anything but an existing private directory: the fast check declines (paths then
    creates the directory or words the refusal), never answers differently."""
    missing = os.path.join(rundir, "new", "dir")
    assert client._fast_run_base(_environb(PREFORK_INTERP_RUNDIR=missing)) is None
    assert paths.run_base({paths.RUNDIR_ENV: missing}) == missing  # created by paths
    assert client._fast_run_base(_environb(PREFORK_INTERP_RUNDIR=missing)) == missing

    open_dir = os.path.join(rundir, "open")
    os.mkdir(open_dir, 0o755)
    os.chmod(open_dir, 0o755)
    assert client._fast_run_base(_environb(PREFORK_INTERP_RUNDIR=open_dir)) is None
    with pytest.raises(paths.RunDirError, match="group/other"):
        paths.run_base({paths.RUNDIR_ENV: open_dir})

    link = os.path.join(rundir, "link")
    os.symlink(missing, link)
    assert client._fast_run_base(_environb(PREFORK_INTERP_RUNDIR=link)) is None
    with pytest.raises(paths.RunDirError, match="symlink"):
        paths.run_base({paths.RUNDIR_ENV: link})

    assert client._fast_run_base(_environb(PREFORK_INTERP_RUNDIR="relative/dir")) is None
    with pytest.raises(paths.RunDirError, match="absolute"):
        paths.run_base({paths.RUNDIR_ENV: "relative/dir"})


def test_run_base_default_agrees() -> None:
    """No override: the per-user base (as the C client computes it) is the same; it exists
    once paths.run_base has made it, and then the fast check answers."""
    want = paths.run_base({})
    got = client._fast_run_base({})
    assert got == want
    st_ = os.lstat(want)
    assert stat.S_ISDIR(st_.st_mode) and st_.st_mode & 0o077 == 0


def test_run_base_wrapper_falls_back(rundir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``_run_base`` (what a call uses) creates a missing directory through paths."""
    target = os.path.join(rundir, "made")
    monkeypatch.setitem(posix.environ, b"PREFORK_INTERP_RUNDIR", os.fsencode(target))
    assert client._run_base() == target
    assert os.path.isdir(target)


# ------------------------------------------------------------------ ident

_item = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b)


@settings(max_examples=150, deadline=None)
@given(interp=_item, script=st.none() | _item,
       opts=st.lists(st.tuples(st.sampled_from(["E", "G"]), _item), max_size=4),
       extra=st.lists(_item, max_size=3), any_cwd=st.booleans(),
       base_len=st.integers(min_value=1, max_value=70))
def test_ident_agrees(interp: bytes, script: bytes | None, opts: list[tuple[str, bytes]],
                      extra: list[bytes], any_cwd: bool, base_len: int) -> None:
    """Same bytes hashed, same cut, for any options, and the same error when the run
    directory's name leaves no room for an ident."""
    base = "/" + "b" * base_len
    cwd = None if any_cwd else "."
    try:
        want: str | Exception = paths.compute_ident(base, interp, script, opts, cwd=cwd,
                                                    extra=extra)
    except paths.RunDirError as e:
        want = e
    try:
        got: str | Exception = client._compute_ident(base, interp, script, opts, cwd, extra)
    except paths.RunDirError as e:
        got = e
    if isinstance(want, Exception):
        assert isinstance(got, paths.RunDirError) and str(got) == str(want)
    else:
        assert got == want


def test_ident_reads_E_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """``-E VAR``: set, empty and unset values hash as paths hashes them."""
    opts = [("E", b"PF_TEST_SET"), ("E", b"PF_TEST_EMPTY"), ("E", b"PF_TEST_UNSET")]
    monkeypatch.setitem(posix.environ, b"PF_TEST_SET", b"value")
    monkeypatch.setitem(posix.environ, b"PF_TEST_EMPTY", b"")
    monkeypatch.delitem(posix.environ, b"PF_TEST_UNSET", raising=False)
    env = dict(posix.environ)
    want = paths.compute_ident("/tmp", b"python3", b"s.py", opts, environb=env)
    assert client._compute_ident("/tmp", b"python3", b"s.py", opts, ".", []) == want
    monkeypatch.setitem(posix.environ, b"PF_TEST_SET", b"other")
    assert client._compute_ident("/tmp", b"python3", b"s.py", opts, ".", []) != want


# ------------------------------------------------------------------ fd passing


def test_send_fds_and_read_exactly() -> None:
    """The lean fd passing delivers the fds as fdio receives them."""
    from prefork.common import fdio

    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        client._send_fds(a, b"\0", [r, w])
        a.sendall(b"rest")
        data, fds = fdio.recv_with_fds(b, 1, 4)
        assert data == b"\0" and len(fds) == 2
        assert [os.fstat(fd).st_ino for fd in fds] == [os.fstat(r).st_ino, os.fstat(w).st_ino]
        for fd in fds:
            os.close(fd)
        assert client._read_exactly(b, 4) == b"rest"
        a.close()
        with pytest.raises(EOFError):
            client._read_exactly(b, 1)
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


# ------------------------------------------------------------------ what a warm call imports

#: Modules a warm call may import beyond those every interpreter loads at start-up.
ALLOWED = {
    "_socket", "select", "_sha2", "_sha256", "_struct", "__future__",
    "prefork", "prefork.client", "prefork.client.main", "prefork.common",
    "prefork.common.protocol",
}


def test_warm_call_imports_only_low_level_modules(env: dict[str, str], rundir: str) -> None:
    """``python -X importtime`` of the installed launcher on a warm call: nothing but the
    allowed modules (no os, no paths/fdio/locking, no cold-path start module)."""
    script = write_script(rundir, "t.py", "import os\n" + TRIVIAL)
    env = {**env, "X": "1"}
    first = subprocess.run([CLIENT, "-U", str(PYTHON), script], env=env, capture_output=True,
                           timeout=60, check=False)
    assert first.returncode == 0, first.stderr
    launcher_python = Path(CLIENT).read_text().split("\n", 1)[0][2:].split()
    p = subprocess.run([*launcher_python, "-X", "importtime", CLIENT, "-U", str(PYTHON), script],
                       env=env, capture_output=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout == b"warm\n"
    imported = set(re.findall(rb"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", p.stderr, re.M))
    baseline = subprocess.run([*launcher_python, "-X", "importtime", "-c", "pass"], env=env,
                              capture_output=True, timeout=60, check=False).stderr
    startup = set(re.findall(rb"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", baseline, re.M))
    extra = {m.decode() for m in imported - startup}
    assert "prefork.client.main" in extra  # the parse works: the client's own module is seen
    assert extra <= ALLOWED, f"the warm path imported {sorted(extra - ALLOWED)}"
