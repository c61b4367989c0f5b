"""Soak (issue 4, ``make soak``): 10,000 calls to one server, nothing grows, nothing is lost.

Calls go through our client and the script's ``#!`` line, four at a time (``PF_SOAK_CALLS``
changes the count, for a quick look).  After a warm-up the
server's fd count (``/proc/PID/fd``) and resident size are recorded whenever it is idle; at the
end the fd count must be exactly what it was and the resident size within a small bound, and
no child of the server may be left a zombie (an unreaped executor).  Every call must give its
own output and exit status.
"""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from _procfacts import asleep_in_epoll, executors
from harness import scaled, wait_for, write_script
from procfs import children, fd_count, gone, rss_kib

CALLS = int(os.environ.get("PF_SOAK_CALLS", "10000"))
WARMUP = 500
BATCH = 500
WORKERS = 4
RSS_GROWTH_KIB = 1024  # allowed after warm-up: allocator noise, not a per-call leak

SCRIPT = """
import os, sys
import prefork
prefork.initialisation_complete(log="file", autoreload=False)  # one server throughout
n = int(sys.argv[1])
print(n, os.getppid())
sys.exit(3 if n % 10 == 0 else 0)
"""


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_10000_calls(rundir: str, env: dict[str, str]) -> None:
    script = write_script(rundir, "soak.py", SCRIPT)
    servers: set[int] = set()

    def call(n: int) -> None:
        r = subprocess.run([script, str(n)], env=env, capture_output=True,
                           timeout=scaled(60), check=False)
        assert r.returncode == (3 if n % 10 == 0 else 0), (n, r)
        assert r.stderr == b"", (n, r.stderr)
        got, server = r.stdout.split()
        assert int(got) == n
        servers.add(int(server))

    def batch(start: int, count: int) -> int:
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(call, range(start, start + count)))
        assert len(servers) == 1, f"more than one server: {servers}"
        server = next(iter(servers))
        zombies = [pid for pid, state in children(server) if state == "Z"]
        assert len(zombies) <= WORKERS, f"zombies accumulate: {zombies}"
        return server

    t0 = time.monotonic()
    server = batch(0, WARMUP)
    wait_for(lambda: _idle(server), what="server idle after warm-up")
    fds0, rss0 = fd_count(server), rss_kib(server)
    samples = [(WARMUP, fds0, rss0)]
    done = WARMUP
    while done < CALLS:
        n = min(BATCH, CALLS - done)
        batch(done, n)
        done += n
        wait_for(lambda: _idle(server), what=f"server idle after {done} calls")
        samples.append((done, fd_count(server), rss_kib(server)))
    elapsed = time.monotonic() - t0
    print(f"\nsoak: {CALLS} calls in {elapsed:.1f}s ({CALLS / elapsed:.0f}/s); "
          f"(calls, fds, rss KiB): {samples[0]} ... {samples[-1]}")
    assert not gone(server)
    assert all(fds == fds0 for _, fds, _ in samples), samples
    assert samples[-1][2] - rss0 <= RSS_GROWTH_KIB, samples
    assert not [pid for pid, state in children(server) if state == "Z"]


def _idle(server: int) -> bool:
    """No executor left (every one reaped; the spare stays) and the server asleep in its
    event loop."""
    return not executors(server) and asleep_in_epoll(server)

