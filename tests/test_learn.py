"""Learning from calls (prefork/server/learn.py), and setup state that a call's atexit undoes.

Real servers through the real client and ``prefork-server``; what the server learned is
observed in the next spare, before the call runs (``sys.modules``, the ``re`` cache), in the
``p<IDENT>.learned`` file and through ``prefork-ctl show --json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from harness import CLIENT, PYTHON, REPO, VENV_BIN, ProcRegistry, wait_for

pytestmark = pytest.mark.timeout(120)

CTL = VENV_BIN / "prefork-ctl"

MODULES = {
    "goodmod.py": "VALUE = 42\n",
    "thr.py": "import threading, time\n"
              "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n",
    "sockmod.py": "import socket\nSOCK = socket.socket()\n",
    "exitmod.py": "import atexit\natexit.register(lambda: None)\n",
    # Imports only in a call, which set up what it needs: raises in the server.
    "boom.py": "import os\nif 'IN_CALL' not in os.environ:\n"
               "    raise RuntimeError('boom outside a call')\n",
    "printer.py": "print('printer imported')\n",
}

SCRIPT = """\
    import re, sys
    PATTERN = "learned-([0-9]+)-pattern"
    NAMES = ("goodmod", "thr", "sockmod", "exitmod", "boom", "printer")
    caches = [getattr(re, n, {}) for n in ("_cache", "_cache2")]
    print("before", sorted(m for m in NAMES if m in sys.modules),
          any((str, PATTERN, 0) in c for c in caches))
    def main():
        import os
        os.environ["IN_CALL"] = "1"
        import goodmod, thr, sockmod, exitmod, printer, boom
        re.compile(PATTERN)
    main()
"""


def _learned(rundir: str) -> list[dict[str, object]]:
    out = []
    for name in sorted(os.listdir(rundir)):
        if name.startswith("p") and name.endswith(".learned"):
            with open(os.path.join(rundir, name)) as f:
                out.append(json.load(f))
    return out


@pytest.fixture
def program(tmp_path: Path) -> Path:
    for name, body in MODULES.items():
        (tmp_path / name).write_text(body)
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(SCRIPT))
    return script


def test_learns_safe_modules_and_regexes(program: Path, rundir: str, env: dict[str, str],
                                         procs: ProcRegistry) -> None:
    """A module a call imports is in the next spare before its call; unsafe ones are refused
    with the reason; a restarted server starts with what was learned."""
    helper = [CLIENT, "-U", "prefork-server", program]
    first = procs.run(helper, env=env)
    assert first == (0, b"before [] False\nprinter imported\n", b""), first
    second = procs.run(helper, env=env)
    assert second == (0, b"before ['goodmod'] True\nprinter imported\n", b""), second

    [state] = _learned(rundir)
    assert "goodmod" in state["learned"]
    refused = state["refused"]
    assert isinstance(refused, dict)
    assert "thread" in refused["thr"]
    assert "fd(s) open" in refused["sockmod"]
    assert "atexit" in refused["exitmod"]
    assert "RuntimeError: boom outside a call" in refused["boom"]
    assert "output" in refused["printer"]
    assert not {"thr", "sockmod", "exitmod", "boom", "printer"} & set(state["learned"])

    code, out, err = procs.run([CTL, "show", "--json", str(program)], env=env)
    assert code == 0, err
    [entry] = json.loads(out)
    assert "goodmod" in entry["learned"]["learned"]
    assert "thread" in entry["learned"]["refused"]["thr"]
    assert entry["learned"]["regexes"] >= 1
    code, out, err = procs.run([CTL, "show", str(program)], env={**env, "COLUMNS": "200"})
    assert code == 0, err
    assert b"modules learned: " in out and b"goodmod" in out
    assert b"thr: left 1 thread(s) running" in out

    # A fresh server of the same identity starts warm: its first call has them already.
    fresh = procs.run([CLIENT, "-f", "-U", "prefork-server", program], env=env)
    assert fresh == second, fresh


def test_no_learn(program: Path, rundir: str, env: dict[str, str],
                  procs: ProcRegistry) -> None:
    """--no-learn: every call starts from what the setup imported, nothing is saved."""
    helper = [CLIENT, "-U,prefork-server,--no-learn", program]
    for _ in range(3):
        assert procs.run(helper, env=env) == (0, b"before [] False\nprinter imported\n", b"")
    assert _learned(rundir) == []


def test_learning_off_for_scripts_unless_asked(tmp_path: Path, rundir: str,
                                              env: dict[str, str], procs: ProcRegistry) -> None:
    """A script calling initialisation_complete() learns only with learn=True."""
    (tmp_path / "goodmod.py").write_text("VALUE = 1\n")
    for learn, want in ((False, ["False", "False"]), (True, ["False", "True"])):
        script = tmp_path / f"s{learn}.py"
        script.write_text(textwrap.dedent(f"""\
            import sys
            import prefork
            prefork.initialisation_complete(learn={learn})
            print("goodmod" in sys.modules)
            import goodmod
        """))
        got = [procs.run([CLIENT, "-U", PYTHON, script], env=env) for _ in want]
        assert got == [(0, f"{w}\n".encode(), b"") for w in want]


def test_atexit_undoing_setup_state(tmp_path: Path, rundir: str, env: dict[str, str],
                                    procs: ProcRegistry) -> None:
    """A module that makes a directory at import and removes it in an atexit handler (as
    ansible does): every call behaves as a direct run; the server that saw a call remove
    it restarts, and the next one runs the handler only when it exits."""
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "tmpstate.py").write_text(textwrap.dedent(f"""\
        import atexit, shutil, tempfile
        STATE = tempfile.mkdtemp(prefix="tmpstate-", dir={str(state)!r})
        atexit.register(shutil.rmtree, STATE, True)
    """))
    script = tmp_path / "tmpprog.py"
    script.write_text(textwrap.dedent("""\
        import os, sys
        import tmpstate
        if not os.path.isdir(tmpstate.STATE):
            print("state dir gone", file=sys.stderr)
            sys.exit(250)
        with open(os.path.join(tmpstate.STATE, "x"), "w") as f:
            f.write("x")
        print("ok")
    """))
    want = procs.run([PYTHON, script], env=env)
    assert want == (0, b"ok\n", b"")
    for _ in range(4):
        assert procs.run([CLIENT, "-U", "prefork-server", script], env=env) == want
    [learned] = _learned(rundir)
    assert learned["undone"], learned
    logs = "".join(Path(rundir, n).read_text() for n in os.listdir(rundir)
                   if n.endswith(".log"))
    assert "a call removed" in logs and "shutil.rmtree" in logs
    assert len(os.listdir(state)) == 1, "the live server's directory"
    # The server runs the deferred handler when it quits.
    assert procs.run([CLIENT, "--kill", "-U", "prefork-server", script], env=env)[0] == 0
    wait_for(lambda: not os.listdir(state), what="the server's atexit handler at its exit")


# ------------------------------------------------------------------ ansible (the real case)

ANSIBLE_VENV = Path(f"/tmp/prefork-tests-ansible-py{sys.version_info[0]}{sys.version_info[1]}")


@pytest.fixture(scope="session")
def ansible_bin() -> Path:
    """ansible-core in a venv of its own (installed once, from PyPI, and kept for later
    runs); the test is skipped, saying why, when it cannot be installed here."""
    bin_dir = ANSIBLE_VENV / "bin"
    if not (bin_dir / "ansible-playbook").exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", ANSIBLE_VENV], check=True,
                           capture_output=True, timeout=120)
            subprocess.run([bin_dir / "pip", "install", "-q", "ansible-core"], check=True,
                           capture_output=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            pytest.skip(f"cannot install ansible-core from PyPI here: {e}")
    return bin_dir


@pytest.mark.timeout(600)
def test_ansible_calls_after_the_first(ansible_bin: Path, tmp_path: Path, rundir: str,
                                       env: dict[str, str], procs: ProcRegistry) -> None:
    """ansible makes ansible-local-<pid> at import and removes it at exit: every call
    through prefork-server gives what a direct run gives (not 250 / 2 after the first)."""
    env = {**env, "ANSIBLE_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO),
           "ANSIBLE_NOCOLOR": "1"}
    out = tmp_path / "out.txt"
    play = tmp_path / "play.yml"
    play.write_text(textwrap.dedent(f"""\
        - hosts: localhost
          connection: local
          gather_facts: false
          tasks:
            - copy:
                content: "hello\\n"
                dest: {out}
    """))
    helper = [CLIENT, f"-U,{ansible_bin / 'python'},-m,prefork.server"]
    doc = [ansible_bin / "ansible-doc", "-l"]
    want = procs.run(doc, env=env, timeout=120)
    assert want[0] == 0 and b"copy" in want[1]
    for _ in range(3):
        assert procs.run([*helper, *doc], env=env, timeout=120) == want
    playbook = [ansible_bin / "ansible-playbook", play]
    direct = [procs.run(playbook, env=env, cwd=tmp_path, timeout=120) for _ in range(2)]
    out.unlink()
    warm = [procs.run([*helper, *playbook], env=env, cwd=tmp_path, timeout=120)
            for _ in range(2)]
    assert warm == direct and direct[0][0] == 0 and b"changed=1" in direct[0][1]
