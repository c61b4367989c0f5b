"""Which interpreter a bare ``-U,NAME`` runs, and what a failed setup says about it.

The quickstart's ``#!/path/to/repo/.venv/bin/prefork-interp -U,/path/to/repo/.venv/bin/python3``
works without the venv activated.  A bare name (``-U,python3``) is looked up on ``PATH``, as
the reference does and as a direct run would (``prefork/client/interp.py``).  When setup
fails, the client says which interpreter ran (path, how it was
found, version), whether it can import prefork, and names one that can.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from harness import CLIENT, PYTHON, VENV_BIN, ProcRegistry, write_script

from prefork.common import consts

pytestmark = pytest.mark.timeout(120)

SYSTEM_PYTHON = "/usr/bin/python3"
QUICKSTART = """\
import sys
import typer, psutil            # slow imports: done once per server

import prefork
prefork.initialisation_complete()

print(sum(len(line.split()) for line in sys.stdin), sys.argv[1:])
"""


def _bare_env(env: dict[str, str]) -> dict[str, str]:
    """The caller's environment without the venv: PATH of the system only."""
    e = {k: v for k, v in env.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    e["PATH"] = "/usr/bin:/bin"
    e["PREFORK_INTERP_WATCHER"] = str(VENV_BIN / "prefork-watcher")
    return e


@pytest.fixture
def system_python() -> str:
    """A Python on the system PATH that cannot import prefork (the situation of the issue)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"no {SYSTEM_PYTHON} on this machine")
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import prefork"], capture_output=True,
                           cwd="/", env={"PATH": "/usr/bin:/bin"}, check=False)
    if probe.returncode == 0:
        pytest.skip(f"{SYSTEM_PYTHON} can import prefork here")
    return SYSTEM_PYTHON


def _version(python: str) -> str:
    return subprocess.run([python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_quickstart_works_without_the_venv_activated(
        rundir: str, env: dict[str, str], procs: ProcRegistry, tmp_path: Path,
        system_python: str) -> None:
    assert (VENV_BIN / "python3").exists()
    # As written in the README's quickstart: the venv's Python named in full.
    script = write_script(tmp_path, "words.py", QUICKSTART, f"{CLIENT} -U,{VENV_BIN}/python3")
    bare = _bare_env(env)
    for args in (["a"], ["b", "c"]):  # the first call starts the server, the second is warm
        rc, out, err = procs.run([script, *args], input=b"one two\nthree\n", env=bare,
                                 cwd=str(tmp_path))
        assert (rc, out) == (0, f"3 {args}\n".encode()), err
    (stat_file,) = Path(rundir).glob("p*" + consts.STAT_SUFFIX)
    assert json.loads(stat_file.read_text())["executable"] == str(VENV_BIN / "python3")


def test_failed_setup_names_the_interpreter(rundir: str, env: dict[str, str],
                                            procs: ProcRegistry, tmp_path: Path,
                                            system_python: str) -> None:
    # a client with no python3 beside it: the bare name is found on PATH
    bindir = tmp_path / "bin"
    bindir.mkdir()
    client = bindir / "prefork-interp"
    shutil.copy(CLIENT, client)
    script = write_script(tmp_path, "words.py", QUICKSTART, f"{client} -U,python3")
    rc, out, err = procs.run([script], env=_bare_env(env), cwd=str(tmp_path))
    text = err.decode()
    assert rc == 1 and out == b"", text
    assert "ModuleNotFoundError" in text  # the script's own traceback comes first
    version = _version(system_python)
    assert (f"prefork-interp: the interpreter was {system_python}, found on PATH as "
            f"'python3' (Python {version}), which cannot import prefork: name an "
            f"interpreter that can in the #! line, e.g. -U,") in text, text
    suggested = text.rsplit("-U,", 1)[1].split(" ", 1)[0]
    assert os.path.realpath(suggested) == os.path.realpath(PYTHON), text

    # named by its path: no lookup to report
    script2 = write_script(tmp_path, "w2.py", QUICKSTART, f"{CLIENT} -U,{system_python}")
    rc, _out, err = procs.run([script2], env=_bare_env(env), cwd=str(tmp_path))
    assert rc == 1
    assert (f"the interpreter was {system_python} (Python {version}), which cannot import "
            "prefork") in err.decode(), err


def test_failed_setup_with_prefork_says_where_it_came_from(
        rundir: str, env: dict[str, str], procs: ProcRegistry, tmp_path: Path) -> None:
    script = write_script(tmp_path, "bad.py", "import sys\nsys.exit(4)\n",
                          f"{CLIENT} -U,{PYTHON}")
    rc, _out, err = procs.run([script], env=env, cwd=str(tmp_path))
    text = err.decode()
    assert rc == 4, text
    assert f"the interpreter was {PYTHON} (Python {_version(str(PYTHON))}); it imports " \
           "prefork from " in text, text
