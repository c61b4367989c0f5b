"""``prefork-ctl`` run in the test's own process (typer's ``CliRunner``), for the tests of
its commands; one real run of the installed command is in each test file besides."""

from __future__ import annotations

import json
from typing import Any

from typer.testing import CliRunner

from prefork.ctl.main import app


def ctl(*args: str) -> Any:
    """Run prefork-ctl in this process; returns typer's Result."""
    return CliRunner().invoke(app, list(args))


def ctl_json(*args: str) -> list[dict[str, Any]]:
    """Run ``prefork-ctl ARGS --json``, which must succeed; its parsed output."""
    result = ctl(*args, "--json")
    assert result.exit_code == 0, result.output
    data: list[dict[str, Any]] = json.loads(result.stdout)
    return data
