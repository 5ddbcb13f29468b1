"""The ``p2prc`` command line: thin, it parses, calls the client or a service, and prints."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.live import Live
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from p2prc_core import __version__
from p2prc_core.config import (
    CONFIG_FILE,
    ConfigError,
    LoadedSettings,
    default_config_text,
    default_home,
    load_settings,
    settings_as_dict,
)
from p2prc_core.containers import ContainerService
from p2prc_core.errors import P2PRCError, PeerError, PeerRefused
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Address, Endpoint, parse_duration, parse_endpoint, parse_size
from p2prc_core.node import advertisable, local_addresses, ordered_by_preference, record_fields
from p2prc_core.output import err_console, human_bytes, print_json, print_table
from p2prc_core.peertable import PeerTable, TableState, entry_to_peer
from p2prc_core.plugins import PluginHooks, PluginLoadError, make_plugin_manager
from p2prc_core.records import RecordPublisher
from p2prc_core.sshkeys import ensure_key
from p2prc_core.tasks import (
    Playbooks,
    Runs,
    build_inventory,
    parse_variables,
    record_of,
    reserve_ports,
)
from p2prc_core.tracking import Tracked
from p2prc_core.trust import Invite, ServerState, TrustError, TrustStore

if TYPE_CHECKING:  # httpx and what uses it load only for commands that talk to peers
    from p2prc_core.client import PeerClient, Transfer
    from p2prc_core.discovery import Discovery


class Node:
    """The click context object: this node's home, settings and plugins, built on demand."""

    def __init__(self, home: Path | None):
        self.home = home or default_home()
        self.overrides: dict[str, Any] = {}
        self._loaded: LoadedSettings | None = None
        self._hooks: PluginHooks | None = None

    @property
    def loaded(self) -> LoadedSettings:
        if self._loaded is None:
            self._loaded = load_settings(self.home, self.overrides)
        return self._loaded

    @property
    def hooks(self) -> PluginHooks:
        if self._hooks is None:
            self._hooks = make_plugin_manager(disabled=self.loaded.settings.disable_plugins)
        return self._hooks

    @property
    def identity(self) -> NodeIdentity:
        """This node's key, created on first use."""
        return NodeIdentity.load_or_create(self.home)

    def client(self, peer: str | Endpoint) -> PeerClient:
        from p2prc_core.client import PeerClient

        endpoint = peer if isinstance(peer, Endpoint) else self.resolve(peer)
        return PeerClient(endpoint, timeout=self.loaded.settings.request_timeout,
                          identity=self.identity)

    def resolve(self, text: str) -> Endpoint:
        """PEER: a node id or a name from the table, or ADDRESS[:PORT]."""
        entry = self.find_peer(text)
        if entry is not None:
            measured = entry.get("measured", {})
            if measured.get("address"):
                return parse_endpoint(measured["address"])
            endpoints = self.discovery().endpoints(entry)
            if endpoints:
                return endpoints[0]
            raise P2PRCError(f"{text}: the table has no address this node may dial")
        return resolve_peer(text)

    def find_peer(self, text: str) -> dict[str, Any] | None:
        if not (self.home / "peers.json").exists():
            return None
        peers = self.table().load()
        if text in peers:
            return peers[text]
        named = [e for e in peers.values() if e["record"].get("name") == text]
        if len(named) > 1:
            ids = ", ".join(e["record"]["node_id"] for e in named)
            raise P2PRCError(f"{len(named)} peers are named {text!r} ({ids}): use a node id")
        return named[0] if named else None

    def table(self) -> PeerTable:
        return PeerTable(self.home, self.identity.node_id, self.loaded.settings.allow_loopback)

    def discovery(self) -> Discovery:
        from p2prc_core.discovery import Discovery, HttpTransport

        s = self.loaded.settings
        return Discovery(self.table(), self.hooks,
                         HttpTransport(s.request_timeout, s.max_table_bytes), self.own_record,
                         concurrency=s.update_concurrency, probes=s.latency_probes,
                         max_failures=s.peer_max_failures,
                         max_records=s.max_records_per_response)

    def own_record(self) -> dict[str, Any]:
        """This node's signed record, as its server would serve it."""
        fields = record_fields(self.loaded.settings, self.hooks, self.hooks.collect_specs(),
                               __version__)
        return RecordPublisher(self.home, self.identity).current(fields)


def resolve_peer(text: str) -> Endpoint:
    """ADDRESS[:PORT] (IPv6 in brackets)."""
    try:
        return parse_endpoint(text)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="PEER") from None


class P2PRCGroup(click.Group):
    """Turns every p2prc error into one line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (P2PRCError, ConfigError, PluginLoadError) as err:
            raise click.ClickException(str(err)) from None


pass_node = click.make_pass_decorator(Node)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


@click.group(cls=P2PRCGroup, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(path_type=Path), envvar="P2PRC_HOME",
              help="This node's home directory [default: ~/.p2prc; env P2PRC_HOME].")
@click.option("-s", "serve_flag", is_flag=True, help="Run the peer server (as 'p2prc server').")
@click.option("--as", "add_address", metavar="ADDRESS", help="As 'p2prc peers add ADDRESS'.")
@click.option("--ls", "list_flag", is_flag=True, help="As 'p2prc peers ls'.")
@click.option("--us", "update_flag", is_flag=True, help="As 'p2prc peers update'.")
@click.option("--touch", "touch_peer", metavar="PEER", help="As 'p2prc touch PEER'.")
@click.option("--ports", "touch_ports", type=click.IntRange(0, 64), default=0,
              help="With --touch: extra TCP ports.")
@click.option("--gpu", "touch_gpu", is_flag=True, help="With --touch: ask for GPUs.")
@click.option("--tc", "tracked_flag", is_flag=True, help="As 'p2prc containers ls'.")
@click.option("--rm", "rm_container", metavar="CONTAINER", help="As 'p2prc rm CONTAINER'.")
@click.option("--pp", "add_playbook", metavar="PATH", help="As 'p2prc playbooks add PATH'.")
@click.option("--vp", "list_playbooks", is_flag=True, help="As 'p2prc playbooks ls'.")
@click.option("--rp", "rm_playbook", metavar="NAME", help="As 'p2prc playbooks rm NAME'.")
@click.option("--plugin", "plugin_name", metavar="NAME", help="With --id: as 'p2prc run NAME'.")
@click.option("--id", "plugin_ids", multiple=True, metavar="CONTAINER",
              help="With --plugin: where to run it.")
@click.version_option(__version__, "--version", prog_name="p2prc")
@click.pass_context
def main(ctx: click.Context, home: Path | None, serve_flag: bool, add_address: str | None,
         list_flag: bool, update_flag: bool, touch_peer: str | None, touch_ports: int,
         touch_gpu: bool, tracked_flag: bool, rm_container: str | None,
         add_playbook: str | None, list_playbooks: bool, rm_playbook: str | None,
         plugin_name: str | None, plugin_ids: tuple[str, ...]) -> None:
    """p2prc: connect to a friend's machine, or one close by, and run anything on it."""
    ctx.obj = Node(home)
    original: list[tuple[bool, click.Command, dict[str, Any]]] = [
        (serve_flag, server, {}), (add_address is not None, peers_add,
                                           {"address": add_address}),
                (list_flag, peers_ls, {}), (update_flag, peers_update, {}),
                (touch_peer is not None, touch,
                 {"peer": touch_peer, "ports": touch_ports, "gpu": touch_gpu, "image": None,
                  "cpus": None, "memory": None, "ttl": None, "as_json": True}),
                (tracked_flag, containers_ls, {}),
                (rm_container is not None, remove_container, {"container": rm_container}),
                (add_playbook is not None, playbooks_add, {"source": add_playbook}),
                (list_playbooks, playbooks_ls, {}),
                (rm_playbook is not None, playbooks_rm, {"name": rm_playbook}),
                (plugin_name is not None, run_playbook,
                 {"playbook": plugin_name, "targets": plugin_ids, "pairs": ()})]
    if plugin_name is not None and not plugin_ids:
        raise click.UsageError("--plugin NAME needs --id CONTAINER")
    chosen = [(command, kwargs) for given, command, kwargs in original if given]
    if (touch_ports or touch_gpu) and touch_peer is None:
        raise click.UsageError("--ports and --gpu go with --touch PEER")
    if len(chosen) > 1 or (chosen and ctx.invoked_subcommand is not None):
        raise click.UsageError("the original flags (-s, --as, --ls, --us, --touch, --tc, --rm, "
                               "--pp, --vp, --rp, --plugin) each stand alone: give one, and "
                               "no other command")
    if chosen:
        command, kwargs = chosen[0]
        ctx.invoke(command, **kwargs)
    elif ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


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

    node = ctx.find_object(Node)
    assert node is not None
    node.overrides.update(host=host, port=port, name=name, workers=workers)
    settings = node.loaded.settings
    hooks = node.hooks
    advertised = record_fields(settings, hooks, {}, __version__)["addresses"]
    chosen = advertised[0] if advertised else None
    where = f"[{settings.host}]" if ":" in settings.host else settings.host
    stack = " (IPv6 and IPv4)" if settings.host == "::" else ""

    def announce() -> None:
        click.echo(f"p2prc {__version__}: node {settings.display_name!r} "
                   f"({node.identity.node_id}) serving on http://{where}:{settings.port}{stack}; "
                   f"advertising {chosen or 'no routable address'}; home {node.home}", err=True)
        if settings.trust_mode == "open":
            click.echo("WARNING: trust_mode = open: ANYONE who can reach this server can start "
                       "work on it. Use this only on a lab network you control.", err=True)
        else:
            count = len(TrustStore(node.home).all())
            click.echo(f"trust: allowlist of {count} node(s); add friends with 'p2prc trust "
                       f"NODE_ID' or 'p2prc invite'", err=True)

    serve(settings, node.home, hooks, announce)


# -- peers -------------------------------------------------------------------------------

@main.group()
def peers() -> None:
    """The peer table: add peers, list them, and discover more."""


@peers.command("add")
@click.argument("address")
@json_option
@pass_node
def peers_add(node: Node, address: str, as_json: bool = False) -> None:
    """Add the p2prc node at ADDRESS[:PORT] to the table (and tell it about this node)."""
    endpoint = resolve_peer(address)
    with node.client(endpoint) as client:
        record = client.node()
    if record["node_id"] == node.identity.node_id:
        raise P2PRCError(f"{endpoint} is this node itself")
    summary = node.discovery().add(endpoint, record)
    entry = node.table().load().get(record["node_id"], {})
    latency = entry.get("measured", {}).get("latency_ms")
    if as_json:
        print_json({"node_id": record["node_id"], "name": record["name"],
                    "address": str(endpoint), "latency_ms": latency,
                    "learned": len(summary.added)})
        return
    state = "added" if record["node_id"] not in summary.updated else "updated"
    click.echo(f"{state} {record['name']!r} ({record['node_id']}) at {endpoint}"
               + (f", {latency:.1f} ms" if latency is not None else "")
               + (f"; learned of {len(summary.added)} more" if summary.added else ""))


@peers.command("ls")
@json_option
@pass_node
def peers_ls(node: Node, as_json: bool = False) -> None:
    """List known peers, best first (by p2prc_score_peer)."""
    entries = node.table().load()
    by_id = {e["record"]["node_id"]: e for e in entries.values()}
    ranked = node.hooks.rank_peers(entry_to_peer(e) for e in entries.values())
    rows = []
    now = time.time()
    for peer in ranked:
        entry = by_id[peer.node_id]
        measured = entry.get("measured", {})
        rows.append({"name": peer.name, "node_id": peer.node_id,
                     "address": measured.get("address") or _first_address(node, entry),
                     "latency_ms": measured.get("latency_ms"),
                     "bandwidth_mbps": measured.get("bandwidth_mbps"),
                     "last_seen": measured.get("last_seen"),
                     "failures": measured.get("failures", 0),
                     "gpus": entry["record"].get("specs", {}).get("gpus", []),
                     "score": round(node.hooks.score_peer(peer), 3)})
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("The table is empty: add a peer with 'p2prc peers add ADDRESS'.")
        return
    print_table(("name", "node id", "address", "latency", "bandwidth", "last seen", "gpus"),
                [(r["name"], r["node_id"], r["address"],
                  f"{r['latency_ms']:.1f} ms" if r["latency_ms"] is not None else "-",
                  f"{r['bandwidth_mbps']:,.0f} Mbit/s" if r["bandwidth_mbps"] else "-",
                  _ago(now, r["last_seen"]) + (f" ({r['failures']} failed)"
                                               if r["failures"] else ""),
                  ", ".join(r["gpus"]) or "-") for r in rows])


def _first_address(node: Node, entry: dict[str, Any]) -> str:
    endpoints = node.discovery().endpoints(entry)
    return str(endpoints[0]) if endpoints else "-"


def _ago(now: float, stamp: float | None) -> str:
    if not stamp:
        return "never"
    seconds = max(0, int(now - stamp))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


@peers.command("update")
@click.option("--hops", type=click.IntRange(0, 16), help="How far to go [default: 3].")
@json_option
@pass_node
def peers_update(node: Node, hops: int | None = None, as_json: bool = False) -> None:
    """Ask known peers for their tables, then the peers they told of, HOPS deep."""
    hops = node.loaded.settings.update_hops if hops is None else hops
    if not node.table().load():
        raise P2PRCError("the table is empty: add a peer first with 'p2prc peers add ADDRESS'")
    discovery = node.discovery()
    with Progress(TextColumn("hop {task.fields[hop]}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} peers"), console=err_console,
                  transient=True) as bar:
        task = bar.add_task("update", total=None, hop=1)

        def progress(done: int, total: int, hop: int) -> None:
            bar.update(task, completed=done, total=total, hop=hop)

        summary = discovery.update(hops, progress)
    if as_json:
        print_json(summary.as_dict())
        return
    parts = [f"asked {summary.asked} peer(s) over {summary.hops} hop(s)",
             f"{len(summary.added)} added", f"{len(summary.updated)} updated",
             f"{len(summary.removed)} removed"]
    if summary.failed:
        parts.append(f"{len(summary.failed)} did not answer")
    if summary.dropped:
        parts.append("dropped " + ", ".join(f"{n} {why}" for why, n in summary.dropped.items()))
    click.echo("; ".join(parts))
    for node_id, error in summary.failed.items():
        click.echo(f"  {node_id}: {error}", err=True)

@main.command()
@click.argument("peer")
@json_option
@pass_node
def specs(node: Node, peer: str, as_json: bool) -> None:
    """Show a peer's CPU, memory, disk, load and GPUs."""
    with node.client(peer) as client:
        data = client.specs()
    if as_json:
        print_json(data)
        return
    cpu, memory, disk = data.get("cpu", {}), data.get("memory", {}), data.get("disk", {})
    os_info = data.get("os", {})
    load = data.get("load", {})
    rows = [
        ("host", data.get("hostname")),
        ("os", f"{os_info.get('name', '?')} ({os_info.get('machine', '?')})"),
        ("cpu", f"{cpu.get('model', '?')}: {cpu.get('cores', '?')} cores, "
                f"{cpu.get('threads', '?')} threads, {cpu.get('percent', '?')}% busy"),
        ("load", f"{load.get('1m', 0):.2f} {load.get('5m', 0):.2f} {load.get('15m', 0):.2f}"),
        ("memory", f"{human_bytes(memory.get('available'))} free of "
                   f"{human_bytes(memory.get('total'))}"),
        ("disk", f"{human_bytes(disk.get('free'))} free of {human_bytes(disk.get('total'))}"),
    ]
    gpus = data.get("gpus") or []
    for gpu in gpus:
        rows.append((f"gpu {gpu.get('index', '')}",
                     f"{gpu.get('name')}: {human_bytes(gpu.get('memory_total'))}, driver "
                     f"{gpu.get('driver')}, {gpu.get('utilization_percent', '?')}% busy"))
    if not gpus:
        rows.append(("gpus", "none"))
    print_table(("", str(client.endpoint)), rows)


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


@main.command()
@click.argument("peer")
@click.option("--bytes", "size", callback=_size, metavar="SIZE",
              help="How much to send each way, e.g. 10M [default: speedtest_default_bytes].")
@click.option("--download-only", is_flag=True, help="Skip the upload.")
@json_option
@pass_node
def speedtest(node: Node, peer: str, size: int | None, download_only: bool,
              as_json: bool) -> None:
    """Measure download and upload speed to a peer, in Mbit/s."""
    total = size if size is not None else node.loaded.settings.speedtest_default_bytes
    results: list[Transfer] = []
    with node.client(peer) as client, _progress() as bar:
        steps: list[tuple[str, Callable[..., Transfer]]] = [("download", client.download)]
        if not download_only:
            steps.append(("upload", client.upload))
        for label, run in steps:
            task = bar.add_task(label, total=total)
            results.append(run(total, lambda n, task=task: bar.advance(task, n)))
    entry = node.find_peer(peer)
    if entry is not None and results[0].direction == "download":
        node_id = entry["record"]["node_id"]

        def remember(state: TableState) -> None:
            if node_id in state.peers:
                state.peers[node_id].setdefault("measured", {})["bandwidth_mbps"] = round(
                    results[0].mbit_per_second, 1)

        node.table().update(remember)
    if as_json:
        print_json({"peer": str(client.endpoint), "transfers": [r.as_dict() for r in results]})
        return
    print_table(("direction", "size", "seconds", "Mbit/s"),
                [(r.direction, human_bytes(r.bytes), f"{r.seconds:.3f}",
                  f"{r.mbit_per_second:,.1f}") for r in results])


def _progress() -> Progress:
    return Progress(TextColumn("{task.description:>8}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), console=err_console, transient=True)


# -- this node ---------------------------------------------------------------------------

@main.command()
@json_option
@pass_node
def interfaces(node: Node, as_json: bool) -> None:
    """Every local address, and which one p2prc advertises and why."""
    from p2prc_plugins.address import explain

    settings = node.loaded.settings
    found = local_addresses()
    eligible = advertisable(found, settings)
    order = ordered_by_preference(node.hooks, eligible, "advertise")
    chosen = order[0] if order else None

    def why(address: Address) -> str:
        if address.kind == "loopback" and not settings.allow_loopback:
            return "never chosen: loopback (set allow_loopback = true for a lab)"
        return explain(address)

    rows = [{"interface": a.interface, "address": str(a), "version": a.version, "kind": a.kind,
             "advertised": a == chosen,
             "preference": order.index(a) + 1 if a in order else None, "why": why(a)}
            for a in found]
    if as_json:
        print_json({"chosen": str(chosen) if chosen else None, "addresses": rows})
        return
    print_table(("", "interface", "address", "kind", "rank", "why"),
                [("*" if r["advertised"] else "", r["interface"], r["address"],
                  f"IPv{r['version']} {r['kind']}", r["preference"] or "-", r["why"])
                 for r in rows])
    if chosen is None:
        click.echo("No address can be advertised: peers cannot reach this node.", err=True)


@main.command()
@pass_node
def init(node: Node) -> None:
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
def show_config(node: Node, as_json: bool) -> None:
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
                [(k, _show(v), loaded.sources[k]) for k, v in values.items()])


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(value) or "-"
    return repr(value) if isinstance(value, str) else str(value)


@main.command()
@json_option
@pass_node
def plugins(node: Node, as_json: bool) -> None:
    """List every plugin with its distribution, version and hooks."""
    infos = node.hooks.plugin_info()
    if as_json:
        print_json([i.as_dict() for i in infos])
        return
    print_table(("plugin", "distribution", "version", "hooks"),
                [(i.name, i.distribution, i.version, ", ".join(i.hooks)) for i in infos])


# -- identity and trust ------------------------------------------------------------------

@main.command("id")
@json_option
@pass_node
def show_id(node: Node, as_json: bool) -> None:
    """Print this node's id (the key is created on first use)."""
    identity = node.identity
    if as_json:
        from p2prc_core.identity import b64encode

        print_json({"node_id": identity.node_id, "public_key": b64encode(identity.public_key),
                    "key_file": str(node.home / "node.key")})
        return
    click.echo(identity.node_id)


@main.command()
@click.argument("node_id", required=False)
@click.option("--name", default="", help="A name to remember this node by.")
@json_option
@pass_node
def trust(node: Node, node_id: str | None, name: str, as_json: bool) -> None:
    """Let NODE_ID run work here; with no NODE_ID, list the nodes trusted here."""
    store = TrustStore(node.home)
    if node_id is None:
        trusted = store.all()
        if as_json:
            print_json(trusted)
            return
        if not trusted:
            click.echo("No node is trusted here yet: 'p2prc trust NODE_ID' or 'p2prc invite'.")
            return
        print_table(("node id", "name", "since", "via"),
                    [(k, v.get("name") or "-", _when(v.get("since")), v.get("via", "-"))
                     for k, v in sorted(trusted.items())])
        return
    if store.add(node_id.strip().lower(), name=name, via="trust"):
        click.echo(f"trusted {node_id}: it can now start work on this node")
    else:
        click.echo(f"{node_id} was already trusted")


@main.command()
@click.argument("node_id")
@pass_node
def untrust(node: Node, node_id: str) -> None:
    """Stop trusting NODE_ID: its next signed request here gets 403."""
    if TrustStore(node.home).remove(node_id.strip().lower()):
        click.echo(f"{node_id} is no longer trusted here")
    else:
        raise TrustError(f"{node_id} was not trusted here ('p2prc trust' lists who is)")


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_duration(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


@main.command()
@click.option("--ttl", default="24h", callback=_duration, show_default=True,
              help="How long the invite works (30m, 2h, 7d).")
@click.option("--address", "addresses", multiple=True,
              help="Address the friend should dial (repeatable); default: this node's "
                   "advertised addresses.")
@click.option("--port", type=int, help="The server's port [default: the configured port].")
@json_option
@pass_node
def invite(node: Node, ttl: int, addresses: tuple[str, ...], port: int | None,
           as_json: bool) -> None:
    """Print a one-time token that lets a friend join: they trust you, you trust them."""
    settings = node.loaded.settings
    if addresses:
        chosen = []
        for text in addresses:
            try:
                chosen.append(str(Address.parse(text)))
            except ValueError:
                raise click.BadParameter(f"{text!r} is not an IP address",
                                         param_hint="--address") from None
    else:
        found = advertisable(local_addresses(), settings)
        chosen = [str(a) for a in ordered_by_preference(node.hooks, found, "advertise")]
    if not chosen:
        raise TrustError("this node has no address a friend could dial: pass --address")
    secret, expires = ServerState(node.home).create_invite(ttl)
    token = Invite(node.identity.node_id, chosen[:8], port or settings.port, secret,
                   expires).token()
    if as_json:
        print_json({"token": token, "expires": expires, "addresses": chosen[:8],
                    "port": port or settings.port})
        return
    click.echo(token)
    click.echo(f"Send this to your friend; they run: p2prc join TOKEN. It works once, until "
               f"{_when(expires)}.", err=True)


@main.command()
@click.argument("token")
@json_option
@pass_node
def join(node: Node, token: str, as_json: bool) -> None:
    """Redeem a friend's invite: you are trusted there, and their node joins your table."""
    offer = Invite.parse(token)
    if offer.expires < time.time():
        raise TrustError(f"this invite expired at {_when(offer.expires)}: ask for a new one")
    candidates = []
    for text in offer.addresses:
        try:
            candidates.append(Address.parse(text))
        except ValueError:
            continue
    ordered = ordered_by_preference(node.hooks, candidates, "dial") or candidates
    own = node.own_record()
    failures = []
    for address in ordered:
        endpoint = Endpoint(str(address), offer.port)
        try:
            with node.client(endpoint) as client:
                record = client.join(offer.secret, own)
        except PeerRefused:
            raise
        except PeerError as err:
            failures.append(str(err))
            continue
        if record["node_id"] != offer.node_id:
            raise TrustError(f"{endpoint} is not the node the invite names "
                             f"({record['node_id']} instead of {offer.node_id}): not joined")
        node.discovery().add(endpoint, record)
        if as_json:
            print_json({"joined": record["node_id"], "name": record["name"],
                        "address": str(endpoint)})
        else:
            click.echo(f"joined {record['name']!r} ({record['node_id']}) at {endpoint}: you "
                       f"can start work there, and it is in your peer table")
        return
    raise PeerError("could not reach the inviting node at any of its addresses: "
                    + "; ".join(failures))


def _when(stamp: float | None) -> str:
    if not stamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(stamp))


# -- containers ------------------------------------------------------------------------------

def _memory(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return _size(ctx, param, value)


def _ttl(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return None if value is None else _duration(ctx, param, value)


@main.command()
@click.argument("peer")
@click.option("--ports", type=click.IntRange(0, 64), default=0, show_default=True,
              help="Extra TCP ports to open, besides SSH.")
@click.option("--gpu", is_flag=True, help="Ask for the host's NVIDIA GPUs.")
@click.option("--image", help="An image the host offers [default: its first].")
@click.option("--cpus", type=float, help="CPUs [default: the host's default].")
@click.option("--memory", callback=_memory, metavar="SIZE", help="Memory, e.g. 1G.")
@click.option("--ttl", callback=_ttl, metavar="DURATION", help="Lifetime, e.g. 2h, 7d.")
@json_option
@pass_node
def touch(node: Node, peer: str, ports: int, gpu: bool, image: str | None, cpus: float | None,
          memory: int | None, ttl: int | None, as_json: bool) -> None:
    """Start a container on PEER with SSH access (your key) and open ports."""
    _, public_key = ensure_key(node.home, node.loaded.settings.ssh_key)
    request: dict[str, Any] = {"ssh_key": public_key, "ports": ports, "gpu": gpu}
    for name, value in (("image", image), ("cpus", cpus), ("memory", memory), ("ttl", ttl)):
        if value is not None:
            request[name] = value
    with node.client(peer) as client:
        with err_console.status(f"starting a container on {client.endpoint} ..."):
            reply = client.create_container(request)
        endpoint = client.endpoint
    tracked = {"id": reply["id"], "node_id": reply.get("node_id"), "endpoint": str(endpoint),
               "host": endpoint.host, "ssh_port": reply["ssh"]["port"],
               "host_key": reply["ssh"]["host_key"], "ports": reply["ports"],
               "image": reply["image"], "created": reply["created"],
               "expires": reply["expires"], "gpu": reply.get("gpu", False)}
    Tracked(node.home).add(tracked)
    if as_json:
        print_json(reply)
        return
    extra = ", ".join(f"{p['external']}" for p in reply["ports"][1:]) or "none"
    click.echo(f"container {reply['id'][:12]} on {endpoint}: ssh port {reply['ssh']['port']}, "
               f"extra ports {extra}, until {_when(reply['expires'])}")
    click.echo(f"  host key {reply['ssh']['fingerprint']}")
    click.echo(f"  log in:  p2prc ssh {reply['id'][:12]}")


@main.group("containers", invoke_without_command=True)
@click.pass_context
def containers_group(ctx: click.Context) -> None:
    """Containers this client started (ls)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(containers_ls)


@containers_group.command("ls")
@json_option
@pass_node
def containers_ls(node: Node, as_json: bool = False) -> None:
    """List tracked containers with their live state (asks each host)."""
    tracked = Tracked(node.home).containers()
    by_endpoint: dict[str, list[dict[str, Any]]] = {}
    for container in tracked.values():
        by_endpoint.setdefault(container["endpoint"], []).append(container)
    rows = []
    for endpoint, members in sorted(by_endpoint.items()):
        try:
            with node.client(parse_endpoint(endpoint)) as client:
                live = {c["id"]: c for c in client.list_containers()}
            problem = None
        except PeerError as err:
            live, problem = {}, str(err)
        for container in members:
            state = live.get(container["id"], {}).get("state") or \
                ("unreachable" if problem else "gone")
            rows.append({**container, "state": state})
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("No containers: start one with 'p2prc touch PEER'.")
        return
    groups = Tracked(node.home).groups()
    print_table(("id", "host", "state", "ssh", "ports", "expires", "groups"),
                [(r["id"][:12], r["endpoint"], r["state"], r["ssh_port"],
                  ", ".join(str(p["external"]) for p in r["ports"][1:]) or "-",
                  _when(r["expires"]),
                  ", ".join(g for g, m in groups.items() if r["id"] in m) or "-")
                 for r in rows])


@main.command("rm")
@click.argument("container")
@pass_node
def remove_container(node: Node, container: str) -> None:
    """Stop and remove a container (or every container of a group) and forget it."""
    tracked = Tracked(node.home)
    for entry in tracked.resolve(container):
        with node.client(parse_endpoint(entry["endpoint"])) as client:
            try:
                client.remove_container(entry["id"])
                click.echo(f"removed {entry['id'][:12]} from {client.endpoint}")
            except PeerRefused as err:
                if err.status != 404:
                    raise
                click.echo(f"{entry['id'][:12]} was already gone from {client.endpoint}")
        tracked.forget(entry["id"])


@main.command()
@click.argument("container")
@click.argument("command", nargs=-1)
@pass_node
def ssh(node: Node, container: str, command: tuple[str, ...]) -> None:
    """Log into a container with your key, checking its pinned host key."""
    entry = Tracked(node.home).find(container)
    private, _ = ensure_key(node.home, node.loaded.settings.ssh_key)
    argv = ssh_command(node.home, entry, private) + list(command)
    os.execvp(argv[0], argv)


def ssh_command(home: Path, entry: dict[str, Any], private_key: Path) -> list[str]:
    """ssh with the container's host key pinned: no prompt, no trust on first use."""
    known = home / "ssh" / f"known_hosts_{entry['id'][:12]}"
    host = entry["host"]
    bracketed = f"[{host}]:{entry['ssh_port']}"
    known.parent.mkdir(parents=True, exist_ok=True)
    known.write_text(f"{bracketed} {entry['host_key']}\n")
    return ["ssh", "-i", str(private_key), "-p", str(entry["ssh_port"]),
            "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", f"root@{host}"]


@main.group("group")
def group_group() -> None:
    """Groups of containers: a group name works wherever a container id does."""


@group_group.command("create")
@click.argument("name")
@pass_node
def group_create(node: Node, name: str) -> None:
    """Make an empty group."""
    Tracked(node.home).create_group(name)
    click.echo(f"group {name} created")


@group_group.command("add")
@click.argument("group")
@click.argument("containers", nargs=-1, required=True)
@pass_node
def group_add(node: Node, group: str, containers: tuple[str, ...]) -> None:
    """Add containers to a group."""
    for container in containers:
        container_id = Tracked(node.home).change_group(group, container, add=True)
        click.echo(f"{container_id[:12]} is in {group}")


@group_group.command("rm")
@click.argument("group")
@click.argument("containers", nargs=-1)
@pass_node
def group_rm(node: Node, group: str, containers: tuple[str, ...]) -> None:
    """Take containers out of a group; with none given, delete the group (not its
    containers)."""
    tracked = Tracked(node.home)
    if not containers:
        tracked.delete_group(group)
        click.echo(f"group {group} deleted")
    for container in containers:
        click.echo(f"{tracked.change_group(group, container, add=False)[:12]} left {group}")


@group_group.command("ls")
@json_option
@pass_node
def group_ls(node: Node, as_json: bool) -> None:
    """List groups and their containers."""
    groups = Tracked(node.home).groups()
    if as_json:
        print_json(groups)
        return
    if not groups:
        click.echo("No groups: 'p2prc group create NAME'.")
        return
    print_table(("group", "containers"),
                [(name, ", ".join(m[:12] for m in members) or "-")
                 for name, members in sorted(groups.items())])


# -- the host's own view -----------------------------------------------------------------------

def _local_service(node: Node) -> ContainerService:
    settings = node.loaded.settings
    backend = node.hooks.backends().get(settings.backend)
    if backend is None:
        raise P2PRCError(f"the {settings.backend!r} backend is not installed or is disabled")
    return ContainerService.open(settings, backend, node.home, node.identity.node_id)


@server.group("containers", invoke_without_command=True)
@click.pass_context
def server_containers(ctx: click.Context) -> None:
    """Every p2prc container on this host, whoever owns it (ls, kill)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(server_containers_ls)


@server_containers.command("ls")
@json_option
@pass_node
def server_containers_ls(node: Node, as_json: bool = False) -> None:
    """List every p2prc container here, with its owner, limits and lease."""
    leases = _local_service(node).list_leases()
    if as_json:
        print_json([lease.as_dict() for lease in leases])
        return
    if not leases:
        click.echo("No p2prc containers on this host.")
        return
    names = {k: v.get("name") for k, v in TrustStore(node.home).all().items()}
    print_table(("id", "owner", "state", "image", "cpus", "memory", "ports", "expires"),
                [(lease.id[:12], names.get(lease.owner) or lease.owner, lease.state,
                  lease.image, f"{lease.cpus:g}", human_bytes(lease.memory),
                  ", ".join(str(p["external"]) for p in lease.ports), _when(lease.expires))
                 for lease in leases])


@server_containers.command("kill")
@click.argument("container_ids", nargs=-1, required=True)
@pass_node
def server_containers_kill(node: Node, container_ids: tuple[str, ...]) -> None:
    """Stop and remove p2prc containers on this host, whoever owns them."""
    service = _local_service(node)
    for container_id in container_ids:
        lease = service.remove(container_id, owner=None)
        click.echo(f"killed {lease.id[:12]} (owner {lease.owner})")


# -- images ------------------------------------------------------------------------------------

@main.group("image")
def image_group() -> None:
    """The base container image."""


@image_group.command("build")
@click.option("--from-debootstrap", is_flag=True,
              help="Build from a Debian root filesystem (no registry needed; root only).")
@click.option("--tag", default="p2prc/base:latest", show_default=True)
@click.option("--force", is_flag=True, help="Build even if the image exists.")
def image_build(from_debootstrap: bool, tag: str, force: bool) -> None:
    """Build the base image (sshd, python3, sudo) that containers run by default."""
    from p2prc_plugins.docker import build_image

    build_image(tag, from_debootstrap, force, say=lambda line: click.echo(line, err=True))


# -- playbooks and runs --------------------------------------------------------------------------

@main.group("playbooks", invoke_without_command=True)
@click.pass_context
def playbooks_group(ctx: click.Context) -> None:
    """Playbook bundles (site.yml + p2prc.toml) installed here."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(playbooks_ls)


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
    ports = reserve_ports(tracked, containers, bundle.ports)
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


@main.group("runs", invoke_without_command=True)
@click.pass_context
def runs_group(ctx: click.Context) -> None:
    """Past runs and their artifacts."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(runs_ls)


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
                [(r["id"], r["playbook"], _when(r["started"]), len(r["hosts"]),
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
