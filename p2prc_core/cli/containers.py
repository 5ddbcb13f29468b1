"""Containers on peers: touch, containers ls, rm, ssh, group."""

from __future__ import annotations

import contextlib
import os

import click
from rich.text import Text

from p2prc_core.cli.base import (
    CliContext,
    ListingGroup,
    duration_option,
    gpu_option,
    json_option,
    main,
    pass_node,
    size_option,
)
from p2prc_core.containers import fingerprint, port_is_free
from p2prc_core.my_containers import RemoteContainer
from p2prc_core.names import errors_named
from p2prc_core.output import err_console, print_json, print_table
from p2prc_core.text import clean, format_when

# -- containers ------------------------------------------------------------------------------

@main.command()
@click.argument("peer")
@click.option("--ports", type=click.IntRange(0, 64), default=0, show_default=True,
              help="Extra TCP ports to open, besides SSH.")
@click.option("--gpu", is_flag=False, flag_value="all", default=None, metavar="[N|I,J]",
              callback=gpu_option,
              help="Ask for NVIDIA GPUs: every free one (--gpu), a count (--gpu 2), or "
                   "those by index (--gpu 0,1 or --gpu device=1).")
@click.option("--image", help="An image the host offers [default: its first].")
@click.option("--cpus", type=float, help="CPUs [default: the host's default].")
@click.option("--memory", callback=size_option, metavar="SIZE", help="Memory, e.g. 1G.")
@click.option("--ttl", callback=duration_option, metavar="DURATION",
              help="Lifetime, e.g. 2h, 7d.")
@json_option
@pass_node
def touch(node: CliContext, peer: str, ports: int, gpu: bool | int | list[int] | None,
          image: str | None, cpus: float | None, memory: int | None, ttl: int | None,
          as_json: bool) -> None:
    """Start a container on PEER with SSH access (your key) and open ports."""
    with err_console.status(Text(f"starting a container on {clean(peer)} ...")):
        container = node.services.on_peers.touch(
            peer, ports=ports, gpu=gpu if gpu is not None else False, image=image, cpus=cpus,
            memory=memory, ttl=ttl)
    published = published_reachable(container)
    if as_json:
        print_json({**container.as_dict(), "published_reachable": published})
        return
    extra = ", ".join(f"{p['external']}" for p in container.extra_ports) or "none"
    click.echo(f"container {container.short_id} on {host_name(node, container)}, until "
               f"{format_when(container.expires)}")
    click.echo(f"  reached {host_path(node, container)}")
    click.echo(f"  host key {fingerprint(container.host_key)}")
    if container.gpus:
        click.echo(f"  GPU{'s' if len(container.gpus) > 1 else ''} "
                   f"{', '.join(map(str, container.gpus))} (the host's numbering; "
                   f"'nvidia-smi' in the container lists them from 0)")
    click.echo(f"  log in:  p2prc ssh {container.short_id}   (through the host's p2prc port)")
    where = f"{container.host}: ssh {container.ssh_port}, extra {extra}"
    if not container.direct:
        click.echo(f"  ports: ssh {container.ssh_port}, extra {extra}, on the host's loopback "
                   f"only; reach them with 'p2prc ssh' and 'p2prc forward "
                   f"{container.short_id} PORT'")
    elif published:
        click.echo(f"  published ports on {where} (reachable from here)")
    else:
        click.echo(f"  published ports on {where}: NOT reachable from here (a firewall or "
                   f"NAT); use 'p2prc ssh' and 'p2prc forward {container.short_id} PORT'")


def host_name(node: CliContext, container: RemoteContainer) -> str:
    """The host of ``container`` as people name it (``PeerNames.label``), not its address:
    the address, or the relay the traffic went through, is ``host_path``'s."""
    return node.services.peers.names.label(container.node_id, container.endpoint)


def host_path(node: CliContext, container: RemoteContainer) -> str:
    """How the host of ``container`` is reached: ``at ADDRESS`` or ``through relay R``."""
    return node.services.peers.names.path_text(container.endpoint, container.node_id)


def published_reachable(container: RemoteContainer, timeout: float = 1.0) -> bool:
    """Whether the container's published SSH port takes a connection from here: only where
    its host publishes on its addresses (``publish_ports = "all"``), and even then it may be
    one this client cannot reach (NAT, a firewall, a relay)."""
    import socket

    if not container.direct or container.host_endpoint.relay:
        return False
    try:
        socket.create_connection((container.host, container.ssh_port), timeout=timeout).close()
    except OSError:
        return False
    return True


@main.group("containers", cls=ListingGroup)
def containers_group() -> None:
    """Containers this client started (ls)."""


@containers_group.command("ls")
@json_option
@pass_node
def containers_ls(node: CliContext, as_json: bool = False) -> None:
    """List tracked containers with their live state (asks each host); why each host that
    could not be asked could not follows the table."""
    states, why = node.services.on_peers.states_and_why()
    rows = [{**container.as_dict(), "state": state, "peer": host_name(node, container),
             **({"why": why[container.endpoint]} if container.endpoint in why else {})}
            for container, state in states]
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("No containers: start one with 'p2prc touch PEER'.")
        return
    groups = node.services.tracked.groups()
    print_table(("id", "host", "state", "ssh", "ports", "gpus", "expires", "groups"),
                [(r["id"][:12], r["peer"], r["state"], r["ssh_port"],
                  ", ".join(str(p["external"]) for p in r["ports"][1:]) or "-",
                  ", ".join(map(str, r["gpus"])) or "-", format_when(r["expires"]),
                  ", ".join(g for g, m in groups.items() if r["id"] in m) or "-")
                 for r in rows])
    for peer, reason in sorted({(r["peer"], r["why"]) for r in rows if "why" in r}):
        click.echo(f"{peer} is unreachable: {reason}", err=True)


@main.command("rm")
@click.argument("container")
@pass_node
def remove_container(node: CliContext, container: str) -> None:
    """Stop and remove a container (or every container of a group) and forget it."""
    for entry in node.services.tracked.resolve(container):
        with errors_named(host_name(node, entry)):
            removed = node.services.on_peers.remove(entry)
        if removed:
            click.echo(f"removed {entry.short_id} from {host_name(node, entry)}")
        else:
            click.echo(f"{entry.short_id} was already gone from {host_name(node, entry)}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--direct", is_flag=True,
              help="Use the container's published SSH port instead of the tunnel through the "
                   "host's p2prc port (only where the host publishes on its addresses).")
@click.argument("container")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@pass_node
def ssh(node: CliContext, direct: bool, container: str, command: tuple[str, ...]) -> None:
    """Log into a container with your key, checking its pinned host key. SSH goes through
    the host's p2prc port (and its relay, if it has one): nothing else need be open."""
    entry = node.services.tracked.find(container)
    if direct and not entry.direct:
        raise click.ClickException(
            f"{entry.short_id}'s host publishes its ports on its loopback only (its "
            f"publish_ports setting): --direct cannot reach them; 'p2prc ssh "
            f"{entry.short_id}' goes through the host's p2prc port")
    node.services.on_peers.check_alive([entry])  # its port may be someone else's container
    argv = node.services.on_peers.ssh_argv(entry, direct) + list(command)
    os.execvp(argv[0], argv)


@main.command("ssh-config")
@click.argument("containers", nargs=-1)
@click.option("--write", is_flag=True,
              help="Write $P2PRC_HOME/ssh/config (to Include from ~/.ssh/config) instead of "
                   "printing it.")
@pass_node
def ssh_config(node: CliContext, containers: tuple[str, ...], write: bool) -> None:
    """OpenSSH Host entries (p2prc-ID) for your containers, through the tunnel with the
    pinned host keys: for scp, rsync, VS Code Remote, or ssh itself."""
    tracked = node.services.tracked
    entries = [e for name in containers for e in tracked.resolve(name)] if containers \
        else list(tracked.containers().values())
    text = node.services.on_peers.ssh_config(entries)
    if not write:
        click.echo(text, nl=False)
        if not entries:
            click.echo("# no containers: 'p2prc touch PEER' starts one", err=True)
        return
    path = node.home / "ssh" / "config"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(text)
    click.echo(f"wrote {len(entries)} Host {'entry' if len(entries) == 1 else 'entries'} to "
               f"{path}; add this line to the top of "
               f"~/.ssh/config:\n    Include {path}")


@main.command()
@click.argument("container")
@click.argument("port", type=click.IntRange(1, 65535), default=22)
@pass_node
def tunnel(node: CliContext, container: str, port: int) -> None:
    """Join standard input and output to PORT of CONTAINER, through its host's p2prc port
    (what 'p2prc ssh' gives OpenSSH as its ProxyCommand)."""
    entry = node.services.tracked.find(container)
    node.services.on_peers.tunnel_stdio(entry, port)


@main.command()
@click.argument("container")
@click.argument("port", type=click.IntRange(1, 65535))
@click.argument("local_port", type=click.IntRange(0, 65535), required=False)
@pass_node
def forward(node: CliContext, container: str, port: int, local_port: int | None) -> None:
    """Serve PORT of CONTAINER on 127.0.0.1:LOCAL_PORT (default: the same number if free,
    else any), through the host's p2prc port, until Ctrl-C."""
    entry = node.services.tracked.find(container)
    node.services.on_peers.check_alive([entry])
    if local_port is None:
        local_port = port if port >= 1024 and port_is_free(port) else 0

    def ready(bound: int) -> None:
        click.echo(f"forwarding 127.0.0.1:{bound} to port {port} of {entry.short_id} on "
                   f"{host_name(node, entry)} (Ctrl-C stops)", err=True)
        click.echo(f"127.0.0.1:{bound}")

    with contextlib.suppress(KeyboardInterrupt):
        node.services.on_peers.forward(entry, port, local_port, ready,
                              lambda why: click.echo(why, err=True))


@main.group("group", cls=ListingGroup)
def group_group() -> None:
    """Groups of containers: a group name works wherever a container id does (ls is the
    default)."""


@group_group.command("create")
@click.argument("name")
@pass_node
def group_create(node: CliContext, name: str) -> None:
    """Make an empty group."""
    node.services.tracked.create_group(name)
    click.echo(f"group {name} created")


@group_group.command("add")
@click.argument("group")
@click.argument("containers", nargs=-1, required=True)
@pass_node
def group_add(node: CliContext, group: str, containers: tuple[str, ...]) -> None:
    """Add containers to a group."""
    for container in containers:
        container_id = node.services.tracked.change_group(group, container, add=True)
        click.echo(f"{container_id[:12]} is in {group}")


@group_group.command("rm")
@click.argument("group")
@click.argument("containers", nargs=-1)
@pass_node
def group_rm(node: CliContext, group: str, containers: tuple[str, ...]) -> None:
    """Take containers out of a group; with none given, delete the group (not its
    containers)."""
    tracked = node.services.tracked
    if not containers:
        tracked.delete_group(group)
        click.echo(f"group {group} deleted")
    for container in containers:
        click.echo(f"{tracked.change_group(group, container, add=False)[:12]} left {group}")


@group_group.command("ls")
@json_option
@pass_node
def group_ls(node: CliContext, as_json: bool) -> None:
    """List groups and their containers."""
    groups = node.services.tracked.groups()
    if as_json:
        print_json(groups)
        return
    if not groups:
        click.echo("No groups: 'p2prc group create NAME'.")
        return
    print_table(("group", "containers"),
                [(name, ", ".join(m[:12] for m in members) or "-")
                 for name, members in sorted(groups.items())])
