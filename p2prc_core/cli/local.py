"""This node: the server, its interfaces, config and plugins; the host's own view of its
containers; the base image."""

from __future__ import annotations

import os
import stat
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import click

from p2prc_core import __version__
from p2prc_core.addresses import address_report, advertised_addresses
from p2prc_core.cli.base import (
    CliContext,
    ListingGroup,
    format_setting,
    json_option,
    main,
    pass_node,
)
from p2prc_core.config import (
    CONFIG_FILE,
    default_config_text,
    load_settings,
    settings_as_dict,
)
from p2prc_core.errors import P2PRCError
from p2prc_core.output import print_json, print_table
from p2prc_core.reach_state import ReachState
from p2prc_core.text import format_ago, format_when, human_bytes, human_duration

if TYPE_CHECKING:  # the host's view needs them; 'version' and 'id' do not load them
    from p2prc_core.containers import ContainerService, Lease

# -- server ------------------------------------------------------------------------------

@main.group(invoke_without_command=True)
@click.option("--host", help="Address to listen on [default: '::', IPv6 and IPv4].")
@click.option("--port", type=int, help="TCP port [default: 8088].")
@click.option("--name", help="The name this node shows to others.")
@click.option("--workers", type=int, help="gunicorn worker processes.")
@click.pass_context
def server(ctx: click.Context, host: str | None = None, port: int | None = None,
           name: str | None = None, workers: int | None = None) -> None:
    """Run the peer server (Ctrl-C or SIGTERM stops it)."""
    if ctx.invoked_subcommand is not None:
        return
    from p2prc_core.server.run import serve

    node = ctx.find_object(CliContext)
    assert node is not None
    node.overrides.update(host=host, port=port, name=name, workers=workers)
    settings = node.settings
    services = node.services
    advertised = advertised_addresses(settings, services.hooks,
                                      ReachState(node.home).reached())
    chosen = ", ".join(advertised) if advertised else None
    where = f"[{settings.host}]" if ":" in settings.host else settings.host
    stack = " (IPv6 and IPv4)" if settings.host == "::" else ""

    def announce() -> None:
        click.echo(f"p2prc {__version__}: node {settings.display_name!r} "
                   f"({services.identity.node_id}) serving on "
                   f"{'https' if settings.transport == 'tls' else 'http'}://{where}:"
                   f"{settings.port}{stack}; "
                   f"advertising {chosen or 'no routable address'}; home {node.home}", err=True)
        if settings.transport == "http":
            click.echo("WARNING: transport = http: connections to and from this node are "
                       "plain text; anyone on the path can read and change them. Use this "
                       "only on a lab network you control.", err=True)
        else:
            click.echo("transport: TLS 1.3, certificate bound to this node's key", err=True)
        if settings.trust_mode == "open":
            click.echo("WARNING: trust_mode = open: ANYONE who can reach this server can start "
                       "work on it. Use this only on a lab network you control.", err=True)
        else:
            count = len(services.trust.all())
            click.echo(f"trust: allowlist of {count} node(s); add friends with 'p2prc trust "
                       f"NODE_ID' or 'p2prc invite'", err=True)

    serve(services, announce)


# -- this node ---------------------------------------------------------------------------

@main.command()
@json_option
@pass_node
def interfaces(node: CliContext, as_json: bool) -> None:
    """Every local address, and which one p2prc advertises and why."""
    settings = node.settings
    chosen, rows = address_report(settings, node.hooks, ReachState(node.home).reached())
    transport = ("TLS 1.3, certificate bound to the node key" if settings.transport == "tls"
                 else "plain HTTP (transport = http: labs only)")
    if as_json:
        print_json({"chosen": str(chosen) if chosen else None,
                    "addresses": [asdict(r) for r in rows],
                    "advertise_addresses": settings.advertise_addresses,
                    "transport": settings.transport})
        return
    print_table(("", "interface", "address", "kind", "rank", "why"),
                [("*" if r.advertised else "", r.interface, r.address,
                  f"IPv{r.version} {r.kind}", r.preference or "-", r.why)
                 for r in rows])
    if settings.advertise_addresses:
        click.echo(f"advertise_addresses is set: this node advertises "
                   f"{', '.join(settings.advertise_addresses)}", err=True)
    elif chosen is None:
        click.echo("No address can be advertised: peers cannot reach this node.", err=True)
    click.echo(f"transport: {transport}, port {settings.advertise_port or settings.port}",
               err=True)


@main.command()
@json_option
@pass_node
def status(node: CliContext, as_json: bool) -> None:
    """This node at a glance: id, server, transport, addresses as peers see them, peers,
    the containers it hosts for peers and those you hold on peers, and GPUs."""
    from p2prc_core.doctor import node_status

    state = node_status(node.services)
    if as_json:
        print_json(state)
        return
    server = state["server"]
    containers = state["containers"]
    peers = state["peers"]
    rows = [
        ("node", f"{state['name']} ({state['node_id']})"),
        ("server", f"running at {server['at']}, up {int(server['uptime_seconds'] or 0)} s"
         if server["running"] else f"not running ({server['why']})"),
        ("transport", f"{state['transport']}, port {state['port']}"),
    ]
    for address in state["addresses"]:
        rows.append(("address", f"{address['address']}"
                     + (" (peers see this one)" if address["seen_by_peers"] else "")))
    for seen in state["observed"]:
        if not seen["advertised"]:
            rows.append(("seen as", f"{seen['address']} by {len(seen['by'])} peer(s), "
                                    f"{format_when(seen['last'])}"))
    if state["behind_nat"]:
        rows.append(("NAT", "behind NAT: peers see another address than the ones this "
                            "node advertises"))
    reach = state["reach"]
    checked = reach["dial_back"]
    rows.append(("reach", {
        "direct": f"direct: dialled back at {checked and checked['address']}",
        "relay": f"through relay {reach['relay']} only (peers cannot dial this node)",
        "unreachable": f"NOT reachable: dialled back at {checked and checked['address']} "
                       f"without an answer, and no relay",
        "unknown": "not checked yet (the server checks once it runs and knows a peer)",
    }[reach["summary"]]))
    if reach["upnp"]:
        rows.append(("mapping", f"{reach['upnp'].get('gateway')} forwards "
                             f"{reach['upnp'].get('external_ip')}:"
                             f"{reach['upnp'].get('external_port')} here ("
                             f"{'TCP and UDP' if reach['upnp'].get('udp') is True else 'TCP'})"))
    udp = reach["udp"]
    rows.append(("UDP", f"{udp['kind']}: {udp['detail']} ({format_when(udp['checked'])})"
                 if udp else "not checked yet ('p2prc doctor' asks peers over UDP)"))
    if reach["udp_port"] and reach["relay"]:
        rows.append(("punching", f"peers behind NAT punch to {reach['udp_port']['address']}:"
                                 f"{reach['udp_port']['port']} (this port's UDP mapping, as "
                                 f"the relay sees it)"))
    if reach["punched"]:
        rows.append(("punched", f"{len(reach['punched'])} peer(s) met through their relays "
                                f"reached direct lately ('p2prc peers ls': path)"))
    if reach["relay_offered"]:
        rows.append(("relay", "offered to other nodes (relay = true)"))
    rows.append(("peers", f"{peers['known']} known, {peers['answering']} answering, "
                          f"{peers['never_answered']} never answered"))
    rows.append(("hosting", _hosting_line(containers)))
    on_peers = state["on_peers"]
    rows.append(("yours", f"{on_peers['containers']} container(s) on {on_peers['hosts']} "
                          f"peer(s) ('p2prc containers ls')"))
    rows.append(("gpus", ", ".join(state["gpus"]) or "none"))
    print_table(("", "status"), rows)


def _hosting_line(containers: dict[str, Any]) -> str:
    """What this node runs for others: not the user's own containers (those are on peers)."""
    if containers["engine"] == "up":
        return (f"{containers['running']} container(s) running here for peers, of "
                f"{containers['leases']} leased ('p2prc server containers ls')")
    if containers["engine"] == "unavailable":
        return f"cannot run containers: {containers['why']}"
    return "no containers for peers (no server runs here)"


@main.command()
@json_option
@pass_node
def doctor(node: CliContext, as_json: bool) -> None:
    """Check what this node needs to work well, with a fix for each problem; exit 1 if any
    check fails."""
    from p2prc_core.doctor import diagnose

    checks = diagnose(node.services)
    if as_json:
        print_json([c.as_dict() for c in checks])
    else:
        print_table(("check", "result", "detail", "fix"),
                    [(c.name, c.result, c.detail, c.fix or "-") for c in checks])
    if any(c.result == "fail" for c in checks):
        raise SystemExit(1)


@main.command()
@pass_node
def init(node: CliContext) -> None:
    """Create this node's home directory and a commented config.toml."""
    node.home.mkdir(parents=True, exist_ok=True)
    os.chmod(node.home, stat.S_IRWXU)
    path = node.home / CONFIG_FILE
    if path.exists():
        click.echo(f"{path} already exists; left as it is")
    else:
        path.write_text(default_config_text())
        click.echo(f"wrote {path}")
    load_settings(node.home)  # an invalid existing config is reported now, not at first use


@main.command("config")
@json_option
@pass_node
def show_config(node: CliContext, as_json: bool) -> None:
    """Show the home directory and the effective settings, with where each came from."""
    loaded = node.loaded
    values = settings_as_dict(loaded.settings)
    path = loaded.home / CONFIG_FILE
    if as_json:
        print_json({"home": str(loaded.home), "config_file": str(path),
                    "config_file_exists": path.exists(), "settings": values,
                    "sources": loaded.sources})
        return
    click.echo(f"home:   {loaded.home}")
    click.echo(f"config: {path}{'' if path.exists() else ' (not created; p2prc init)'}")
    print_table(("setting", "value", "from"),
                [(k, format_setting(v), loaded.sources[k]) for k, v in values.items()])


@main.command()
@json_option
@pass_node
def version(node: CliContext, as_json: bool) -> None:
    """Versions of p2prc, Python, the Docker engine, Ansible and each plugin."""
    import platform

    from p2prc_core.entry_points import installed_version

    def package(name: str) -> str:
        return installed_version(name) or "not installed"

    try:  # (the plugins' backend itself: the node's services are not needed for this)
        backend = node.hooks.backends().get(node.settings.backend)
        ask = getattr(backend, "engine_version", None)
        engine = str(ask()) if ask is not None else \
            f"no {node.settings.backend!r} backend" if backend is None else \
            "not said by this backend"
    except Exception as err:  # noqa: BLE001 - no engine, or another backend: say why
        engine = f"unavailable ({str(err).splitlines()[0][:300]})"
    found = {"p2prc": __version__, "python": platform.python_version(),
             "docker engine": engine, "ansible-core": package("ansible-core")}
    plugins_found = {i.name: i.version for i in node.hooks.plugin_info()}
    if as_json:
        print_json({**found, "plugins": plugins_found})
        return
    print_table(("", "version"), [*found.items(), *((f"plugin {k}", v)
                                                    for k, v in plugins_found.items())])


@main.command()
@json_option
@pass_node
def plugins(node: CliContext, as_json: bool) -> None:
    """List every plugin with its distribution, version and hooks."""
    infos = node.hooks.plugin_info()
    if as_json:
        print_json([i.as_dict() for i in infos])
        return
    print_table(("plugin", "distribution", "version", "hooks"),
                [(i.name, i.distribution, i.version, ", ".join(i.hooks)) for i in infos])


# -- the host's own view -----------------------------------------------------------------------

def _local_service(node: CliContext) -> ContainerService:
    return node.services.hosting.service()  # a ContainerError (no backend) is one line, as others


@server.group("containers", cls=ListingGroup)
def server_containers() -> None:
    """Every p2prc container on this host, whoever owns it (ls, kill)."""


@server_containers.command("ls")
@json_option
@pass_node
def server_containers_ls(node: CliContext, as_json: bool = False) -> None:
    """List every p2prc container here, with its owner, state, limits and lease: a stopped
    one with when it is freed, a running one that uses no CPU now as idle."""
    service = _local_service(node)
    leases = service.list_leases()
    from p2prc_core.containers import POOL_OWNER, STOPPED, usage_of

    usage = usage_of(service.backend, [lease.id for lease in leases if lease.state == "running"])
    stopped_now = {lease.id for lease in leases if lease.state in STOPPED}
    stopped = {i: times for i, times in service.freed_at().items() if i in stopped_now}
    if as_json:
        print_json([{**lease.as_dict(), "usage": usage.get(lease.id),
                     "idle": _idle(lease, usage),
                     "stopped_since": stopped.get(lease.id, (None, None))[0],
                     "freed_at": stopped.get(lease.id, (None, None))[1]} for lease in leases])
        return
    if not leases:
        click.echo("No p2prc containers on this host.")
        return
    names = node.services.trust.names()
    moment = time.time()

    def state(lease: Lease) -> str:
        if lease.id in stopped:
            since, freed = stopped[lease.id]
            return f"{lease.state} {format_ago(since, moment)}, " + (
                f"freed in {human_duration(freed - moment)}" if freed > moment
                else "being freed")
        return f"{lease.state}, idle" if _idle(lease, usage) else lease.state

    def used(lease: Any) -> tuple[str, str]:
        now = usage.get(lease.id)
        if now is None:
            return "-", f"- of {human_bytes(lease.memory)}"
        return (f"{now['cpu_percent']:g}% of {lease.cpus:g}",
                f"{human_bytes(now['memory'])} of {human_bytes(lease.memory)}")

    print_table(("id", "owner", "state", "image", "cpu", "memory", "ports", "gpus", "expires"),
                [(lease.id[:12], names.get(lease.owner) or lease.owner, state(lease),
                  lease.image, *used(lease),
                  ", ".join(str(p["external"]) for p in lease.ports),
                  ", ".join(map(str, lease.gpus)) or "-", format_when(lease.expires))
                 for lease in leases])
    pooled = sum(lease.owner == POOL_OWNER for lease in leases)
    if pooled:
        click.echo(f"{pooled} in the warm pool (owner pool): started for the next callers, "
                   f"each handed to one caller only (container_warm_pool).")
    holding = sum(lease.state in STOPPED for lease in leases)
    if holding:
        click.echo(f"{holding} stopped container{'s' if holding > 1 else ''} still "
                   f"hold{'' if holding > 1 else 's'} ports and GPUs: freed "
                   f"{human_duration(node.settings.container_exited_grace)} after stopping "
                   f"(container_exited_grace) while the server runs; 'p2prc server "
                   f"containers kill ID' frees one now.")


IDLE_PERCENT = 1.0  # a running container that uses less of a CPU than this now is idle


def _idle(lease: Lease, usage: dict[str, dict[str, float]]) -> bool | None:
    """Whether a running container uses next to no CPU now (None: not running, or unknown)."""
    now = usage.get(lease.id)
    return None if now is None else now["cpu_percent"] < IDLE_PERCENT


@server_containers.command("kill")
@click.argument("container_ids", nargs=-1, required=True)
@pass_node
def server_containers_kill(node: CliContext, container_ids: tuple[str, ...]) -> None:
    """Stop and remove p2prc containers on this host, whoever owns them."""
    names = node.services.trust.names()
    for text in container_ids:
        lease = node.services.hosting.kill(text)
        owner = names.get(lease.owner)
        click.echo(f"killed {lease.id[:12]} (owner "
                   f"{f'{owner} ({lease.owner})' if owner else lease.owner})")


# -- images ------------------------------------------------------------------------------------

@main.group("image")
def image_group() -> None:
    """The base container image."""


@image_group.command("build")
@click.option("--from-debootstrap", is_flag=True,
              help="Build from a Debian root filesystem (no registry needed; root only).")
@click.option("--tag", default="p2prc/base:latest", show_default=True)
@click.option("--force", is_flag=True, help="Build even if the image exists.")
@pass_node
def image_build(node: CliContext, from_debootstrap: bool, tag: str, force: bool) -> None:
    """Build the base image (sshd, python3, sudo) that containers run by default, with the
    configured backend."""
    build = getattr(node.services.hosting.backend(), "build_image", None)  # optional
    if build is None:
        raise P2PRCError(f"the {node.settings.backend!r} backend cannot build images")
    build(tag, from_debootstrap, force, lambda line: click.echo(line, err=True))


# -- the dashboard -----------------------------------------------------------------------------

@main.command()
@click.option("--port", type=click.IntRange(0, 65535), default=0,
              help="Port to serve on [default: any free one].")
@click.option("--host", default=None,
              help="Address to serve on [default: one of its own in 127.0.0.0/8, whose "
                   "cookie no other local service gets]. Keep it on loopback: whoever has "
                   "the printed address (with its token) controls this node.")
@click.option("--no-browser", is_flag=True, help="Print the address; do not open a browser.")
@pass_node
def ui(node: CliContext, port: int, host: str | None, no_browser: bool) -> None:
    """Serve a local web dashboard: peers, your containers, this host's containers and
    trusted nodes, runs, and specs."""
    import threading
    import webbrowser

    from p2prc_ui import Served, serve

    def ready(served: Served) -> None:
        if served.warning:
            click.echo(f"WARNING: {served.warning}", err=True)
        click.echo(served.url)
        click.echo("Open that address (it carries this dashboard's access token); Ctrl-C "
                   "stops the dashboard.", err=True)
        if not no_browser:
            # Through a private file that sends the browser on with a code that works once:
            # nothing is on a command line another user could read, and the token is
            # taken only from an address the user opens (a file's page counts as another
            # site's).
            from p2prc_core.storage import atomic_write

            opener, url = node.home / "ui-open.html", served.opener
            atomic_write(opener, f'<!doctype html><meta http-equiv="refresh" content="0;url='
                                 f'{url}"><a href="{url}">p2prc dashboard</a>\n'.encode(),
                         mode=0o600)
            threading.Thread(target=webbrowser.open, args=(opener.as_uri(),),
                             daemon=True).start()

    try:
        serve(node.services, host, port, ready)
    except OSError as err:
        where = f"{host}:{port}" if host else f"port {port}" if port else "loopback"
        raise P2PRCError(f"cannot serve the dashboard on {where}: {err.strerror}") from None
    except KeyboardInterrupt:
        pass
