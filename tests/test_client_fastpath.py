"""The client's warm path: it imports nothing costly (no ``os``, no ``paths``) on a warm call,
and its run directory comes from ``ident.fast_run_base``, falling back to ``paths`` for
anything unusual.

The ident, the run-directory check and fd passing have one copy each (``prefork.common.ident``,
``prefork.common.fdio``), tested in tests/test_paths.py and tests/test_fdio.py.
"""

from __future__ import annotations

import os
import posix
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import CLIENT, PYTHON, REPO, write_script

from prefork.client import main as client
from prefork.client.boot import HOT_MODULES

TRIVIAL = """\
import prefork
prefork.initialisation_complete()
print("warm" if os.environ.get("X") else "?")
"""


def test_run_base_falls_back_to_paths(rundir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``run_base`` (what a call uses) creates a missing directory through paths."""
    target = os.path.join(rundir, "made")
    monkeypatch.setitem(posix.environ, b"PREFORK_INTERP_RUNDIR", os.fsencode(target))
    assert client.run_base() == target
    assert os.path.isdir(target)


# ------------------------------------------------------------------ what a warm call imports

#: Modules a warm call may import beyond those every interpreter loads at start-up.  Not
#: ``__future__``: the hot-path modules do without ``from __future__ import annotations``
#: (each module a call imports costs about 0.1 ms).
ALLOWED = {
    "_socket", "select", "_sha2", "_sha256", "_struct",
    "prefork", "prefork.client", "prefork.client.boot", *HOT_MODULES,
}


def test_warm_call_imports_only_low_level_modules(env: dict[str, str], rundir: str) -> None:
    """``python -X importtime`` of the installed launcher on a warm call: nothing but the
    allowed modules (no os, no paths/locking, no cold-path start module)."""
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
    assert "prefork.client.boot" in extra  # the parse works: the launcher's module is seen
    assert extra <= ALLOWED, f"the warm path imported {sorted(extra - ALLOWED)}"
    # Every warm-path module of ours came from boot.preload, none through the import system.
    assert not extra & set(HOT_MODULES), sorted(extra & set(HOT_MODULES))


# ------------------------------------------------------------------ boot.preload

_LIST_LOADED = """\
import sys
root = sys.argv[1]
sys.path.append(root)
from prefork.client.boot import preload
loaded = preload(root)
from prefork.client.main import main
import prefork.client.main as m
print(" ".join(loaded))
print(m.__spec__.origin, m.__spec__.cached, m.__spec__.parent, m.__loader__.name)
"""


def _copy_package(dest: Path) -> Path:
    """A copy of the ``prefork`` package under ``dest``, byte-compiled by the test's Python."""
    shutil.copytree(REPO / "prefork", dest / "prefork",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([str(PYTHON), "-m", "compileall", "-q", str(dest / "prefork")], check=True,
                   timeout=120)
    return dest


def test_preload_loads_every_hot_module_as_the_import_system_would(tmp_path: Path) -> None:
    """With fresh byte code, ``preload`` loads the whole warm path, in order, with the module
    attributes the import system sets."""
    root = _copy_package(tmp_path)
    p = subprocess.run([str(PYTHON), "-IS", "-c", _LIST_LOADED, str(root)],
                       capture_output=True, text=True, timeout=60, check=True)
    loaded, attrs = p.stdout.splitlines()
    assert tuple(loaded.split()) == HOT_MODULES
    main_py = root / "prefork" / "client" / "main.py"
    tag = sys.implementation.cache_tag
    assert attrs.split() == [str(main_py), str(main_py.parent / "__pycache__" / f"main.{tag}.pyc"),
                             "prefork.client", "prefork.client.main"]


def test_preload_stops_at_stale_byte_code(tmp_path: Path) -> None:
    """A source newer than its ``.pyc`` (an edit, a ``git checkout``): ``preload`` stops
    before it and the import system loads the rest, running the edited source."""
    root = _copy_package(tmp_path)
    ident = root / "prefork" / "common" / "ident.py"
    ident.write_text(ident.read_text() + "\nEDITED = True\n")
    os.utime(ident, ns=(ident.stat().st_atime_ns, ident.stat().st_mtime_ns + 5 * 10**9))
    check = _LIST_LOADED + "import prefork.common.ident as i; print(i.EDITED)\n"
    p = subprocess.run([str(PYTHON), "-IS", "-c", check, str(root)], capture_output=True,
                       text=True, timeout=60, check=True)
    loaded, _attrs, edited = p.stdout.splitlines()
    assert tuple(loaded.split()) == HOT_MODULES[:HOT_MODULES.index("prefork.common.ident")]
    assert edited == "True"


def test_preload_without_byte_code_leaves_it_all_to_the_import_system(tmp_path: Path) -> None:
    """No ``__pycache__`` at all (a read-only install never compiled): nothing is preloaded
    and the client still runs."""
    root = tmp_path
    shutil.copytree(REPO / "prefork", root / "prefork",
                    ignore=shutil.ignore_patterns("__pycache__"))
    p = subprocess.run([str(PYTHON), "-IS", "-B", "-c", _LIST_LOADED, str(root)],
                       capture_output=True, text=True, timeout=60, check=True)
    assert p.stdout.splitlines()[0] == ""
