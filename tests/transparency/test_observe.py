"""What a script sees of its process: argv, environment, cwd, umask, stdio objects, locale,
signal dispositions, open fds -- equal directly, cold and warm, under pipes and under a pty."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from .probes import PY311, ProbeFactory, Run, needs_py311

pytestmark = pytest.mark.timeout(120)

#: Prints everything the process-level probes compare, as one JSON object.
OBSERVE = r'''
import json, locale, signal, io

def stream(s):
    if s is None:
        return None
    raw = getattr(s.buffer, "raw", s.buffer)
    return {
        "repr": repr(s), "isatty": s.isatty(), "line_buffering": s.line_buffering,
        "write_through": s.write_through, "encoding": s.encoding, "errors": s.errors,
        "newlines": s.newlines, "name": s.name, "mode": s.mode, "fileno": s.fileno(),
        "buffer": type(s.buffer).__name__, "raw": type(raw).__name__,
        "raw_name": raw.name, "closefd": raw.closefd, "buffer_mode": s.buffer.mode,
    }

def disposition(sig):
    h = signal.getsignal(sig)
    names = {signal.SIG_DFL: "SIG_DFL", signal.SIG_IGN: "SIG_IGN", None: "None",
             signal.default_int_handler: "default_int_handler"}
    return names.get(h, repr(h))

def cwd():
    try:
        return os.getcwd()
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror}"

fds = sorted(int(n) for n in os.listdir("/proc/self/fd"))
obs = {
    "argv": sys.argv, "orig_argv": sys.orig_argv, "executable": sys.executable,
    "environ": dict(os.environ), "cwd": cwd(), "umask": oct(os.umask(0o22)),
    "stdin": stream(sys.stdin), "stdout": stream(sys.stdout), "stderr": stream(sys.stderr),
    "dunder_stdio": [sys.stdin is sys.__stdin__, sys.stdout is sys.__stdout__,
                     sys.stderr is sys.__stderr__],
    "ctype": locale.setlocale(locale.LC_CTYPE), "getencoding": locale.getencoding(),
    "preferred": locale.getpreferredencoding(False), "flags": repr(sys.flags),
    "fsencoding": [sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()],
    "signals": {s.name: disposition(s) for s in signal.Signals
                if s not in (signal.SIGKILL, signal.SIGSTOP)},
    "sigmask": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
    "fds": fds[:-1],
    "path0": sys.path[1], "file": __file__, "name": __name__, "spec": repr(__spec__),
    "main_thread": __import__("threading").current_thread().name,
    "terminal_size": tuple(os.get_terminal_size(1)) if os.isatty(1) else None,
    "ttyname": os.ttyname(0).startswith("/dev/pts/") if os.isatty(0) else None,
    "rlimits": {n: __import__("resource").getrlimit(getattr(__import__("resource"), n))
                for n in dir(__import__("resource")) if n.startswith("RLIMIT_")},
    "nice": os.getpriority(os.PRIO_PROCESS, 0),
    "affinity": sorted(os.sched_getaffinity(0)),
}
print(json.dumps(obs, sort_keys=True))
'''


def observe(probe_run: Run) -> dict[str, Any]:
    """The observation of a pipe run (its stderr must be empty)."""
    assert probe_run.status == "exit 0" and probe_run.err == b"", probe_run
    return dict(probe_run.json())


def observe_pty(probe_run: Run) -> dict[str, Any]:
    """The observation of a pty run (the transcript is the JSON line)."""
    assert probe_run.status == "exit 0", probe_run
    return dict(probe_run.json())


#: What the interpreter fixed at its start-up from the environment (sys.flags, UTF-8 mode and
#: what follows from it): in a warm call these are the server's (see test_differences.py).
START_KEYS = frozenset({"flags", "fsencoding", "preferred"})


def assert_same(want: dict[str, Any], got: dict[str, Any], how: str,
                skip: frozenset[str] = frozenset()) -> None:
    """Key-by-key comparison (but ``skip``), so a failure names what differs."""
    diff = {k: (want.get(k), got.get(k)) for k in sorted((set(want) | set(got)) - skip)
            if want.get(k) != got.get(k)}
    assert not diff, f"{how} run differs from the direct run: {diff}"


ARGS = ("a b", "", "--flag", "é", "-")


@pytest.mark.parametrize("how", ["cold", "warm"])
@pytest.mark.parametrize("io", ["pipe", "pty"])
def test_process_view(make_probe: ProbeFactory, how: str, io: str) -> None:
    probe = make_probe(OBSERVE)
    check = observe if io == "pipe" else observe_pty
    want = check(probe.run("direct", *ARGS, io=io))
    got = check(probe.run(how, *ARGS, io=io))
    assert want["stdout"]["isatty"] is (io == "pty")
    assert_same(want, got, how)


ENV_VARIANTS: dict[str, dict[str, str | None]] = {
    "unbuffered": {"PYTHONUNBUFFERED": "1"},
    "ioencoding-latin1": {"PYTHONIOENCODING": "latin-1"},
    "ioencoding-errors": {"PYTHONIOENCODING": "utf-8:replace"},
    "ioencoding-only-errors": {"PYTHONIOENCODING": ":namereplace"},
    "ioencoding-ascii-strict": {"PYTHONIOENCODING": "ascii:strict"},
    "lang-C": {"LANG": "C"},
    "lang-POSIX": {"LANG": "POSIX"},
    "lc-all-C": {"LC_ALL": "C"},
    "lc-ctype-C-utf8": {"LANG": "C", "LC_CTYPE": "C.utf8"},
    "lang-unset": {"LANG": None},
    "no-coercion": {"LANG": "C", "PYTHONCOERCECLOCALE": "0"},
    "utf8-mode-off": {"LANG": "C", "PYTHONUTF8": "0"},
    "unknown-locale": {"LANG": "xx_YY.UTF-8"},
}


def _variant(base: dict[str, str], changes: dict[str, str | None]) -> dict[str, str]:
    env = dict(base)
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


@pytest.mark.parametrize("how", ["cold", "warm"])
@pytest.mark.parametrize("variant", sorted(ENV_VARIANTS))
@pytest.mark.parametrize("io", ["pipe", "pty"])
def test_stdio_and_locale_follow_the_callers_environment(
        make_probe: ProbeFactory, probe_env: dict[str, str], how: str, variant: str,
        io: str) -> None:
    """The warm server was started from the base environment (LANG=C.UTF-8, buffered): the
    call's own PYTHONIOENCODING / PYTHONUNBUFFERED / locale must still rule its stdio and
    LC_CTYPE (C-locale coercion included).  A cold call's server started from the call's
    environment, so there even sys.flags and UTF-8 mode match."""
    probe = make_probe(OBSERVE)
    env = _variant(probe_env, ENV_VARIANTS[variant])
    check = observe if io == "pipe" else observe_pty
    want = check(probe.run("direct", io=io, env=env))
    got = check(probe.run(how, io=io, env=env))
    assert_same(want, got, how, START_KEYS if how == "warm" else frozenset())


STDIO_BYTES = r'''
data = sys.stdin.buffer.read()
sys.stdout.write("text line é\n")
sys.stdout.buffer.write(b"raw \xff\x00 bytes\n")
sys.stderr.write("to stderr \u2603\n")
print(len(data), data[:5], file=sys.stderr)
sys.stdout.write("no newline at the end, never flushed explicitly")
os.write(2, b"fd 2 directly\n")
'''


@pytest.mark.parametrize("how", ["cold", "warm"])
def test_stdio_bytes(make_probe: ProbeFactory, how: str) -> None:
    probe = make_probe(STDIO_BYTES)
    data = bytes(range(256)) * 300
    want = probe.run("direct", input=data)
    assert want.out.endswith(b"never flushed explicitly")
    assert probe.run(how, input=data) == want


STDIN_TEXT = r'''
try:
    lines = sys.stdin.readlines()
    print(repr(lines))
except UnicodeDecodeError as e:
    print("UnicodeDecodeError", e.start, e.reason)
print(ascii("\udcff"), file=sys.stderr)
try:
    print("surrogate: \udcff")
except UnicodeEncodeError as e:
    print("UnicodeEncodeError", e.reason, file=sys.stderr)
'''


@pytest.mark.parametrize("how", ["cold", "warm"])
@pytest.mark.parametrize("lang", ["C", "C.UTF-8"])
def test_stdin_text_decoding(make_probe: ProbeFactory, probe_env: dict[str, str], how: str,
                             lang: str) -> None:
    """Invalid UTF-8 on stdin and lone surrogates on stdout: the error handlers match."""
    probe = make_probe(STDIN_TEXT)
    env = {**probe_env, "LANG": lang}
    probe.differential(input=b"ok\n\xff\xfe bad\r\nlast", env=env, hows=(how,))


@pytest.mark.parametrize("how", ["cold", "warm"])
def test_umask(make_probe: ProbeFactory, tmp_path: Path, how: str) -> None:
    probe = make_probe(r'''
        open(sys.argv[1], "w").close()
        print(oct(os.stat(sys.argv[1]).st_mode & 0o777), oct(os.umask(0)))
    ''')
    for mask in (0o027, 0o000, 0o077):
        target = tmp_path / f"f{mask:o}-{how}"
        want = probe.run("direct", str(target) + "-d", umask=mask)
        got = probe.run(how, str(target), umask=mask)
        assert got == want and want.status == "exit 0", (mask, want, got)


CWD = r'''
import json
try:
    cwd = os.getcwd()
except OSError as e:
    cwd = f"{type(e).__name__}: {e.strerror}"
try:
    listing = sorted(os.listdir("."))
except OSError as e:
    listing = f"{type(e).__name__}: {e.strerror}"
rel = None
try:
    with open("marker") as f:
        rel = f.read()
except OSError as e:
    rel = f"{type(e).__name__}: {e.strerror}"
print(json.dumps({"cwd": cwd, "PWD": os.environ.get("PWD"), "listing": listing, "rel": rel,
                  "links": os.stat(".").st_nlink}))
'''


@pytest.mark.parametrize("how", ["cold", "warm"])
def test_symlinked_cwd(make_probe: ProbeFactory, probe_env: dict[str, str], tmp_path: Path,
                       how: str) -> None:
    """In a directory reached through a symlink: getcwd() is the real path, $PWD the logical
    one, and relative paths resolve in that directory (not the server's)."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "marker").write_text("here")
    link = tmp_path / "link"
    link.symlink_to(real)
    env = {**probe_env, "PWD": str(link)}
    probe = make_probe(CWD)
    want = probe.differential(cwd=link, env=env, hows=(how,)).json()
    assert want["cwd"] == str(real) and want["PWD"] == str(link) and want["rel"] == "here"


@pytest.mark.parametrize("how", ["cold", "warm"])
def test_deleted_cwd(make_probe: ProbeFactory, probe_env: dict[str, str], tmp_path: Path,
                     how: str) -> None:
    """In a directory that was removed: getcwd() fails the same way, "." still works."""
    probe = make_probe(CWD)
    # A shell enters the directory, (for a warm run) makes the call that starts the server
    # there, removes the directory, then runs the probe from it.
    shell = ('cd "$1" || exit 99; d=$1; warm=$2; shift 2; '
             'if [ "$warm" = 1 ]; then PROBE_WARMUP=1 "$@" || exit 98; fi; '
             'rmdir "$d" && exec "$@"')
    results = {}
    for mode in ("direct", how):
        gone = tmp_path / f"gone-{mode}"
        gone.mkdir()
        rc, out, err = probe.procs.run(
            ["sh", "-c", shell, "sh", str(gone), str(int(mode == "warm")),
             *probe.command(mode)], env={**probe_env, "PWD": str(gone)})
        results[mode] = (rc, out.replace(os.fsencode(gone), b"GONE"), err)
    assert results[how] == results["direct"]
    assert b"FileNotFoundError" in results["direct"][1]


@pytest.mark.parametrize("how", ["cold", "warm"])
@pytest.mark.parametrize("python_args", [("-u",), ("-X", "dev", "-Bu"), ("-I",), ("-E",),
                                         ("-X", "utf8")], ids=" ".join)
def test_interpreter_options(make_probe: ProbeFactory, probe_env: dict[str, str], how: str,
                             python_args: tuple[str, ...]) -> None:
    """Options on the #! line after the interpreter: sys.orig_argv, sys.flags and unbuffered
    stdio (-u) as in a direct run, whatever the call's environment says."""
    probe = make_probe(OBSERVE, python_args=python_args)
    env = {**probe_env, "PYTHONIOENCODING": "latin-1", "PYTHONUNBUFFERED": ""}
    want = observe(probe.run("direct", *ARGS, env=env))
    assert want["orig_argv"][1:1 + len(python_args)] == list(python_args)
    assert_same(want, observe(probe.run(how, *ARGS, env=env)), how)


CALLER_SETUPS = {
    "ignored-signals": "trap '' INT HUP QUIT USR2 TERM",
    "rlimits": "ulimit -n 123 && ulimit -S -c 0 && ulimit -S -s 4096 && ulimit -S -v 8000000",
    "nice": "renice -n 7 -p $$ >/dev/null",
    "affinity": "taskset -p -c 0 $$ >/dev/null",
    "all": "trap '' HUP; ulimit -n 99 && renice -n 3 -p $$ >/dev/null",
}


@pytest.mark.parametrize("how", ["cold", "warm"])
@pytest.mark.parametrize("setup", sorted(CALLER_SETUPS))
def test_what_the_caller_passes_on(make_probe: ProbeFactory, probe_env: dict[str, str],
                                   how: str, setup: str) -> None:
    """Attributes a program inherits from its caller across exec: ignored signals (nohup, a
    shell's ``trap ''``, background jobs), resource limits (ulimit), nice value, CPU
    affinity.  The executor takes them from the client, which has them from the caller."""
    probe = make_probe(OBSERVE)
    results = {}
    for mode in ("direct", how):
        probe.prepare(mode)
        rc, out, err = probe.procs.run(
            ["bash", "-c", CALLER_SETUPS[setup] + '; exec "$@"', "bash", *probe.command(mode)],
            env=probe_env)
        assert (rc, err) == (0, b""), (mode, err)
        results[mode] = json.loads(out)
    assert_same(results["direct"], results[how], how)


@pytest.mark.parametrize("how", ["cold", "warm"])
def test_blocked_signals_pass_on(make_probe: ProbeFactory, probe_env: dict[str, str],
                                 how: str) -> None:
    """A caller's blocked signal mask survives exec: the script starts with it."""
    probe = make_probe(OBSERVE)
    results = {}
    for mode in ("direct", how):
        probe.prepare(mode)
        rc, out, err = probe.procs.run(
            probe.command(mode), env=probe_env,
            preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2,
                                                                         signal.SIGWINCH]))
        assert (rc, err) == (0, b""), (mode, err)
        results[mode] = json.loads(out)
    assert results["direct"]["sigmask"] == [signal.SIGUSR2, signal.SIGWINCH]
    assert_same(results["direct"], results[how], how)


@needs_py311
def test_py311_process_view(make_probe: ProbeFactory) -> None:
    """The 3.11 interpreter (no fast exit): the same view of the process."""
    probe = make_probe(OBSERVE, python=PY311)
    want = observe(probe.run("direct", *ARGS))
    for how in ("cold", "warm"):
        assert_same(want, observe(probe.run(how, *ARGS)), how)
