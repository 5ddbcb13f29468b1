"""The ``p2prc`` command line: thin, it parses, calls the client or a service, and prints."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from p2prc_core import __version__
from p2prc_core.client import PeerClient, Transfer
from p2prc_core.config import (
    CONFIG_FILE,
    ConfigError,
    LoadedSettings,
    default_config_text,
    default_home,
    load_settings,
    settings_as_dict,
)
from p2prc_core.discovery import Discovery, HttpTransport
from p2prc_core.errors import P2PRCError, PeerError, PeerRefused
from p2prc_core.identity import NodeIdentity
from p2prc_core.models import Address, Endpoint, parse_duration, parse_endpoint, parse_size
from p2prc_core.node import advertisable, local_addresses, ordered_by_preference, record_fields
from p2prc_core.output import err_console, human_bytes, print_json, print_table
from p2prc_core.peertable import PeerTable, TableState, entry_to_peer
from p2prc_core.plugins import PluginHooks, PluginLoadError, make_plugin_manager
from p2prc_core.records import RecordPublisher
from p2prc_core.trust import Invite, ServerState, TrustError, TrustStore


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
@click.version_option(__version__, "--version", prog_name="p2prc")
@click.pass_context
def main(ctx: click.Context, home: Path | None, serve_flag: bool, add_address: str | None,
         list_flag: bool, update_flag: bool) -> None:
    """p2prc: connect to a friend's machine, or one close by, and run anything on it."""
    ctx.obj = Node(home)
    original = [(serve_flag, server, {}), (add_address is not None, peers_add,
                                           {"address": add_address}),
                (list_flag, peers_ls, {}), (update_flag, peers_update, {})]
    chosen = [(command, kwargs) for given, command, kwargs in original if given]
    if len(chosen) > 1 or (chosen and ctx.invoked_subcommand is not None):
        raise click.UsageError("-s, --as, --ls and --us each stand alone: give one, and no "
                               "other command")
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
