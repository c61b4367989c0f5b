"""prefork-ctl: list, inspect and stop prefork-interp servers (see ``prefork.ctl.main``)."""
