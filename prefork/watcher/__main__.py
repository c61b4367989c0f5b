"""``python -m prefork.watcher``: the same as the ``prefork-watcher`` console script."""

import sys

from prefork.watcher.main import main

sys.exit(main())
