"""The watcher role: ``prefork-watcher``, which tells a server that its socket is gone.

See ``prefork.watcher.main`` for the behaviour and the command line.
"""
