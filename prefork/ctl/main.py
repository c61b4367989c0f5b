"""prefork-ctl: see, inspect and stop prefork-interp servers, and read their logs.

A typer app over ``prefork.ctl.discover`` (what runs, from kernel facts), ``render`` (tables,
trees, JSON) and ``actions`` (kill, clean, logs). Works for servers started by our client or
the reference C client, running our Python script side or the reference Perl one.

Exit statuses: 0 done; 1 nothing matched / nothing to do / an error (one line
``prefork-ctl: ...`` on stderr); 2 usage.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from prefork import __version__
from prefork.common.ident import RunDirError
from prefork.ctl import actions, discover, render

TYPE_CHECKING = False
if TYPE_CHECKING:
    from prefork.ctl.discover import Entry

PROG = "prefork-ctl"
EXIT_NOT_FOUND = 1
PROGRESS_AFTER = 1.0  # seconds: lookups shorter than this show no progress
_WIDE = 200  # columns for tables when stdout is not a terminal (rich would assume 80)

app = typer.Typer(
    name=PROG,
    help="See, inspect and stop prefork-interp servers, and read their logs.\n\n"
         "Servers are found from kernel facts (who listens on each s<IDENT> socket of the run "
         "directory, its children, the watcher holding the other ends of its pipes), for "
         "servers started by this package's client or the reference C client, with the Python "
         "or the Perl script side. IDENT arguments take any unique prefix of an ident; SCRIPT "
         "arguments a script path or file name.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# --------------------------------------------------------------------------- shared bits


def _version(value: bool) -> None:
    if value:
        typer.echo(f"{PROG} {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True,
        help="Show the version and exit.")] = False,
) -> None:
    """See, inspect and stop prefork-interp servers, and read their logs."""


def _complete_target(incomplete: str) -> list[str]:
    """Shell completion for IDENT|SCRIPT: idents and script names of the default run dir."""
    try:
        entries = discover.scan(discover.resolve_run_dir(None))
    except (RunDirError, OSError):
        return []
    words = {e.ident[:12] for e in entries}
    words |= {os.path.basename(e.script) for e in entries if e.script}
    return sorted(w for w in words if w.startswith(incomplete))


RunDirOpt = Annotated[str | None, typer.Option(
    "--run-dir", metavar="DIR", show_default=False,
    help="Run directory to look in (default: $PREFORK_INTERP_RUNDIR, else the per-user one "
         "the clients use; the C client always uses the per-user one).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
TargetArg = Annotated[str, typer.Argument(
    metavar="IDENT|SCRIPT", autocompletion=_complete_target, show_default=False,
    help="A unique prefix of an ident, or a script (path or file name).")]


def _fail(message: str, code: int = EXIT_NOT_FOUND) -> typer.Exit:
    """Say ``prefork-ctl: message`` on stderr; the caller raises the returned Exit."""
    typer.echo(f"{PROG}: {message}", err=True)
    return typer.Exit(code)


def _console(*, stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr); wide when not a terminal, so that piped tables
    are not folded to 80 columns. Rich honours NO_COLOR and FORCE_COLOR."""
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, width=_WIDE)
    return console


class _LazyProgress:
    """A progress bar on stderr that appears only once a lookup has taken over a second
    (and only on a terminal): quick lookups print nothing extra."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.bar: Progress | None = None
        self.task: TaskID | None = None
        self.console = Console(stderr=True)

    def __call__(self, what: str, done: int, total: int) -> None:
        if self.bar is None:
            if time.monotonic() - self.start < PROGRESS_AFTER or not self.console.is_terminal:
                return
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                TextColumn("{task.completed}/{task.total}"),
                                console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(what, total=total)
        assert self.task is not None
        self.bar.update(self.task, description=what, completed=done, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _scan(run_dir: str | None, *, detail: bool = False) -> tuple[str, list[Entry]]:
    """The run directory and its entries; errors become a message and exit status 1."""
    try:
        base = discover.resolve_run_dir(run_dir)
    except RunDirError as e:
        raise _fail(str(e)) from None
    progress = _LazyProgress()
    try:
        return base, discover.scan(base, detail=detail, progress=progress)
    except OSError as e:
        raise _fail(f"reading {base}: {e}") from None
    finally:
        progress.close()


def _select(entries: list[Entry], base: str, target: str) -> list[Entry]:
    if not entries:
        raise _fail(f"no servers in {base}")
    try:
        return discover.select(entries, target)
    except discover.LookupFailed as e:
        raise _fail(str(e)) from None


# --------------------------------------------------------------------------- commands


@app.command("list")
def list_(run_dir: RunDirOpt = None, as_json: JsonOpt = False) -> None:
    """List the servers of the run directory, one row each.

    Columns: ident, state, server pid, script, interpreter, uptime, idle time, calls
    running, memory (RSS, and PSS/USS: forked copies share pages).

    STATE is live (serving), draining (stopping: finishing its calls), stale (a socket
    nobody listens on) or dead (only a lock, log or stat file left). VIA, CWD and INTERP tell
    apart servers of one program: VIA is script, prefork-server or "wrapper for PROGRAM",
    with "C client" and "any cwd" (--any-cwd) when so. IDLE (since the last call ended),
    SERVED (calls so far) and SAVED (calls x the setup's duration) come from the server's
    own p<IDENT>.stat; without it (the Perl side), IDLE is the socket's access time (subject
    to the mount's relatime). RUN is the calls running now.
    """
    base, entries = _scan(run_dir)
    now = discover.now()
    if as_json:
        typer.echo(render.entries_json(entries, now))
        return
    if not entries:
        typer.echo(f"no servers in {base}")
        return
    _console().print(render.list_table(entries, now))


@app.command()
def show(target: TargetArg, run_dir: RunDirOpt = None, as_json: JsonOpt = False) -> None:
    """Show a server's process tree, its watcher and its files.

    The tree is server -> executors (ours) or server -> monitors -> executors (the Perl
    side), and the watcher, each with pid, age, title and the fds of interest.
    """
    base, entries = _scan(run_dir, detail=True)
    chosen = _select(entries, base, target)
    now = discover.now()
    if as_json:
        import json

        typer.echo(json.dumps([{**e.to_dict(now), "learned": discover.read_learned(e)}
                               for e in chosen], indent=2))
        return
    console = _console()
    for e in chosen:
        console.print(render.show_tree(e, now))
        info = discover.read_learned(e)
        if info is not None:
            console.print(render.learned_tree(info))


@app.command()
def kill(
    targets: Annotated[list[str] | None, typer.Argument(
        metavar="IDENT|SCRIPT", autocompletion=_complete_target, show_default=False,
        help="Servers to stop (ident prefixes or scripts).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Stop every server of the run "
                                                     "directory, and remove stale entries.")
                    ] = False,
    timeout: Annotated[float, typer.Option(
        "--timeout", "-t", min=0.0, metavar="SECONDS",
        help="How long running calls may take to finish before SIGKILL.")] = 10.0,
    run_dir: RunDirOpt = None,
) -> None:
    """Stop servers, letting running calls finish first.

    The socket goes first, then SIGTERM (running calls finish), then SIGKILL for what
    still runs after the timeout. Removes socket and lock; the log stays.

    Exit status 1 if nothing was found.
    """
    if not targets and not all_:
        raise typer.BadParameter("give IDENT or SCRIPT (one or more), or --all",
                                 param_hint="IDENT|SCRIPT")
    if targets and all_:
        raise typer.BadParameter("give either targets or --all, not both",
                                 param_hint="IDENT|SCRIPT")
    base, entries = _scan(run_dir)
    if all_:
        chosen = entries
    else:
        chosen = []
        for target in targets or []:
            chosen += [e for e in _select(entries, base, target) if e not in chosen]
    if not chosen:
        raise _fail(f"nothing to kill in {base}")
    result = actions.kill_entries(chosen, timeout, typer.echo)
    if not result.found:
        raise _fail("nothing was running and no file was left to remove")
    if result.survivors:
        raise _fail(f"processes still running: {result.survivors}")


@app.command()
def clean(run_dir: RunDirOpt = None) -> None:
    """Remove stale sockets, and locks and logs of servers that are gone.

    Only what no live server holds; entries whose lock is held (a server starting) are kept.
    """
    try:
        base = discover.resolve_run_dir(run_dir)
    except RunDirError as e:
        raise _fail(str(e)) from None
    removed = actions.clean(base, typer.echo)
    if not removed:
        typer.echo(f"nothing to clean in {base}")


@app.command()
def logs(
    target: Annotated[str | None, typer.Argument(
        metavar="IDENT|SCRIPT", autocompletion=_complete_target, show_default=False,
        help="Whose log (default: every log of the run directory).")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f",
                                         help="Keep printing new lines (Ctrl-C stops).")
                      ] = False,
    lines: Annotated[int | None, typer.Option(
        "--lines", "-n", min=0, metavar="N", show_default=False,
        help="Only the last N lines.")] = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Print a server's log (-f: follow it), also once the server is gone.

    Our server's log is p<IDENT>.log in the run directory, or syslog when /dev/log exists;
    the Perl side always logs to syslog. It has a line per call (when it ended, the script,
    the exit status, the duration; at a bounded rate, failures first). With several servers,
    each log comes under a header, the most recently written last.
    """
    base, entries = _scan(run_dir)
    chosen = entries if target is None else _select(entries, base, target)
    with_logs = actions.log_order(chosen)
    if not with_logs:
        if target is None:
            raise _fail(f"no log files in {base}")
        _syslog(chosen[0], follow, lines)
        return
    files: list[str] = []
    headers: dict[str, bytes] = {}
    idents = {e.ident for e in with_logs}
    short = discover.short_idents(chosen)
    for e in with_logs:
        for f in actions.log_files(e):
            if f not in files:
                files.append(f)
                if len(idents) > 1:
                    name = e.script_path or e.script or "?"
                    headers[f] = os.fsencode(f"==> {short[e.ident]} {name} ({e.state}) "
                                             f"{e.log_path} <==\n")
    try:
        actions.print_files(files, lines, actions.stdout_bytes, follow=follow,
                            headers=headers or None)
    except KeyboardInterrupt:
        return
    except OSError as e:
        raise _fail(str(e)) from None


@app.command()
def doctor(run_dir: RunDirOpt = None, as_json: JsonOpt = False) -> None:
    """Check what makes calls slow or fail on this machine, and say what to do.

    The client launcher(s) in use (the fast one, or pip's slower console script), the
    Python version (before 3.12 an executor's exit is slow), the run directory and its
    ancestors, where servers log, inotify instances in use against the limit, and the
    reference binaries for interop. Exit status 1 if a check failed (calls fail now);
    warnings (slower calls, later trouble) leave it 0.
    """
    from prefork.ctl import doctor as checks

    findings = checks.run_checks(run_dir)
    if as_json:
        import json

        typer.echo(json.dumps([f.to_dict() for f in findings], indent=2))
    else:
        style = {"ok": "green", "info": "cyan", "warn": "yellow", "fail": "bold red"}
        console = _console()
        for f in findings:
            console.print(f"[{style[f.level]}]{f.level.upper():4}[/] "
                          f"[bold]{escape(f.check)}[/]: {escape(f.found)}")
            if f.advice:
                console.print(f"      -> {escape(f.advice)}")
    if any(f.level == checks.FAIL for f in findings):
        raise typer.Exit(1)


def _syslog(e: Entry, follow: bool, lines: int | None) -> None:
    """The syslog lines of ``e``'s server (journalctl by pid), or why there are none."""
    why = ("the Perl side logs to syslog" if e.side == "perl"
           else f"it has no log file {e.log_path}")
    if not os.path.exists("/dev/log"):
        raise _fail(f"{e.ident[:12]}: {why}, and there is no /dev/log here: "
                    "syslog messages are dropped")
    journalctl = shutil.which("journalctl")
    if e.server is None or journalctl is None:
        raise _fail(f"{e.ident[:12]}: {why}; look for 'prefork-interp' in the system log")
    cmd = [journalctl, "--no-pager", "-o", "short-iso", f"_PID={e.server.pid}"]
    if lines is not None:
        cmd += ["-n", str(lines)]
    if follow:
        cmd.append("-f")
    try:
        status = subprocess.run(cmd, check=False).returncode
    except KeyboardInterrupt:
        return
    if status:
        raise typer.Exit(status)


def main() -> None:
    """Entry point of the ``prefork-ctl`` console script."""
    app(prog_name=PROG)


if __name__ == "__main__":
    main()
