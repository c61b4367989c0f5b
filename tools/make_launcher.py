#!/usr/bin/env python3
"""Write fast launchers for ``prefork-interp`` and ``prefork-watcher`` into a venv's ``bin/``.

The console scripts that pip writes start Python with ``site`` (about 30 ms here) and import
``importlib.metadata`` machinery; the client runs on every call of every script, so it gets a
launcher of its own::

    #!<venv>/bin/python -IS
    import sys
    sys.path.append('<dir holding the prefork package>')
    from prefork.client.main import main
    main()

``-I`` (isolated: no ``PYTHON*`` variables, no user site, no script dir or cwd on ``sys.path``)
and ``-S`` (no ``site``).  The package's location is computed now, at install time, by asking
the venv's Python where ``prefork`` is: the repository root for an editable install, else the
venv's site-packages.  It is appended to ``sys.path``, after the standard library: neither a
file in the repository root nor a package in site-packages can then shadow a standard module
the client imports.  The watcher needs ``pyinotify`` (and ``asyncore`` from ``pyasyncore``
on Python >= 3.12) from site-packages, so its launcher appends that directory too.

``--client-python PATH`` runs the client launcher with another interpreter (>= 3.11) than the
venv's, e.g. a distribution's ``/usr/bin/python3``, which may start faster (statically linked,
``_socket``/``select`` built in: about 2 ms a call on the machine of docs/bench-results.md).
The client needs nothing but the standard library and the ``prefork`` package, whose
location is still the venv's; that interpreter's byte code is compiled too.  If it goes away
(a distribution upgrade), the client fails until this is run again.

Finally the package is byte-compiled with the venv's Python so that no ``.pyc`` is written on
the hot path at run time.

Usage: ``python tools/make_launcher.py [--venv DIR]`` (default: ``.venv`` in the repository).
After a ``pip install`` into the venv, pip's ``prefork-interp`` launcher makes itself the fast
one on its first call (``prefork/client/launcher.py``, same text); running this again also
redoes the watcher's launcher and the byte-compilation.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prefork.client import launcher  # noqa: E402

_PROBE = """\
import os, sys, sysconfig
import prefork
pkg = os.path.dirname(os.path.abspath(prefork.__file__))
print(os.path.dirname(pkg))
print(sysconfig.get_path("purelib"))
print(sysconfig.get_path("platlib"))
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
    launcher.write_atomically(str(path), text)


def launcher_text(python: Path, module: str, dirs: list[str]) -> str:
    return launcher.launcher_text(str(python), module, dirs, writer="tools/make_launcher.py")


def check_client_python(path: Path) -> Path:
    """``--client-python``: an absolute path (not resolved: ``/usr/bin/python3`` follows
    upgrades) usable in a ``#!`` line, of an interpreter >= 3.11 that runs."""
    path = path.absolute()
    if any(c.isspace() for c in str(path)) or len(str(path)) > 200:
        sys.exit(f"make_launcher: {path} cannot be used in a #! line (space or too long)")
    try:
        ok = subprocess.run([str(path), "-IS", "-c",
                             "import sys; sys.exit(sys.version_info < (3, 11))"],
                            check=False, cwd="/").returncode == 0
    except OSError as e:
        sys.exit(f"make_launcher: --client-python {path}: {e.strerror}")
    if not ok:
        sys.exit(f"make_launcher: --client-python {path}: not a Python >= 3.11")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=REPO / ".venv", help="the venv (default .venv)")
    ap.add_argument("--client-python", type=Path, default=None,
                    help="interpreter (>= 3.11) for the client launcher (default: the venv's)")
    ap.add_argument("-q", "--quiet", action="store_true")
    ns = ap.parse_args()

    venv = ns.venv.absolute()
    python = venv / "bin" / "python"
    if not os.access(python, os.X_OK):
        sys.exit(f"make_launcher: no Python at {python} (make the venv first)")
    if any(c.isspace() for c in str(python)) or len(str(python)) > 200:
        # A #! line holds one argument and at most 255 bytes (Linux >= 5.1).
        sys.exit(f"make_launcher: {python} cannot be used in a #! line (space or too long)")

    client_python = python
    if ns.client_python is not None:
        client_python = check_client_python(ns.client_python)
    pkg_root, site = probe(python)
    for name, (module, needs_site) in ROLES.items():
        dirs = [pkg_root]
        if needs_site:
            dirs += [d for d in site if d != pkg_root]
        dest = venv / "bin" / name
        interp = client_python if name == "prefork-interp" else python
        write_atomically(dest, launcher_text(interp, module, dirs))
        if not ns.quiet:
            print(f"make_launcher: wrote {dest} (prefork from {pkg_root})")

    # Byte-compile with the venv's Python (same cache tag as at run time), so that the
    # client never writes a .pyc itself.
    # A module that does not compile yet (work in progress) is reported, not fatal.
    rc = 0
    for interp in dict.fromkeys((python, client_python)):
        rc |= subprocess.run(
            [str(interp), "-I", "-m", "compileall", "-q", os.path.join(pkg_root, "prefork")],
            check=False, cwd="/",
        ).returncode
    if rc != 0:
        print("make_launcher: warning: compileall reported errors (above)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
