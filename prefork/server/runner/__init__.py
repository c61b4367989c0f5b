"""prefork-server: run an unmodified Python script, or an installed program, through prefork-interp.

Usage::

    #!/usr/bin/prefork-interp -U,prefork-server              first line of an unmodified script
    prefork-interp -U prefork-server "$(command -v some-cli)" ARGS...   an installed program
    prefork-server --wrap some-cli > ~/bin/some-cli          a ready #! wrapper for it
    prefork-server --wrap some-cli -- ARGS > ~/bin/some-cli  ... preloading what a run imports
    prefork-server --explain some-cli -- ARGS                what a run imports, and costs

A program from another environment (another venv, pipx, the distribution's ``/usr/bin``)
runs under its own Python, with nothing of ours installed there: ``boot.py`` loads this
package from its own directory (the server side is standard library only), and a script
whose ``#!`` names another Python is started again under that one by ``boot.py``.

Under prefork-interp (``PREFORK_INTERP`` set), in setup::

    read SCRIPT (a wrapper made by --wrap names the program it stands for)
    sys.argv = [SCRIPT, *ARGS]; sys.path[0] = SCRIPT's directory; a fresh __main__ module
    ┌ fds 1 and 2 captured (memfd) ─────────────────────────────────────────────────────┐
    │ compile SCRIPT (its SyntaxWarnings land in the capture)                             │
    │ import the module-level imports found by ``ast`` (failures skipped: the script     │
    │ raises them itself later), then every --preload MODULE                              │
    └─────────────────────────────────────────────────────────────────────────────────────┘
    prefork.initialisation_complete(autoreload_extra=[SCRIPT, program, --reload-also...])

and in each executor: replay the captured output (import-time warnings and prints appear
on every call, as in a direct run), then run the compiled script as ``__main__``.  A
direct run by hand (no ``PREFORK_INTERP``) takes the same path without the server and the
preload, so a script can be checked to behave the same with and without the helper.

The script runs as CPython runs a file: ``__file__`` absolute, ``sys.argv[0]`` as given,
``sys.path[0]`` the directory of the real path (unless ``-P``/``-I``/``PYTHONSAFEPATH``),
the same ``__main__`` globals, code compiled without our ``__future__`` flags.  An uncaught
exception is printed by ``sys.excepthook`` with a traceback starting at the script's own
frame; the status is 1, or death by SIGINT for ``KeyboardInterrupt``, after ``atexit``.

Exit statuses: the script's own; 2 for a usage error, a script that cannot be opened
(as ``python``) or one that is not Python; 1 for a failed ``--wrap``/``--explain``; 127 when
the server cannot serve or the Python a script's ``#!`` names cannot be run.

The package, one concern a module (each imports only those before it)::

    script.py    the script run as __main__ (Script, enter, run) and RunnerError
    preload.py   finding module-level imports (ast) and preloading them, output captured
    wrap.py      --wrap: the wrapper's text, the program on PATH, its #! interpreter
    explain.py   --explain: what the preload imports, its cost and fork hazards; -- ARGS:
                 one run in a fork, the imports it made, their cost, what to learn
    cli.py       the command line and its modes (main); another Python: exec boot.py
    boot.py      run as a file by any Python: loads this package, runs cli.main
"""

from prefork.server.runner.cli import main, parse, split_argv
from prefork.server.runner.preload import find_imports, plan_preload, preload_one
from prefork.server.runner.script import PROG, RunnerError, Script
from prefork.server.runner.wrap import (
    BOOT,
    find_program,
    make_wrapper,
    program_python,
    shebang_python,
)

__all__ = ["BOOT", "PROG", "RunnerError", "Script", "find_imports", "find_program", "main",
           "make_wrapper", "parse", "plan_preload", "preload_one", "program_python",
           "shebang_python", "split_argv"]
