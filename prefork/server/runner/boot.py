"""Start ``prefork-server`` under any Python, with nothing of ours installed in its environment.

Run as a file: ``PYTHON /path/to/prefork/server/runner/boot.py [OPTIONS] SCRIPT ARGS``
(the ``#!`` line of a ``--wrap`` wrapper does).  The ``prefork`` package this file belongs
to is loaded from its own directory by a spec whose ``__path__`` is that directory, so its
submodules (the server side: standard library only) are found without touching
``sys.path``: the program sees the ``sys.path`` of a direct run (the entry the interpreter
put first for this file, its directory, is replaced by the script's own directory, as
``python SCRIPT`` has it).  The one thing the program shares with us is the name: in this
process ``prefork`` and its submodules in ``sys.modules`` are ours, so a program whose
environment has a package named ``prefork`` of its own is refused (``cli``).

Standard library only, no ``prefork`` import before the package is loaded from here.
"""

import os
import sys


def load_package() -> None:
    """Put our ``prefork`` package into ``sys.modules`` from this file's location."""
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    package_dir = os.path.dirname(os.path.dirname(here))
    spec = importlib.util.spec_from_file_location(
        "prefork", os.path.join(package_dir, "__init__.py"),
        submodule_search_locations=[package_dir])
    if spec is None or spec.loader is None:  # pragma: no cover - our own file
        raise ImportError(f"cannot load prefork from {package_dir}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["prefork"] = module
    spec.loader.exec_module(module)


if __name__ == "__main__":
    load_package()
    from prefork.server.runner.cli import main

    sys.exit(main())
