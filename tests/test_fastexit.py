"""The fast exit under prefork-server costs the script's code nothing (issue 13, point 5).

The runner ends every executor itself (``fastexit.caller_exits()``): no ``sys.monitoring``
event is armed while the script runs, so an exception costs what it costs directly; and yet
every way a call can end still takes the fast exit, with the status and output of a direct
run.  (Speed itself is measured in ``make bench``, section (h), not here.)
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
from harness import CLIENT, PYTHON, ProcRegistry

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(sys.version_info < (3, 12), reason="sys.monitoring is 3.12+"),
]

EVENTS = r'''
import json, sys
mon = sys.monitoring
E = mon.events
per_exception = E.RAISE | E.PY_UNWIND | E.RERAISE | E.EXCEPTION_HANDLED | E.PY_THROW
tools = {t: mon.get_tool(t) for t in range(6)}
print(json.dumps({name: mon.get_events(t) & per_exception
                  for t, name in tools.items() if name is not None}))
'''


def test_no_per_exception_event_during_the_call(env: dict[str, str], procs: ProcRegistry,
                                                tmp_path: Path) -> None:
    """While the script runs in a warm executor, no monitoring tool listens to any event
    that fires per exception (the old fast exit set PY_UNWIND globally)."""
    (tmp_path / "events.py").write_text(EVENTS)
    direct = procs.run([PYTHON, "events.py"], env=env, cwd=str(tmp_path))
    assert direct == (0, b"{}\n", b"")
    for _ in range(2):  # the first call starts the server, the second is warm
        status, out, err = procs.run([CLIENT, "-U", "prefork-server", "events.py"], env=env,
                                     cwd=str(tmp_path))
        assert (status, err) == (0, b"")
        listening = {name: bits for name, bits in json.loads(out).items() if bits}
        assert listening == {}, f"tools listening to per-exception events: {listening}"


HELD = '''\
import os
class Held:
    def __del__(self):
        os.write(2, b"finalized: a server object\\n")
held = Held()
'''

ENDINGS = '''\
import sys, held
def nested(n, what):
    if n:
        return nested(n - 1, what)
    if what == "exit":
        sys.exit(3)
    if what == "raise-exit":
        raise SystemExit(4)
    if what == "msg":
        sys.exit("bye now")
    if what == "raise":
        raise ValueError("boom")
    if what == "kbi":
        raise KeyboardInterrupt
what = sys.argv[1]
print("out", end="")
if what == "top-exit":
    sys.exit(5)
nested(3, what)
'''

#: How each ending ends a direct run (a negative status: death by that signal).
ENDS = {"normal": 0, "top-exit": 5, "exit": 3, "raise-exit": 4, "msg": 1, "raise": 1,
        "kbi": -signal.SIGINT}
FINALIZED = b"finalized: a server object\n"


@pytest.mark.parametrize("what", sorted(ENDS))
def test_every_ending_takes_the_fast_exit(env: dict[str, str], procs: ProcRegistry,
                                          tmp_path: Path, what: str) -> None:
    """Normal end, sys.exit at top level and in nested frames, SystemExit raised in nested
    frames, an uncaught exception, KeyboardInterrupt: the status, stdout and stderr of a
    direct run (traceback included), through the fast exit -- seen by an object of the
    preloaded module ``held`` not being finalized (the fast exit does not tear down the
    server's heap; a direct run, or the interpreter's own shutdown, finalizes it)."""
    (tmp_path / "held.py").write_text(HELD)
    (tmp_path / "endings.py").write_text(ENDINGS)
    want = procs.run([PYTHON, "endings.py", what], env=env, cwd=str(tmp_path))
    assert want[0] == ENDS[what] and want[1] == b"out"
    assert want[2].endswith(FINALIZED), "the direct run must finalize the object"
    for _ in range(2):  # cold, then warm
        got = procs.run([CLIENT, "-U", "prefork-server", "endings.py", what], env=env,
                        cwd=str(tmp_path))
        assert got == (want[0], want[1], want[2].replace(FINALIZED, b""))
