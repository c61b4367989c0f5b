"""``python -m prefork.server SCRIPT ...``: the same as the ``prefork-server`` console script.

For a script whose interpreter is another environment's Python (prefork installed there)::

    #!/usr/bin/prefork-interp -U,/opt/app/venv/bin/python,-m,prefork.server
"""

import sys

from prefork.server.runner import main

sys.exit(main())
