"""``prefork-ctl doctor``: what makes calls slow or fail on this machine, and what to do.

Each check reads (it changes nothing) and gives a ``Finding``: ``ok``, ``info``, ``warn``
(calls are slower than they could be, or something may fail later) or ``fail`` (calls fail
now), with what was found and what to do.  Checks: the client launcher(s) in use, the
Python the launcher and the servers run on (before 3.12 an executor's exit tears down the
whole inherited heap), the run directory and its ancestors, where servers log, inotify
limits against what is in use, and the reference binaries for interop.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from dataclasses import asdict, dataclass

from prefork.client.launcher import ENTRY_LINE, FAST_MARK, why_not_fast
from prefork.common import paths
from prefork.common.ident import RunDirError

OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"
LEVELS = (OK, INFO, WARN, FAIL)
REFERENCE_CLIENT = "/usr/bin/prefork-interp"
REFERENCE_PERL = "/usr/share/perl5/Proc/Prefork/Interp.pm"
_INOTIFY = "/proc/sys/fs/inotify"
_INOTIFY_SHARE = 0.8  # warn when this share of the per-user inotify limit is in use
_FAST_EXIT_PYTHON = (3, 12)


@dataclass(frozen=True)
class Finding:
    """One check's result."""

    check: str
    level: str
    found: str
    advice: str = ""

    def to_dict(self) -> dict[str, str]:
        """A JSON-ready view."""
        return asdict(self)


# --------------------------------------------------------------------------- launcher


def _head(path: str, size: int = 4096) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def _python_version(python: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([python, "-IS", "-c",
                              "import sys; print(*sys.version_info[:3])"],
                             capture_output=True, text=True, timeout=20, check=False,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    try:
        return tuple(int(x) for x in out.stdout.split())
    except ValueError:
        return None


def _version_text(v: tuple[int, ...] | None) -> str:
    return "unknown version" if not v else "Python " + ".".join(map(str, v))


def client_launchers() -> list[str]:
    """The ``prefork-interp`` clients worth checking: the one beside this Python (its venv
    or prefix), then the one on PATH, real paths, each once."""
    found = []
    for cand in (os.path.join(os.path.dirname(sys.executable), "prefork-interp"),
                 shutil.which("prefork-interp")):
        if cand and os.access(cand, os.X_OK):
            found.append(os.path.realpath(cand))
    return list(dict.fromkeys(found))


def check_launcher(path: str) -> list[Finding]:
    """What kind of launcher ``path`` is, and the Python it starts."""
    name = f"client {path}"
    try:
        head = _head(path)
    except OSError as e:
        return [Finding(name, FAIL, f"cannot read it: {e.strerror}", "reinstall prefork-interp")]
    if head.startswith(b"\x7fELF"):
        return [Finding(name, INFO, "a compiled client (the reference C client?)",
                        "its calls speak protocol v1 without our extension x1")]
    text = head.decode("utf-8", "replace")
    first = text.split("\n", 1)[0]
    words = first[2:].split() if first.startswith("#!") else []
    out = []
    if FAST_MARK in text:
        out.append(Finding(name, OK, f"fast launcher ({first[2:].strip()}: no site)"))
    elif ENTRY_LINE in text:
        why = why_not_fast(path)
        out.append(Finding(
            name, WARN, "pip's console script, not yet made the fast launcher "
            f"({why or 'its next call will do it'}): about 8 ms more per call",
            "run it once (any call) as its owner with PYTHONPATH unset" if why is None
            or "PYTHONPATH" in why else "reinstall it where you can write, e.g. in a venv "
            "or with pipx; or run tools/make_launcher.py --venv VENV"))
    elif "prefork.client.main" in text and words and "-IS" not in words[1:] \
            and "-S" not in words[1:]:
        out.append(Finding(name, WARN, "a launcher that runs Python's site (slow: about "
                           "8 ms more per call)",
                           "reinstall with pip (its first call makes it fast) or run "
                           "tools/make_launcher.py --venv VENV"))
    elif first.startswith("#!") and "bash" in first:
        out.append(Finding(name, INFO, "the source tree's development launcher (bin/)",
                           "an installed client (make venv, pip install) starts faster"))
    else:
        out.append(Finding(name, INFO, f"a launcher of another kind ({first[:80]!r})"))
    if words and words[0].startswith("/") and "python" in os.path.basename(words[0]):
        v = _python_version(words[0])
        if v is None:
            out.append(Finding(name, FAIL, f"its interpreter {words[0]} does not run",
                               "reinstall prefork-interp (or run tools/make_launcher.py)"))
        elif v < (3, 11):
            out.append(Finding(name, FAIL, f"its interpreter {words[0]} is "
                               f"{_version_text(v)}: the client needs 3.11 or later",
                               "reinstall prefork-interp with a newer Python"))
        else:
            out.append(Finding(name, INFO, f"it runs on {words[0]} ({_version_text(v)})"))
    return out


def check_python() -> Finding:
    """The Python of this installation (the servers' usual one): < 3.12 exits slowly."""
    v = sys.version_info[:3]
    text = f"{sys.executable} is {_version_text(v)}"
    if v < _FAST_EXIT_PYTHON:
        return Finding("python", WARN, text + ": before 3.12 there is no fast executor exit "
                       "(each call's exit tears down the heap it inherited)",
                       "run scripts with Python >= 3.12 (-U,/path/to/python3.12)")
    return Finding("python", OK, text + " (fast executor exit available)")


# --------------------------------------------------------------------------- run directory


def _ancestor_problem(path: str, st: os.stat_result) -> str | None:
    uid = os.getuid()
    if st.st_uid not in (0, uid):
        return f"{path} belongs to uid {st.st_uid}"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}, no sticky bit)"
    return None


def check_run_dir(run_dir: str | None) -> list[Finding]:
    """The run directory: usable, private, its ancestors safe, not crowded."""
    out = []
    try:
        if run_dir is None:
            base, reason = paths.run_base_with_reason()
        else:
            base, reason = os.path.abspath(run_dir), None
            paths.check_run_dir(base)
    except RunDirError as e:
        return [Finding("run directory", FAIL, str(e),
                        "fix its owner and mode (0700), or set PREFORK_INTERP_RUNDIR to a "
                        "private directory")]
    out.append(Finding("run directory", OK, f"{base} (private, ours)"))
    if reason is not None:
        out.append(Finding("run directory", WARN, f"{reason}; using {base} instead",
                           "the C client still uses /var/run/user/UID: fix that directory "
                           "so that both clients share servers"))
    path = base
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
        try:
            problem = _ancestor_problem(path, os.stat(path))
        except OSError as e:
            problem = f"{path}: {e.strerror}"
        if problem is not None:
            out.append(Finding("run directory", WARN, f"ancestor {problem}: someone else "
                               "could replace the run directory",
                               "use a run directory whose ancestors only root and you can "
                               "change (PREFORK_INTERP_RUNDIR)"))
    try:
        names = os.listdir(base)
    except OSError:
        names = []
    sockets = sum(1 for n in names if n.startswith("s"))
    if sockets >= paths.MAX_SOCKETS:
        out.append(Finding("run directory", WARN, f"{sockets} sockets: every server start "
                           f"cleans the oldest beyond {paths.MAX_SOCKETS}",
                           "prefork-ctl clean; prefork-ctl kill IDENT for servers not needed"))
    return out


# --------------------------------------------------------------------------- logs, inotify


def check_logging() -> Finding:
    """Where our servers log by default."""
    if os.path.exists("/dev/log"):
        if shutil.which("journalctl"):
            return Finding("logging", OK, "servers log to syslog (/dev/log); prefork-ctl "
                           "logs reads them with journalctl")
        return Finding("logging", INFO, "servers log to syslog (/dev/log), and there is no "
                       "journalctl: prefork-ctl logs cannot show them",
                       "look for 'prefork-interp' in the system log, or pass log=\"file\" to "
                       "initialisation_complete()")
    return Finding("logging", OK, "no /dev/log: our servers log to p<IDENT>.log in the run "
                   "directory (the Perl side's syslog lines are lost)")


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def inotify_in_use() -> int:
    """How many inotify instances this user's processes hold."""
    uid = os.getuid()
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
                    count += 1
            except OSError:
                pass
    return count


def check_inotify() -> Finding:
    """Each server (autoreload) and each watcher takes an inotify instance."""
    limit = _read_int(f"{_INOTIFY}/max_user_instances")
    watches = _read_int(f"{_INOTIFY}/max_user_watches")
    used = inotify_in_use()
    if limit is None:
        return Finding("inotify", WARN, "no inotify here: the watcher and autoreload cannot "
                       "work", "use a Linux kernel with inotify")
    text = f"{used} of {limit} instances in use by you; {watches} watches allowed"
    if used >= limit * _INOTIFY_SHARE:
        return Finding("inotify", WARN, text + ": new servers may fail to start (each "
                       "server and watcher takes one)",
                       f"raise fs.inotify.max_user_instances (sysctl; now {limit}), or "
                       "prefork-ctl kill servers not needed")
    return Finding("inotify", OK, text)


def check_reference() -> Finding:
    """The reference implementation (chiark-utils), for interop and the tests."""
    have = [p for p in (REFERENCE_CLIENT, REFERENCE_PERL) if os.path.exists(p)]
    if len(have) == 2:
        return Finding("reference", OK, f"{REFERENCE_CLIENT} and {REFERENCE_PERL} installed")
    missing = sorted({REFERENCE_CLIENT, REFERENCE_PERL} - set(have))
    return Finding("reference", INFO, f"missing {', '.join(missing)}: only needed for "
                   "interop with the reference (and by make test)",
                   "apt-get install chiark-utils-bin chiark-scripts (make deps)")


def run_checks(run_dir: str | None) -> list[Finding]:
    """Every check, in order."""
    findings: list[Finding] = []
    launchers = client_launchers()
    if not launchers:
        findings.append(Finding("client", FAIL, "no prefork-interp beside this Python nor "
                                "on PATH", "install prefork-interp (pip install, make venv)"))
    for path in launchers:
        findings += check_launcher(path)
    findings.append(check_python())
    findings += check_run_dir(run_dir)
    findings.append(check_logging())
    findings.append(check_inotify())
    findings.append(check_reference())
    return findings
