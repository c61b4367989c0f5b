"""Per-call process state: random reseeded, the pid right, closed standard fds, and the
hazard of threads started before initialisation (warned about in the server log)."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest
from harness import wait_for

from .probes import INTERPRETERS, PYTHONS, ProbeFactory

pytestmark = pytest.mark.timeout(120)

RANDOMS = r'''
import json, random, secrets, tempfile, uuid
print(json.dumps({"random": random.random(), "token": secrets.token_hex(8),
                  "uuid4": str(uuid.uuid4()), "tempname": next(tempfile._get_candidate_names()),
                  "urandom": os.urandom(8).hex()}))
'''


@pytest.mark.parametrize("python", PYTHONS)
def test_randomness_differs_per_call(make_probe: ProbeFactory, python: str) -> None:
    """Two warm calls of one server (forks of one heap) draw different random numbers, as
    two direct runs do: random, secrets, uuid4, tempfile names, os.urandom."""
    probe = make_probe(RANDOMS, python=INTERPRETERS[python],
                       pre="import random, tempfile; random.random(); "
                           "next(tempfile._get_candidate_names())")
    first = probe.run("warm").json()
    second = probe.run("warm").json()
    for key in first:
        assert first[key] != second[key], key


PIDS = r'''
import json, subprocess
child = subprocess.run([sys.executable, "-c", "import os; print(os.getppid())"],
                       capture_output=True, text=True, check=True).stdout
with open("/proc/self/stat") as f:
    stat_pid = int(f.read().split()[0])
print(json.dumps({"getpid": os.getpid(), "proc_self": stat_pid, "child_ppid": int(child),
                  "threading": __import__("threading").get_native_id() == os.getpid()}))
'''


@pytest.mark.parametrize("how", ["cold", "warm"])
def test_getpid_is_the_process(make_probe: ProbeFactory, how: str) -> None:
    """os.getpid() is the executor's own pid: /proc/self agrees, the script's children see
    it as their parent, the main thread's native id is it."""
    probe = make_probe(PIDS)
    r = probe.run(how).json()
    assert r["getpid"] == r["proc_self"] == r["child_ppid"]
    assert r["threading"]


CLOSED = r'''
import json
with open(sys.argv[1], "w") as report:
    json.dump({"stdio_none": [s is None for s in (sys.stdin, sys.stdout, sys.stderr)],
               "fds": sorted(int(n) for n in os.listdir("/proc/self/fd"))[:-1]}, report)
'''


@pytest.mark.parametrize("how", ["cold", "warm"])
@pytest.mark.parametrize("closed", ["0", "1", "2", "012"])
def test_closed_standard_fds(make_probe: ProbeFactory, tmp_path: Path, how: str,
                             closed: str) -> None:
    """A caller that closed some of fds 0/1/2: the script sees those closed (sys.stdin etc.
    None), not the client's sockets or /dev/null."""
    probe = make_probe(CLOSED)
    results = {}
    for mode in ("direct", how):
        report = tmp_path / f"report-{mode}-{closed}"
        probe.prepare(mode, tmp_path)
        shut = " ".join(f"{fd}>&-" for fd in closed)
        rc, _, _ = probe.procs.run(
            ["bash", "-c", f'exec {shut} "$@"', "bash", *probe.command(mode), str(report)],
            env=probe.env)
        results[mode] = (rc, json.loads(report.read_text()))
    assert results[how] == results["direct"]
    assert results["direct"][1]["stdio_none"] == [str(i) in closed for i in range(3)]


THREADS = r'''
print("threads:", __import__("threading").active_count())
'''


def test_threads_started_before_initialisation_are_warned_about(
        make_probe: ProbeFactory, rundir: str) -> None:
    """A thread started before initialisation_complete() does not exist in the executors
    (fork copies only the calling thread): the server says so, once, in its log."""
    probe = make_probe(THREADS, pre=r'''
        import threading
        threading.Thread(target=threading.Event().wait, daemon=True).start()
    ''', init='log="file"')
    assert probe.run("direct").out == b"threads: 2\n"
    assert probe.run("warm").out == b"threads: 1\n"
    assert probe.run("warm").out == b"threads: 1\n"

    def log() -> str:
        return "".join(Path(p).read_text() for p in glob.glob(os.path.join(rundir, "p*.log")))

    wait_for(lambda: "threads alive at fork" in log(), what="the warning")
    assert log().count("threads alive at fork") == 1


def test_no_warning_without_threads(make_probe: ProbeFactory, rundir: str) -> None:
    probe = make_probe(THREADS, init='log="file"')
    assert probe.run("warm").out == b"threads: 1\n"
    text = "".join(Path(p).read_text() for p in glob.glob(os.path.join(rundir, "p*.log")))
    assert "server started" in text and "threads alive" not in text
