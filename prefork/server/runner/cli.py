"""The ``prefork-server`` command line: options, the modes (``--wrap``, ``--explain``, setup
under prefork-interp, a direct run by hand) and their exit statuses."""

from __future__ import annotations

import os
import sys

from prefork.common.consts import EXIT_FAILED
from prefork.server.runner.explain import explain
from prefork.server.runner.preload import Capture, plan_preload, preload_one, replay
from prefork.server.runner.script import PROG, RunnerError, Script, enter, run
from prefork.server.runner.wrap import BOOT, make_wrapper, program_python

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    import types
    from collections.abc import Callable

#: Options that take a value (the first word that is neither these nor an option is SCRIPT).
_VALUE_OPTIONS = frozenset({"--preload", "--reload-also", "--wrap", "--client"})


def serve(script: Script, opts: argparse.Namespace) -> None:
    """Setup under prefork-interp: preload, become the server; in each executor, run the
    call and end it (3.12+: the fast exit, from here; 3.11: returns, for the interpreter's
    own shutdown)."""
    import prefork
    from prefork.server import fastexit, learn

    module = enter(script, opts.args)
    # The atexit handlers and paths the setup makes: a call's atexit must not undo them.
    effects = learn.setup_effects = learn.SetupEffects()
    effects.start()
    capture = Capture()
    try:
        try:
            script.compile()
        except (SyntaxError, ValueError):
            pass  # raised again, and reported, when the script runs
        for found in plan_preload(script, opts.preload, not opts.no_preload):
            mark = capture.mark()
            if preload_one(found).error is not None:
                capture.rewind(mark)
    finally:
        captured = capture.finish()
        effects.stop()
    if script.rehearse is not None and not opts.no_rehearse and not opts.no_learn:
        from prefork.server import rehearse

        rehearse.planned = rehearse.Plan(_rehearsal_run(script), script.rehearse)
    # This frame ends every executor itself (fastexit.finish below): no sys.monitoring
    # event is armed, so the script's code runs at direct speed (3.12+).
    fastexit.caller_exits()
    prefork.initialisation_complete(
        autoreload_extra=[*script.reload_paths(), *opts.reload_also], learn=not opts.no_learn)
    # In the executor.
    if not fastexit.AVAILABLE:
        _call(script, module, captured)  # ends with the interpreter's own shutdown
        return
    try:
        _call(script, module, captured)
    except RunnerError as e:
        sys.stderr.write(f"{e}\n")
        fastexit.finish(e.status, None)
    except BaseException as e:  # noqa: BLE001 - ended here as the interpreter ends a script
        fastexit.finish(None, e)
    fastexit.finish(0, None)


def _call(script: Script, module: types.ModuleType, captured: dict[int, bytes]) -> None:
    """One call, in its executor: sys.argv is [SCRIPT as the client gave it, *ARGS]."""
    if sys.argv and os.path.abspath(sys.argv[0]) != os.path.abspath(script.given):
        raise RunnerError(f"{sys.argv[0]} is not the script this server was started for "
                          f"({script.given}): give an absolute path when using --any-cwd",
                          EXIT_FAILED)
    if sys.argv:
        sys.argv[0] = script.argv0
    replay(captured)
    run(script, module)


def _rehearsal_run(script: Script) -> Callable[[list[str]], int]:
    """A run of the script in this process as a call would run it (for a rehearsal and its
    probe, ``prefork.server.rehearse``), putting back what ``enter`` and ``run`` change:
    its exit status."""

    def run_once(args: list[str]) -> int:
        saved_argv = list(sys.argv)
        saved_main = sys.modules.get("__main__")
        limit = sys.getrecursionlimit()
        hook = sys.excepthook
        try:
            run(script, enter(script, args))
            return 0
        except SystemExit as e:
            code = e.code
            if code is None or isinstance(code, int):
                return code or 0
            print(code, file=sys.stderr)
            return 1
        except BaseException:  # noqa: BLE001 - KeyboardInterrupt, printed already
            return 130
        finally:
            sys.argv[:] = saved_argv
            if saved_main is not None:
                sys.modules["__main__"] = saved_main
            sys.setrecursionlimit(limit)
            sys.excepthook = hook

    return run_once


def run_direct(script: Script, opts: argparse.Namespace) -> None:
    """By hand: the same start as under prefork-interp, without server or preload."""
    run(script, enter(script, opts.args))


def _run_under(python: tuple[str, list[str]], argv: list[str]) -> None:
    """Start again under the script's own Python (its ``#!`` line names another one), by
    ``boot.py``: nothing of ours needs to be installed there.  The process, its fds (those
    named in PREFORK_INTERP) and its environment stay; only the interpreter changes."""
    interp, interp_args = python
    sys.stdout.flush()
    sys.stderr.flush()
    _pass_contract_fds_on()
    try:
        os.execv(interp, [interp, *interp_args, BOOT, "--python-checked", *argv])
    except OSError as e:
        raise RunnerError(f"cannot run {interp}, the Python named by the script's #! line: "
                          f"{e.strerror}", EXIT_FAILED) from None


def _pass_contract_fds_on() -> None:
    """The fds ``PREFORK_INTERP`` names go on to the next interpreter: ``import prefork``
    made them close-on-exec (for programs set-up starts), this exec is the same set-up."""
    from prefork.common import envspec

    value = os.environ.get(envspec.ENV_NAME)
    if not value:
        return
    try:
        spec = envspec.parse(value)
    except envspec.EnvSpecError:
        return  # the next interpreter says what is wrong with it
    for fd in (spec.listen, spec.call, spec.watch_in, spec.watch_err):
        try:
            os.set_inheritable(fd, True)
        except OSError:
            pass


def _check_no_other_prefork(script: Script) -> None:
    """Refuse a program whose environment has a ``prefork`` of its own (not a copy of this
    package): in this process the name is ours, so it would import ours."""
    from importlib.machinery import PathFinder

    ours = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = PathFinder.find_spec("prefork", sys.path[1:])
    if spec is None or not spec.submodule_search_locations:
        return
    theirs = next(iter(spec.submodule_search_locations))
    if os.path.realpath(theirs) == os.path.realpath(ours) or \
            os.path.isfile(os.path.join(theirs, "server", "runner", "boot.py")):
        return
    raise RunnerError(f"{script.path}: its environment has a package named prefork of its "
                      f"own ({theirs}), which this process's prefork would hide: run it "
                      "directly", EXIT_FAILED)


# ------------------------------------------------------------------ command line

USAGE = f"""\
{PROG} [OPTIONS] SCRIPT [ARGS ...]
       {PROG} --explain [OPTIONS] SCRIPT [-- ARGS ...]
       {PROG} --wrap NAME [--client PATH] [--preload MODULE ..] [--rehearse] [-- ARGS ...]
              > WRAPPER"""

DESCRIPTION = """\
Runs an unmodified Python script (or an installed program's script) fast under prefork-interp:
setup imports the modules the script imports at module level (found with ast, without running
it), then each call forks a warm copy that runs the script as __main__.  Use as

  #!/usr/bin/prefork-interp -U,prefork-server                (first line of a script)
  prefork-interp -U prefork-server "$(command -v PROGRAM)" ARGS ...
  prefork-server --wrap PROGRAM > ~/bin/PROGRAM && chmod +x ~/bin/PROGRAM

A script whose #! line names another Python (another venv's, the distribution's) runs under
that one, with nothing of prefork-interp installed there; a program that is not Python is
refused.  Without PREFORK_INTERP in the environment (run by hand) it runs the script
directly."""


def _parser() -> argparse.ArgumentParser:
    import argparse

    from prefork import __version__

    p = argparse.ArgumentParser(prog=PROG, usage=USAGE, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--preload", action="append", default=[], metavar="MODULE",
                   help="also import MODULE in setup (repeatable)")
    p.add_argument("--no-preload", action="store_true",
                   help="do not import the script's own imports in setup")
    p.add_argument("--no-learn", action="store_true",
                   help="do not learn from calls (modules they import, regexes they compile)")
    p.add_argument("--rehearse", action="store_true",
                   help="with --wrap NAME -- ARGS: the wrapper's server runs the program "
                        "once with ARGS itself (probed first in throwaway forks, sandboxed), "
                        "so that calls start with what a run builds lazily")
    p.add_argument("--no-rehearse", action="store_true",
                   help="do not rehearse, even if the wrapper asks for it")
    p.add_argument("--reload-also", action="append", default=[], metavar="PATH",
                   help="restart the server when PATH changes too (repeatable)")
    p.add_argument("--explain", action="store_true",
                   help="print what setup would preload and why, the time each import "
                        "takes, and threads or files left by the preload; with -- ARGS, "
                        "also run the script once (in a child) and report what it imported "
                        "while running, their cost, and what learning would preload")
    p.add_argument("--json", action="store_true",
                   help="with --explain: print one JSON object (for tools)")
    p.add_argument("--wrap", metavar="NAME",
                   help="print a #! wrapper running program NAME (on PATH, or a path) "
                        "through prefork-interp with its own environment's Python (nothing "
                        "installed there); with -- ARGS, run it once with ARGS and list "
                        "the modules it imported while running in the wrapper, to preload")
    p.add_argument("--python-checked", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--client", metavar="PATH",
                   help="with --wrap: the prefork-interp to put in the #! line")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(our options, [SCRIPT, *ARGS]): options end at the first word that is not one."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return argv[:i], argv[i + 1:]
        if not word.startswith("-") or word == "-":
            break
        if word in _VALUE_OPTIONS:
            i += 1
        i += 1
    return argv[:i], argv[i:]


def parse(argv: list[str]) -> argparse.Namespace:
    """Options and the script; exits 2 (argparse) on a usage error."""
    ours, rest = split_argv(argv)
    dashdash = argv[len(ours):len(ours) + 1] == ["--"]
    parser = _parser()
    opts = parser.parse_args(ours)
    opts.learn_args = None
    if opts.wrap is not None and dashdash:
        opts.learn_args, rest = rest, []
    opts.script = rest[0] if rest else None
    opts.args = rest[1:]
    opts.run_args = opts.args[1:] if opts.explain and opts.args[:1] == ["--"] else None
    if opts.wrap is None and opts.script is None:
        parser.error("no SCRIPT given")
    if opts.wrap is not None and opts.script is not None:
        parser.error("--wrap takes no SCRIPT")
    if opts.client is not None and opts.wrap is None:
        parser.error("--client goes with --wrap")
    if opts.wrap is not None and opts.explain:
        parser.error("--explain takes a SCRIPT, not --wrap")
    if opts.rehearse and opts.learn_args is None:
        parser.error("--rehearse goes with --wrap NAME -- ARGS")
    if opts.json and not opts.explain:
        parser.error("--json goes with --explain")
    return opts


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``prefork-server`` (and ``python -m prefork.server``)."""
    from prefork.common import envspec

    argv = sys.argv[1:] if argv is None else argv
    opts = parse(argv)
    try:
        if opts.wrap is not None:
            passed = [w for m in opts.preload for w in ("--preload", m)]
            passed += ["--no-preload"] if opts.no_preload else []
            passed += ["--no-learn"] if opts.no_learn else []
            passed += ["--no-rehearse"] if opts.no_rehearse else []
            passed += [w for p in opts.reload_also for w in ("--reload-also", p)]
            sys.stdout.write(make_wrapper(opts.wrap, opts.client, passed, opts.learn_args,
                                          opts.rehearse))
            return 0
        script = Script(opts.script)
        if not opts.python_checked:
            other = program_python(script.path, script.source)
            if other is not None:
                _run_under(other, argv)
        _check_no_other_prefork(script)
        if opts.explain:
            return explain(script, opts)
        if envspec.ENV_NAME in os.environ:
            serve(script, opts)
        else:
            run_direct(script, opts)
    except RunnerError as e:
        sys.stderr.write(f"{e}\n")
        return e.status
    return 0


if __name__ == "__main__":
    sys.exit(main())
