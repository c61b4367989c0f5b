"""Issue 13, item 4: wrap a program from any environment, installing nothing into it.

Real programs from PyPI (pygments, docutils, httpie, flake8) live in venvs of their own,
built once under ``.venv-programs/`` (``programs.program_venv``), with nothing of ours in
them (checked: ``import prefork`` fails there); one venv is made by another Python version
(3.11, when there is one).  Every comparison runs the program directly, then through the
helper cold and warm, and wants stdout, stderr and the exit status byte for byte; and a
server must be listening afterwards (so the helper did not quietly run it directly).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from harness import CLIENT, PYTHON, ProcRegistry, find_python, scaled, write_script
from programs import program_venv

from prefork.server.runner.wrap import BOOT

SERVER = Path(CLIENT).parent / "prefork-server"

pytestmark = pytest.mark.timeout(600)

Result = tuple[int, bytes, bytes]

RST_GOOD = b"Title\n=====\n\nSome *emphasis*, ``code`` and a list:\n\n- one\n- two\n"
RST_BAD = b"Title\n=====\n\n`unclosed\n\n.. nosuchdirective:: x\n"
PY_SRC = b"def f(x):\n    return x + 1  # comment\n\nprint(f(2))\n"
PY_BAD = b"import os\ndef f( x ):\n  return x+1\n"
PY_CLEAN = b"print(1)\n"

#: program -> [(args, stdin)], run in a directory holding the files above.
CASES: dict[str, list[tuple[list[str], bytes | None]]] = {
    "pygmentize": [
        (["-l", "python", "-f", "html", "code.py"], None),
        (["-f", "terminal256", "-l", "python"], PY_SRC),
        (["-l", "nosuchlexer", "code.py"], None),
    ],
    "rst2html": [
        (["good.rst"], None),
        (["bad.rst"], None),
        (["--halt=2", "bad.rst"], None),
    ],
    "http": [
        (["--offline", "--ignore-stdin", "POST", "example.org/x", "a=1", "b:=2"], None),
        (["--offline", "--ignore-stdin", "--print=HhBb", "https://example.org/p", "X-A:b"],
         None),
        (["--offline", "--ignore-stdin"], None),                   # usage error: exit 2
    ],
    "flake8": [
        (["clean.py"], None),
        (["code.py", "bad.py"], None),                                        # findings: exit 1
        (["--select=E", "--max-line-length=20", "code.py"], None),
    ],
}

MAIN_REQUIREMENTS = ["pygments", "docutils", "httpie", "flake8"]


@pytest.fixture(scope="session")
def main_venv() -> Path:
    """pygments, docutils, httpie and flake8 in a venv of our Python version (not ours)."""
    return program_venv(sys.executable, MAIN_REQUIREMENTS)


@pytest.fixture(scope="session")
def other_venv() -> Path:
    """docutils in a venv made by Python 3.11 (skipped where there is none)."""
    python = find_python("3.11")
    if python is None:
        pytest.skip("no Python 3.11 on this machine")
    return program_venv(python, ["docutils"])


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for name, data in (("good.rst", RST_GOOD), ("bad.rst", RST_BAD), ("code.py", PY_SRC),
                       ("bad.py", PY_BAD), ("clean.py", PY_CLEAN)):
        (d / name).write_bytes(data)
    return d


def _live_servers(rundir: str) -> int:
    live = 0
    for name in os.listdir(rundir):
        if not name.startswith("s"):
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(scaled(10))
            try:
                s.connect(os.path.join(rundir, name))
                live += s.recv(4) == b"PFI\n"
            except OSError:
                pass
    return live


def _nothing_of_ours(venv: Path) -> None:
    got = subprocess.run([venv / "bin" / "python", "-c", "import prefork"], cwd="/",
                         capture_output=True, timeout=scaled(60), check=False)
    assert got.returncode == 1 and b"No module named 'prefork'" in got.stderr


def same(procs: ProcRegistry, direct: list[str | os.PathLike[str]],
         helper: list[str | os.PathLike[str]], env: dict[str, str], cwd: Path,
         stdin: bytes | None, calls: int = 2) -> Result:
    """``direct`` once, then ``helper`` cold and warm: the same bytes and status."""
    want = procs.run(direct, input=stdin, env=env, cwd=str(cwd), timeout=120)
    for i in range(calls):
        got = procs.run(helper, input=stdin, env=env, cwd=str(cwd), timeout=120)
        assert got == want, f"call {i} through the helper differs from a direct run"
    return want


def _wrap(procs: ProcRegistry, env: dict[str, str], where: Path, name: str,
          *extra: str) -> Path:
    wrapper = where / name
    with open(wrapper, "wb") as out:
        status, _, err = procs.run([SERVER, "--wrap", name, *extra], env=env, stdout=out,
                                   timeout=300)
    assert status == 0, err
    wrapper.chmod(0o755)
    return wrapper


@pytest.mark.parametrize("program", sorted(CASES))
def test_wrapped_program_from_another_venv(program: str, main_venv: Path, inputs: Path,
                                          rundir: str, env: dict[str, str],
                                          procs: ProcRegistry, tmp_path: Path) -> None:
    """``prefork-server --wrap NAME`` (found on PATH in the program's own venv, nothing of
    ours installed there): the wrapper's #! runs that venv's Python and our boot file; every
    case is byte-identical to the direct run, cold and warm."""
    _nothing_of_ours(main_venv)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wenv = dict(env, PATH=f"{main_venv / 'bin'}{os.pathsep}{env['PATH']}")
    wrapper = _wrap(procs, wenv, bindir, program)
    lines = wrapper.read_text().splitlines()
    assert lines[0] == f"#!{CLIENT} -U,{main_venv / 'bin' / 'python'},{BOOT}"
    assert lines[1] == f"# prefork-server-wrap: {main_venv / 'bin' / program}"
    statuses = set()
    for args, stdin in CASES[program]:
        got = same(procs, [main_venv / "bin" / program, *args], [wrapper, *args], env,
                   inputs, stdin)
        statuses.add(got[0])
    assert 0 in statuses and len(statuses) > 1, "the cases must include a failure"
    assert _live_servers(rundir) == 1


def test_helper_form_runs_the_programs_own_python(main_venv: Path, other_venv: Path,
                                                  inputs: Path, rundir: str,
                                                  env: dict[str, str],
                                                  procs: ProcRegistry) -> None:
    """``prefork-interp -U prefork-server PROGRAM``: prefork-server runs under our venv's
    Python, the program's #! names another (another venv; another version): it starts again
    under that one, never half-imported with ours."""
    _nothing_of_ours(other_venv)
    for venv, program in ((main_venv, "http"), (other_venv, "rst2html")):
        path = venv / "bin" / program
        for args, stdin in CASES[program]:
            same(procs, [path, *args], [CLIENT, "-U", "prefork-server", path, *args], env,
                 inputs, stdin)
        # By hand (no PREFORK_INTERP), the same start without a server.
        args, stdin = CASES[program][0]
        same(procs, [path, *args], [SERVER, path, *args], env, inputs, stdin, calls=1)
    assert _live_servers(rundir) == 2


def test_wrapped_program_of_another_python_version(other_venv: Path, inputs: Path,
                                                   rundir: str, env: dict[str, str],
                                                   procs: ProcRegistry,
                                                   tmp_path: Path) -> None:
    """rst2html in a Python 3.11 venv: our server side runs under 3.11 from our source tree;
    the program sees the sys.path, sys.executable and flags of a direct run."""
    probe = write_script(tmp_path, "probe", """\
        import sys, json
        print(sys.version_info[:2], sys.executable, sys.prefix)
        print(json.dumps(sys.path))
        print(sys.flags, sys.argv[1:], __name__)
    """, shebang=str(other_venv / "bin" / "python"))
    for name, path in (("rst2html", other_venv / "bin" / "rst2html"), ("probe", probe)):
        wrapper = tmp_path / f"w-{name}"
        with open(wrapper, "wb") as out:
            status, _, err = procs.run([SERVER, "--wrap", str(path)], env=env, stdout=out)
        assert status == 0, err
        wrapper.chmod(0o755)
        assert str(other_venv / "bin" / "python") in wrapper.read_text().splitlines()[0]
        cases = CASES["rst2html"] if name == "rst2html" else [(["a", "b c"], None)]
        for args, stdin in cases:
            got = same(procs, [path, *args], [wrapper, *args], env, inputs, stdin)
        if name == "probe":
            out = got[1].decode()
            assert "(3, 11)" in out and str(BOOT.rsplit("/", 1)[0]) not in out
    assert _live_servers(rundir) == 2


def test_wrap_learns_run_time_imports(main_venv: Path, inputs: Path, rundir: str,
                                      env: dict[str, str], procs: ProcRegistry,
                                      tmp_path: Path) -> None:
    """``--wrap NAME -- ARGS``: httpie imports nearly everything inside main(); one run in a
    child finds those imports, the wrapper lists them, setup preloads them, and the output
    stays byte-identical."""
    http = str(main_venv / "bin" / "http")
    args = CASES["http"][0][0]
    wrapper = tmp_path / "http"
    with open(wrapper, "wb") as out:
        status, _, err = procs.run([SERVER, "--wrap", http, "--", *args], env=env,
                                   stdout=out, timeout=300)
    assert status == 0, err
    assert b"module(s) that setup will preload" in err
    wrapper.chmod(0o755)
    text = wrapper.read_text()
    assert "# prefork-server-preload: httpie.core" in text, text
    for args, stdin in CASES["http"]:
        same(procs, [http, *args], [wrapper, *args], env, inputs, stdin)
    assert _live_servers(rundir) == 1


def test_explain_a_run(main_venv: Path, inputs: Path, env: dict[str, str],
                       procs: ProcRegistry, tmp_path: Path) -> None:
    """``--explain PROGRAM -- ARGS``: one run (in a child, its output kept apart) of
    rst2html from another venv: the modules it imported while running with their cost,
    what learning would add; and an import whose atexit handler removes what it made is
    refused (the ansible class)."""
    rst2html = main_venv / "bin" / "rst2html"
    status, out, err = procs.run([SERVER, "--explain", rst2html, "--", "good.rst"], env=env,
                                 cwd=str(inputs), timeout=120)
    text = out.decode()
    assert (status, err) == (0, b""), err
    assert "<html" not in text, "the program's output must be kept apart"
    for needle in ("run with ['good.rst']", "exit status 0", "imported while running",
                   "docutils.parsers.rst", "costliest by own time", " ms ",
                   "learning would add"):
        assert needle in text, (needle, text)
    # A module that makes a directory at import and removes it at exit (as ansible does).
    (tmp_path / "tidy.py").write_text(
        "import atexit, os, shutil, tempfile\n"
        "D = tempfile.mkdtemp(prefix='tidy-')\n"
        "atexit.register(shutil.rmtree, D, True)\n")
    (tmp_path / "plain.py").write_text("import atexit\natexit.register(print, end='')\n")
    script = write_script(tmp_path, "prog", """\
        import sys
        def main():
            import tidy, plain
            print("ran", sys.argv[1:])
        main()
    """, shebang=str(main_venv / "bin" / "python"))
    status, out, err = procs.run([SERVER, "--explain", script, "--", "x"], env=env,
                                 cwd=str(tmp_path))
    text = out.decode()
    assert (status, err) == (0, b""), err
    assert "refused tidy: an atexit handler removes what importing it made" in text, text
    assert "\n  plain\n" in text and "plain (1)" in text, text
    # --json, for tools (and --wrap).
    status, out, _ = procs.run([SERVER, "--explain", "--json", script, "--", "x"], env=env,
                               cwd=str(tmp_path))
    import json
    report = json.loads(out)
    assert status == 0 and report["learn"] == ["plain"] and report["refused"][0][0] == "tidy"


def test_refusals(env: dict[str, str], procs: ProcRegistry, tmp_path: Path) -> None:
    """Not a Python program, a #! naming a Python that is not there: clear messages."""
    shell = write_script(tmp_path, "shell-prog", "echo hi\n", shebang="/bin/sh")
    for argv in ([SERVER, shell], [CLIENT, "-U", "prefork-server", shell]):
        status, out, err = procs.run(argv, env=env)
        assert (status, out) != (0, b"hi\n")
        assert f"{shell} is not a Python program: its #! line runs /bin/sh".encode() in err
    status, _, err = procs.run([SERVER, "/bin/true"], env=env)
    assert status == 2 and b"/bin/true is a binary, not a Python program" in err
    gone = write_script(tmp_path, "gone", "print(1)\n", shebang="/nonexistent/bin/python3")
    status, _, err = procs.run([SERVER, gone], env=env)
    assert status == 127 and b"cannot run /nonexistent/bin/python3, the Python named" in err
    status, _, err = procs.run([SERVER, "--wrap", gone], env=env)
    assert status == 1 and b"which cannot run prefork-server" in err


def test_program_with_a_prefork_of_its_own(env: dict[str, str], procs: ProcRegistry,
                                           tmp_path: Path) -> None:
    """A program whose sys.path has another package named prefork is refused (it would get
    ours), by name and path; ours, found again on sys.path, is no reason to refuse."""
    other = tmp_path / "other" / "prefork"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("MINE = True\n")
    script = write_script(tmp_path, "mine", "import prefork\nprint(prefork.MINE)\n",
                          shebang=str(PYTHON))
    penv = dict(env, PYTHONPATH=str(other.parent))
    assert procs.run([PYTHON, script], env=penv)[:2] == (0, b"True\n")
    status, out, err = procs.run([PYTHON, BOOT, script], env=penv)
    assert (status, out) == (127, b"")
    assert f"its environment has a package named prefork of its own ({other})".encode() in err
    assert procs.run([PYTHON, BOOT, script], env=env)[:2] == (1, b"")  # ours: no MINE


def test_server_side_is_standard_library_only(other_venv: Path) -> None:
    """Under another version's Python without site-packages (-I -S), the boot file loads our
    package from its own directory and everything the server side imports is standard
    library; ``sys.path`` is left as it was."""
    code = (
        "import runpy, sys\n"
        f"before = list(sys.path)\n"
        f"ns = runpy.run_path({str(BOOT)!r}, run_name='boot')\n"
        "ns['load_package']()\n"
        "import prefork.server.runner.cli, prefork.server.api, prefork.server.loop\n"
        "import prefork.server.spare, prefork.server.executor, prefork.server.fastexit\n"
        "import prefork.server.autoreload, prefork.server.log, prefork.server.config\n"
        "top = {m.split('.')[0] for m in sys.modules}\n"
        "odd = sorted(top - set(sys.stdlib_module_names) - {'prefork', 'boot', '__main__'}\n"
        "             - set(sys.builtin_module_names))\n"
        "print(odd, sys.path == before)\n")
    got = subprocess.run([other_venv / "bin" / "python", "-I", "-S", "-c", code],
                         capture_output=True, text=True, timeout=scaled(60), check=False)
    assert got.returncode == 0, got.stderr
    assert got.stdout == "[] True\n"
