"""prefork-server (issue 6): unmodified scripts and installed programs, preforked.

Every comparison runs the same thing directly and through the helper (cold, then warm) and
wants stdout, stderr and the exit status byte for byte.  That alone would also pass if the
helper quietly ran the script without a server, so the tests also check that a server is
listening and, with a sibling module that counts its own imports, that setup imported it
once and the calls were forks of it.
"""

from __future__ import annotations

import os
import signal
import socket
import textwrap
import uuid
from pathlib import Path

import pytest
from harness import C_CLIENT, CLIENT, PYTHON, REPO, VENV_BIN, ProcRegistry, scaled, write_script

from prefork.common import paths
from prefork.common.ident import RUNDIR_ENV, lock_path, log_path, socket_path
from prefork.server import runner

SERVER = VENV_BIN / "prefork-server"
BOOT = REPO / "prefork" / "server" / "runner" / "boot.py"
PYGMENTIZE = VENV_BIN / "pygmentize"
RST2HTML = VENV_BIN / "rst2html"

Result = tuple[int, bytes, bytes]

pytestmark = pytest.mark.timeout(120)


def _server_sockets(rundir: str) -> list[str]:
    """Sockets in the run directory that a live server answers with a greeting."""
    live = []
    for name in os.listdir(rundir):
        if not name.startswith("s"):
            continue
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(scaled(10))
        try:
            s.connect(os.path.join(rundir, name))
            if s.recv(4) == b"PFI\n":
                live.append(name)
        except OSError:
            pass
        finally:
            s.close()
    return live


def same(procs: ProcRegistry, direct: list[str | os.PathLike[str]],
         helper: list[str | os.PathLike[str]], env: dict[str, str], *,
         input: bytes | None = None, cwd: str | None = None, calls: int = 2) -> Result:
    """Run ``direct`` once and ``helper`` ``calls`` times; all must give the same result."""
    want = procs.run(direct, input=input, env=env, cwd=cwd)
    for i in range(calls):
        got = procs.run(helper, input=input, env=env, cwd=cwd)
        assert got == want, f"call {i} through the helper differs from a direct run"
    return want


def _count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


# ------------------------------------------------------------------ real programs


RST_GOOD = b"Title\n=====\n\nSome *emphasis*, ``code`` and a list:\n\n- one\n- two\n"
RST_BAD = b"Title\n=====\n\n`unclosed\n\n.. nosuchdirective:: x\n"
PY_SRC = b"def f(x):\n    return x + 1  # comment\n\nprint(f(2))\n"


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """Input files for the real programs."""
    (tmp_path / "good.rst").write_bytes(RST_GOOD)
    (tmp_path / "bad.rst").write_bytes(RST_BAD)
    (tmp_path / "code.py").write_bytes(PY_SRC)
    return tmp_path


PROGRAM_CASES = {
    "pygmentize": [
        (["-l", "python", "-f", "html", "code.py"], None),
        (["-f", "terminal256", "-l", "python"], PY_SRC),          # stdin
        (["-N", "code.py"], None),
        (["-l", "nosuchlexer", "code.py"], None),                 # error: exit 1
        (["-l", "python", "missing.py"], None),                   # error: unreadable file
        (["--bogus"], None),                                      # usage error
    ],
    "rst2html": [
        (["good.rst"], None),
        (["--no-doc-title"], RST_GOOD),                           # stdin
        (["bad.rst"], None),                                      # warnings on stderr
        (["--halt=2", "bad.rst"], None),                          # error: halts, exit 1
        (["missing.rst"], None),                                  # error: unreadable file
        (["--bogus"], None),                                      # usage error: exit 2
    ],
}


@pytest.mark.parametrize("program", sorted(PROGRAM_CASES))
def test_real_program_through_the_helper(program: str, inputs: Path, rundir: str,
                                         env: dict[str, str], procs: ProcRegistry) -> None:
    """An installed PyPI program, unmodified, via ``prefork-interp -U prefork-server
    "$(command -v PROGRAM)"``: byte-identical to a direct run, errors included."""
    path = str(VENV_BIN / program)
    statuses = set()
    for args, stdin in PROGRAM_CASES[program]:
        got = same(procs, [path, *args], [CLIENT, "-U", "prefork-server", path, *args], env,
                   input=stdin, cwd=str(inputs))
        statuses.add(got[0])
    assert 0 in statuses and len(statuses) > 1, "the cases must include errors"
    assert len(_server_sockets(rundir)) == 1


@pytest.mark.parametrize("program", sorted(PROGRAM_CASES))
def test_real_program_through_a_wrapper(program: str, inputs: Path, rundir: str,
                                        env: dict[str, str], procs: ProcRegistry,
                                        tmp_path: Path) -> None:
    """``prefork-server --wrap PROGRAM > WRAPPER``: the wrapper behaves as the program."""
    wrapper = tmp_path / program
    with open(wrapper, "wb") as out:
        status, _, err = procs.run([SERVER, "--wrap", program], env=env, stdout=out)
    assert (status, err) == (0, b"")
    wrapper.chmod(0o755)
    first = wrapper.read_text().splitlines()[0]
    assert first == f"#!{CLIENT} -U,{PYTHON},{BOOT}"
    path = str(VENV_BIN / program)
    for args, stdin in PROGRAM_CASES[program]:
        same(procs, [path, *args], [wrapper, *args], env, input=stdin, cwd=str(inputs))
    assert len(_server_sockets(rundir)) == 1
    # Run any other way (no prefork-interp), the wrapper just runs the program.
    args, stdin = PROGRAM_CASES[program][0]
    same(procs, [path, *args], [PYTHON, wrapper, *args], env, input=stdin, cwd=str(inputs),
         calls=1)


# ------------------------------------------------------------------ scripts

PROBE = """\
    import sys
    print("argv", sys.argv)
    print("file", __file__)
    print("path0", sys.path[0])
    print("name", __name__, __package__, __spec__, __cached__, type(__loader__).__name__)
    print("globals", [k for k in globals() if k.startswith("__")])
    print("stdin", sys.stdin.read())
    import __main__, pickle
    class C:
        pass
    print("main is me", __main__.__dict__ is globals(), type(pickle.loads(pickle.dumps(C()))))
    if __name__ == "__main__":
        print("as main")
        sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""


def _helper_forms(script: str) -> list[list[str | os.PathLike[str]]]:
    return [[CLIENT, "-U", "prefork-server", script],
            [CLIENT, f"-U,{PYTHON},-m,prefork.server", script]]


def test_script_sees_what_a_direct_run_sees(rundir: str, env: dict[str, str],
                                            procs: ProcRegistry, tmp_path: Path) -> None:
    """``__name__ == "__main__"``, ``__file__``, ``sys.argv``, ``sys.path[0]``, the globals
    and the exit status, from another directory with a relative path, in each form."""
    sub = tmp_path / "sub"
    sub.mkdir()
    write_script(sub, "probe.py", PROBE, shebang=f"{CLIENT} -U,prefork-server")
    for rel in ("sub/probe.py", str(sub / "probe.py")):
        for args in (["0"], ["7", "x y"]):
            for form in _helper_forms(rel):
                out = same(procs, [PYTHON, rel, *args], [*form, *args], env, input=b"in",
                           cwd=str(tmp_path))
                assert b"as main" in out[1] and out[0] == int(args[0])
    # The script's own #! line (prefork-interp -U,prefork-server), run as a program.
    same(procs, [PYTHON, sub / "probe.py", "3"], [sub / "probe.py", "3"], env, input=b"")
    assert len(_server_sockets(rundir)) == 5


def test_sibling_module_preloaded_once(rundir: str, env: dict[str, str],
                                       procs: ProcRegistry, tmp_path: Path) -> None:
    """A module next to the script is found (sys.path[0] set before the preload), imported
    once in setup, and its import-time output and warnings appear on every call."""
    count = tmp_path / "count"
    (tmp_path / "sib.py").write_text(textwrap.dedent(f"""\
        import os, sys, warnings
        with open({str(count)!r}, "a") as f:
            f.write("imported\\n")
        print("sib says hello")
        print("sib to stderr", file=sys.stderr)
        warnings.warn("sib is careful")
        VALUE = 42
    """))
    script = write_script(tmp_path, "main.py", """\
        import sib
        print("value", sib.VALUE)
    """, shebang=f"{CLIENT} -U,prefork-server")
    want = procs.run([PYTHON, script], env=env)
    assert b"sib is careful" in want[2] and _count(count) == 1
    for _ in range(3):
        assert procs.run([script], env=env) == want
    assert _count(count) == 2, "setup should have imported sib once, for all three calls"


def test_failure_at_import(env: dict[str, str], procs: ProcRegistry, tmp_path: Path) -> None:
    """Imports that fail are skipped in setup; the script then fails exactly as directly,
    including a module's import-time output before it fails."""
    (tmp_path / "broken.py").write_text(textwrap.dedent("""\
        import helper_ok
        print("broken starts")
        raise RuntimeError("broken at import")
    """))
    (tmp_path / "helper_ok.py").write_text('print("helper_ok imported")\n')
    cases = {
        "missing.py": "import json\nimport no_such_module_xyz\nprint('unreached')\n",
        "sibling.py": "import broken\n",
        "syntax.py": "print('a')\ndef f(:\n    pass\n",
        "warns.py": "import re\nx = re.compile('\\d')\nprint('compiled')\n",
        "chained.py": textwrap.dedent("""\
            try:
                import no_such_module_xyz
            except ImportError as e:
                raise SystemError("wrapped") from e
        """),
    }
    for name, body in cases.items():
        (tmp_path / name).write_text(body)
        got = same(procs, [PYTHON, name], [CLIENT, "-U", "prefork-server", name], env,
                   cwd=str(tmp_path))
        if name != "warns.py":
            assert got[0] == 1 and got[2], name
        else:
            assert b"SyntaxWarning" in got[2], "the compile's warning is replayed"
    assert b"prefork" not in got[2] and b"runpy" not in got[2]
    # A script that cannot be opened: setup fails as `python` would, with status 2 (and
    # the client adds a line saying that setup failed).
    want = procs.run([PYTHON, "nonexistent.py"], env=env, cwd=str(tmp_path))
    got = procs.run([CLIENT, "-U", "prefork-server", "nonexistent.py"], env=env,
                    cwd=str(tmp_path))
    assert want[0] == got[0] == 2 and want[1] == got[1] == b""
    assert got[2].startswith(want[2]) and got[2].count(b"\n") == 2


def test_exits_like_a_direct_run(env: dict[str, str], procs: ProcRegistry,
                                 tmp_path: Path) -> None:
    """sys.exit codes and messages, atexit, unflushed output, KeyboardInterrupt (death by
    SIGINT after the traceback), an exception with its frames and no runner frames."""
    cases = {
        "code.py": "import sys\nprint('out', end='')\nsys.exit(5)\n",
        "message.py": "import sys\nsys.exit('bye now')\n",
        "atexit_.py": "import atexit\natexit.register(print, 'at exit')\nprint('body')\n",
        "interrupt.py": "import atexit\natexit.register(print, 'at exit')\n"
                        "def f():\n    raise KeyboardInterrupt\nf()\n",
        "raises.py": "def inner():\n    return {}['k']\ndef outer():\n    inner()\nouter()\n",
    }
    want_status = {"code.py": 5, "message.py": 1, "atexit_.py": 0,
                   "interrupt.py": -signal.SIGINT, "raises.py": 1}
    for name, body in cases.items():
        (tmp_path / name).write_text(body)
        got = same(procs, [PYTHON, name], [CLIENT, "-U", "prefork-server", name], env,
                   cwd=str(tmp_path))
        assert got[0] == want_status[name], name
    assert got[2].count(b'File "') == 3  # raises.py: <module>, outer, inner; nothing else


def test_direct_mode_by_hand(env: dict[str, str], procs: ProcRegistry,
                             tmp_path: Path) -> None:
    """Without PREFORK_INTERP, ``prefork-server SCRIPT ARGS`` is ``python SCRIPT ARGS``;
    options after SCRIPT belong to the script."""
    write_script(tmp_path, "probe.py", PROBE, shebang=f"{PYTHON}")
    for args in (["0"], ["4", "--preload", "x", "--", "y"]):
        for launcher in ([SERVER], [PYTHON, "-m", "prefork.server"],
                         [REPO / "bin" / "prefork-server"]):
            same(procs, [PYTHON, "probe.py", *args],
                 [*launcher, "--preload", "json", "probe.py", *args], env, input=b"x",
                 cwd=str(tmp_path), calls=1)
    (tmp_path / "bad.py").write_text("import sys\nraise ValueError(sys.argv)\n")
    same(procs, [PYTHON, "bad.py", "a"], [SERVER, "bad.py", "a"], env, cwd=str(tmp_path),
         calls=1)
    # As deep as directly: "[Previous line repeated 996 more times]" counts the frames.
    (tmp_path / "rec.py").write_text("def f(n):\n    return f(n + 1)\nf(0)\n")
    for launcher in ([SERVER], [PYTHON, "-m", "prefork.server"]):
        same(procs, [PYTHON, "rec.py"], [*launcher, "rec.py"], env, cwd=str(tmp_path),
             calls=1)
    same(procs, [PYTHON, "nonexistent.py"], [SERVER, "nonexistent.py"], env,
         cwd=str(tmp_path), calls=1)


def test_autoreload_script_and_extra_path(rundir: str, env: dict[str, str],
                                          procs: ProcRegistry, tmp_path: Path) -> None:
    """Editing the script, a preloaded module, or a --reload-also file gives a fresh
    server: the next call sees the change."""
    data = tmp_path / "data.txt"
    data.write_text("data 1\n")
    (tmp_path / "cfg.py").write_text(f"TEXT = open({str(data)!r}).read().strip()\n")
    script = write_script(tmp_path, "s.py", "import cfg\nprint('v1', cfg.TEXT)\n",
                          shebang=f"{CLIENT} -U,prefork-server,--reload-also,{data}")
    assert procs.run([script], env=env)[1] == b"v1 data 1\n"
    assert procs.run([script], env=env)[1] == b"v1 data 1\n"
    Path(script).write_text(Path(script).read_text().replace("'v1'", "'v2'"))
    assert procs.run([script], env=env)[1] == b"v2 data 1\n"
    data.write_text("data 2\n")
    assert procs.run([script], env=env)[1] == b"v2 data 2\n"
    (tmp_path / "cfg.py").write_text("TEXT = 'from code'\n")
    assert procs.run([script], env=env)[1] == b"v2 from code\n"


def test_reference_c_client(rundir: str, env: dict[str, str], procs: ProcRegistry) -> None:
    """``/usr/bin/prefork-interp -U prefork-server SCRIPT`` (the reference client, v1)."""
    if not os.access(C_CLIENT, os.X_OK):
        pytest.skip("the reference client is not installed (make deps)")
    cenv = dict(env)
    cenv.pop(RUNDIR_ENV, None)
    base = paths.run_base(cenv)
    ident = "runner" + uuid.uuid4().hex
    # In the run dir: the fixture's teardown finds a straggling server by its command line.
    script = write_script(rundir, "probe.py", PROBE, shebang=str(PYTHON))
    try:
        for args in (["0"], ["6", "a"]):
            same(procs, [PYTHON, script, *args],
                 [C_CLIENT, "-g", ident, "-U", "prefork-server", script, *args], cenv,
                 input=b"in", cwd=rundir)
        assert os.path.exists(socket_path(base, ident))
    finally:
        procs.run([C_CLIENT, "-g", ident, "--kill", "-U", "prefork-server"], env=cenv)
        for p in (socket_path(base, ident), lock_path(base, ident),
                  log_path(base, ident)):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


# ------------------------------------------------------------------ --explain


def test_explain(env: dict[str, str], procs: ProcRegistry, tmp_path: Path) -> None:
    """Lists module-level imports with their source lines and times; not TYPE_CHECKING-only
    ones nor those in functions; warns about a thread and a socket left by an import."""
    (tmp_path / "threaded.py").write_text(textwrap.dedent("""\
        import socket, threading
        EVENT = threading.Event()
        threading.Thread(target=EVENT.wait, name="poller", daemon=True).start()
        CONN = socket.socket()
    """))
    script = write_script(tmp_path, "s.py", """\
        import json
        from email import message as m
        try:
            import no_such_module_xyz
        except ImportError:
            pass
        if TYPE_CHECKING:
            import typing_only_xyz
        def f():
            import inner_only_xyz
        from threaded import EVENT
        from . import relative_xyz
        print("the script itself must not run")
    """, shebang=str(PYTHON))
    status, out, err = procs.run([SERVER, "--explain", "--preload", "csv", script], env=env,
                                 cwd=str(tmp_path))
    text = out.decode()
    assert (status, err) == (0, b""), err
    assert "the script itself must not run" not in text
    for needle in ("json", "line 2: import json", "email.message",
                   "line 3: from email import message as m", "no_such_module_xyz",
                   "ModuleNotFoundError", "threaded", "csv", "--preload", " ms ",
                   "thread(s) started during preload (poller)", "socket:["):
        assert needle in text, needle
    for absent in ("typing_only_xyz", "inner_only_xyz", "relative_xyz"):
        assert absent not in text, absent


def test_find_imports_and_split() -> None:
    """The ast scan and the option split, as functions."""
    src = textwrap.dedent("""\
        import a.b as c, d
        from e import f, g
        from .h import i
        with x:
            import j
        if TYPE_CHECKING:
            import k
        else:
            import m
        class C:
            import n
    """).encode()
    found = [(f.name, f.quiet) for f in runner.find_imports(src, "s.py")]
    assert found == [("a.b", False), ("d", False), ("e", False), ("e.f", True),
                     ("e.g", True), ("j", False), ("m", False)]
    assert runner.find_imports(b"def (:\n", "s.py") == []
    assert runner.split_argv(["--preload", "x", "--no-preload", "s.py", "--preload", "y"]) \
        == (["--preload", "x", "--no-preload"], ["s.py", "--preload", "y"])
    assert runner.split_argv(["--", "-s.py", "a"]) == ([], ["-s.py", "a"])


# ------------------------------------------------------------------ --wrap


def test_wrap_errors_and_path_search(env: dict[str, str], procs: ProcRegistry,
                                     tmp_path: Path) -> None:
    """--wrap: unknown names, non-Python programs; an existing wrapper or our own output
    file earlier on PATH is seen through."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    write_script(bindir, "shell-prog", "echo hi\n", shebang="/bin/sh")
    wenv = dict(env, PATH=f"{bindir}{os.pathsep}{env['PATH']}")
    status, out, err = procs.run([SERVER, "--wrap", "no-such-program-xyz"], env=wenv)
    assert (status, out) == (1, b"") and b"no such program on PATH" in err
    status, out, err = procs.run([SERVER, "--wrap", "shell-prog"], env=wenv)
    assert (status, out) == (1, b"") and b"not a Python program: its #! line runs /bin/sh" \
        in err
    status, out, err = procs.run([SERVER, "--wrap", "/bin/true"], env=wenv)
    assert (status, out) == (1, b"") and b"/bin/true is a binary, not a Python program" in err
    # `prefork-server --wrap pygmentize > BINDIR/pygmentize`: the shell has made our output
    # file (empty, maybe executable from last time) first on PATH.
    target = bindir / "pygmentize"
    target.touch(mode=0o755)
    with open(target, "wb") as f:
        status, _, err = procs.run([SERVER, "--wrap", "pygmentize"], env=wenv, stdout=f)
    assert (status, err) == (0, b"")
    assert f"prefork-server-wrap: {PYGMENTIZE}" in target.read_text()
    # Again, now that an earlier wrapper is on PATH: it names the real program.
    status, out, err = procs.run([SERVER, "--wrap", "pygmentize", "--preload", "json"],
                                 env=wenv)
    assert status == 0, err
    assert f"prefork-server-wrap: {PYGMENTIZE}" in out.decode()
    assert out.decode().splitlines()[0].endswith(f",{BOOT},--preload,json")


def test_usage(env: dict[str, str], procs: ProcRegistry) -> None:
    """--version, --help, and usage errors (exit 2)."""
    status, out, _ = procs.run([SERVER, "--version"], env=env)
    assert status == 0 and out.startswith(b"prefork-server ")
    status, out, _ = procs.run([SERVER, "--help"], env=env)
    assert status == 0 and b"--wrap" in out and b"--explain" in out
    assert procs.run([SERVER], env=env)[0] == 2
    assert procs.run([SERVER, "--wrap", "x", "script"], env=env)[0] == 2
    assert procs.run([SERVER, "--no-such-option", "script"], env=env)[0] == 2
