"""Rehearsal (prefork/server/rehearse.py): ``--wrap NAME --rehearse -- ARGS`` makes the
wrapper's server run the program once with ARGS itself, between calls, after a probe in
throwaway forks proved the next call's output unchanged and nothing done outside.

Real servers through real wrappers; real programs from PyPI in venvs of their own (nothing
of ours installed); every call's output and exit status byte-identical to a direct run,
cold and warm.  The rehearsal is done between the first call and the second (the server
runs the probe in two forks after its first call and goes on serving; it rehearses at the
first pause between calls after the probe is done), so a test calls until the outcome is
recorded (``rehearsed``), each call compared with the direct run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from harness import PYTHON, VENV_BIN, ProcRegistry, wait_for, write_script
from programs import program_venv
from test_wrap_anywhere import CASES, MAIN_REQUIREMENTS, inputs, same  # noqa: F401

pytestmark = pytest.mark.timeout(600)

SERVER = VENV_BIN / "prefork-server"
CTL = VENV_BIN / "prefork-ctl"


def _wrap(procs: ProcRegistry, env: dict[str, str], program: str | Path, wrapper: Path,
          *extra: str) -> Path:
    """``--wrap PROGRAM EXTRA > WRAPPER``, in a directory of its own (with ``-- ARGS`` the
    program runs once there, to find its imports)."""
    where = wrapper.parent / f"{wrapper.name}.wrapping"
    where.mkdir()
    with open(wrapper, "wb") as out:
        status, _, err = procs.run([SERVER, "--wrap", str(program), *extra], env=env,
                                   stdout=out, timeout=300, cwd=str(where))
    assert status == 0, err
    wrapper.chmod(0o755)
    return wrapper


def _outcomes(rundir: str, idents: dict[str, str] | None = None) -> dict[str, str]:
    """program path -> the rehearsal's outcome (from the servers' state files and logs),
    for the servers that rehearsed or refused to; ``idents``: filled with their idents."""
    got: dict[str, str] = {}
    for name in sorted(os.listdir(rundir)):
        if name.startswith("p") and name.endswith(".learned"):
            with open(os.path.join(rundir, name)) as f:
                outcome = json.load(f).get("rehearsal", "")
            with open(os.path.join(rundir, name[:-len(".learned")] + ".log")) as f:
                line = f.readline()
            if outcome:
                program = line.split(" ", 3)[3].split(": ", 1)[0]
                got[program] = outcome
                if idents is not None:
                    idents[program] = name[1:-len(".learned")]
    return got


def rehearsed(procs: ProcRegistry, direct: list[str | os.PathLike[str]],
              helper: list[str | os.PathLike[str]], env: dict[str, str], cwd: Path,
              stdin: bytes | None, rundir: str, program: str | Path,
              counted: list[int] | None = None) -> str:
    """Call through ``helper`` (each call byte-identical to ``direct``) until the server of
    ``program`` has recorded its rehearsal's outcome; that outcome.  ``counted``: gets the
    number of calls (and of direct runs) appended."""
    n = 0

    def outcome() -> str | None:
        nonlocal n
        same(procs, direct, helper, env, cwd, stdin, calls=1)
        n += 1
        return _outcomes(rundir).get(str(program))

    got = wait_for(outcome, timeout=300, what=f"the rehearsal of {program}", interval=0.05)
    if counted is not None:
        counted.append(n)
    return got


@pytest.fixture(scope="session")
def real_venv() -> Path:
    """The six programs of ``make bench`` section (r) (pylint among them)."""
    return program_venv(sys.executable, ["httpie", "docutils", "pygments", "flake8",
                                         "pylint", "black"])


@pytest.fixture(scope="session")
def main_venv() -> Path:
    return program_venv(sys.executable, MAIN_REQUIREMENTS)


def test_rehearsed_real_programs(main_venv: Path, inputs: Path, rundir: str,  # noqa: F811
                                 env: dict[str, str], procs: ProcRegistry,
                                 tmp_path: Path) -> None:
    """pygmentize, rst2html, flake8 and httpie (its update check off: it forks a daemon,
    which the guard denies, and httpie then ends the process) rehearsed with their first
    case: every case, cold and warm, is byte-identical to the direct run, and the
    rehearsal is done (``prefork-ctl show`` says so)."""
    config = tmp_path / "httpie"
    config.mkdir()
    (config / "config.json").write_text('{"disable_update_warnings": true}\n')
    env = dict(env, HTTPIE_CONFIG_DIR=str(config))
    for program, cases in sorted(CASES.items()):
        path = main_venv / "bin" / program
        wrapper = _wrap(procs, env, path, tmp_path / program, "--rehearse", "--",
                        *cases[0][0])
        assert '# prefork-server-rehearse: ["' in wrapper.read_text()
        args, stdin = cases[0]
        got = rehearsed(procs, [path, *args], [wrapper, *args], env, inputs, stdin, rundir,
                        path)
        assert got.startswith("done with ["), (program, got)
        same(procs, [path, *args], [wrapper, *args], env, inputs, stdin)
        for args, stdin in cases[1:]:
            same(procs, [path, *args], [wrapper, *args], env, inputs, stdin)
    idents: dict[str, str] = {}
    outcomes = _outcomes(rundir, idents)
    assert len(outcomes) == len(CASES)
    for program, outcome in outcomes.items():
        assert outcome.startswith("done with ["), (program, outcome)
    status, out, err = procs.run([CTL, "show", "--json", idents[str(main_venv / "bin/http")]],
                                 env=env)
    assert status == 0, err
    assert json.loads(out)[0]["learned"]["rehearsal"].startswith("done with ")


def test_rehearsed_pylint_writes_nothing(real_venv: Path, rundir: str, env: dict[str, str],
                                         procs: ProcRegistry, tmp_path: Path) -> None:
    """pylint saves its statistics under ``$XDG_CACHE_HOME/pylint`` every run: the
    rehearsal (and the probe's runs) are denied that, the calls are not; output identical
    to direct, cold and warm."""
    cache = tmp_path / "cache"
    env = dict(env, XDG_CACHE_HOME=str(cache))
    code = tmp_path / "code.py"
    code.write_text("import os\n\n\ndef f(x):\n    y = 1\n    return os.path.join(x)\n")
    pylint = real_venv / "bin" / "pylint"
    args = ["-sn", "--disable=C,R", "code.py"]
    wrapper = _wrap(procs, env, pylint, tmp_path / "pylint", "--rehearse", "--", *args)
    want = same(procs, [pylint, *args], [wrapper, *args], env, tmp_path, None, calls=1)
    assert want[0] != 0 and b"unused-variable" in want[1]
    stats = list(cache.rglob("*.stats"))
    assert len(stats) == 1
    outcome = rehearsed(procs, [pylint, *args], [wrapper, *args], env, tmp_path, None,
                        rundir, pylint)
    assert outcome.startswith("done with ") and "denied: " in outcome, outcome
    assert f"open {stats[0]}" in outcome, outcome
    stats[0].unlink()
    procs.run([wrapper, *args], env=env, cwd=str(tmp_path))
    assert stats[0].exists(), "a rehearsed call saves its statistics as a direct run does"


def test_rehearsal_refused_or_sandboxed(tmp_path: Path, rundir: str, env: dict[str, str],
                                        procs: ProcRegistry) -> None:
    """Synthetic programs: one whose second run in a process prints otherwise, one that
    ends the process when its fork fails, one that leaves a thread running are refused
    (with the reason); one that writes a file is rehearsed with the write denied (the file
    gets one line per call, none from the rehearsal) and its calls start with the state the
    rehearsal built; ``--no-rehearse`` in the #! line turns it off."""
    (tmp_path / "tally.py").write_text("n = 0\nTABLE: dict[str, str] = {}\n")
    bodies = {
        "counter": "def main():\n    import tally\n    tally.n += 1\n"
                   "    print('run', tally.n)\n",
        "forker": "def main():\n    try:\n        pid = os.fork()\n    except OSError:\n"
                  "        os._exit(1)\n    if pid == 0:\n        os._exit(0)\n"
                  "    os.waitpid(pid, 0)\n    print('forked')\n",
        "threader": "def main():\n    import threading, time\n"
                    "    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
                    "    print('thread')\n",
        "writer": "def main():\n    import tally\n"
                  "    if os.environ.get('PEEK'):\n        print('table', tally.TABLE)\n"
                  "    tally.TABLE.setdefault('k', 'built')\n"
                  "    with open('runs.log', 'a') as f:\n        f.write('run\\n')\n"
                  "    print('wrote', sys.argv[1:])\n",
    }
    wrappers = {}
    counted: list[int] = []
    for name, body in bodies.items():
        script = write_script(tmp_path, name, f"import os, sys\n{body}main()\n",
                              shebang=str(PYTHON))
        wrappers[name] = _wrap(procs, env, script, tmp_path / f"w-{name}", "--rehearse",
                               "--", "a")
        rehearsed(procs, [script, "a"], [wrappers[name], "a"], env, tmp_path, None, rundir,
                  script, counted)
    outcomes = {Path(k).name: v for k, v in _outcomes(rundir).items()}
    assert "the call after a rehearsal differs" in outcomes["counter"], outcomes
    assert "ended the probe's process after the guard denied os.fork" in \
        outcomes["forker"], outcomes
    assert "left 1 thread(s) running" in outcomes["threader"], outcomes
    writer = outcomes["writer"]
    assert writer.startswith("done with ['a']") and "runs.log" in writer, outcomes
    # Direct runs and calls only, a line each (none from the rehearsal or the probe).
    assert (tmp_path / "runs.log").read_text() == "run\n" * 2 * counted[-1]
    # The state the rehearsal built is there in a call (a direct run has it empty).
    peek = dict(env, PEEK="1")
    direct = procs.run([tmp_path / "writer", "a"], env=peek, cwd=str(tmp_path))
    warm = procs.run([wrappers["writer"], "a"], env=peek, cwd=str(tmp_path))
    assert direct[1].startswith(b"table {}\n") and warm[1].startswith(b"table {'k': 'built'}")
    # Turned off by --no-rehearse (in the #! line): no rehearsal recorded.
    off = _wrap(procs, env, tmp_path / "writer", tmp_path / "w-off", "--no-rehearse",
                "--rehearse", "--", "b")
    assert "--no-rehearse" in off.read_text().splitlines()[0]
    for _ in range(2):
        same(procs, [tmp_path / "writer", "b"], [off, "b"], env, tmp_path, None, calls=1)
    assert len(_outcomes(rundir)) == 4 and "['b']" not in str(_outcomes(rundir))
