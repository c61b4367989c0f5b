"""prefork-ctl for operating servers: telling servers of one program apart, the server's own
record of its calls (``p<IDENT>.stat``), logs of servers that are gone, the per-call log
lines and their rate limit.  Real servers through the real client; CliRunner for most
checks, and one real run of the installed ``prefork-ctl`` each.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ctlrun import ctl, ctl_json
from harness import CLIENT, PYTHON, VENV_BIN, ProcRegistry, wait_for, write_script
from typer.testing import CliRunner

from prefork.common import consts
from prefork.ctl.main import app

pytestmark = pytest.mark.timeout(120)

CTL = VENV_BIN / "prefork-ctl"

BODY = """\
import sys
import prefork
prefork.initialisation_complete(idle_timeout=300, log="file")
print("ok", flush=True)
sys.exit(int(sys.argv[1]) if sys.argv[1:] else 0)
"""
PLAIN = """\
import sys
print("plain", sys.argv[1:], flush=True)
"""


def run_ok(procs: ProcRegistry, argv: list[str], env: dict[str, str], cwd: str,
           status: int = 0) -> str:
    rc, out, err = procs.run(argv, env=env, cwd=cwd)
    assert rc == status, (rc, out, err)
    return out.decode()


def live(rundir: str) -> list[dict[str, Any]]:
    return [e for e in ctl_json("list", "--run-dir", rundir) if e["state"] == "live"]


# --------------------------------------------------------------------------- item 4


def test_list_tells_servers_of_one_program_apart(rundir: str, env: dict[str, str],
                                                 procs: ProcRegistry, tmp_path: Path) -> None:
    d1, d2, bindir = tmp_path / "one", tmp_path / "two", tmp_path / "bin"
    for d in (d1, d2, bindir):
        d.mkdir()
    script = write_script(tmp_path, "job.py", BODY, f"{CLIENT} -U,{PYTHON}")
    run_ok(procs, [script], env, str(d1))                      # cwd one
    run_ok(procs, [script], env, str(d2))                      # cwd two
    run_ok(procs, [str(CLIENT), "--any-cwd", "-U", str(PYTHON), script], env, str(d2))
    # an unmodified program, through prefork-server and through a --wrap wrapper of it
    prog = write_script(bindir, "prog", PLAIN, f"#!{PYTHON}")
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    run_ok(procs, [str(CLIENT), "-U", str(VENV_BIN / "prefork-server"), prog, "x"], env,
           str(d1))
    rc, wrapper_text, err = procs.run([str(VENV_BIN / "prefork-server"), "--wrap", "prog",
                                       "--client", str(CLIENT)], env=env)
    assert rc == 0, err
    wrapper = tmp_path / "prog-fast"
    wrapper.write_bytes(wrapper_text)
    wrapper.chmod(0o755)
    assert "plain ['y']" in run_ok(procs, [str(wrapper), "y"], env, str(d1))

    entries = live(rundir)
    assert len(entries) == 5, entries
    mine = [e for e in entries if e["script_path"] == script]
    assert sorted((e["cwd"], e["any_cwd"], e["via"]) for e in mine) == sorted([
        (str(d1), False, "script"), (str(d2), False, "script"), (str(d2), True, "script")])
    assert {e["via"] for e in entries if e not in mine} == {"prefork-server",
                                                           f"wrapper for {prog}"}
    assert all(e["stats"]["executable"] == str(PYTHON) for e in entries)

    table = CliRunner().invoke(app, ["list", "--run-dir", rundir], env={"COLUMNS": "500"})
    assert table.exit_code == 0, table.output
    for text in ("script, any cwd", "(any)", "prefork-server", "wrapper for", str(d2)):
        assert text in table.stdout, (text, table.stdout)
    real = subprocess.run([str(CTL), "list", "--run-dir", rundir], env=env, check=False,
                          capture_output=True, text=True, timeout=60)
    assert real.returncode == 0 and "wrapper for" in real.stdout, real


# --------------------------------------------------------------------------- item 5


def test_server_records_its_calls(rundir: str, env: dict[str, str], procs: ProcRegistry,
                                  tmp_path: Path) -> None:
    script = write_script(tmp_path, "job.py", BODY, f"{CLIENT} -U,{PYTHON}")
    run_ok(procs, [script], env, str(tmp_path))
    run_ok(procs, [script, "3"], env, str(tmp_path), status=3)
    run_ok(procs, [script], env, str(tmp_path))
    # written once the last status has gone back to the client
    (e,) = wait_for(lambda: [x for x in live(rundir) if (x.get("stats") or {}).get("calls") == 3],
                    what="the record of the three calls")
    stat_file = Path(rundir) / consts.stat_name(e["ident"])
    assert e["stat"] == str(stat_file) and stat_file.name.startswith("p")
    facts = json.loads(stat_file.read_text())
    assert facts["pid"] == e["server"]["pid"]
    assert (facts["calls"], facts["failed"], facts["last_status"]) == (3, 1, "exit 0")
    assert facts["last_argv0"] == script and facts["setup_seconds"] > 0
    assert e["saved_seconds"] == pytest.approx(3 * facts["setup_seconds"])
    # IDLE comes from the server's record, not the socket's atime: an old atime (as a
    # relatime mount leaves it) changes nothing
    sock = e["socket"]
    st = os.stat(sock)
    os.utime(sock, ns=(st.st_atime_ns - 7200 * 10**9, st.st_mtime_ns))
    (e,) = live(rundir)
    assert e["last_call"] == facts["last_call"] and e["idle_seconds"] < 600
    shown = ctl("show", "job.py", "--run-dir", rundir)
    assert "calls served: 3 (1 failed)" in shown.stdout, shown.output
    # once the server is gone the record stays (dead entry), and clean removes it
    assert ctl("kill", "--all", "--run-dir", rundir).exit_code == 0
    (dead,) = ctl_json("list", "--run-dir", rundir)
    assert dead["state"] == "dead" and dead["stats"]["calls"] == 3, dead
    assert dead["script_path"] == script
    cleaned = ctl("clean", "--run-dir", rundir)
    assert cleaned.exit_code == 0 and "stat" in cleaned.stdout, cleaned.output
    assert not stat_file.exists()


# --------------------------------------------------------------------------- item 6


def test_logs_of_servers_gone_with_headers_in_time_order(
        rundir: str, env: dict[str, str], procs: ProcRegistry, tmp_path: Path) -> None:
    a = write_script(tmp_path, "a.py", BODY, f"{CLIENT} -U,{PYTHON}")
    b = write_script(tmp_path, "b.py", BODY, f"{CLIENT} -U,{PYTHON}")
    run_ok(procs, [a, "5"], env, str(tmp_path), status=5)
    run_ok(procs, [b], env, str(tmp_path))
    assert ctl("kill", "--all", "--run-dir", rundir).exit_code == 0
    gone = ctl("logs", "a.py", "--run-dir", rundir)
    assert gone.exit_code == 0, gone.output
    assert re.search(rf"WARNING {re.escape(a)}: call '{re.escape(a)}' client \d+ "
                     r"executor \d+: exit 5 in [\d.]+ ms", gone.stdout), gone.stdout
    assert "==>" not in gone.stdout  # one server: no header
    entries = {e["script_path"]: e for e in ctl_json("list", "--run-dir", rundir)}
    for newest in (a, b):
        older = b if newest == a else a
        t = os.stat(entries[newest]["log"]).st_mtime
        os.utime(entries[older]["log"], (t - 100, t - 100))
        out = ctl("logs", "--run-dir", rundir).stdout
        heads = [line for line in out.splitlines() if line.startswith("==> ")]
        assert len(heads) == 2, out
        assert older in heads[0] and newest in heads[1] and "(dead)" in heads[1], heads
    real = subprocess.run([str(CTL), "logs", "b.py", "--run-dir", rundir], env=env,
                          check=False, capture_output=True, text=True, timeout=60)
    assert real.returncode == 0 and "quitting" in real.stdout, real


def test_call_log_lines_are_rate_limited(rundir: str, env: dict[str, str],
                                         procs: ProcRegistry, tmp_path: Path) -> None:
    script = write_script(tmp_path, "job.py", BODY, f"{CLIENT} -U,{PYTHON}")
    n = 40
    for _ in range(n):
        run_ok(procs, [script], env, str(tmp_path))
    run_ok(procs, [script, "9"], env, str(tmp_path), status=9)
    # The record and the log line are written once the status has gone back to the client.
    (e,) = wait_for(lambda: [x for x in live(rundir) if x["stats"]["calls"] == n + 1],
                    what="the record of every call")
    log = Path(e["log"]).read_text()
    ok_lines = re.findall(r"INFO .*: call .*: exit 0 in", log)
    assert 20 <= len(ok_lines) < n, log  # the burst, and then about one a second
    assert len([ln for ln in log.splitlines() if "exit 9" in ln]) == 1  # a failure gets through
    # every call not logged is counted in the next line that is
    notes = re.findall(r"\((\d+) earlier call\(s\) not logged", log)
    assert sum(map(int, notes)) == n - len(ok_lines), log
    assert e["stats"]["calls"] == n + 1  # the record counts every call
