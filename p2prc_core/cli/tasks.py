"""Playbook bundles and runs: playbooks, run, runs."""

from __future__ import annotations

import time
from typing import Any

import click
from rich.live import Live
from rich.table import Table

from p2prc_core.cli.base import ListingGroup, Node, format_when, json_option, main, pass_node
from p2prc_core.errors import P2PRCError
from p2prc_core.output import err_console, print_json, print_table
from p2prc_core.sshkeys import ensure_key
from p2prc_core.tasks import (
    Playbooks,
    Runs,
    build_inventory,
    parse_variables,
    record_of,
)
from p2prc_core.tracking import Tracked

# -- playbooks and runs --------------------------------------------------------------------------

@main.group("playbooks", cls=ListingGroup)
def playbooks_group() -> None:
    """Playbook bundles (site.yml + p2prc.toml) installed here."""


@playbooks_group.command("add")
@click.argument("source")
@click.option("--replace", is_flag=True, help="Replace an installed bundle of that name.")
@pass_node
def playbooks_add(node: Node, source: str, replace: bool = False) -> None:
    """Install a bundle from a directory or a git URL."""
    bundle = Playbooks(node.home).add(source, replace)
    click.echo(f"added {bundle.name}: {bundle.description or 'no description'} "
               f"(needs {bundle.ports} port(s))")


@playbooks_group.command("ls")
@json_option
@pass_node
def playbooks_ls(node: Node, as_json: bool = False) -> None:
    """List installed bundles."""
    bundles = Playbooks(node.home).all()
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
def playbooks_rm(node: Node, name: str) -> None:
    """Remove an installed bundle."""
    Playbooks(node.home).remove(name)
    click.echo(f"removed {name}")


@main.command("run")
@click.argument("playbook")
@click.option("--on", "targets", multiple=True, required=True, metavar="CONTAINER_OR_GROUP",
              help="Where to run it (repeatable).")
@click.option("-e", "--extra-var", "pairs", multiple=True, metavar="KEY=VALUE",
              help="A variable for the playbook (repeatable).")
@click.option("--runner", default="ansible", show_default=True, help="The task runner.")
@json_option
@pass_node
def run_playbook(node: Node, playbook: str, targets: tuple[str, ...], pairs: tuple[str, ...],
                 runner: str = "ansible", as_json: bool = False) -> None:
    """Run a playbook on containers and groups, all at once, with progress per host."""
    bundle = Playbooks(node.home).get(playbook)
    tracked = Tracked(node.home)
    containers: list[dict[str, Any]] = []
    for target in targets:
        for container in tracked.resolve(target):
            if container["id"] not in {c["id"] for c in containers}:
                containers.append(container)
    if not containers:
        raise P2PRCError("no containers to run on (an empty group?)")
    runners = node.hooks.runners()
    if runner not in runners:
        raise P2PRCError(f"no task runner {runner!r} (have: {', '.join(runners) or 'none'})")
    extravars = {**bundle.variables, **parse_variables(pairs)}
    private_key, _ = ensure_key(node.home, node.loaded.settings.ssh_key)
    ports = tracked.reserve_ports(containers, bundle.ports)
    runs = Runs(node.home)
    run_id, run_dir = runs.new()
    inventory = build_inventory(containers, ports, private_key, run_dir / "known_hosts")
    started = time.time()
    progress = RunProgress(list(inventory["all"]["hosts"]))
    # Redrawn on each event rather than by a timer thread, which would hold up the end.
    with Live(progress.table(), console=err_console, auto_refresh=False) as live:
        def on_event(host: str, task: str, status: str) -> None:
            progress.update(host, task, status)
            live.update(progress.table(), refresh=True)

        result = runners[runner].run(bundle, inventory, extravars, run_dir, on_event)
    record = record_of(run_id, bundle, result, started, extravars, run_dir)
    runs.save(run_id, record)
    if as_json:
        print_json(record)
    else:
        _print_run(record)
    if not result.succeeded:
        raise SystemExit(1)


class RunProgress:
    """The live view: each host's latest task and state."""

    def __init__(self, hosts: list[str]):
        self.state = {host: ("waiting", "") for host in hosts}
        self.counts = {host: [0, 0] for host in hosts}

    def update(self, host: str, task: str, status: str) -> None:
        self.state[host] = (status, task)
        self.counts.setdefault(host, [0, 0])[0 if status in ("ok", "skipped") else 1] += 1

    def table(self) -> Table:
        table = Table(box=None, header_style="bold")
        for column in ("host", "state", "task", "done", "failed"):
            table.add_column(column)
        for host, (status, task) in self.state.items():
            done, failed = self.counts[host]
            table.add_row(host, status, task, str(done), str(failed))
        return table


def _print_run(record: dict[str, Any]) -> None:
    print_table(("host", "result", "ok", "changed", "failed", "message"),
                [(name, h["status"], h["ok"], h["changed"], h["failed"], h["message"] or "-")
                 for name, h in record["hosts"].items()],
                title=f"run {record['id']} of {record['playbook']}: "
                      f"{'succeeded' if record['succeeded'] else 'FAILED'}")


@main.group("runs", cls=ListingGroup)
def runs_group() -> None:
    """Past runs and their artifacts."""


@runs_group.command("ls")
@json_option
@pass_node
def runs_ls(node: Node, as_json: bool = False) -> None:
    """List past runs."""
    records = Runs(node.home).all()
    if as_json:
        print_json(records)
        return
    if not records:
        click.echo("No runs yet: 'p2prc run PLAYBOOK --on CONTAINER'.")
        return
    print_table(("run", "playbook", "started", "hosts", "result"),
                [(r["id"], r["playbook"], format_when(r["started"]), len(r["hosts"]),
                  "ok" if r["succeeded"] else "failed") for r in records])


@runs_group.command("show")
@click.argument("run_id")
@json_option
@pass_node
def runs_show(node: Node, run_id: str, as_json: bool = False) -> None:
    """Show one run: each host's result, and where its artifacts are."""
    record = Runs(node.home).get(run_id)
    if as_json:
        print_json(record)
        return
    _print_run(record)
    click.echo(f"artifacts: {record['artifacts']}")
