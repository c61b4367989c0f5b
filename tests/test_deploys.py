"""Autoreload after deploys (issue 11, item 2): whatever way new code lands, the next call
runs it.

Each test makes a first call (the server imports the old code), deploys the new code the way
a tool does it, and makes the next call, which must print the new version.  Deploys that
keep the old mtime (``cp -p``, ``rsync -a``, ``tar x``, ``mv new old``, a symlink swap, a
wheel installed by pip) and a file that a call finds briefly absent used to leave the server
serving the old code until its idle timeout.  The new files are written before the first call
where the tool would carry their old mtime over.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import zipfile

import pytest
from harness import CLIENT, PYTHON, REPO, ProcRegistry, wait_for, write_script
from procfs import gone

SCRIPT = """
import os, sys
import appmod
import prefork
prefork.initialisation_complete(log="file")
print("{version}", appmod.VERSION, os.getppid())
"""


def _module(path: str, version: str) -> None:
    with open(path, "w") as f:
        f.write(f"VERSION = {version!r}\n")


def _call(procs: ProcRegistry, env: dict[str, str], script: str) -> tuple[str, str, int]:
    rc, out, err = procs.run([script], env=env)
    assert (rc, err) == (0, b""), (rc, out, err)
    script_version, mod_version, server = out.decode().split()
    return script_version, mod_version, int(server)


@pytest.fixture
def app(rundir: str) -> str:
    """``rundir/app`` with the script (s1) and its module (m1); ``rundir/new`` with the next
    version of both (s2, m2), written now, so older than the first call's server."""
    d = os.path.join(rundir, "app")
    new = os.path.join(rundir, "new")
    for where, s, m in ((d, "s1", "m1"), (new, "s2", "m2")):
        os.mkdir(where)
        write_script(where, "app.py", SCRIPT.format(version=s))
        _module(os.path.join(where, "appmod.py"), m)
    return d


def _rsync_a(src: str, dst: str) -> None:
    """What ``rsync -a src dst`` does: a temporary file next to dst, the source's mtime and
    mode, renamed over dst."""
    tmp = os.path.join(os.path.dirname(dst), "." + os.path.basename(dst) + ".Xa1b2c")
    shutil.copyfile(src, tmp)
    shutil.copystat(src, tmp)
    os.rename(tmp, dst)


DEPLOYS = {
    "edit-in-place": lambda new, app: _module(os.path.join(app, "appmod.py"), "m2"),
    "cp-p": lambda new, app: subprocess.run(
        ["cp", "-p", os.path.join(new, "appmod.py"), os.path.join(app, "appmod.py")],
        check=True),
    "mv-new-old": lambda new, app: os.rename(os.path.join(new, "appmod.py"),
                                             os.path.join(app, "appmod.py")),
    "rsync-a": lambda new, app: _rsync_a(os.path.join(new, "appmod.py"),
                                         os.path.join(app, "appmod.py")),
    "mv-script": lambda new, app: os.rename(os.path.join(new, "app.py"),
                                            os.path.join(app, "app.py")),
}


@pytest.mark.parametrize("deploy", list(DEPLOYS))
def test_deploy_gives_new_code_on_the_next_call(deploy: str, app: str, rundir: str,
                                                procs: ProcRegistry,
                                                env: dict[str, str]) -> None:
    script = os.path.join(app, "app.py")
    s, m, first = _call(procs, env, script)
    assert (s, m) == ("s1", "m1")
    DEPLOYS[deploy](os.path.join(rundir, "new"), app)
    want = ("s2", "m1") if deploy == "mv-script" else ("s1", "m2")
    s, m, second = _call(procs, env, script)
    assert (s, m) == want, f"{deploy}: old code served"
    assert second != first
    wait_for(lambda: gone(first), what="the stale server to quit")


def test_tar_x_over_the_tree(app: str, rundir: str, procs: ProcRegistry,
                             env: dict[str, str]) -> None:
    """``tar x`` unlinks each file and writes it again with the archived (old) mtime."""
    archive = os.path.join(rundir, "new.tar")
    subprocess.run(["tar", "-cf", archive, "-C", os.path.join(rundir, "new"), "appmod.py"],
                   check=True)
    assert _call(procs, env, os.path.join(app, "app.py"))[:2] == ("s1", "m1")
    subprocess.run(["tar", "-xf", archive, "-C", app], check=True)
    assert _call(procs, env, os.path.join(app, "app.py"))[:2] == ("s1", "m2")


def test_git_checkout(app: str, procs: ProcRegistry, env: dict[str, str]) -> None:
    git = ["git", "-C", app, "-c", "user.name=t", "-c", "user.email=t@t",
           "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "v1"],
                 ["checkout", "-qb", "v2"]):
        subprocess.run([*git, *args], check=True)
    _module(os.path.join(app, "appmod.py"), "m2")
    for args in (["commit", "-qam", "v2"], ["checkout", "-q", "main"]):
        subprocess.run([*git, *args], check=True)
    assert _call(procs, env, os.path.join(app, "app.py"))[:2] == ("s1", "m1")
    subprocess.run([*git, "checkout", "-q", "v2"], check=True)
    assert _call(procs, env, os.path.join(app, "app.py"))[:2] == ("s1", "m2")


def test_file_briefly_absent_then_recreated(app: str, procs: ProcRegistry,
                                            env: dict[str, str]) -> None:
    """A call that finds the module missing is served by the old server (a deploy half
    done); once the module is back, the next call gets it."""
    script = os.path.join(app, "app.py")
    mod = os.path.join(app, "appmod.py")
    first = _call(procs, env, script)
    os.unlink(mod)
    assert _call(procs, env, script) == first
    _module(mod, "m2")
    assert _call(procs, env, script)[:2] == ("s1", "m2")
    # and the fresh server follows later edits as well
    _module(mod, "m3")
    assert _call(procs, env, script)[:2] == ("s1", "m3")


def test_symlink_swapped_to_another_release(rundir: str, procs: ProcRegistry,
                                            env: dict[str, str]) -> None:
    """``current -> r1`` swapped to ``current -> r2`` (``ln -sfn``, atomically): no file
    under r1 changes, yet the script at ``current/app.py`` is another file."""
    for r, s in (("r1", "s1"), ("r2", "s2")):
        os.mkdir(os.path.join(rundir, r))
        write_script(os.path.join(rundir, r), "app.py", SCRIPT.format(version=s))
        _module(os.path.join(rundir, r, "appmod.py"), "m")
    current = os.path.join(rundir, "current")
    os.symlink("r1", current)
    script = os.path.join(current, "app.py")
    assert _call(procs, env, script)[0] == "s1"
    os.symlink("r2", current + ".new")
    os.rename(current + ".new", current)
    assert _call(procs, env, script)[0] == "s2"


def _wheel(where: str, version: str) -> str:
    """A minimal pure-Python wheel of package ``pfdemo``, dated 1980 as reproducible builds
    are."""
    dist = f"pfdemo-{version}.dist-info"
    files = {"pfdemo/__init__.py": f"VERSION = 'p{version}'\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: pfdemo\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    record = []
    for name, text in files.items():
        digest = hashlib.sha256(text.encode()).digest()
        b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        record.append(f"{name},sha256={b64},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    path = os.path.join(where, f"pfdemo-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), text)
    return path


def test_pip_install_upgrade_of_an_imported_package(rundir: str, procs: ProcRegistry,
                                                    env: dict[str, str]) -> None:
    venv = os.path.join(rundir, "v")
    subprocess.run([str(PYTHON), "-m", "venv", "--without-pip", venv], check=True)
    vpy = os.path.join(venv, "bin", "python")
    purelib = subprocess.run([vpy, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(purelib, "prefork_src.pth"), "w") as f:
        f.write(f"{REPO}\n")
    wheels = [_wheel(rundir, v) for v in ("1.0", "2.0")]

    def pip(*args: str) -> None:
        subprocess.run([str(PYTHON), "-m", "pip", "--python", vpy, "install", "-q",
                        "--no-index", "--no-deps", "--disable-pip-version-check", *args],
                       check=True, capture_output=True)

    pip(wheels[0])
    script = write_script(rundir, "usepkg.py", """
        import os
        import pfdemo
        import prefork
        prefork.initialisation_complete(log="file")
        print("s", pfdemo.VERSION, os.getppid())
        """, shebang=f"{CLIENT} -U,{vpy}")
    assert _call(procs, env, script)[1] == "p1.0"
    pip("-U", wheels[1])
    assert _call(procs, env, script)[1] == "p2.0"
