"""python -m prefork.ctl: the same as prefork-ctl."""

from prefork.ctl.main import main

main()
