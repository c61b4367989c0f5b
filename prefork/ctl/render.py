"""How prefork-ctl shows entries: rich tables and trees for people, JSON for scripts.

Pure functions from ``discover.Entry`` values to rich renderables or JSON text; the consoles
are made by ``main`` (rich honours ``NO_COLOR`` and ``FORCE_COLOR`` there).
"""

from __future__ import annotations

import json
import os
import time

from rich.markup import escape
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from prefork.ctl import discover

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from prefork.ctl.discover import Entry, ProcInfo

STATE_STYLE = {discover.LIVE: "green", discover.DRAINING: "yellow",
               discover.STALE: "red", discover.DEAD: "dim"}
_ROLE_STYLE = {"server": "bold", "watcher": "cyan", "monitor": "magenta", "spare": "dim"}


def human_bytes(n: int | None) -> str:
    """``7.6M``, ``13M``, ``181K``-style size (powers of 1024); ``-`` when unknown."""
    if n is None:
        return "-"
    value = float(n)
    unit = "B"
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            break
        value /= 1024
    if unit == "B":
        return f"{int(value)}B"
    return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"


def human_age(seconds: float | None) -> str:
    """A short duration: ``42s``, ``5m12s``, ``2h03m``, ``3d04h``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def human_seconds(seconds: float | None) -> str:
    """``0.65s`` below a minute, else as ``human_age``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    return f"{seconds:.2f}s" if seconds < 60 else human_age(seconds)


def local_time(t: float | None) -> str:
    """``YYYY-MM-DD HH:MM:SS`` local time, ``-`` when unknown."""
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _home(path: str | None) -> str:
    """``path`` with the home directory shown as ``~``."""
    if path is None:
        return "-"
    home = os.path.expanduser("~")
    if home not in ("", "/") and (path == home or path.startswith(home + "/")):
        return "~" + path[len(home):]
    return path


def entries_json(entries: list[Entry], now: float) -> str:
    """``list --json`` / ``show --json``: a JSON array of entries."""
    return json.dumps([e.to_dict(now) for e in entries], indent=2)


def list_table(entries: list[Entry], now: float) -> Table:
    """One row per entry: the ``prefork-ctl list`` table.  VIA, CWD and INTERP tell apart
    servers of one program (started as a script, through ``prefork-server`` or one of its
    ``--wrap`` wrappers, by the C client, in another directory, with ``--any-cwd``, by
    another interpreter); IDLE and SERVED come from the server's own record of its calls."""
    short = discover.short_idents(entries)
    table = Table(title=f"prefork servers in {_home(entries[0].run_dir)}" if entries else None,
                  title_justify="left", header_style="bold")
    for name, justify in (("IDENT", "left"), ("STATE", "left"), ("PID", "right"),
                          ("SCRIPT", "left"), ("VIA", "left"), ("CWD", "left"),
                          ("INTERP", "left"), ("UP", "right"), ("IDLE", "right"),
                          ("RUN", "right"), ("SERVED", "right"), ("SAVED", "right"),
                          ("RSS", "right"), ("PSS", "right"), ("USS", "right")):
        wrap = name in ("SCRIPT", "VIA", "CWD", "INTERP")
        table.add_column(name, justify=justify, no_wrap=not wrap,  # type: ignore[arg-type]
                         overflow="fold" if wrap else "ellipsis")
    for e in entries:
        srv = e.server
        idle = e.idle_seconds(now) if e.state == discover.LIVE else None
        served = e.stat_number("calls")
        saved = e.saved_seconds()
        table.add_row(
            short[e.ident],
            Text(e.state, style=STATE_STYLE.get(e.state, "")),
            str(srv.pid) if srv else "-",
            escape(_home(e.script_path or e.script)),
            escape(via_text(e)),
            escape("(any)" if e.any_cwd else _home(e.cwd or _stat_str(e, "cwd"))),
            escape(_home(_stat_str(e, "executable") or e.interpreter)),
            human_age(now - srv.create_time) if srv else "-",
            ("busy" if e.calls else human_age(idle)) if srv else "-",
            str(e.calls) if srv else "-",
            "-" if served is None else str(int(served)),
            human_seconds(saved),
            human_bytes(srv.rss) if srv else "-",
            human_bytes(srv.pss) if srv else "-",
            human_bytes(srv.uss) if srv else "-",
        )
    return table


def via_text(e: Entry) -> str:
    """How the entry's script runs and who started it: ``script``, ``prefork-server`` or
    ``wrapper for PROGRAM``; then ``C client`` if the reference client started it, and
    ``any cwd`` for ``--any-cwd``."""
    parts = [e.via or ("perl script" if e.side == "perl" else "-")]
    if e.client == "prefork-interp (C)":
        parts.append("C client")
    if e.any_cwd:
        parts.append("any cwd")
    return ", ".join(parts)


def _stat_str(e: Entry, key: str) -> str | None:
    value = (e.stats or {}).get(key)
    return value if isinstance(value, str) else None


def calls_text(e: Entry) -> str:
    """The server's own record of its calls (``p<IDENT>.stat``), in a line."""
    n, failed = e.stat_number("calls"), e.stat_number("failed")
    setup, saved = e.stat_number("setup_seconds"), e.saved_seconds()
    text = (f"calls served: {int(n or 0)} ({int(failed or 0)} failed); setup took "
            f"{setup or 0:.2f}s, so about {human_seconds(saved)} saved")
    last = e.stat_number("last_call")
    if last is not None:
        stats = e.stats or {}
        text += (f"; last call {local_time(last)}: {escape(str(stats.get('last_argv0')))} "
                 f"{stats.get('last_status')} in {(e.stat_number('last_seconds') or 0):.3f}s")
    return text


def show_tree(e: Entry, now: float) -> Tree:
    """``prefork-ctl show``: the entry's files, then server -> (monitors ->) executors, and the
    watcher, each with pid, age, title and the fds of interest."""
    head = Text.assemble(
        ("ident ", "bold"), e.ident, "  ",
        (e.state, STATE_STYLE.get(e.state, "")))
    tree = Tree(head)
    facts = tree.add("[bold]files[/]")
    for label, path, exists in (("socket", e.socket_path, e.has_socket),
                                ("lock", e.lock_path, e.has_lock),
                                ("log", e.log_path, e.has_log)):
        facts.add(f"{label}: {escape(path)}" + ("" if exists else " [dim](absent)[/]"))
    if e.born is not None:
        facts.add(f"socket born {local_time(e.born)}, last used {local_time(e.last_used)}")
    if e.stats is not None:
        facts.add(calls_text(e))
    if e.server is not None:
        about = tree.add("[bold]script[/]")
        about.add(f"script: {escape(e.script or '?')}"
                  + (f" ({escape(e.script_path)})" if e.script_path else ""))
        about.add(f"cwd: {escape(e.cwd or '?')}")
        about.add(f"interpreter: {escape(_stat_str(e, 'executable') or e.interpreter or '?')} "
                  f"(side: {e.side or '?'})")
        about.add(f"started by: {e.client or 'unknown client'}; runs as: {escape(via_text(e))}"
                  + ("" if e.any_cwd is None else
                     f"; --any-cwd: {'yes' if e.any_cwd else 'no'}"))
        about.add(f"calls running: {e.calls}")
        _add_proc(tree, e.server, now)
    if e.watcher is not None:
        node = _add_proc(tree, e.watcher, now)
        if e.server is not None:
            node.add(f"[dim]watches {escape(e.socket_path)} for server {e.server.pid}[/]")
    elif e.server is not None and e.self_watching:
        tree.add("[dim]watcher: none, the server watches itself (the run directory's "
                 "self-watching server)[/]")
    elif e.server is not None:
        tree.add("[yellow]watcher: none found[/] (gone, or the server stopped watching)")
    return tree


def _add_proc(parent: Tree, p: ProcInfo, now: float) -> Tree:
    style = _ROLE_STYLE.get(p.role, "")
    label = Text.assemble((f"{p.role} {p.pid}", style), f"  up {human_age(now - p.create_time)}")
    if p.zombie:
        label.append("  (exited, not yet reaped)", style="dim")
    else:
        label.append(f"  {p.title}")
    if p.rss is not None:
        label.append(f"  RSS {human_bytes(p.rss)} PSS {human_bytes(p.pss)} "
                     f"USS {human_bytes(p.uss)}", style="dim")
    node = parent.add(label)
    for n in p.fds:
        node.add(Text(f"fd {n.fd}: {n.note}  [{n.target}]", style="dim"))
    for child in p.children:
        _add_proc(node, child, now)
    return node


def learned_tree(info: dict[str, Any]) -> Tree:
    """``prefork-ctl show``: what the server learned from calls, and what it refused."""
    learned, refused = info["learned"], info["refused"]
    tree = Tree(f"[bold]learned from calls[/] ({escape(info['path'])})")
    node = tree.add(f"modules learned: {len(learned)}")
    for name in learned:
        node.add(escape(name))
    node = tree.add(f"modules refused: {len(refused)}")
    for name, why in sorted(refused.items()):
        node.add(f"{escape(name)}: [yellow]{escape(why)}[/]")
    tree.add(f"regular expressions compiled: {info['regexes']}")
    rehearsal = info.get("rehearsal") or ""
    if rehearsal:
        style = "yellow" if rehearsal.startswith("refused") else "green"
        tree.add(f"rehearsal: [{style}]{escape(rehearsal)}[/]")
    for path in info["undone"]:
        tree.add(f"[yellow]a call removed {escape(path)}, made during setup[/]: the setup's "
                 "atexit handlers run only when the server exits")
    return tree
