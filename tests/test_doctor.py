"""``prefork-ctl doctor``: each check against a real situation made for it (a launcher of
each kind on PATH, a run directory with a bad mode or an unsafe ancestor, a live server
holding inotify instances), through CliRunner, and one real run of the installed command.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from harness import CLIENT, PYTHON, VENV_BIN, ProcRegistry, write_script
from typer.testing import CliRunner

from prefork.client.launcher import ENTRY_LINE
from prefork.ctl.main import app

pytestmark = pytest.mark.timeout(120)

CTL = VENV_BIN / "prefork-ctl"


def doctor(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[dict[str, Any]]]:
    result = CliRunner().invoke(app, ["doctor", "--json", *args], env=env)
    return result.exit_code, json.loads(result.stdout)


def by_check(findings: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [f for f in findings if f["check"].startswith(prefix)]


def test_doctor_reports_every_check(rundir: str, procs: ProcRegistry, env: dict[str, str],
                                    tmp_path: Path) -> None:
    script = write_script(tmp_path, "s.py", """\
        import prefork
        prefork.initialisation_complete(idle_timeout=300)
        """)
    rc, _out, err = procs.run([script], env=env)
    assert rc == 0, err
    code, findings = doctor("--run-dir", rundir)
    assert code == 0, findings
    assert {f["level"] for f in findings} <= {"ok", "info", "warn", "fail"}
    (mine,) = [f for f in by_check(findings, "client ")
               if f["check"] == f"client {os.path.realpath(CLIENT)}" and f["level"] == "ok"]
    assert "fast launcher" in mine["found"]
    (run,) = [f for f in by_check(findings, "run directory") if f["level"] == "ok"]
    assert rundir in run["found"]
    (ino,) = by_check(findings, "inotify")
    used = re.match(r"(\d+) of (\d+) instances in use", ino["found"])
    # A lone server watches itself and its files in one inotify instance of its own (the
    # shared watcher, if not yet retired, may hold one more).
    assert used and int(used.group(1)) >= 1, ino
    assert by_check(findings, "python") and by_check(findings, "logging")
    (ref,) = by_check(findings, "reference")
    assert ref["level"] == ("ok" if os.path.exists("/usr/bin/prefork-interp") else "info")
    real = subprocess.run([str(CTL), "doctor", "--run-dir", rundir], capture_output=True,
                          text=True, timeout=60, check=False)
    assert real.returncode == 0 and "run directory" in real.stdout, real


def test_doctor_names_a_slow_launcher_on_path(rundir: str, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    slow = bindir / "prefork-interp"
    slow.write_text(f"#!{PYTHON}\nimport re\nimport sys\n{ENTRY_LINE}\nsys.exit(main())\n")
    slow.chmod(0o755)
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": ""}
    code, findings = doctor("--run-dir", rundir, env=env)
    assert code == 0, findings
    (f,) = [f for f in by_check(findings, f"client {slow}") if f["level"] == "warn"]
    assert "pip's console script" in f["found"] and "its next call will do it" in f["found"]
    old = bindir / "prefork-interp"
    old.write_text(f"#!{PYTHON}\nimport sys\nfrom prefork.client.main import main\n"
                   "sys.exit(main())\n")
    code, findings = doctor("--run-dir", rundir, env=env)
    (f,) = [f for f in by_check(findings, f"client {slow}") if f["level"] == "warn"]
    assert "runs Python's site" in f["found"] and "make_launcher" in f["advice"]


def test_doctor_fails_on_a_bad_run_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    code, findings = doctor("--run-dir", str(shared))
    assert code == 1
    (f,) = by_check(findings, "run directory")
    assert f["level"] == "fail" and "allows group/other access" in f["found"]
    assert "0700" in f["advice"]
    # a private run directory under a directory anyone can write to (no sticky bit): the
    # clients refuse it (an ancestor others can rename entries in), and so does doctor
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    private = open_dir / "rd"
    private.mkdir(mode=0o700)
    code, findings = doctor("--run-dir", str(private))
    assert code == 1
    (f,) = by_check(findings, "run directory")
    assert f["level"] == "fail" and f"{open_dir} above it mode 0777" in f["found"]
