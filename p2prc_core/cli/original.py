"""The original P2PRC's flags (``p2prc -s``, ``--as ADDRESS``, ``--ls`` ...): each stands for
one of today's commands, and stands alone."""

from __future__ import annotations

from typing import Any

import click

from p2prc_core.cli.base import OriginalFlag, main, run_original

FLAGS = [
    OriginalFlag(["-s", "serve_flag"], is_flag=True,
                 help="Run the peer server (as 'p2prc server')."),
    OriginalFlag(["--as", "add_address"], metavar="ADDRESS", help="As 'p2prc peers add ADDRESS'."),
    OriginalFlag(["--ls", "list_flag"], is_flag=True, help="As 'p2prc peers ls'."),
    OriginalFlag(["--us", "update_flag"], is_flag=True, help="As 'p2prc peers update'."),
    OriginalFlag(["--touch", "touch_peer"], metavar="PEER", help="As 'p2prc touch PEER'."),
    OriginalFlag(["--ports", "touch_ports"], type=click.IntRange(0, 64), default=0,
                 help="With --touch: extra TCP ports."),
    OriginalFlag(["--gpu", "touch_gpu"], is_flag=True, help="With --touch: ask for GPUs."),
    OriginalFlag(["--tc", "tracked_flag"], is_flag=True, help="As 'p2prc containers ls'."),
    OriginalFlag(["--rm", "rm_container"], metavar="CONTAINER",
                 help="As 'p2prc rm CONTAINER'."),
    OriginalFlag(["--pp", "add_playbook"], metavar="PATH", help="As 'p2prc playbooks add PATH'."),
    OriginalFlag(["--vp", "list_playbooks"], is_flag=True, help="As 'p2prc playbooks ls'."),
    OriginalFlag(["--rp", "rm_playbook"], metavar="NAME", help="As 'p2prc playbooks rm NAME'."),
    OriginalFlag(["--plugin", "plugin_name"], metavar="NAME",
                 help="With --id: as 'p2prc run NAME'."),
    OriginalFlag(["--id", "plugin_ids"], multiple=True, metavar="CONTAINER",
                 help="With --plugin: where to run it."),
]


def command_at(ctx: click.Context, path: str) -> click.Command:
    """The command at PATH (``peers ls``), its module loaded only now that it runs."""
    command: click.Command | None = main
    for name in path.split():
        assert isinstance(command, click.Group), path
        command = command.get_command(ctx, name)
    assert command is not None, path
    return command


def chosen_command(ctx: click.Context,
                   flags: dict[str, Any]) -> list[tuple[click.Command, dict[str, Any]]]:
    """The commands the given flags stand for, with their arguments."""
    given = {name: value for name, value in flags.items()
             if value not in (None, False, 0, ())}
    stands_for: list[tuple[str, str, dict[str, Any]]] = [
        ("serve_flag", "server", {}),
        ("add_address", "peers add", {"address": given.get("add_address")}),
        ("list_flag", "peers ls", {}), ("update_flag", "peers update", {}),
        ("touch_peer", "touch",
         {"peer": given.get("touch_peer"), "ports": flags["touch_ports"],
          "gpu": flags["touch_gpu"], "image": None, "cpus": None, "memory": None, "ttl": None,
          "as_json": True}),
        ("tracked_flag", "containers ls", {}),
        ("rm_container", "rm", {"container": given.get("rm_container")}),
        ("add_playbook", "playbooks add", {"source": given.get("add_playbook")}),
        ("list_playbooks", "playbooks ls", {}),
        ("rm_playbook", "playbooks rm", {"name": given.get("rm_playbook")}),
        ("plugin_name", "run", {"playbook": given.get("plugin_name"),
                                "targets": flags["plugin_ids"], "pairs": ()})]
    return [(command_at(ctx, path), kwargs) for name, path, kwargs in stands_for
            if name in given]


def carry_out(ctx: click.Context, flags: dict[str, Any]) -> None:
    """Run the one command the original flags stand for, if any was given."""
    if flags["plugin_name"] is not None and not flags["plugin_ids"]:
        raise click.UsageError("--plugin NAME needs --id CONTAINER")
    if (flags["touch_ports"] or flags["touch_gpu"]) and flags["touch_peer"] is None:
        raise click.UsageError("--ports and --gpu go with --touch PEER")
    chosen = chosen_command(ctx, flags)
    if len(chosen) > 1 or (chosen and ctx.invoked_subcommand is not None):
        raise click.UsageError("the original flags (-s, --as, --ls, --us, --touch, --tc, --rm, "
                               "--pp, --vp, --rp, --plugin) each stand alone: give one, and "
                               "no other command")
    if chosen:
        command, kwargs = chosen[0]
        ctx.invoke(command, **kwargs)


main.params[1:1] = FLAGS  # after --home, before --version and --help
run_original.append(carry_out)
