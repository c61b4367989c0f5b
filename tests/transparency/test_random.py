"""Random state made before initialisation (issue 12, item 8): a seeded generator draws the
same numbers in every run, an unseeded one new numbers in every run -- directly, and in
every warm call of a server started by another call."""

from __future__ import annotations

import pytest

from .probes import INTERPRETERS, PYTHONS, ProbeFactory

pytestmark = pytest.mark.timeout(120)

#: Seeds made after ``import prefork`` (seen) -- the global generator, instances seeded by
#: value and by state, and instances left to the system's randomness.
SEEDED_AFTER_IMPORT = """\
import prefork
import random
from random import Random
random.seed(42)
by_value = Random(7)
by_state = Random()
by_state.setstate(Random(9).getstate())
unseeded = Random()
reseeded = Random(5)
reseeded.seed()
"""

DRAW = """\
print(random.random(), by_value.random(), by_state.random(), "|", unseeded.random(),
      reseeded.random(), flush=True)
"""


def _draws(probe: object, how: str, io: str, n: int = 3) -> list[tuple[str, str]]:
    out = []
    for _ in range(n):
        r = probe.run(how, io=io)  # type: ignore[attr-defined]
        assert r.status == "exit 0", r
        fixed, _, fresh = r.out.decode().strip().splitlines()[-1].partition(" | ")
        out.append((fixed, fresh))
    return out


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("io", ["pipe", "pty"])
def test_seeded_generators_repeat_and_unseeded_ones_differ(make_probe: ProbeFactory,
                                                           python: str, io: str) -> None:
    probe = make_probe(DRAW, pre=SEEDED_AFTER_IMPORT, python=INTERPRETERS[python])
    direct = _draws(probe, "direct", io)
    assert len({fixed for fixed, _ in direct}) == 1
    assert len({fresh for _, fresh in direct}) == 3
    for how in ("cold", "warm"):
        got = _draws(probe, how, io, 1 if how == "cold" else 3)
        assert {fixed for fixed, _ in got} == {direct[0][0]}, how
        assert len({fresh for _, fresh in got} | {fresh for _, fresh in direct}) == \
            len(got) + 3, how


def test_module_functions_bound_before_import_prefork(make_probe: ProbeFactory) -> None:
    """``from random import seed`` after ``import prefork`` binds the watched method."""
    probe = make_probe("print(random(), flush=True)\n",
                       pre="import prefork\nfrom random import random, seed\nseed(3)")
    want = probe.run("direct").out
    assert [probe.run("warm").out for _ in range(2)] == [want, want]


def test_after_fork_callback_runs_in_each_call(make_probe: ProbeFactory) -> None:
    """``prefork.after_fork(callback)``: once per call, in the executor, with the call's
    argv (the remedy for generators ``random`` does not know, e.g. numpy's)."""
    probe = make_probe("print(seen, flush=True)\n", pre="""\
        import prefork
        seen = []
        prefork.after_fork(lambda: seen.append(list(sys.argv[1:])))
    """)
    assert probe.run("direct", "a").out == b"[]\n"
    assert probe.run("warm", "b").out == b"[['b']]\n"
    assert probe.run("warm", "c").out == b"[['c']]\n"


def test_seed_before_import_prefork_is_not_seen(make_probe: ProbeFactory) -> None:
    """Remaining difference: a seed set before ``import prefork`` (``random`` imported and
    seeded first) is not seen: the global generator is reseeded in every warm call, and an
    instance seeded then is treated as unseeded (reseeded per call).  Remedy: import
    prefork first, or seed again after initialisation_complete() / in prefork.after_fork."""
    probe = make_probe("print(random.random(), early.random(), flush=True)\n",
                       pre="import random\nrandom.seed(42)\nearly = random.Random(1)")
    direct = {probe.run("direct").out for _ in range(2)}
    assert len(direct) == 1
    warm = {probe.run("warm").out for _ in range(2)}
    assert len(warm) == 2 and not warm & direct
