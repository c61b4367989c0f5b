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
    """One row per entry: the ``prefork-ctl list`` table."""
    short = discover.short_idents(entries)
    table = Table(title=f"prefork servers in {_home(entries[0].run_dir)}" if entries else None,
                  title_justify="left", header_style="bold")
    for name, justify in (("IDENT", "left"), ("STATE", "left"), ("PID", "right"),
                          ("SCRIPT", "left"), ("INTERP", "left"), ("UP", "right"),
                          ("IDLE", "right"), ("CALLS", "right"), ("RSS", "right"),
                          ("PSS", "right"), ("USS", "right")):
        wrap = name == "SCRIPT"
        table.add_column(name, justify=justify, no_wrap=not wrap,  # type: ignore[arg-type]
                         overflow="fold" if wrap else "ellipsis")
    for e in entries:
        srv = e.server
        idle = e.idle_seconds(now) if e.state == discover.LIVE else None
        table.add_row(
            short[e.ident],
            Text(e.state, style=STATE_STYLE.get(e.state, "")),
            str(srv.pid) if srv else "-",
            escape(_home(e.script_path or e.script)),
            escape(_interp(e)),
            human_age(now - srv.create_time) if srv else "-",
            ("busy" if e.calls else human_age(idle)) if srv else "-",
            str(e.calls) if srv else "-",
            human_bytes(srv.rss) if srv else "-",
            human_bytes(srv.pss) if srv else "-",
            human_bytes(srv.uss) if srv else "-",
        )
    return table


def _interp(e: Entry) -> str:
    if e.interpreter is None:
        return "-"
    return os.path.basename(e.interpreter)


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
    if e.server is not None:
        about = tree.add("[bold]script[/]")
        about.add(f"script: {escape(e.script or '?')}"
                  + (f" ({escape(e.script_path)})" if e.script_path else ""))
        about.add(f"cwd: {escape(e.cwd or '?')}")
        about.add(f"interpreter: {escape(e.interpreter or '?')} (side: {e.side or '?'})")
        about.add(f"started by: {e.client or 'unknown client'}; calls running: {e.calls}")
        _add_proc(tree, e.server, now)
    if e.watcher is not None:
        node = _add_proc(tree, e.watcher, now)
        if e.server is not None:
            node.add(f"[dim]watches {escape(e.socket_path)} for server {e.server.pid}[/]")
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
    for path in info["undone"]:
        tree.add(f"[yellow]a call removed {escape(path)}, made during setup[/]: the setup's "
                 "atexit handlers run only when the server exits")
    return tree
