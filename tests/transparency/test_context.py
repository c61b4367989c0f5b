"""Context fidelity (issue 12, items 1-5): a warm call made from another context than the one
that started the server sees what a direct run in the caller's context sees -- the time
zone, the interpreter's start-up settings, the interpreter itself, preloaded libraries, the
sandbox (namespaces, NoNewPrivs, capabilities, cgroup) -- and a server started by a restricted
caller does not restrict later ones.  Each test: direct vs warm, with the server started
(by the warm-up call) from the probe's base environment, under pipes and a pty, on the
newest Python and 3.11 (see docs/transparency.md, "Context")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from harness import PYTHON, kill_processes, scaled, wait_for

from .probes import INTERPRETERS, PYTHONS, Probe, ProbeFactory, Run

pytestmark = pytest.mark.timeout(180)

IOS = ("pipe", "pty")


def _json(run: Run) -> object:
    """The JSON object a probe printed (under a pty: the transcript's last line)."""
    assert run.status == "exit 0", run
    line = run.out.replace(b"\r\n", b"\n").strip().splitlines()[-1]
    return json.loads(line)


def _same(probe: Probe, io: str, env: dict[str, str] | None = None,
          wrap: tuple[str, ...] = ()) -> object:
    """Run ``probe`` directly and warm (``wrap``: a command it is run under, such as
    ``unshare -n``); assert both saw the same; return it."""
    outs = {}
    for how in ("direct", "warm"):
        probe.prepare(how)
        if wrap:
            original = probe.command
            probe.command = lambda how, *a, _o=original: [*wrap, *_o(how, *a)]  # type: ignore[method-assign]
            try:
                outs[how] = _json(probe.run(how, io=io, env=env))
            finally:
                probe.command = original  # type: ignore[method-assign]
        else:
            outs[how] = _json(probe.run(how, io=io, env=env))
    assert outs["warm"] == outs["direct"], f"direct {outs['direct']} != warm {outs['warm']}"
    return outs["direct"]


# ---------------------------------------------------------------- 1. time zone

TIMEZONE = r'''
import datetime, json, time
print(json.dumps({"strftime": time.strftime("%Z %z", time.localtime(0)),
                  "tzname": list(time.tzname), "timezone": time.timezone,
                  "astimezone": datetime.datetime.fromtimestamp(0).astimezone().isoformat()}))
'''


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("python", PYTHONS)
def test_time_zone_follows_the_caller(make_probe: ProbeFactory, probe_env: dict[str, str],
                                      python: str, io: str) -> None:
    """Server started with TZ unset; ``TZ=JST-9 script`` sees JST, as directly; and a
    later call without TZ sees the server's zone again."""
    probe = make_probe(TIMEZONE, python=INTERPRETERS[python])
    base = {k: v for k, v in probe_env.items() if k != "TZ"}
    probe.env = base
    seen = _same(probe, io, env={**base, "TZ": "JST-9"})
    assert seen["strftime"] == "JST +0900"  # type: ignore[index]
    again = _same(probe, io, env=base)
    assert again != seen


# ---------------------------------------------------------------- 2. start-up settings

LOCALE = r'''
import json, locale, subprocess
facts = {"utf8_mode": sys.flags.utf8_mode, "fs": sys.getfilesystemencoding(),
         "preferred": locale.getpreferredencoding(False), "stdout": sys.stdout.encoding}
path = os.path.join(os.environ["PROBE_DIR"], "utf8.txt")
with open(path, "w") as f:
    f.write("h\u00e9llo \u2603\n")
with open(path) as f:
    facts["read"] = f.read()
facts["subprocess"] = subprocess.run(["echo", "\u00e9"], capture_output=True,
                                     text=True).stdout
print(json.dumps(facts))
'''


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("setting", ["LC_ALL=C", "LC_ALL=POSIX", "LANG=C"])
def test_c_locale_gets_utf8_mode(make_probe: ProbeFactory, probe_env: dict[str, str],
                                 tmp_path: Path, setting: str, python: str, io: str) -> None:
    """Server started under C.UTF-8; ``LC_ALL=C script``: UTF-8 mode, as directly (open()
    of UTF-8 text, writing it, subprocess text=True all work); ``LANG=C``: coerced."""
    probe = make_probe(LOCALE, python=INTERPRETERS[python])
    probe.env = {**probe_env, "PROBE_DIR": str(tmp_path)}
    name, _, value = setting.partition("=")
    seen = _same(probe, io, env={**probe.env, name: value})
    assert seen["utf8_mode"] == 1 and seen["read"] == "h\u00e9llo \u2603\n"  # type: ignore[index]


STARTUP = r'''
import json, warnings
try:
    import context_probe_mod
    found = context_probe_mod.__file__
except ImportError:
    found = None
seeded = "PYTHONHASHSEED" in os.environ
print(json.dumps({"hash": hash("some text") if seeded else None, "flags": repr(sys.flags),
                  "module": found,
                  "debug": __debug__, "warnings": [str(f) for f in warnings.filters[:1]],
                  "int_max_str_digits": sys.get_int_max_str_digits()}))
'''

STARTUP_VARIANTS = {
    "hashseed": {"PYTHONHASHSEED": "7"},
    "path": {"PYTHONPATH": "{tmp}/pythonpath"},
    "optimize": {"PYTHONOPTIMIZE": "1"},
    "warnings": {"PYTHONWARNINGS": "error::DeprecationWarning"},
    "devmode": {"PYTHONDEVMODE": "1"},
    "safepath": {"PYTHONSAFEPATH": "1"},
    "bytecode": {"PYTHONDONTWRITEBYTECODE": None},
    "nousersite": {"PYTHONNOUSERSITE": "1"},
    "intmaxstrdigits": {"PYTHONINTMAXSTRDIGITS": "1000"},
    "utf8": {"PYTHONUTF8": "1"},
}


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("variant", sorted(STARTUP_VARIANTS))
def test_start_up_settings_follow_the_caller(make_probe: ProbeFactory,
                                             probe_env: dict[str, str], tmp_path: Path,
                                             variant: str, python: str, io: str) -> None:
    """A PYTHON* setting read once at start-up, set (or unset) for a warm call: the call
    gets a server started with it, and sees what a direct run sees."""
    (tmp_path / "pythonpath").mkdir()
    (tmp_path / "pythonpath" / "context_probe_mod.py").write_text("")
    probe = make_probe(STARTUP, python=INTERPRETERS[python])
    env = dict(probe_env)
    for name, value in STARTUP_VARIANTS[variant].items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value.format(tmp=tmp_path)
    seen = _same(probe, io, env=env)
    assert seen != _same(probe, io)


# ---------------------------------------------------------------- 3. the interpreter

VENV = r'''
import json
print(json.dumps({"prefix": sys.prefix, "executable": sys.executable}))
'''


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("python", PYTHONS)
def test_venv_switch_runs_the_new_interpreter(make_probe: ProbeFactory,
                                              probe_env: dict[str, str], tmp_path: Path,
                                              python: str, io: str) -> None:
    """``#!CLIENT -U,python3``: after a venv (made by ``python``) is put first on PATH, a
    warm call runs the venv's python3, as a direct run does."""
    venv = tmp_path / "venv"
    subprocess.run([INTERPRETERS[python], "-m", "venv", "--without-pip", str(venv)],
                   check=True, timeout=120)
    probe = make_probe(VENV, python="python3")
    old_path = f"{Path(PYTHON).parent}:{probe_env.get('PATH', '/usr/bin:/bin')}"
    probe.env = {**probe_env, "PATH": old_path}
    first = _same(probe, io)
    seen = _same(probe, io, env={**probe.env, "PATH": f"{venv}/bin:{old_path}"})
    assert seen["prefix"] == str(venv) != first["prefix"]  # type: ignore[index]


# ---------------------------------------------------------------- 4. LD_PRELOAD

PRELOADED = r'''
import json
with open("/proc/self/maps") as f:
    libs = sorted({line.split()[-1] for line in f if "libcontextprobe" in line})
print(json.dumps({"preloaded": libs}))
'''


@pytest.mark.skipif(not shutil.which("cc"), reason="needs a C compiler (cc)")
@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("python", PYTHONS)
def test_ld_preload_is_loaded(make_probe: ProbeFactory, probe_env: dict[str, str],
                              tmp_path: Path, python: str, io: str) -> None:
    """``LD_PRELOAD=lib script``: the warm call has the library loaded, as directly."""
    src = tmp_path / "probe.c"
    src.write_text("int context_probe_value(void) { return 42; }\n")
    lib = tmp_path / "libcontextprobe.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True,
                   timeout=120)
    probe = make_probe(PRELOADED, python=INTERPRETERS[python])
    seen = _same(probe, io, env={**probe_env, "LD_PRELOAD": str(lib)})
    assert seen == {"preloaded": [str(lib)]}


# ---------------------------------------------------------------- 5. sandboxes

SANDBOX = r'''
import json, socket
status = {}
with open("/proc/self/status") as f:
    for line in f:
        key, _, value = line.partition(":")
        if key in ("NoNewPrivs", "CapEff", "CapBnd", "CapPrm", "Seccomp", "Groups"):
            status[key] = value.strip()
with open("/proc/self/cgroup") as f:
    cgroup = sorted(line.strip() for line in f)
print(json.dumps({"interfaces": sorted(n for _, n in socket.if_nameindex()),
                  "status": status, "cgroup": cgroup}))
'''


def _can(*cmd: str) -> bool:
    if not shutil.which(cmd[0]):
        return False
    return subprocess.run([*cmd, "true"], capture_output=True, check=False).returncode == 0


SANDBOXES = {
    "unshare-n": ("unshare", "-n"),
    "unshare-rn": ("unshare", "-rn"),
    "no-new-privs": ("setpriv", "--no-new-privs"),
    "no-caps": ("setpriv", "--inh-caps=-all", "--bounding-set=-all"),
    "groups": ("setpriv", "--groups=1,2,3"),
}


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("sandbox", sorted(SANDBOXES))
def test_sandbox_is_kept(make_probe: ProbeFactory, sandbox: str, python: str,
                         io: str) -> None:
    """A call made inside a sandbox (no network, NoNewPrivs, no capabilities, other
    groups) stays in it: the warm call sees what a direct run in it sees."""
    wrap = SANDBOXES[sandbox]
    if not _can(*wrap):
        pytest.skip(f"{' '.join(wrap)} is not permitted here")
    probe = make_probe(SANDBOX, python=INTERPRETERS[python])
    outside = _same(probe, io)
    inside = _same(probe, io, wrap=wrap)
    assert inside != outside


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("sandbox", sorted(SANDBOXES))
def test_sandboxed_server_does_not_sandbox_later_calls(make_probe: ProbeFactory,
                                                       sandbox: str, python: str,
                                                       io: str) -> None:
    """The converse: a server started inside a sandbox (no network, NoNewPrivs, no
    capabilities, other groups) does not pass it on to a later call from outside."""
    wrap = SANDBOXES[sandbox]
    if not _can(*wrap):
        pytest.skip(f"{' '.join(wrap)} is not permitted here")
    probe = make_probe(SANDBOX, python=INTERPRETERS[python])
    rc, out, err = probe.procs.run([*wrap, *probe.command("warm")],
                                   env={**probe.env, "PROBE_WARMUP": "1"})
    assert rc == 0, (out, err)
    probe.warm.add(os.path.realpath(os.getcwd()))
    direct = probe.run("direct", io=io)
    _same(probe, io)
    assert _json(direct)["interfaces"] != ["lo"] or sandbox not in (  # type: ignore[index]
        "unshare-n", "unshare-rn")


RESTRICTED = r'''
import json, resource
print(json.dumps({"nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
                  "nice": os.getpriority(os.PRIO_PROCESS, 0)}))
'''


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("python", PYTHONS)
def test_restricted_server_does_not_restrict_later_calls(make_probe: ProbeFactory,
                                                        python: str, io: str) -> None:
    """A server started by a caller with ``nofile`` 256 and nice 5 (both hard): a later
    call from an unrestricted caller gets its own limits, as directly."""
    probe = make_probe(RESTRICTED, python=INTERPRETERS[python])
    rc, out, err = probe.procs.run(
        ["prlimit", "--nofile=256:256", "nice", "-n", "5", *probe.command("warm")],
        env={**probe.env, "PROBE_WARMUP": "1"})
    assert rc == 0, (out, err)
    probe.warm.add(os.path.realpath(os.getcwd()))
    seen = _same(probe, io)
    assert seen["nofile"][1] > 256 and seen["nice"] == os.getpriority(  # type: ignore[index]
        os.PRIO_PROCESS, 0)


PIDS_CGROUP = Path("/sys/fs/cgroup/pids")


def _pids_cgroup_problem() -> str | None:
    if not PIDS_CGROUP.is_dir():
        return "no cgroup v1 pids hierarchy at /sys/fs/cgroup/pids"
    if not os.access(PIDS_CGROUP, os.W_OK):
        return "/sys/fs/cgroup/pids is not writable"
    return None


@pytest.mark.skipif(_pids_cgroup_problem() is not None,
                    reason=str(_pids_cgroup_problem()))
@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("python", PYTHONS)
def test_pids_cgroup_is_kept(make_probe: ProbeFactory, python: str, io: str) -> None:
    """A call made in a pids cgroup of 8 runs in it (its children count against it)."""
    group = PIDS_CGROUP / f"prefork-test-{os.getpid()}-{python}-{io}"
    try:
        group.mkdir()
    except OSError as e:
        pytest.skip(f"cannot create a pids cgroup: {e}")
    try:
        (group / "pids.max").write_text("8\n")
        probe = make_probe(SANDBOX, python=INTERPRETERS[python])
        outside = _same(probe, io)
        wrap = ("sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh")
        inside = _same(probe, io, wrap=wrap)
        assert inside != outside
        assert any(line.endswith(f":pids:/{group.name}")
                   for line in inside["cgroup"])  # type: ignore[index]
    finally:
        # Only this test's processes are in the group: the servers it started there.
        kill_processes(int(p) for p in (group / "cgroup.procs").read_text().split())
        wait_for(lambda: not (group / "cgroup.procs").read_text().strip(), scaled(10),
                 "the test's cgroup to empty")
        group.rmdir()
