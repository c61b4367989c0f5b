"""Real programs from PyPI in venvs of their own (never ours), built once and kept.

Each venv lives under ``REPO/.venv-programs/`` (git-ignored), named by what went into it
(the interpreter, its version, the requirements): a later session, or ``make bench``,
reuses it as it is.  Building one is serialised by a lock, and a venv counts as built only
once its stamp is written (an interrupted build is thrown away and made again).  Nothing of
prefork-interp is installed in them: the point is that ``prefork-server`` wraps them as they
are.  Standard library only (``bench/bench.py`` uses it too).

    program_venv(python, requirements) -> Path   the venv's directory
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".venv-programs"
STAMP = ".built"


def _version(python: str) -> str:
    return subprocess.run([python, "-c", "import sys; print(sys.version)"], check=True,
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL).stdout.strip()


def program_venv(python: str, requirements: Sequence[str], timeout: float = 1200) -> Path:
    """A venv made by ``python`` holding ``requirements`` (pip from PyPI), built if missing."""
    key = hashlib.sha256("\n".join([os.path.realpath(python), _version(python),
                                    *sorted(requirements)]).encode()).hexdigest()[:10]
    major_minor = _version(python).split()[0].rsplit(".", 1)[0]
    venv = CACHE / f"py{major_minor}-{key}"
    CACHE.mkdir(exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / STAMP).exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
        got = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                              "--disable-pip-version-check", *requirements],
                             check=False, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
        if got.returncode != 0:
            raise RuntimeError(f"pip install {' '.join(requirements)} into {venv} failed:\n"
                               + got.stderr[-3000:])
        (venv / STAMP).write_text("\n".join(requirements) + "\n")
    return venv
