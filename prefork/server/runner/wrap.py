"""``--wrap``: a ``#!`` wrapper running an installed program through a warm server with its own
environment's Python; finding the program on ``PATH``, its interpreter from its ``#!`` line,
and our client."""

from __future__ import annotations

import os
import sys

from prefork.server.runner.script import HEAD, PROG, WRAP_MARKER, RunnerError, wrapped_target

#: Longest ``#!`` line Linux reads whole (BINPRM_BUF_SIZE, since Linux 5.1).
SHEBANG_MAX = 255


def shebang_python(source: bytes) -> tuple[str, list[str]] | None:
    """(interpreter, its arguments) from a ``#!`` line, resolving ``/usr/bin/env [-S] NAME``
    on PATH; None without a ``#!`` line."""
    import shutil

    if not source.startswith(b"#!"):
        return None
    line = os.fsdecode(source[2:].split(b"\n", 1)[0].rstrip(b"\r")).strip()
    interp, _, rest = line.partition(" ")
    rest = rest.strip()
    args = [rest] if rest else []
    if os.path.basename(interp) == "env" and rest:
        words = rest.split()
        if words[0] == "-S":
            words = words[1:]
        while words and ("=" in words[0] or words[0].startswith("-")):
            words = words[1:]
        if not words:
            return None
        found = shutil.which(words[0])
        interp = found if found is not None else words[0]
        args = words[1:]
    return interp, args


def same_python(interp: str) -> bool:
    try:
        return os.path.samefile(interp, sys.executable)
    except OSError:
        return False


def find_program(name: str) -> str:
    """The program NAME on PATH (or NAME itself if it has a ``/``), skipping our own output
    file (``--wrap x > ~/bin/x`` truncates it before we look) and empty files, and seeing
    through an existing wrapper to the program it stands for."""
    try:
        out_st: os.stat_result | None = os.fstat(1)
    except OSError:
        out_st = None
    if "/" in name:
        candidates = [name]
    else:
        candidates = [os.path.join(d or ".", name)
                      for d in os.environ.get("PATH", os.defpath).split(os.pathsep)]
    for cand in candidates:
        try:
            st = os.stat(cand)
        except OSError:
            continue
        if not (os.path.isfile(cand) and os.access(cand, os.X_OK)):
            continue
        if out_st is not None and (st.st_dev, st.st_ino) == (out_st.st_dev, out_st.st_ino):
            continue
        if st.st_size == 0:
            continue
        with open(cand, "rb") as f:
            head = f.read(HEAD)
        target = wrapped_target(head)
        return os.path.abspath(cand if target is None else target)
    raise RunnerError(f"{name}: no such program" + ("" if "/" in name else " on PATH"))


def find_client(explicit: str | None) -> str:
    """Our prefork-interp (the reference C client cannot pass interpreter arguments)."""
    import shutil
    import subprocess

    if explicit is not None:
        candidates = [explicit]
    else:
        here = os.path.dirname(os.path.abspath(sys.argv[0])) if sys.argv else ""
        candidates = [os.path.join(here, "prefork-interp"),
                      os.path.join(os.path.dirname(sys.executable), "prefork-interp")]
        on_path = shutil.which("prefork-interp")
        if on_path is not None:
            candidates.append(on_path)
    for cand in candidates:
        if not (os.path.isfile(cand) and os.access(cand, os.X_OK)):
            continue
        try:
            got = subprocess.run([cand, "--version"], capture_output=True, timeout=30,
                                 check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if got.returncode == 0 and got.stdout.startswith(b"prefork-interp (Python)"):
            return os.path.abspath(cand)
    raise RunnerError("cannot find prefork-interp for Python (the C client cannot pass "
                      "interpreter arguments): give it with --client PATH")


def make_wrapper(name: str, client: str | None, options: list[str] | None = None) -> str:
    """The text of a ``#!`` wrapper running program NAME through a warm server; ``options``
    (``--preload MODULE`` ...) go into the ``#!`` line, for the server's setup."""
    import subprocess

    program = find_program(name)
    with open(program, "rb") as f:
        head = f.read(HEAD)
    got = shebang_python(head)
    if got is None:
        raise RunnerError(f"{program} is not a script (no #! line): not a Python program")
    interp, interp_args = got
    options = options or []
    if "\n" in program or "\n" in name:
        raise RunnerError(f"{program!r}: a newline in the name cannot go in a wrapper")
    if any(c in w for w in (interp, *interp_args) for c in ",\n"):
        raise RunnerError(f"{program}: its #! line has a comma: it cannot be put in a "
                          "prefork-interp #! line")
    if any(c in w for w in options for c in ", \n"):
        raise RunnerError(f"options for the #! line cannot hold commas or spaces: {options}")
    check = subprocess.run([interp, *interp_args, "-c", "import prefork.server.runner"],
                           capture_output=True, timeout=60, check=False)
    if check.returncode != 0:
        why = check.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RunnerError(f"{program} runs with {interp}, which cannot import prefork "
                          f"({why[-1] if why else f'status {check.returncode}'}): install "
                          "prefork-interp in that environment")
    client_path = find_client(client)
    shebang = f"#!{client_path} -U," + ",".join(
        [interp, *interp_args, "-m", "prefork.server", *options])
    if len(shebang) > SHEBANG_MAX or " " in client_path:
        raise RunnerError(f"the #! line would be unusable (longer than {SHEBANG_MAX} "
                          f"bytes, or a space in the client's path): {shebang}")
    return (f"{shebang}\n"
            f"{WRAP_MARKER.decode()}{program}\n"
            f"# Made by `{PROG} --wrap {name}`: runs the program above through a\n"
            "# warm prefork server (the first call starts it); run any other way\n"
            "# (python WRAPPER ...), it just runs the program.\n"
            "import os, sys\n"
            f"os.execv({program!r}, [{program!r}, *sys.argv[1:]])\n")

