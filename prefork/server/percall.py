"""What each call redoes of the script's state, so that it starts as a direct run would:
the ``random`` module's generators, and the script's own ``after_fork`` callbacks.

A direct run that seeds ``random`` (``random.seed(42)``, ``Random(42)``, ``setstate``)
before ``initialisation_complete()`` draws the same numbers every run; one that does not
draws new ones every run.  In executors, ``random`` itself reseeds its global generator at
every fork (``os.register_at_fork``), and leaves every other ``Random`` instance as the
server had it.  So, per call: the global generator gets back the state the server had if
the script seeded it, and every other instance that was not seeded explicitly is reseeded
from ``os.urandom``.  Seeds are seen from ``import prefork`` on: ``watch_random`` wraps
``Random.seed`` and ``Random.setstate`` (``prefork/__init__.py`` arranges it when
``random`` is imported); an instance seeded before that counts as not seeded.
"""

from __future__ import annotations

import _weakref
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import random as _random_mod
    import weakref
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any

#: Random instances seen being seeded: True = explicitly (a value or a state), False = from
#: the system's randomness.
#: Made when ``random`` is first watched (``weakref`` would cost every idle server 0.5 MB).
_seeded: weakref.WeakKeyDictionary[object, bool] | None = None
#: Set in the server at freeze time: the global generator's state to restore in each call
#: (None: it was not seeded explicitly; random's own fork hook reseeds it) ...
_global_state: object = None
#: ... and the other generators to reseed in each call.
_reseed: list[weakref.ref[_random_mod.Random]] = []
#: ``after_fork`` callbacks, in registration order.
_callbacks: list[Callable[[], object]] = []


def _note(inst: object, explicit: bool) -> None:
    if _seeded is None:
        return
    try:
        _seeded[inst] = explicit
    except TypeError:  # a subclass without __weakref__: not tracked
        pass


def watch_random(module: ModuleType) -> None:
    """Record explicit seeds of ``module`` (``random``) from now on: wrap ``Random.seed``
    and ``Random.setstate``, and rebind the module's ``seed``/``setstate`` functions (bound
    to its global instance at import) to the wrapped methods."""
    global _seeded
    cls = module.Random
    if getattr(cls.seed, "_prefork_watched", False):
        return
    if _seeded is None:
        import weakref

        _seeded = weakref.WeakKeyDictionary()
    seed, setstate = cls.seed, cls.setstate

    def watched_seed(self: object, a: object = None, version: int = 2) -> None:
        seed(self, a, version)
        _note(self, a is not None)

    def watched_setstate(self: object, state: object) -> None:
        setstate(self, state)
        _note(self, True)

    new: Any
    for new, old in ((watched_seed, seed), (watched_setstate, setstate)):
        new.__name__, new.__qualname__, new.__doc__ = old.__name__, old.__qualname__, old.__doc__
        new.__wrapped__ = old
        new._prefork_watched = True
    cls.seed = watched_seed
    cls.setstate = watched_setstate
    inst = module._inst
    for name in ("seed", "setstate"):
        if getattr(getattr(module, name, None), "__self__", None) is inst:
            setattr(module, name, getattr(inst, name))


def remember_global() -> None:
    """At ``initialisation_complete()``, before any fork (``random`` reseeds its global
    generator in every child): its state, if the script seeded it."""
    global _global_state
    module = sys.modules.get("random")
    if module is not None:
        inst = module._inst
        _global_state = inst.getstate() if _seeded is not None and _seeded.get(inst) else None


def remember() -> None:
    """In the server, before the heap is frozen: the generators to reseed in each call
    (none if ``random`` is not loaded)."""
    module = sys.modules.get("random")
    if module is None:
        return
    import gc

    objects = gc.get_objects()
    inst = module._inst
    cls = module.Random
    seeded = _seeded if _seeded is not None else {}
    _reseed[:] = [_weakref.ref(o) for o in objects
                  if isinstance(o, cls) and o is not inst and not seeded.get(o, False)
                  and hasattr(type(o), "__weakref__")]


def after_fork(callback: Callable[[], object]) -> None:
    """Call ``callback()`` in every executor, once it has taken on its call (argv,
    environment, fds, stdio are the call's), before the script goes on: reseed third-party
    generators there, reopen per-call resources."""
    if not callable(callback):
        raise TypeError(f"after_fork: {callback!r} is not callable")
    _callbacks.append(callback)


def at_call() -> None:
    """In the executor, taking its call: the generators as a direct run would have them,
    then the script's callbacks."""
    if _global_state is not None:
        sys.modules["random"]._inst.setstate(_global_state)
    for ref in _reseed:
        inst = ref()
        if inst is not None:
            inst.seed()
    for callback in _callbacks:
        callback()
