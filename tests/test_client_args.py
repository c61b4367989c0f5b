"""The client's command line: the reference's three usage forms, and what we fix."""

from __future__ import annotations

import subprocess

import pytest
from harness import CLIENT

from prefork.client.main import ClientError, parse_args


def test_separate_words() -> None:
    o = parse_args(["pi", "-U", "-E", "HOME", "-G", "x", "python3", "s.py", "a", "-b"])
    assert (o.mode, o.interp, o.script, o.args) == ("U", "python3", "s.py", ["a", "-b"])
    assert o.ident_opts == [("E", b"HOME"), ("G", b"x")]
    assert o.interp_args == []


def test_combined_shebang_form_keeps_interpreter_args() -> None:
    o = parse_args(["pi", "-U,python3,-X,dev", "./s.py", "arg 1"])
    assert (o.interp, o.interp_args, o.script, o.args) == (
        "python3", ["-X", "dev"], "./s.py", ["arg 1"])


def test_space_form() -> None:
    o = parse_args(["pi", "-U -f python3 -u", "s.py"])
    assert (o.interp, o.interp_args, o.force, o.script) == ("python3", ["-u"], True, "s.py")


def test_attached_option_values_and_clusters() -> None:
    o = parse_args(["pi", "-fU", "-EVAR", "-gmyident", "perl"])
    assert o.force and o.mode == "U" and o.ident == "myident"
    assert o.ident_opts == [("E", b"VAR")] and o.script is None


def test_combined_form_options_before_interpreter() -> None:
    o = parse_args(["pi", "-U,-E,LANG,-G,v2,--any-cwd,python3", "s.py"])
    assert o.ident_opts == [("E", b"LANG"), ("G", b"v2")] and o.any_cwd
    assert o.interp == "python3" and o.interp_args == []


@pytest.mark.parametrize("argv, what", [
    (["pi", "python3", "s.py"], "-U"),
    (["pi", "-U"], "no interpreter"),
    (["pi", "-U", "-Q", "python3"], "unknown option -Q"),
    (["pi", "-U", "--bogus", "python3"], "unknown option --bogus"),
    (["pi", "-U", "-E"], "needs an argument"),
    (["pi", "-U,python3"], "no script"),
])
def test_usage_errors(argv: list[str], what: str) -> None:
    with pytest.raises(ClientError, match=what):
        parse_args(argv)


def test_usage_error_exit_status_and_message() -> None:
    r = subprocess.run([str(CLIENT), "python3"], capture_output=True, timeout=30, check=False)
    assert r.returncode == 127
    assert r.stderr.startswith(b"prefork-interp: ") and b"-U" in r.stderr


def test_help_and_version() -> None:
    r = subprocess.run([str(CLIENT), "--help"], capture_output=True, timeout=30, check=False)
    assert r.returncode == 0 and b"usage:" in r.stdout
    r = subprocess.run([str(CLIENT), "--version"], capture_output=True, timeout=30, check=False)
    assert r.returncode == 0 and r.stdout.startswith(b"prefork-interp (Python) ")
