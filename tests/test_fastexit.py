"""The fast exit costs the script's code nothing (issue 13, point 5).

Under prefork-server the runner ends every executor itself (``fastexit.caller_exits()``):
no ``sys.monitoring`` event is armed while the script runs.  A script that calls
``initialisation_complete()`` itself has no global event set while it runs either: its
return is a local event, an uncaught exception is seen through ``sys.excepthook``, a
``SystemExit`` from ``sys.exit``/``exit()`` arms the global events while it is in flight.
Either way an exception costs what it costs directly, and every way a call can end gives the
status and output of a direct run, through the fast exit where it is seen (the server's
object is not finalized) and through the interpreter's own shutdown where it is not.
(Speed itself is measured in ``make bench``, section (h), not here.)
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
    def __del__(self, write=os.write):  # (os may be gone at the teardown)
        write(2, b"finalized: a server object\\n")
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


# A script that calls initialisation_complete() itself: its own <module> frame is the
# outermost, and the fast exit must find its end without listening to every exception.

OWN = '''\
import sys, held, prefork
{pre}
prefork.initialisation_complete()
{body}
'''


def own_script(tmp_path: Path, body: str, pre: str = "", name: str = "own.py") -> str:
    """Write ``held.py`` and a script calling ``initialisation_complete()`` (after ``pre``,
    before ``body``); its name."""
    (tmp_path / "held.py").write_text(HELD)
    (tmp_path / name).write_text(OWN.format(pre=pre, body=body))
    return name


def differential(procs: ProcRegistry, env: dict[str, str], tmp_path: Path, script: str,
                 *args: str, fast: bool = True) -> tuple[int, bytes, bytes]:
    """Run ``script`` directly, then cold and warm through our client: the same status,
    stdout and stderr; with ``fast``, through the fast exit (the server's object is not
    finalized), else through the interpreter's own shutdown (it is, as directly)."""
    want = procs.run([PYTHON, script, *args], env=env, cwd=str(tmp_path))
    assert FINALIZED in want[2], "the direct run must finalize the object"
    expect = (want[0], want[1], want[2].replace(FINALIZED, b"")) if fast else want
    for how in ("cold", "warm"):
        got = procs.run([CLIENT, "-U", PYTHON, script, *args], env=env, cwd=str(tmp_path))
        assert got == expect, f"{how} call"
    return want


OWN_ENDINGS = ENDINGS.replace("import sys, held\n", "") + '''\
if what == "quit":
    exit(6)
if what == "argparse":
    import argparse
    argparse.ArgumentParser(prog="p").parse_args(["--nope"])
if what == "bound-exit":
    bound.leave(8)
if what == "module-raise-exit":
    bound.raise_exit(10)
if what == "asyncio":
    import asyncio
    async def main():
        await asyncio.sleep(0)
        sys.exit(12)
    asyncio.run(main())
if what == "with":
    import contextlib
    @contextlib.contextmanager
    def cleaning():
        try:
            yield
        finally:
            print(" cleaned", end="")
    with cleaning():
        sys.exit(13)
if what == "hook-exits":
    def hook(*info):
        sys.exit(9)
    sys.excepthook = hook
    raise ValueError
'''
BOUND = "def leave(n):\n    exit(n)\ndef raise_exit(n):\n    raise SystemExit(n)\n"
#: How each ending ends, and whether it takes the fast exit.
OWN_ENDS = {"normal": (0, True), "top-exit": (5, True), "exit": (3, True),
            "msg": (1, True), "raise": (1, True), "kbi": (-signal.SIGINT, True),
            "quit": (6, True), "argparse": (2, True), "bound-exit": (8, True),
            "asyncio": (12, True), "with": (13, True), "raise-exit": (4, True),
            # Not seen: the interpreter's own (slower) shutdown, as directly.
            "module-raise-exit": (10, False), "hook-exits": (9, False)}


@pytest.mark.parametrize("what", sorted(OWN_ENDS))
def test_every_ending_of_a_script_of_its_own(env: dict[str, str], procs: ProcRegistry,
                                             tmp_path: Path, what: str) -> None:
    """A script calling initialisation_complete() itself: sys.exit at top level and in
    nested frames (a message too), exit(), argparse's error exit, sys.exit bound by
    ``from sys import exit`` before the fork, in a coroutine under asyncio.run, through a
    context manager's cleanup, an uncaught exception, KeyboardInterrupt: the fast exit,
    with the status and output of a direct run; so does ``raise SystemExit(4)`` in the
    script's own file.  Not seen by it, ``raise SystemExit(10)`` in another module, and a
    hook the script set itself raising SystemExit: the normal shutdown, with the status and
    output of a direct run all the same."""
    (tmp_path / "bound.py").write_text("from sys import exit\n" + BOUND)
    script = own_script(tmp_path, OWN_ENDINGS, pre="import bound")
    status, fast = OWN_ENDS[what]
    want = differential(procs, env, tmp_path, script, what, fast=fast)
    assert want[0] == status


EVENTS_DURING = r'''
import json, threading, traceback
mon = sys.monitoring
def events():
    return {t: mon.get_events(t) for t in range(6) if mon.get_events(t)}
def f3():
    raise ValueError
def loop():
    for _ in range(3):
        try:
            f3()
        except ValueError:
            pass
loop()
print("running", events())
class Noisy:
    def __del__(self):
        print("finalized noisy")
def leave(code):
    noisy = Noisy()
    with open(__file__):
        try:
            sys.exit(code)
        finally:
            try:
                int("x")
            except ValueError:
                pass
try:
    leave(7)
except SystemExit as e:
    print("caught", e.code)
    print("".join(traceback.format_exception(e)).replace(__file__, "F"))
print("after the catch")
loop()
print("caught, then", events())
try:
    raise SystemExit(5)
except SystemExit:
    pass
loop()
print("raised, caught, then", events())
t = threading.Thread(target=leave, args=(3,))
t.start()
t.join()
loop()
print("a thread's exit, then", events())
sys.exit(4)
'''


def test_no_global_event_in_a_script_of_its_own(env: dict[str, str], procs: ProcRegistry,
                                                tmp_path: Path) -> None:
    """While a script that called initialisation_complete() itself runs, no sys.monitoring
    event is set globally (the old fast exit set PY_UNWIND, which fires on every frame any
    exception unwinds); nor after a sys.exit() that was caught (in the main thread, through
    a ``with`` and a ``finally`` handling an exception of its own) or that ended a thread,
    nor after a ``raise SystemExit(5)`` that was caught.
    The caught SystemExit's traceback is a direct run's (no wrapper frame), and the frame
    that raised it dies when the handler drops it, as directly."""
    script = own_script(tmp_path, EVENTS_DURING)
    want = differential(procs, env, tmp_path, script)
    assert want[0] == 4
    out = want[1].decode()
    assert "running {}\n" in out and "caught, then {}\n" in out
    assert "a thread's exit, then {}\n" in out and "raised, caught, then {}\n" in out
    assert out.index("finalized noisy") < out.index("after the catch")


HOOKS_PRE = '''\
def hook(typ, value, tb):
    print("script's hook:", typ.__name__, value, file=sys.stderr)
    if str(value) == "exit":
        sys.exit(11)
    if str(value) == "fail":
        raise RuntimeError("the hook failed")
if sys.argv[1].startswith("before"):
    sys.excepthook = hook
if sys.argv[1] == "before-partial":  # a hook without __name__, __qualname__, __module__
    import functools
    sys.excepthook = functools.partial(hook)
'''
HOOKS = '''\
what = sys.argv[1]
if what == "during":
    sys.excepthook = hook
if what == "chained":
    default = sys.excepthook
    def chained(*info):
        print("chained", file=sys.stderr)
        default(*info)
    sys.excepthook = chained
if what == "default-restored":
    sys.excepthook = hook
    sys.excepthook = sys.__excepthook__
print("is default:", sys.excepthook is sys.__excepthook__)
raise ValueError(sys.argv[2])
'''
#: (hook, its value): whether the fast exit is taken.
HOOK_CASES = {("before", "boom"): True, ("before", "exit"): True, ("before", "fail"): True,
              ("before-partial", "boom"): True,
              ("default-restored", "boom"): True,
              # Not seen: the hook the script set during the call, or its own calling ours.
              ("during", "boom"): False, ("chained", "boom"): False}


@pytest.mark.parametrize(("when", "value"), sorted(HOOK_CASES))
def test_excepthook_of_the_script(env: dict[str, str], procs: ProcRegistry, tmp_path: Path,
                                  when: str, value: str) -> None:
    """An uncaught exception with a ``sys.excepthook`` the script set before
    initialisation_complete() (which may exit or fail itself), or after restoring the
    default: the fast exit, through that hook.  A hook set during the call, or one calling
    the previous hook itself: the normal shutdown.  Either way the status and output of a
    direct run."""
    script = own_script(tmp_path, HOOKS, pre=HOOKS_PRE)
    want = differential(procs, env, tmp_path, script, when, value,
                        fast=HOOK_CASES[when, value])
    assert want[0] == {"exit": 11}.get(value, 1)


THREADS = r'''
import threading
what = sys.argv[1]
started = threading.Event()
def late():
    started.set()
    time.sleep(0.3)  # the main thread ends meanwhile: its end waits for this thread
    print("late thread done", flush=True)
def fails():
    raise KeyError("in a thread")
import time
t = threading.Thread(target=fails)
t.start()
t.join()
threading.Thread(target=late).start()
started.wait()
if what == "exit":
    sys.exit(3)
if what == "raise":
    raise ValueError("main")
'''


@pytest.mark.parametrize("what", ["exit", "raise", "normal"])
def test_threads_of_a_script_of_its_own(env: dict[str, str], procs: ProcRegistry,
                                        tmp_path: Path, what: str) -> None:
    """An exception ending a thread (printed by threading.excepthook, not seen as the end
    of the script); a thread still running when the main module ends by sys.exit, an
    uncaught exception or its return: the fast exit waits for it, as directly."""
    script = own_script(tmp_path, THREADS)
    want = differential(procs, env, tmp_path, script, what)
    assert want[0] == {"exit": 3, "raise": 1}.get(what, 0)
    assert want[1] == b"late thread done\n" and b"KeyError: 'in a thread'" in want[2]
