"""Which interpreter setup runs, and what to say when it could not become a server.

Cold path only (a server start), imported by ``prefork.client.start``.

A bare interpreter name (``-U,python3``: no ``/``) is looked up on the caller's ``PATH``, as
the reference client does (``execvp``) and as a direct run would: after a venv switch the
call runs the new venv's Python.  To run one venv's Python whether or not it is activated,
name it in full (``-U,/path/venv/bin/python3``), as the README's quickstart does.  Nothing is
added to the script's environment (no ``PYTHONPATH``): adding only ``prefork`` to another
Python would just move the failure to the script's next import.

When setup ends before ``initialisation_complete()``, ``failure_hint`` says which
interpreter ran (path, how it was found, version), whether it can import ``prefork`` at all,
and how to name one that can.
"""

from __future__ import annotations

import os
import sys

_PROBE = ("import sys; print('%d.%d.%d' % sys.version_info[:3]); import prefork; "
          "print(prefork.__file__)")
_PROBE_TIMEOUT = 10.0


def resolve(name: str, environ: dict[bytes, bytes] | None = None) -> tuple[str, str]:
    """``(path, how)``: the interpreter to run for ``name`` and how it was found
    (``"as given"``, ``"on PATH"``); ``(name, "not found")`` when it is nowhere (spawning
    it then fails with the usual message)."""
    if "/" in name:
        return name, "as given"
    env_path = (environ or {}).get(b"PATH")
    search = os.fsdecode(env_path) if env_path is not None else os.environ.get(
        "PATH", os.defpath)
    for d in search.split(os.pathsep):
        cand = os.path.join(d or ".", name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand, "on PATH"
    return name, "not found"


def _probe(path: str, env: dict[bytes, bytes]) -> tuple[str | None, str | None]:
    """(version, where it imports prefork from) of the Python at ``path``, in the script's
    environment; None for what could not be learnt."""
    import subprocess

    try:
        p = subprocess.run([path, "-c", _PROBE], env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=_PROBE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    lines = p.stdout.decode("utf-8", "replace").split()
    version = lines[0] if lines else None
    where = lines[1] if p.returncode == 0 and len(lines) > 1 else None
    return version, where


def failure_hint(name: str, path: str, how: str, env: dict[bytes, bytes]) -> str:
    """Lines for the caller's stderr after a failed setup: which Python ran, whether it
    has ``prefork``, how to name one that has ("" for an interpreter that is not Python)."""
    if not os.path.basename(path).startswith(("python", "pypy")):
        return ""  # another program (prefork-server, perl): it says what went wrong itself
    found = "" if how == "as given" else f", found {how} as {name!r}"
    version, where = _probe(path, env)
    text = (f"prefork-interp: the interpreter was {path}{found} "
            f"(Python {version or '?'})")
    if where is not None:
        return text + f"; it imports prefork from {os.path.dirname(where)}\n"
    mine = sys.executable
    suggestion = ""
    if (mine and os.path.realpath(mine) != os.path.realpath(path)
            and _probe(mine, env)[1] is not None):
        suggestion = f", e.g. -U,{mine} (the Python this client was installed with)"
    return (text + ", which cannot import prefork: name an interpreter that can in the "
            f"#! line{suggestion}\n")
