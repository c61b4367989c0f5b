"""Tests for prefork.common.ident and prefork.common.paths: ident bytes, socket names equal to
the C client's, run directory choice and checks (the fast one and the full one), and the
cleanup of stale entries."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork.common import paths
from prefork.common.ident import (
    PASSWD_PATH,
    RUNDIR_ENV,
    RunDirError,
    compute_ident,
    fast_run_base,
    ident_bytes,
    ident_max_len,
    lock_path,
    log_path,
    passwd_home,
    socket_path,
)
from prefork.common.locking import lock_file
from prefork.common.paths import check_run_dir, preclean, run_base, run_base_with_reason

REPO = Path(__file__).resolve().parents[1]
C_CLIENT = "/usr/bin/prefork-interp"
DEADLINE = 10.0 * float(os.environ.get("PREFORK_TEST_TIME_FACTOR", "1"))

# Runs argv[1:] as a child subreaper, then reaps every descendant: the C client's watcher
# daemonises, and where pid 1 does not reap, it would otherwise stay a zombie.
REAPER = """
import ctypes, os, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
rc = subprocess.call(sys.argv[1:])
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
sys.exit(rc if rc >= 0 else 128 - rc)
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory under /tmp (socket paths stop at 108 bytes), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="pf", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def _domainname() -> bytes:
    return Path("/proc/sys/kernel/domainname").read_bytes().removesuffix(b"\n")


# --- ident bytes ---------------------------------------------------------------------------


def test_ident_bytes_layout(tmp_path: Path) -> None:
    data = ident_bytes(
        b"/usr/bin/python3",
        b"script.py",
        [("E", b"PF_SET"), ("E", b"PF_UNSET"), ("E", b"PF_EMPTY"), ("G", b"hello world")],
        cwd=str(tmp_path),
        extra=[b"-X", b"any-cwd"],
        environb={b"PF_SET": b"val", b"PF_EMPTY": b""},
    )
    assert data[:1] == b"\x01"
    assert data[1:10] == b"u" + (390).to_bytes(8, "little")
    assert data[10:11] == b"u"
    uts = data[11:401]
    fields = [uts[i * 65 : (i + 1) * 65] for i in range(6)]
    assert all(f.endswith(b"\0") and len(f) == 65 for f in fields)
    want = [os.fsencode(x) for x in os.uname()] + [_domainname()]
    assert [f.rstrip(b"\0") for f in fields] == want
    cwd_st, root_st = tmp_path.stat(), Path("/").stat()
    assert data[401:] == (
        b"." + _u64(cwd_st.st_dev) + b"i" + _u64(cwd_st.st_ino)
        + b"/" + _u64(root_st.st_dev) + b"i" + _u64(root_st.st_ino)
        + b"EPF_SET\0vval\0"
        + b"EPF_UNSET\0\0"
        + b"EPF_EMPTY\0v\0"
        + b"Ghello world\0"
        + b"i/usr/bin/python3\0"
        + b"sscript.py\0"
        + b"X-X\0Xany-cwd\0"
    )


def test_ident_bytes_without_script_cwd_or_extras() -> None:
    root_st = Path("/").stat()
    data = ident_bytes(b"perl", None, [], cwd=None)
    assert data[401:] == (
        b"/" + _u64(root_st.st_dev) + b"i" + _u64(root_st.st_ino) + b"iperl\0"
    )
    with_cwd = ident_bytes(b"perl", None, [])
    assert with_cwd[401:402] == b"."
    assert with_cwd.endswith(b"iperl\0")


def test_ident_bytes_uses_process_environment_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opts = [("E", b"PF_TEST_IDENT_VAR")]
    monkeypatch.setenv("PF_TEST_IDENT_VAR", "from-env")
    assert b"EPF_TEST_IDENT_VAR\0vfrom-env\0" in ident_bytes(b"i", None, opts)
    monkeypatch.delenv("PF_TEST_IDENT_VAR")
    assert b"EPF_TEST_IDENT_VAR\0\0i" in ident_bytes(b"i", None, opts)


def test_ident_bytes_refuses_ambiguous_input() -> None:
    with pytest.raises(ValueError, match="NUL"):
        ident_bytes(b"py\0thon", None, [])
    with pytest.raises(ValueError, match="NUL"):
        ident_bytes(b"python", None, [("G", b"a\0b")])
    with pytest.raises(ValueError, match="unknown ident option"):
        ident_bytes(b"python", None, [("Q", b"x")])


def test_compute_ident_is_cut_sha256(tmp_path: Path) -> None:
    opts = [("G", b"g")]
    full = hashlib.sha256(ident_bytes(b"python3", b"s.py", opts, cwd=str(tmp_path))).hexdigest()
    assert compute_ident("/tmp/x", b"python3", b"s.py", opts, cwd=str(tmp_path)) == full
    base63 = "/var/run/user/1000/prefork-interp"
    assert ident_max_len(base63) == 63
    assert compute_ident(base63, b"python3", b"s.py", opts, cwd=str(tmp_path)) == full[:63]
    base33 = "/" + "d" * (108 - 12 - 33 - 1)
    assert ident_max_len(base33) == 33
    assert compute_ident(base33, b"python3", b"s.py", opts, cwd=str(tmp_path)) == full[:33]


def test_compute_ident_refuses_long_run_base() -> None:
    base = "/" + "d" * (108 - 12 - 33)
    assert ident_max_len(base) == 32
    with pytest.raises(RunDirError, match="too long for a socket name") as info:
        compute_ident(base, b"python3", None, [])
    assert base in str(info.value)


def test_file_names() -> None:
    assert socket_path("/r", "ab12") == "/r/sab12"
    assert lock_path("/r", "ab12") == "/r/lab12"
    assert log_path("/r", "ab12") == "/r/pab12.log"


def test_hot_path_imports_stay_low_level() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import prefork.common.paths, prefork.common.locking; "
        "print(' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(REPO)],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    heavy = {"hashlib", "socket", "pathlib", "pwd", "re", "dataclasses", "typing", "struct"}
    assert heavy.isdisjoint(out)


# What the client's warm path may load for the ident, the fast check and fd passing.
HOT_ALLOWED = {"prefork", "prefork.common", "prefork.common.ident", "prefork.common.consts",
               "prefork.common.fdio", "_sha2", "_sha256", "_socket"}

HOT_PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
before = set(sys.modules)
from prefork.common.ident import ident_bytes
import prefork.common.fdio
print(" ".join(sorted(set(sys.modules) - before)))
print(ident_bytes(b"i", None, [("E", b"PF_PROBE"), ("E", b"PF_PROBE_UNSET")], cwd=None).hex())
"""


def test_ident_and_fdio_load_only_low_level_modules_and_read_posix_environ() -> None:
    """``ident`` and ``fdio`` load nothing but ``posix``-level modules (no ``os``), and with no
    ``os`` loaded the ident's ``-E`` values come from ``posix.environ``."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PF_PROBE": "from the caller"}
    out = subprocess.run([sys.executable, "-I", "-S", "-c", HOT_PROBE, str(REPO)], env=env,
                         check=True, capture_output=True, text=True, timeout=60).stdout
    modules, ident_hex = out.splitlines()
    loaded = set(modules.split())
    assert loaded <= HOT_ALLOWED, f"loaded {sorted(loaded - HOT_ALLOWED)}"
    assert "prefork.common.ident" in loaded
    assert bytes.fromhex(ident_hex).endswith(
        b"EPF_PROBE\0vfrom the caller\0EPF_PROBE_UNSET\0\0ii\0")


# --- the ident against a reference encoding written out here --------------------------------


def _reference_ident(base: str, interp: bytes, script: bytes | None,
                     opts: Sequence[tuple[str, bytes]], cwd: str | None,
                     extra: Sequence[bytes], environb: Mapping[bytes, bytes]) -> str | None:
    """PROTOCOL.md's ident, spelled out with os and hashlib; None if no ident fits."""
    uts = b"".join(f[:64].ljust(65, b"\0") for f in
                   [os.fsencode(x) for x in os.uname()] + [_domainname()])
    data = b"\x01u" + _u64(390) + b"u" + uts
    if cwd is not None:
        data += b"." + _u64(os.stat(cwd).st_dev) + b"i" + _u64(os.stat(cwd).st_ino)
    data += b"/" + _u64(os.stat("/").st_dev) + b"i" + _u64(os.stat("/").st_ino)
    for kind, item in opts:
        data += kind.encode() + item + b"\0"
        if kind == "E":
            value = environb.get(item)
            data += b"\0" if value is None else b"v" + value + b"\0"
    data += b"i" + interp + b"\0" + (b"" if script is None else b"s" + script + b"\0")
    data += b"".join(b"X" + x + b"\0" for x in extra)
    cut = min(64, 108 - len(os.fsencode(base)) - 12)
    return None if cut < 33 else hashlib.sha256(data).hexdigest()[:cut]


_item = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b)


@settings(max_examples=150, deadline=None)
@given(interp=_item, script=st.none() | _item,
       opts=st.lists(st.tuples(st.sampled_from(["E", "G"]), _item), max_size=4),
       extra=st.lists(_item, max_size=3), any_cwd=st.booleans(),
       env=st.dictionaries(_item.filter(lambda b: b"=" not in b), st.binary(max_size=10)
                           .filter(lambda b: b"\0" not in b), max_size=3),
       base_len=st.integers(min_value=1, max_value=70))
def test_ident_matches_the_reference_encoding(
        interp: bytes, script: bytes | None, opts: list[tuple[str, bytes]],
        extra: list[bytes], any_cwd: bool, env: dict[bytes, bytes], base_len: int) -> None:
    """Same bytes hashed, same cut, for any options; RunDirError when no ident fits."""
    base = "/" + "b" * base_len
    cwd = None if any_cwd else "."
    opts = opts + [("E", name) for name in env]
    want = _reference_ident(base, interp, script, opts, cwd, extra, env)
    if want is None:
        with pytest.raises(RunDirError, match="too long for a socket name"):
            compute_ident(base, interp, script, opts, cwd=cwd, extra=extra, environb=env)
    else:
        assert compute_ident(base, interp, script, opts, cwd=cwd, extra=extra,
                             environb=env) == want


# --- same socket names as the reference C client -------------------------------------------


def _reference_env(extra: Mapping[str, str | None]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (RUNDIR_ENV, "PREFORK_INTERP")}
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _run_c_client(cwd: Path, args: Sequence[str], env: Mapping[str, str]) -> str:
    """Run the C client under a reaper; return its stderr."""
    proc = subprocess.run(
        [sys.executable, "-c", REAPER, C_CLIENT, *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60 * DEADLINE / 10,
        check=False,
    )
    return proc.stderr


def _c_client_entries(cwd: Path, args: Sequence[str], env: Mapping[str, str],
                      base: str, ident: str) -> set[str]:
    """Run the C client; the names it added to ``base``. Removes ours (and only ours) after."""
    ours = {"s" + ident, "l" + ident}
    for name in ours:  # a leftover of an earlier run with a recycled cwd inode
        Path(base, name).unlink(missing_ok=True)
    before = set(os.listdir(base))
    stderr = _run_c_client(cwd, args, env)
    new = set(os.listdir(base)) - before
    # Other processes may use the same run base at the same time: remove only what is ours,
    # or, if we computed a wrong ident, the one pair that was created.
    mine = ours & new
    if not mine and len(new) == 2 and len({n[1:] for n in new}) == 1:
        mine = new
    for name in mine:
        Path(base, name).unlink(missing_ok=True)
    assert new, f"the C client created nothing in {base}; stderr: {stderr!r}"
    return new


needs_c_client = pytest.mark.skipif(
    not os.access(C_CLIENT, os.X_OK),
    reason=f"reference C client {C_CLIENT} not installed (apt-get install chiark-utils-bin)",
)

F = b"/bin/false"
S = b"scr.pl"
E_VAR = [("E", b"PF_IDENT_VAR")]
E_ARGS = ["-U", "-E", "PF_IDENT_VAR", "/bin/false", "scr.pl"]
# name: (C client arguments, environment changes, interpreter, script, ident options)
CASES: dict[str, tuple[list[str], dict[str, str | None], bytes, bytes | None,
                       list[tuple[str, bytes]]]] = {
    "no options": (["-U", "/bin/false", "scr.pl"], {}, F, S, []),
    "combined first argument": (["-U,/bin/false", "scr.pl"], {}, F, S, []),
    "no script": (["-U", "/bin/false"], {}, F, None, []),
    "script in a subdirectory": (["-U", "/bin/false", "./sub/scr.pl"], {}, F, b"./sub/scr.pl",
                                 []),
    "-E set": (E_ARGS, {"PF_IDENT_VAR": "some value"}, F, S, E_VAR),
    "-E set empty": (E_ARGS, {"PF_IDENT_VAR": ""}, F, S, E_VAR),
    "-E unset": (E_ARGS, {"PF_IDENT_VAR": None}, F, S, E_VAR),
    "-G": (["-U", "-G", "a string", "/bin/false", "scr.pl"], {}, F, S, [("G", b"a string")]),
    "-G -E -G in order": (
        ["-U", "-G", "two", "-E", "HOME", "-G", "one", "/bin/false", "scr.pl"],
        {}, F, S, [("G", b"two"), ("E", b"HOME"), ("G", b"one")],
    ),
}


@needs_c_client
@pytest.mark.parametrize("case", list(CASES))
def test_socket_name_matches_c_client(case: str, short_dir: Path) -> None:
    args, env_changes, interp, script, opts = CASES[case]
    (short_dir / "sub").mkdir()
    (short_dir / "scr.pl").write_text("exit 0;\n")
    (short_dir / "sub" / "scr.pl").write_text("exit 0;\n")
    env = _reference_env(env_changes)
    base = run_base(env)
    environb = {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
    ident = compute_ident(base, interp, script, opts, cwd=str(short_dir), environb=environb)
    new = _c_client_entries(short_dir, args, env, base, ident)
    assert {"s" + ident, "l" + ident} <= new, f"C client made {sorted(new)}, we expect {ident}"


@needs_c_client
def test_cwd_is_part_of_the_ident(short_dir: Path) -> None:
    dirs = [short_dir / "a", short_dir / "b"]
    env = _reference_env({})
    base = run_base(env)
    idents = []
    for d in dirs:
        d.mkdir()
        ident = compute_ident(base, b"/bin/false", b"scr.pl", [], cwd=str(d))
        new = _c_client_entries(d, ["-U", "/bin/false", "scr.pl"], env, base, ident)
        assert {"s" + ident, "l" + ident} <= new
        idents.append(ident)
    assert idents[0] != idents[1]
    any_cwd = [compute_ident(base, b"/bin/false", b"scr.pl", [], cwd=None, extra=[b"any-cwd"])]
    assert any_cwd[0] not in idents


# --- the per-user run directory, in a private mount namespace ------------------------------


def _python_for_other_users() -> str | None:
    """A Python >= 3.11 that a uid other than ours can run, or None."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        real = Path(candidate).resolve()
        if not real.is_file() or not all(os.stat(p).st_mode & 0o001 for p in real.parents):
            continue
        check = "import sys; print(sys.version_info >= (3, 11))"
        version = subprocess.run([str(real), "-c", check],
                                 capture_output=True, text=True, check=False).stdout.strip()
        if version == "True":
            return str(real)
    return None


def _namespace_problem() -> str | None:
    if os.getuid() != 0:
        return "needs root to make a private mount namespace"
    if not shutil.which("unshare") or not shutil.which("setpriv"):
        return "needs unshare and setpriv (util-linux)"
    if os.path.realpath("/var/run") != "/run":
        return "/var/run is not a symlink to /run here"
    if subprocess.run(["unshare", "-m", "true"], check=False, capture_output=True).returncode:
        return "unshare -m is not permitted here"
    return None


needs_namespace = pytest.mark.skipif(_namespace_problem() is not None,
                                     reason=str(_namespace_problem()))

# Five digits: the ident is cut to 108 - len("/var/run/user/54321/prefork-interp") - 12 = 62.
UID = 54321

NS_SCRIPT = r"""
set -e
mount -t tmpfs -o mode=0755 pf-test /run
mkdir -m 0755 /run/user
mkdir -m 0700 /run/user/$UID
chown $UID:$UID /run/user/$UID
cd "$CWD"
AS_USER="setpriv --reuid=$UID --regid=$UID --clear-groups"
$AS_USER "$PY" -c "$REAPER" "$C_CLIENT" -U /bin/false scr.pl || true
$AS_USER env PYTHONPATH="$REPO" PYTHONDONTWRITEBYTECODE=1 "$PY" -c "$OURS"
ls /run/user/$UID/prefork-interp
"""

OURS = """
import json
from prefork.common.ident import compute_ident
from prefork.common.paths import run_base_with_reason
base, reason = run_base_with_reason({})
print(json.dumps([base, reason, compute_ident(base, b"/bin/false", b"scr.pl", [])]))
"""


@needs_c_client
@needs_namespace
def test_per_user_run_dir_matches_c_client(short_dir: Path) -> None:
    py = _python_for_other_users()
    if py is None:
        pytest.skip("no Python >= 3.11 runnable by another uid")
    short_dir.chmod(0o755)
    (short_dir / "scr.pl").write_text("exit 0;\n")
    # The other uid may not be able to read the checkout (a clone in a 0700 directory):
    # give it a copy of the package, readable by all.
    pkg_root = short_dir / "pkg"
    shutil.copytree(REPO / "prefork", pkg_root / "prefork",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for p in [pkg_root, *pkg_root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "UID": str(UID), "CWD": str(short_dir),
           "PY": py, "REAPER": REAPER, "C_CLIENT": C_CLIENT, "REPO": str(pkg_root), "OURS": OURS}
    proc = subprocess.run(["unshare", "-m", "sh", "-c", NS_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    base, reason, ident = json.loads(lines[0])
    assert base == f"/var/run/user/{UID}/prefork-interp"
    assert reason is None
    assert len(ident) == 62
    assert set(lines[1:]) == {"s" + ident, "l" + ident}


@needs_c_client
@needs_namespace
def test_per_user_run_dir_test_passes_from_a_private_clone() -> None:
    """Run the test above from a clone in a 0700 directory (where the other uid cannot read
    the checkout), with the clone's own package on PYTHONPATH and this venv's Python."""
    if _python_for_other_users() is None:
        pytest.skip("no Python >= 3.11 runnable by another uid")
    if not (REPO / ".git").exists() or not shutil.which("git"):
        pytest.skip("not a git checkout, or no git")
    private = Path(tempfile.mkdtemp(prefix="pfclone", dir="/tmp"))  # mode 0700
    try:
        clone = private / "repo"
        git = ["git", "-c", "safe.directory=*"]
        subprocess.run([*git, "clone", "-q", str(REPO), str(clone)], check=True,
                       capture_output=True, timeout=120)
        # The working tree's uncommitted files too, so that a run tests what is here.
        files = subprocess.run([*git, "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                                "--exclude-standard"], check=True, capture_output=True,
                               timeout=60).stdout.decode().split("\0")
        for name in filter(None, files):
            if (REPO / name).is_file():
                (clone / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, clone / name)
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        env = {**os.environ, "PYTHONPATH": str(clone), "PYTHONDONTWRITEBYTECODE": "1"}
        test = "tests/test_paths.py::test_per_user_run_dir_matches_c_client"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", test],
            cwd=clone, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr
    finally:
        shutil.rmtree(private, ignore_errors=True)


FALLBACK_SCRIPT = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from prefork.common.paths import run_base_with_reason
results = {}
results["absent"] = run_base_with_reason({})
os.mkdir("/run/user/0", 0o700)
os.chmod("/run/user/0", 0o755)
results["user dir 0755"] = run_base_with_reason({})
os.chmod("/run/user/0", 0o700)
results["usable"] = run_base_with_reason({})
results["usable mode"] = oct(os.lstat("/run/user/0/prefork-interp").st_mode & 0o777)
os.chmod("/run/user/0/prefork-interp", 0o755)
results["subdir 0755"] = run_base_with_reason({})
os.rmdir("/run/user/0/prefork-interp")
os.symlink("/tmp", "/run/user/0/prefork-interp")
results["subdir symlink"] = run_base_with_reason({})
os.unlink("/run/user/0/prefork-interp")
os.rmdir("/run/user/0")
os.symlink("/tmp", "/run/user/0")
results["user dir symlink"] = run_base_with_reason({})
print(json.dumps(results))
"""


@needs_namespace
def test_per_user_run_dir_choice_and_fallback() -> None:
    home = pwd.getpwuid(0).pw_dir
    host = os.uname().nodename.split(".")[0][:32]
    script = f"mount -t tmpfs -o mode=0755 pf-test /run && mkdir -m 0755 /run/user && " \
             f"exec {sys.executable} -c '{FALLBACK_SCRIPT}' {REPO}"
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    fallback = f"{home}/.prefork-interp/{host}"
    assert r["absent"] == [fallback, None]
    assert r["user dir 0755"][0] == fallback
    assert "/var/run/user/0: mode 0755 allows group/other access" in r["user dir 0755"][1]
    assert r["usable"] == ["/var/run/user/0/prefork-interp", None]
    assert r["usable mode"] == "0o700"
    assert r["subdir 0755"][0] == fallback
    assert "/var/run/user/0/prefork-interp: mode 0755" in r["subdir 0755"][1]
    assert r["subdir symlink"][0] == fallback
    assert "is a symlink" in r["subdir symlink"][1]
    assert r["user dir symlink"][0] == fallback
    assert "/var/run/user/0: is a symlink" in r["user dir symlink"][1]


# --- run directory checks and the override -------------------------------------------------


def test_check_run_dir_accepts_private_dir(tmp_path: Path) -> None:
    d = tmp_path / "ok"
    d.mkdir(mode=0o700)
    check_run_dir(str(d))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.mkdir(mode=0o755) or p.chmod(0o755), "mode 0755 allows group/other access"),
        (lambda p: p.mkdir() or p.chmod(0o710), "mode 0710 allows group/other access"),
        (lambda p: p.write_text(""), "is not a directory"),
        (lambda p: p.symlink_to(p.parent), "is a symlink"),
        (lambda p: None, "does not exist"),
    ],
    ids=["0755", "0710", "file", "symlink", "missing"],
)
def test_check_run_dir_refusals(tmp_path: Path, make: object, reason: str) -> None:
    p = tmp_path / "rundir"
    assert callable(make)
    make(p)
    with pytest.raises(RunDirError) as info:
        check_run_dir(str(p))
    assert str(info.value) == f"run directory {p}: {reason}"
    assert info.value.path == str(p)
    assert info.value.reason == reason


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to chown")
def test_check_run_dir_refuses_other_owner(tmp_path: Path) -> None:
    p = tmp_path / "theirs"
    p.mkdir(mode=0o700)
    os.chown(p, 12345, 12345)
    with pytest.raises(RunDirError, match="owned by uid 12345"):
        check_run_dir(str(p))


def test_override_creates_missing_dirs_0700(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "run"
    old = os.umask(0o022)
    try:
        base = run_base({RUNDIR_ENV: str(target) + "/"})
    finally:
        os.umask(old)
    assert base == str(target)
    for p in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
    assert run_base_with_reason({RUNDIR_ENV: str(target)}) == (str(target), None)


def test_override_refusals(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    with pytest.raises(RunDirError, match="mode 0755"):
        run_base({RUNDIR_ENV: str(open_dir)})
    with pytest.raises(RunDirError, match="absolute path"):
        run_base({RUNDIR_ENV: "relative/run"})
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunDirError, match="cannot create") as info:
        run_base({RUNDIR_ENV: str(blocker / "run")})
    assert str(blocker / "run") in str(info.value)


def test_default_uses_password_database_home_not_home_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if Path(f"/var/run/user/{os.getuid()}").exists():
        pytest.skip("a per-user run directory exists here; the fallback is not used")
    monkeypatch.setenv("HOME", str(tmp_path))
    base, reason = run_base_with_reason({RUNDIR_ENV: ""})
    host = os.uname().nodename.split(".")[0][:32]
    assert base == f"{pwd.getpwuid(os.getuid()).pw_dir}/.prefork-interp/{host}"
    assert reason is None
    assert not list(tmp_path.iterdir())


def test_home_dir_from_passwd_file_matches_pwd() -> None:
    assert paths._home_dir(os.getuid()) == pwd.getpwuid(os.getuid()).pw_dir


def test_passwd_home_skips_nis_compat_lines() -> None:
    """As glibc's ``getpwuid``: ``+``/``-`` lines are nobody's entry, even with our uid in
    them, and the search goes on past them to the user's own line."""
    passwd = (b"root:x:0:0:root:/root:/bin/bash\n"
              b"+::::::\n"
              b"+@staff::::::\n"
              b"-blocked:x:1000:1000::/blocked:/bin/sh\n"
              b"+nisuser:x:1000:1000::/from/nis:/bin/sh\n"
              b"broken:line\n"
              b"me:x:1000:1000:Me:/home/me:/bin/sh\n"
              b"again:x:1000:1000::/home/again:/bin/sh\n")
    assert passwd_home(passwd, 1000) == "/home/me"
    assert passwd_home(passwd, 0) == "/root"
    assert passwd_home(passwd, 4242) is None
    assert passwd_home(b"+::::::\n-:x:7:7::/x:/bin/sh\n", 7) is None
    assert passwd_home(b"", 0) is None


def test_passwd_home_of_this_system_matches_getpwuid() -> None:
    uid = os.getuid()
    home = passwd_home(Path(PASSWD_PATH).read_bytes(), uid)
    assert home in (None, pwd.getpwuid(uid).pw_dir)  # None: an NSS user, left to pwd


# --- the fast check the client uses: the full one's answer, or none -------------------------


def _environb(env: Mapping[str, str]) -> dict[bytes, bytes]:
    return {os.fsencode(k): os.fsencode(v) for k, v in env.items()}


def test_fast_run_base_override_agrees(tmp_path: Path) -> None:
    """An existing private override directory: both give it (trailing slashes dropped)."""
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o700)
    for value in (str(rundir), f"{rundir}/", f"{rundir}//"):
        env = {RUNDIR_ENV: value}
        assert fast_run_base(_environb(env)) == run_base(env) == str(rundir)


def test_fast_run_base_declines_what_paths_must_handle(tmp_path: Path) -> None:
    """Anything but an existing private directory: the fast check declines (paths then
    creates the directory or words the refusal), never answers differently."""
    missing = str(tmp_path / "new" / "dir")
    assert fast_run_base(_environb({RUNDIR_ENV: missing})) is None
    assert run_base({RUNDIR_ENV: missing}) == missing  # created by paths
    assert fast_run_base(_environb({RUNDIR_ENV: missing})) == missing

    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    assert fast_run_base(_environb({RUNDIR_ENV: str(open_dir)})) is None
    with pytest.raises(RunDirError, match="group/other"):
        run_base({RUNDIR_ENV: str(open_dir)})

    link = tmp_path / "link"
    link.symlink_to(missing)
    assert fast_run_base(_environb({RUNDIR_ENV: str(link)})) is None
    with pytest.raises(RunDirError, match="symlink"):
        run_base({RUNDIR_ENV: str(link)})

    assert fast_run_base(_environb({RUNDIR_ENV: "relative/dir"})) is None
    with pytest.raises(RunDirError, match="absolute"):
        run_base({RUNDIR_ENV: "relative/dir"})


def test_fast_run_base_default_agrees() -> None:
    """No override: the per-user base (as the C client computes it); it exists once
    paths.run_base has made it, and then the fast check gives the same answer."""
    want = run_base({})
    assert fast_run_base({}) == want
    st_ = os.lstat(want)
    assert stat.S_ISDIR(st_.st_mode) and st_.st_mode & 0o077 == 0


# --- preclean ------------------------------------------------------------------------------


T0 = 1_600_000_000


def _ident(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def _make_entries(base: Path, count: int, *, first: int = 0) -> list[str]:
    """``count`` fake entries (regular files) with socket atimes 10 s apart, oldest first."""
    idents = []
    for k in range(first, first + count):
        ident = _ident(k)
        (base / ("l" + ident)).write_bytes(b"")
        s = base / ("s" + ident)
        s.write_bytes(b"")
        os.utime(s, (T0 + 10 * k, T0))
        idents.append(ident)
    return idents


def _present(base: Path, ident: str) -> tuple[bool, bool]:
    return (base / ("s" + ident)).exists(), (base / ("l" + ident)).exists()


JUNK = ["p" + _ident(0) + ".log", "sNOTHEX", "s", "l", "lABCDEF", "x1234", "s12g", "s12.tmp"]


def test_preclean_removes_only_the_least_recently_used(tmp_path: Path) -> None:
    idents = _make_entries(tmp_path, 105)
    for name in JUNK:
        (tmp_path / name).write_bytes(b"")
    assert preclean(str(tmp_path)) == 5
    for ident in idents[:5]:
        assert _present(tmp_path, ident) == (False, False)
    for ident in idents[5:]:
        assert _present(tmp_path, ident) == (True, True)
    for name in JUNK:
        assert (tmp_path / name).exists()
    assert preclean(str(tmp_path)) == 0


def test_preclean_ignores_junk_when_counting(tmp_path: Path) -> None:
    _make_entries(tmp_path, 100)
    for name in JUNK:
        (tmp_path / name).write_bytes(b"")
    before = sorted(os.listdir(tmp_path))
    assert preclean(str(tmp_path)) == 0
    assert sorted(os.listdir(tmp_path)) == before


def test_preclean_half_entries(tmp_path: Path) -> None:
    idents = _make_entries(tmp_path, 99)
    lock_only, socket_only = _ident(1000), _ident(1001)
    (tmp_path / ("l" + lock_only)).write_bytes(b"")  # no socket: atime 0, oldest
    s = tmp_path / ("s" + socket_only)
    s.write_bytes(b"")
    os.utime(s, (T0 - 1, T0))  # older than all the full entries
    assert preclean(str(tmp_path), max_sockets=99) == 2
    assert _present(tmp_path, lock_only) == (False, False)
    assert _present(tmp_path, socket_only) == (False, False)
    assert all(_present(tmp_path, i) == (True, True) for i in idents)


def test_preclean_limits(tmp_path: Path) -> None:
    assert preclean(str(tmp_path / "missing")) == 0
    _make_entries(tmp_path, 3)
    assert preclean(str(tmp_path), max_sockets=3) == 0
    assert preclean(str(tmp_path), max_sockets=0) == 3
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="max_sockets"):
        preclean(str(tmp_path), max_sockets=-1)


def _wait_for_flock_waiter(path: Path) -> None:
    """Poll /proc/locks until some process waits for a flock on ``path``'s inode."""
    suffix = f":{path.stat().st_ino}"
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "->" in fields and "FLOCK" in fields and any(f.endswith(suffix) for f in fields):
                return
        time.sleep(0.005)
    raise AssertionError(f"nobody waited for the lock on {path}")


@pytest.mark.parametrize("used_meanwhile", [True, False])
def test_preclean_rechecks_atime_under_the_lock(tmp_path: Path, used_meanwhile: bool) -> None:
    idents = _make_entries(tmp_path, 101)
    oldest = idents[0]
    held = lock_file(str(tmp_path / ("l" + oldest)))
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(preclean(str(tmp_path))))
    try:
        worker.start()
        _wait_for_flock_waiter(tmp_path / ("l" + oldest))
        if used_meanwhile:  # a client connected between the listing and the deletion
            os.utime(tmp_path / ("s" + oldest), (T0 + 100_000, T0))
    finally:
        os.close(held)
        worker.join(DEADLINE)
    assert not worker.is_alive()
    if used_meanwhile:
        assert result == [0]
        assert _present(tmp_path, oldest) == (True, True)
    else:
        assert result == [1]
        assert _present(tmp_path, oldest) == (False, False)
    assert all(_present(tmp_path, i) == (True, True) for i in idents[1:])
