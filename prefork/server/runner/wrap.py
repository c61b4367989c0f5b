"""``--wrap``: a ``#!`` wrapper running an installed program through a warm server under the
program's own Python, with nothing of ours installed in its environment (``boot.py``);
finding the program on ``PATH``, its interpreter from its ``#!`` line, and our client."""

from __future__ import annotations

import os
import sys

from prefork.server.runner.script import (
    HEAD,
    PRELOAD_MARKER,
    PROG,
    REHEARSE_MARKER,
    WRAP_MARKER,
    RunnerError,
    wrapped_target,
)

#: Longest ``#!`` line Linux reads whole (BINPRM_BUF_SIZE, since Linux 5.1).
SHEBANG_MAX = 255
#: The file any Python runs to start ``prefork-server`` with nothing installed (boot.py).
BOOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "boot.py")
#: Start of the second line of pip's launcher when the interpreter's path is too long for
#: ``#!`` (``#!/bin/sh`` then ``'''exec' "/path/to/python" "$0" "$@"``).
_PIP_EXEC = b"'''exec' "


def shebang_python(source: bytes) -> tuple[str, list[str]] | None:
    """(interpreter, its arguments) from a ``#!`` line, resolving ``/usr/bin/env [-S] NAME``
    on PATH and pip's ``#!/bin/sh`` launcher for long paths; None without a ``#!`` line."""
    import shlex
    import shutil

    if not source.startswith(b"#!"):
        return None
    lines = source.split(b"\n", 2)
    line = os.fsdecode(lines[0][2:].rstrip(b"\r")).strip()
    interp, _, rest = line.partition(" ")
    rest = rest.strip()
    args = [rest] if rest else []
    if os.path.basename(interp) in ("sh", "bash") and len(lines) > 1 \
            and lines[1].startswith(_PIP_EXEC):
        try:
            words = shlex.split(os.fsdecode(lines[1][len(_PIP_EXEC):]))
        except ValueError:
            words = []
        if len(words) >= 3 and words[-2:] == ["$0", "$@"]:
            return words[0], words[1:-2]
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


def is_python(interp: str) -> bool:
    """Whether an interpreter's name is a Python's (``python``, ``python3.11``, ``pypy3``)."""
    import re

    return re.fullmatch(r"(python|pypy)[0-9.]*(-dbg)?", os.path.basename(interp)) is not None


def _environment_of(executable: str) -> tuple[str, str | None]:
    """(the real binary, the venv it belongs to) of a Python executable path: two paths name
    the same environment when both are equal (a venv's python is a symlink to its base
    interpreter, so the binary alone cannot tell a venv from its base)."""
    path = os.path.abspath(executable)
    venv = None
    for d in (os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        if os.path.isfile(os.path.join(d, "pyvenv.cfg")):
            venv = d
            break
    return os.path.realpath(path), venv


def same_python(interp: str) -> bool:
    """Whether ``interp`` is this interpreter in this environment (venv or not)."""
    return _environment_of(interp) == _environment_of(sys.executable)


def program_python(path: str, source: bytes) -> tuple[str, list[str]] | None:
    """The Python a script must run under when it is not this one (from its ``#!`` line):
    None for this one, for no ``#!`` line (a plain ``python SCRIPT`` file) and for a script
    written for prefork-interp; RunnerError for a program that is not Python."""
    got = shebang_python(source)
    if got is None:
        if source.startswith(b"\x7fELF"):
            raise RunnerError(f"{path} is a binary, not a Python program", EXIT_NOT_PYTHON)
        return None
    interp, args = got
    if os.path.basename(interp) == "prefork-interp":
        return None
    if not is_python(interp):
        raise RunnerError(f"{path} is not a Python program: its #! line runs {interp}",
                          EXIT_NOT_PYTHON)
    if same_python(interp):
        return None
    return interp, args


#: A program that is not Python, given to ``prefork-server`` (as ``python`` fails to open).
EXIT_NOT_PYTHON = 2


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


def learn_preloads(interp: list[str], program: str, options: list[str],
                   args: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Run ``--explain PROGRAM -- ARGS`` under the program's Python: (the modules it
    imported while running that are safe to preload, the refused ones with the reason)."""
    import json
    import subprocess

    got = subprocess.run([*interp, BOOT, *options, "--explain", "--json", program, "--",
                          *args], stdin=subprocess.DEVNULL, capture_output=True,
                         timeout=600, check=False)
    try:
        report = json.loads(got.stdout)
    except ValueError:
        report = None
    if got.returncode != 0 or not isinstance(report, dict):
        why = got.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RunnerError(f"could not run {program} to learn its imports: "
                          f"{why[-1] if why else f'status {got.returncode}'}")
    refused = [(str(r[0]), str(r[1])) for r in report.get("refused", [])]
    return [str(m) for m in report.get("learn", [])], refused


def make_wrapper(name: str, client: str | None, options: list[str] | None = None,
                 learn_args: list[str] | None = None, rehearse: bool = False) -> str:
    """The text of a ``#!`` wrapper running program NAME through a warm server under the
    program's own Python, nothing of ours installed in its environment; ``options``
    (``--preload MODULE`` ...) go into the ``#!`` line, for the server's setup.  With
    ``learn_args``, the program is run once with them and the modules it imported while
    running (the fork-safe ones) are listed in the wrapper, for setup to preload; with
    ``rehearse`` too, the wrapper's server rehearses with them (``server/rehearse.py``)."""
    import json
    import subprocess

    program = find_program(name)
    with open(program, "rb") as f:
        head = f.read(HEAD)
    got = shebang_python(head)
    if got is None:
        kind = "a binary" if head.startswith(b"\x7fELF") else "a file without a #! line"
        raise RunnerError(f"{program} is {kind}, not a Python program")
    interp, interp_args = got
    if not is_python(interp):
        raise RunnerError(f"{program} is not a Python program: its #! line runs {interp}")
    options = options or []
    if "\n" in program or "\n" in name:
        raise RunnerError(f"{program!r}: a newline in the name cannot go in a wrapper")
    if any(c in w for w in (interp, *interp_args, BOOT) for c in ",\n"):
        raise RunnerError(f"{program}: its #! line has a comma: it cannot be put in a "
                          "prefork-interp #! line")
    if any(c in w for w in options for c in ", \n"):
        raise RunnerError(f"options for the #! line cannot hold commas or spaces: {options}")
    # The program's Python runs our (standard library only) server side from here:
    # nothing is installed in its environment, but it must be a Python we can run on.
    try:
        check = subprocess.run([interp, *interp_args, BOOT, "--version"], capture_output=True,
                               timeout=60, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RunnerError(f"{program} runs with {interp}, which cannot run {PROG} ({e})") \
            from None
    if check.returncode != 0:
        why = check.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RunnerError(f"{program} runs with {interp}, which cannot run {PROG} "
                          f"({why[-1] if why else f'status {check.returncode}'})")
    client_path = find_client(client)
    shebang = f"#!{client_path} -U," + ",".join([interp, *interp_args, BOOT, *options])
    if len(shebang) > SHEBANG_MAX or " " in client_path:
        raise RunnerError(f"the #! line would be unusable (longer than {SHEBANG_MAX} "
                          f"bytes, or a space in the client's path): {shebang}")
    learned = ""
    if learn_args is not None:
        learn, refused = learn_preloads([interp, *interp_args], program, options, learn_args)
        sys.stderr.write(f"{PROG}: a run of {name} with {learn_args!r} imported "
                         f"{len(learn)} module(s) that setup will preload\n")
        for mod, reason in refused:
            sys.stderr.write(f"{PROG}: not preloaded: {mod}: {reason}\n")
        group: list[str] = []
        for mod in learn:
            if group and sum(len(m) + 1 for m in group) + len(mod) > 70:
                learned += f"{PRELOAD_MARKER.decode()} {' '.join(group)}\n"
                group = []
            group.append(mod)
        if group:
            learned += f"{PRELOAD_MARKER.decode()} {' '.join(group)}\n"
        if rehearse:
            learned += f"{REHEARSE_MARKER.decode()} {json.dumps(learn_args)}\n"
    return (f"{shebang}\n"
            f"{WRAP_MARKER.decode()}{program}\n"
            f"{learned}"
            f"# Made by `{PROG} --wrap {name}`: runs the program above through a\n"
            "# warm prefork server (the first call starts it) under the program's own\n"
            "# Python; run any other way (python WRAPPER ...), it just runs the program.\n"
            "import os, sys\n"
            f"os.execv({program!r}, [{program!r}, *sys.argv[1:]])\n")
