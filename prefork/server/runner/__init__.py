"""prefork-server: run an unmodified Python script, or an installed program, through prefork-interp.

Usage::

    #!/usr/bin/prefork-interp -U,prefork-server              first line of an unmodified script
    prefork-interp -U prefork-server "$(command -v some-cli)" ARGS...   an installed program
    prefork-server --wrap some-cli > ~/bin/some-cli          a ready #! wrapper for it
    #!/usr/bin/prefork-interp -U,/opt/venv/bin/python,-m,prefork.server   another environment

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

Exit statuses: the script's own; 2 for a usage error or a script that cannot be opened
(as ``python``); 1 for a failed ``--wrap``/``--explain``; 127 when the server cannot serve.

The package, one concern a module (each imports only those before it)::

    script.py    the script run as __main__ (Script, enter, run) and RunnerError
    preload.py   finding module-level imports (ast) and preloading them, output captured
    wrap.py      --wrap: the wrapper's text, the program on PATH, its #! interpreter
    explain.py   --explain: what the preload imports, its cost and fork hazards
    cli.py       the command line and its modes (main)
"""

from prefork.server.runner.cli import main, parse, split_argv
from prefork.server.runner.preload import find_imports, plan_preload, preload_one
from prefork.server.runner.script import PROG, RunnerError, Script
from prefork.server.runner.wrap import find_program, make_wrapper, shebang_python

__all__ = ["PROG", "RunnerError", "Script", "find_imports", "find_program", "main",
           "make_wrapper", "parse", "plan_preload", "preload_one", "shebang_python",
           "split_argv"]
