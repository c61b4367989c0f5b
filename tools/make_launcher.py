#!/usr/bin/env python3
"""Write fast launchers for ``prefork-interp`` and ``prefork-watcher`` into a venv's ``bin/``.

The console scripts that pip writes start Python with ``site`` (about 30 ms here) and import
``importlib.metadata`` machinery; the client runs on every call of every script, so it gets a
launcher of its own::

    #!<venv>/bin/python -IS
    import sys
    sys.path.insert(0, '<dir holding the prefork package>')
    from prefork.client.main import main
    main()

``-I`` (isolated: no ``PYTHON*`` variables, no user site, no script dir or cwd on ``sys.path``)
and ``-S`` (no ``site``).  The package's location is computed now, at install time, by asking
the venv's Python where ``prefork`` is: the repository root for an editable install, else the
venv's site-packages.  The watcher needs ``pyinotify`` (and ``asyncore`` from ``pyasyncore``
on Python >= 3.12) from site-packages, so its launcher puts that directory on ``sys.path`` too.

Finally the package is byte-compiled with the venv's Python so that no ``.pyc`` is written on
the hot path at run time.

Usage: ``python tools/make_launcher.py [--venv DIR]`` (default: ``.venv`` in the repository).
Re-run after every ``pip install`` into the venv: pip overwrites these files.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_PROBE = """\
import os, sys, sysconfig
import prefork
pkg = os.path.dirname(os.path.abspath(prefork.__file__))
print(os.path.dirname(pkg))
print(sysconfig.get_path("purelib"))
print(sysconfig.get_path("platlib"))
"""

TEMPLATE = """\
#!{python} -IS
# Written by tools/make_launcher.py (fast launcher: isolated, no site). Re-run it after pip.
import sys
{paths}from {module} import main
sys.exit(main())
"""

ROLES = {
    # name: (module, needs site-packages)
    "prefork-interp": ("prefork.client.main", False),
    "prefork-watcher": ("prefork.watcher.main", True),
}


def probe(python: Path) -> tuple[str, list[str]]:
    """Ask the venv's Python where ``prefork`` lives and where its site-packages are."""
    # -I: do not let the cwd (maybe the repo root) shadow the installed package.
    out = subprocess.run(
        [str(python), "-I", "-c", _PROBE],
        check=True, stdout=subprocess.PIPE, text=True, cwd="/",
    ).stdout.split("\n")
    pkg_root, purelib, platlib = out[0], out[1], out[2]
    site = [purelib] if purelib == platlib else [purelib, platlib]
    return pkg_root, site


def write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def launcher_text(python: Path, module: str, dirs: list[str]) -> str:
    # sys.path.insert(0, ...) in reverse, so the first dir ends up first on sys.path.
    lines = "".join(f"sys.path.insert(0, {d!r})\n" for d in reversed(dirs))
    return TEMPLATE.format(python=python, paths=lines, module=module)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=REPO / ".venv", help="the venv (default .venv)")
    ap.add_argument("-q", "--quiet", action="store_true")
    ns = ap.parse_args()

    venv = ns.venv.absolute()
    python = venv / "bin" / "python"
    if not os.access(python, os.X_OK):
        sys.exit(f"make_launcher: no Python at {python} (make the venv first)")
    if any(c.isspace() for c in str(python)) or len(str(python)) > 200:
        # A #! line holds one argument and at most 255 bytes (Linux >= 5.1).
        sys.exit(f"make_launcher: {python} cannot be used in a #! line (space or too long)")

    pkg_root, site = probe(python)
    for name, (module, needs_site) in ROLES.items():
        dirs = [pkg_root]
        if needs_site:
            dirs += [d for d in site if d != pkg_root]
        dest = venv / "bin" / name
        write_atomically(dest, launcher_text(python, module, dirs))
        if not ns.quiet:
            print(f"make_launcher: wrote {dest} (prefork from {pkg_root})")

    # Byte-compile with the venv's Python (same cache tag as at run time), so that the
    # client never writes a .pyc itself.
    # A module that does not compile yet (work in progress) is reported, not fatal.
    rc = subprocess.run(
        [str(python), "-I", "-m", "compileall", "-q", os.path.join(pkg_root, "prefork")],
        check=False, cwd="/",
    ).returncode
    if rc != 0:
        print("make_launcher: warning: compileall reported errors (above)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
