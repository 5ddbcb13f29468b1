"""Playbook bundles and runs: playbooks, run, runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from p2prc_core.cli.base import CliContext, ListingGroup, json_option, main, pass_node
from p2prc_core.output import get_console, print_json, print_table
from p2prc_core.tasks import parse_variables
from p2prc_core.text import clean, format_when

if TYPE_CHECKING:  # Rich loads at the first event: a run's start-up does not wait for it
    from rich.live import Live
    from rich.table import Table

# -- playbooks and runs --------------------------------------------------------------------------

@main.group("playbooks", cls=ListingGroup)
def playbooks_group() -> None:
    """Playbook bundles (site.yml + p2prc.toml) installed here."""


@playbooks_group.command("add")
@click.argument("source")
@click.option("--replace", is_flag=True, help="Replace an installed bundle of that name.")
@pass_node
def playbooks_add(node: CliContext, source: str, replace: bool = False) -> None:
    """Install a bundle from a directory or a git URL."""
    bundle = node.services.playbooks.add(source, replace)
    click.echo(f"added {bundle.name}: {bundle.description or 'no description'} "
               f"(needs {bundle.ports} port(s))")


@playbooks_group.command("ls")
@json_option
@pass_node
def playbooks_ls(node: CliContext, as_json: bool = False) -> None:
    """List installed bundles."""
    bundles = node.services.playbooks.all()
    if as_json:
        print_json([b.as_dict() for b in bundles])
        return
    if not bundles:
        click.echo("No playbooks: 'p2prc playbooks add PATH_OR_GIT_URL'.")
        return
    print_table(("name", "ports", "variables", "description"),
                [(b.name, b.ports, ", ".join(f"{k}={v}" for k, v in b.variables.items()) or "-",
                  b.description) for b in bundles])


@playbooks_group.command("rm")
@click.argument("name")
@pass_node
def playbooks_rm(node: CliContext, name: str) -> None:
    """Remove an installed bundle."""
    node.services.playbooks.remove(name)
    click.echo(f"removed {name}")


@main.command("run")
@click.argument("playbook")
@click.option("--on", "targets", multiple=True, required=True, metavar="CONTAINER_OR_GROUP",
              help="Where to run it (repeatable).")
@click.option("-e", "--extra-var", "pairs", multiple=True, metavar="KEY=VALUE",
              help="A variable for the playbook (repeatable).")
@click.option("--runner", default="ansible", show_default=True, help="The task runner.")
@click.option("--allow-local", is_flag=True,
              help="Run a bundle even if it delegates to this machine, changes the connection, "
                   "or targets other hosts (it is code that runs here: trust it first).")
@json_option
@pass_node
def run_playbook(node: CliContext, playbook: str, targets: tuple[str, ...], pairs: tuple[str, ...],
                 runner: str = "ansible", allow_local: bool = False,
                 as_json: bool = False) -> None:
    """Run a playbook on containers and groups, all at once, with progress per host.

    PLAYBOOK is an installed bundle's name ('p2prc playbooks ls'), or the path of a playbook
    file or folder ('./site.yml', as ansible-playbook takes it; no 'playbooks add' needed).
    A bundle added from a folder runs as that folder is now: edits there need no --replace.
    A container its host no longer runs is reported unreachable; the others run."""
    progress = RunProgress()
    # Shown from the first event (an error before it is one line, not under a table), and
    # redrawn on each event rather than by a timer thread, which would hold up the end.
    shown: list[Live] = []

    def on_event(host: str, task: str, status: str) -> None:
        progress.update(host, task, status)
        if not shown:
            from rich.live import Live

            shown.append(Live(console=get_console(stderr=True), auto_refresh=False))
            shown[0].start()
        shown[0].update(progress.table(), refresh=True)

    try:
        record = node.services.runs.run(playbook, list(targets), parse_variables(pairs),
                                        runner, on_event, allow_local)
    finally:
        if shown:
            shown[0].stop()
    if record.get("note"):
        from rich.text import Text

        get_console(stderr=True).print(Text(clean(record["note"])))
    if as_json:
        print_json(record)
    else:
        _print_run(record)
    if not record["succeeded"]:
        raise SystemExit(1)


class RunProgress:
    """The live view: each host's latest task and state."""

    def __init__(self) -> None:
        self.state: dict[str, tuple[str, str]] = {}
        self.counts: dict[str, list[int]] = {}

    def update(self, host: str, task: str, status: str) -> None:
        self.state[host] = (status, task)
        counts = self.counts.setdefault(host, [0, 0])
        if status != "waiting":
            counts[0 if status in ("ok", "skipped") else 1] += 1

    def table(self) -> Table:
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, header_style="bold")
        for column in ("host", "state", "task", "done", "failed"):
            table.add_column(column)
        for host, (status, task) in self.state.items():
            done, failed = self.counts[host]
            table.add_row(*(Text(clean(cell)) for cell in (host, status, task, done, failed)))
        return table


def _print_run(record: dict[str, Any]) -> None:
    print_table(("host", "result", "ok", "changed", "failed", "ports", "failed task: why"),
                [(name, h["status"], h["ok"], h["changed"], h["failed"],
                  ", ".join(str(p.get("at") or p.get("external")) for p in h.get("ports", []))
                  or "-",
                  (f"{h.get('task')}: " if h.get("task") else "") + (h["message"] or "")
                  or "-")
                 for name, h in record["hosts"].items()],
                title=f"run {record['id']} of {record['playbook']}"
                      + (f" ({record['source']})" if record.get("source") else "") + ": "
                      f"{'succeeded' if record['succeeded'] else 'FAILED'}, started "
                      f"{format_when(record.get('started'))}"
                      + (", with " + ", ".join(f"{k}={v}" for k, v in
                                               sorted(record.get("variables", {}).items()))
                         if record.get("variables") else ""))


@main.group("runs", cls=ListingGroup)
def runs_group() -> None:
    """Past runs and their artifacts."""


@runs_group.command("ls")
@json_option
@pass_node
def runs_ls(node: CliContext, as_json: bool = False) -> None:
    """List past runs."""
    records = node.services.runs.history.all()
    if as_json:
        print_json(records)
        return
    if not records:
        click.echo("No runs yet: 'p2prc run PLAYBOOK --on CONTAINER'.")
        return
    print_table(("run", "playbook", "started", "hosts", "result"),
                [(r["id"], r["playbook"], format_when(r["started"]), len(r["hosts"]),
                  r.get("state") or ("ok" if r["succeeded"] else "failed"))
                 for r in records])


@runs_group.command("show")
@click.argument("run_id", metavar="RUN_ID|last")
@json_option
@pass_node
def runs_show(node: CliContext, run_id: str, as_json: bool = False) -> None:
    """Show one run: each host's result, and where its artifacts are."""
    record = node.services.runs.history.get(run_id)
    if as_json:
        print_json(record)
        return
    _print_run(record)
    click.echo(f"artifacts: {record['artifacts']}")
