"""A real ``pip install`` of the repository into a fresh venv gives the fast client.

The wheel is built once per session (``pip wheel --no-deps``, from pip's local index and
cache) and installed with ``--no-deps`` into a fresh ``--without-pip`` venv by the test venv's
pip (``pip --python``): the client and the script side need nothing but the standard library;
the watcher (``pyinotify``) is the test venv's, through ``PREFORK_INTERP_WATCHER``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import PYTHON, REPO, VENV_BIN, ProcRegistry, scaled, write_script

from prefork.client.launcher import ENTRY_LINE, FAST_MARK

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

PIP = [str(PYTHON), "-m", "pip"]
BODY = """\
import sys
import prefork
prefork.initialisation_complete()
print("warm", sys.argv[1:], flush=True)
"""


def _pip(*args: str) -> None:
    p = subprocess.run([*PIP, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=scaled(180), check=False)
    assert p.returncode == 0, p.stdout.decode(errors="replace")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of the repository as it is now."""
    out = tmp_path_factory.mktemp("wheel")
    _pip("wheel", "-q", "--no-deps", "-w", str(out), str(REPO))
    (whl,) = out.glob("prefork_interp-*.whl")
    return whl


@pytest.fixture
def venv(tmp_path: Path, wheel: Path) -> Iterator[Path]:
    """A fresh venv with the wheel pip-installed (no dependencies)."""
    d = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(d)], check=True,
                   timeout=scaled(60))
    _pip("--python", str(d / "bin" / "python"), "install", "-q", "--no-deps", str(wheel))
    yield d


def _call(procs: ProcRegistry, script: str, env: dict[str, str], *args: str) -> bytes:
    rc, out, err = procs.run([script, *args], env=env)
    assert rc == 0, err.decode(errors="replace")
    return out


def test_pip_install_gives_fast_client(venv: Path, wheel: Path, rundir: str,
                                       env: dict[str, str], procs: ProcRegistry,
                                       tmp_path: Path) -> None:
    client = venv / "bin" / "prefork-interp"
    text = client.read_text()
    assert ENTRY_LINE in text and FAST_MARK not in text  # pip's own launcher, as installed
    env["PREFORK_INTERP_WATCHER"] = str(VENV_BIN / "prefork-watcher")
    env.pop("PYTHONPATH", None)
    script = write_script(tmp_path, "s.py", BODY, f"{client} -U,{venv / 'bin' / 'python'}")
    assert _call(procs, script, env, "1") == b"warm ['1']\n"  # cold, through pip's launcher
    fast = client.read_text()
    assert fast.startswith(f"#!{venv / 'bin' / 'python'} -IS\n") and FAST_MARK in fast
    assert str(venv / "lib") in fast  # the installed package, not the repository
    assert _call(procs, script, env, "2") == b"warm ['2']\n"  # warm, through the fast one

    # an upgrade writes pip's launcher again; its first call makes it fast again
    _pip("--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
         "--force-reinstall", str(wheel))
    assert FAST_MARK not in client.read_text()
    assert _call(procs, script, env, "3") == b"warm ['3']\n"
    assert FAST_MARK in client.read_text()

    # uninstall removes the launcher pip recorded, rewritten or not
    _pip("--python", str(venv / "bin" / "python"), "uninstall", "-y", "-q", "prefork-interp")
    assert not client.exists()
    assert not list((venv / "bin").glob(".prefork-interp.*"))  # no temporary file left


def test_pipx_style_symlink_rewrites_the_target(venv: Path, rundir: str, env: dict[str, str],
                                                procs: ProcRegistry, tmp_path: Path) -> None:
    """pipx puts a symlink on PATH: the venv's file becomes fast, the symlink stays."""
    client = venv / "bin" / "prefork-interp"
    exposed = tmp_path / "localbin"
    exposed.mkdir()
    link = exposed / "prefork-interp"
    link.symlink_to(client)
    env["PREFORK_INTERP_WATCHER"] = str(VENV_BIN / "prefork-watcher")
    env.pop("PYTHONPATH", None)
    script = write_script(tmp_path, "s.py", BODY, f"{link} -U,{venv / 'bin' / 'python'}")
    assert _call(procs, script, env, "a") == b"warm ['a']\n"
    assert link.is_symlink() and FAST_MARK in client.read_text()
    assert _call(procs, script, env, "b") == b"warm ['b']\n"


def test_pythonpath_keeps_pips_launcher(venv: Path, rundir: str, env: dict[str, str],
                                        procs: ProcRegistry, tmp_path: Path) -> None:
    """With PYTHONPATH set the package found may not be the installed one: nothing is
    rewritten, the call still works."""
    client = venv / "bin" / "prefork-interp"
    env["PREFORK_INTERP_WATCHER"] = str(VENV_BIN / "prefork-watcher")
    env["PYTHONPATH"] = str(tmp_path / "elsewhere")
    script = write_script(tmp_path, "s.py", BODY, f"{client} -U,{venv / 'bin' / 'python'}")
    assert _call(procs, script, env, "x") == b"warm ['x']\n"
    assert FAST_MARK not in client.read_text()
