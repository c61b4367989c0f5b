"""Fixtures of the differential transparency probes (the helpers are in ``probes.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import PYTHON, ProcRegistry

from .probes import Probe, ProbeFactory, base_env, write_probe


@pytest.fixture
def probe_env(env: dict[str, str]) -> dict[str, str]:
    """The base environment of every run (see ``base_env``)."""
    return base_env(env)


@pytest.fixture
def make_probe(tmp_path: Path, probe_env: dict[str, str], procs: ProcRegistry
               ) -> Iterator[ProbeFactory]:
    """``make_probe(body, pre="", init="", python=PYTHON, name="probe.py",
    python_args=()) -> Probe``."""
    def factory(body: str, pre: str = "", init: str = "", python: str = str(PYTHON),
                name: str = "probe.py", python_args: tuple[str, ...] = ()) -> Probe:
        path = write_probe(tmp_path, name, body, python, pre, init, python_args)
        return Probe(path, python, probe_env, procs, python_args)

    yield factory
