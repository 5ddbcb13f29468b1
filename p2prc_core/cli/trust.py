"""Identity and trust: p2prc id, trust, untrust, invite, join."""

from __future__ import annotations

from dataclasses import asdict

import click

from p2prc_core.cli.base import CliContext, duration_option, json_option, main, pass_node
from p2prc_core.output import print_json, print_table
from p2prc_core.text import format_when
from p2prc_core.trust import TrustError

# -- identity and trust ------------------------------------------------------------------

@main.command("id")
@json_option
@pass_node
def show_id(node: CliContext, as_json: bool) -> None:
    """Print this node's id (the key is created on first use) and, on stderr, the
    fingerprint of the TLS certificate its server presents."""
    from p2prc_core import tls

    identity = node.services.identity
    certificate = tls.fingerprint(tls.certificate(identity))
    if as_json:
        from p2prc_core.identity import b64encode

        print_json({"node_id": identity.node_id, "public_key": b64encode(identity.public_key),
                    "key_file": str(node.home / "node.key"),
                    "certificate_fingerprint": certificate})
        return
    click.echo(identity.node_id)
    click.echo(f"TLS certificate {certificate} (self-signed by the node key)", err=True)


@main.command()
@click.argument("node_id", required=False, metavar="[NODE]")
@click.option("--name", default="",
              help="A name to remember this node by (one word: letters, digits, - and _).")
@json_option
@pass_node
def trust(node: CliContext, node_id: str | None, name: str, as_json: bool) -> None:
    """Let NODE (a node id, or a peer's name from the table) run work here; with no NODE,
    list the nodes trusted here. With --name, a node trusted already is renamed."""
    store = node.services.trust
    if node_id is None:
        trusted = store.all()
        if as_json:
            print_json({node_id: asdict(t) for node_id, t in trusted.items()})
            return
        if not trusted:
            click.echo("No node is trusted here yet: 'p2prc trust NODE_ID' or 'p2prc invite'.")
            return
        print_table(("name", "node id", "since", "via"),
                    [(t.name or "-", k, format_when(t.since), t.via or "-")
                     for k, t in sorted(trusted.items(), key=lambda i: (not i[1].name,
                                                                       i[1].name.lower(), i[0]))])
        return
    resolved = node.services.peers.node_id_of(node_id)
    shown = resolved if resolved == node_id.strip().lower() else f"{node_id} ({resolved})"
    name = store.users_name(resolved, name)
    if store.add(resolved, name=name, via="trust"):
        click.echo(f"trusted {shown}: it can now start work on this node")
    elif name and store.rename(resolved, name):
        click.echo(f"{shown} was already trusted; it is now named {name!r}")
    else:
        click.echo(f"{shown} was already trusted")


@main.command()
@click.argument("node_id", metavar="NODE")
@pass_node
def untrust(node: CliContext, node_id: str) -> None:
    """Stop trusting NODE (its id, a unique start of it, or its name): its next signed
    request here gets 403."""
    resolved = node.services.peers.node_id_of(node_id)
    shown = resolved if resolved == node_id.strip().lower() else f"{node_id} ({resolved})"
    if node.services.trust.remove(resolved):
        click.echo(f"{shown} is no longer trusted here")
    else:
        raise TrustError(f"{shown} was not trusted here ('p2prc trust' lists who is)")


@main.command()
@click.option("--ttl", default="24h", callback=duration_option, show_default=True,
              help="How long the invite works (30m, 2h, 7d).")
@click.option("--address", "addresses", multiple=True,
              help="Address the friend should dial (repeatable); default: this node's "
                   "advertised addresses.")
@click.option("--port", type=int, help="The server's port [default: the configured port].")
@click.option("--name", default="",
              help="The name your friend will be trusted under here [default: the name "
                   "they suggest on joining].")
@json_option
@pass_node
def invite(node: CliContext, ttl: int, addresses: tuple[str, ...], port: int | None,
           name: str, as_json: bool) -> None:
    """Print a one-time token for a friend: 'p2prc join TOKEN' on their machine makes them
    trusted here (they can start work on this node) and puts each node in the other's table.
    It does not make you trusted on theirs: for that, they invite you."""
    offer = node.services.invites.create(ttl, list(addresses), port, name)
    token = offer.token()
    if as_json:
        print_json({"token": token, "expires": offer.expires, "addresses": offer.addresses,
                    "port": offer.port, "node_id": offer.node_id, "name": name.strip()})
        return
    click.echo(token)
    named = f" They will be trusted here as {name.strip()!r}." if name.strip() else ""
    click.echo(f"Send this to your friend; they run: p2prc join TOKEN. It works once, until "
               f"{format_when(offer.expires)}.{named}", err=True)
    if node.services.own.running_server() is None:
        click.echo(f"WARNING: no p2prc server runs for this node: start it ('p2prc server') "
                   f"before your friend joins, on port {offer.port}.", err=True)


@main.command()
@click.argument("token")
@click.option("--as", "name", metavar="NAME",
              help="The name you suggest to be known by there [default: this node's name]; "
                   "your friend may have chosen one already.")
@json_option
@pass_node
def join(node: CliContext, token: str, name: str | None, as_json: bool) -> None:
    """Redeem a friend's invite: you are trusted there, and their node joins your table."""
    record, endpoint = node.services.invites.join(token, name)
    if as_json:
        print_json({"joined": record["node_id"], "name": record["name"],
                    "address": str(endpoint)})
    else:
        click.echo(f"joined {record['name']!r} ({record['node_id']}) at {endpoint}: you "
                   f"can start work there, and it is in your peer table")
