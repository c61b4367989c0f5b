"""The ``prefork-interp`` console script as pip writes it, and the fast launcher it becomes.

pip (and pipx, and any wheel installer) writes console scripts that run Python with ``site``
and import ``re``: about 9 ms on every call of every script, more than the client itself
costs.  Wheels cannot carry interpreter flags (pip rewrites a ``#!python`` line to the bare
interpreter path), so the fast launcher is installed by the first call instead: run through
pip's launcher (``site`` ran: ``sys.flags.no_site`` is 0), ``main`` replaces that file, under
its own name, by::

    #!<the interpreter pip chose> -IS
    # prefork-interp fast launcher ...
    import sys
    sys.path.append('<directory holding the prefork package>')
    from prefork.client.boot import run
    run('<directory holding the prefork package>')

and then runs the call.  Every later call starts without ``site``.  pip's record keeps the
path, so ``pip uninstall`` removes it; an upgrade writes pip's launcher again, and its first
call makes it fast again.  The file is replaced only when it is pip's launcher for this
entry point, ours, in a directory we can write, with an interpreter path usable in a ``#!``
line, and ``PYTHONPATH`` unset (the package must be the installed one); otherwise the call
just runs, slower (``prefork-ctl doctor`` says why).  ``tools/make_launcher.py`` writes the
same text for ``make venv``.
"""

from __future__ import annotations

import os
import sys

#: Marks our fast launchers (``prefork-ctl doctor`` and the tests look for it).
FAST_MARK = "# prefork-interp fast launcher"
#: The line by which pip's console script for this entry point is recognised.
ENTRY_LINE = "from prefork.client.launcher import main"
_MAX_SHEBANG = 200  # a #! line holds at most 255 bytes (Linux >= 5.1), with the flags
_MAX_SCRIPT = 4096  # pip's console scripts are a few hundred bytes

TEMPLATE = """\
#!{python} -IS
{mark} (isolated, no site); written by {writer}.
import sys
{paths}{body}"""
#: The body for any role: its ``main``, imported the usual way.
_BODY = "from {module} import main\nsys.exit(main())\n"
#: The client's body: ``prefork.client.boot`` loads its warm-path modules from their byte
#: code, skipping the import system's search (see that module).
_CLIENT_BODY = "from prefork.client.boot import run\nrun({root!r})\n"


def launcher_text(python: str, module: str, dirs: list[str],
                  writer: str = "prefork.client.launcher") -> str:
    """The text of a fast launcher running ``module``'s ``main`` with ``python -IS``, with
    ``dirs`` appended to ``sys.path`` (after the standard library: nothing there can shadow
    a standard module the client imports)."""
    lines = "".join(f"sys.path.append({d!r})\n" for d in dirs)
    if module == "prefork.client.main" and dirs:
        body = _CLIENT_BODY.format(root=dirs[0])  # dirs[0] holds the prefork package
    else:
        body = _BODY.format(module=module)
    return TEMPLATE.format(python=python, mark=FAST_MARK, writer=writer, paths=lines,
                           body=body)


def usable_in_shebang(path: str) -> bool:
    """Whether ``path`` can be a ``#!`` interpreter followed by `` -IS``."""
    return (path.startswith("/") and len(os.fsencode(path)) <= _MAX_SHEBANG
            and not any(c.isspace() for c in path))


def write_atomically(path: str, text: str, mode: int = 0o755) -> None:
    """Replace ``path`` by a file holding ``text`` (a temporary file renamed over it)."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                               prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def package_root() -> str:
    """The directory holding the ``prefork`` package this process imported."""
    import prefork

    return os.path.dirname(os.path.dirname(os.path.abspath(prefork.__file__)))


def why_not_fast(path: str) -> str | None:
    """Why the console script at ``path`` cannot be replaced by the fast launcher (None: it
    can).  Only reads."""
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(_MAX_SCRIPT + 1)
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    if FAST_MARK in text:
        return "it is already the fast launcher"
    if len(text) > _MAX_SCRIPT or ENTRY_LINE not in text:
        return f"{path} is not pip's console script for prefork-interp"
    first = text.split("\n", 1)[0]
    python = first[2:].strip() if first.startswith("#!") else ""
    if not usable_in_shebang(python) or " " in first[2:].strip():
        return f"its interpreter line {first!r} cannot take the flags -IS"
    if st.st_uid != os.getuid():
        return f"{path} belongs to uid {st.st_uid}, not to us (uid {os.getuid()})"
    if not os.access(os.path.dirname(path), os.W_OK):
        return f"its directory {os.path.dirname(path)} is not writable"
    if os.environ.get("PYTHONPATH"):
        return "PYTHONPATH is set (the prefork package found may not be the installed one)"
    return None


def make_fast(path: str) -> bool:
    """Replace pip's console script at ``path`` (symlinks followed, as pipx makes them) by
    the fast launcher; False, changing nothing, if ``why_not_fast`` objects or writing
    fails."""
    path = os.path.realpath(path)
    if why_not_fast(path) is not None:
        return False
    with open(path, encoding="utf-8") as f:
        python = f.readline()[2:].strip()
    text = launcher_text(python, "prefork.client.main", [package_root()])
    try:
        write_atomically(path, text, os.stat(path).st_mode & 0o7777)
    except OSError:
        return False
    return True


def main() -> None:
    """Entry point of pip's ``prefork-interp`` console script: make it the fast launcher
    (once), then run the call."""
    if not sys.flags.no_site and sys.argv and sys.argv[0]:
        make_fast(sys.argv[0])
    from prefork.client.main import main as client_main

    client_main()
