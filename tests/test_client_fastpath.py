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
import subprocess
from pathlib import Path

import pytest
from harness import CLIENT, PYTHON, write_script

from prefork.client import main as client

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
    "prefork", "prefork.client", "prefork.client.main", "prefork.client.wire",
    "prefork.common", "prefork.common.consts", "prefork.common.fdio", "prefork.common.ident",
    "prefork.common.protocol",
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
    assert "prefork.client.main" in extra  # the parse works: the client's own module is seen
    assert extra <= ALLOWED, f"the warm path imported {sorted(extra - ALLOWED)}"
