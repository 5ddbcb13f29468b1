"""The peer table, and commands that talk to one peer (specs, speedtest)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from p2prc_core.cli.base import (
    CliContext,
    ListingGroup,
    json_option,
    main,
    pass_node,
    resolve_peer,
    size_option,
    transfer_progress,
)
from p2prc_core.errors import P2PRCError
from p2prc_core.models import LOCAL_NAME, looks_like_address
from p2prc_core.names import errors_named
from p2prc_core.output import get_console, print_json, print_table
from p2prc_core.text import format_ago, human_bytes, two_places

if TYPE_CHECKING:  # httpx, what uses it and the bars load only for the commands that use them
    from rich.console import Console
    from rich.progress import Progress

    from p2prc_core.discovery import UpdateStopped


# -- peers -------------------------------------------------------------------------------

@main.group(cls=ListingGroup)
def peers() -> None:
    """The peer table: add peers, list them (the default), and discover more."""


@peers.command("add")
@click.argument("address")
@click.option("--name", "local_name", metavar="NAME",
              help="Your own name for it: wins over the name the peer gives itself.")
@json_option
@pass_node
def peers_add(node: CliContext, address: str, local_name: str | None = None,
              as_json: bool = False) -> None:
    """Add the p2prc node at [NODE_ID@]ADDRESS[:PORT] to the table (and tell it about this
    node). Without NODE_ID@, the node that answers is pinned at that address."""
    if local_name is not None and (not LOCAL_NAME.fullmatch(local_name)
                                   or looks_like_address(local_name)):
        raise click.BadParameter("a name is a letter or digit, then letters, digits, '.', "
                                 "'_' or '-' (at most 64), and not an address",
                                 param_hint="--name")
    services = node.services
    known = set(services.peers.entries()) if services.table.path.exists() else set()
    entry, summary, endpoint = services.peers.add(resolve_peer(address), local_name)
    latency = entry.measured.latency_ms
    state = "already known, updated" if entry.node_id in known else "added"
    if as_json:
        print_json({"node_id": entry.node_id, "name": entry.name, "address": str(endpoint),
                    "latency_ms": latency, "learned": len(summary.added),
                    "new": entry.node_id not in known})
        return
    click.echo(f"{state} {entry.local_name or entry.name!r} ({entry.node_id}) at {endpoint}"
               + (f", {latency:.1f} ms" if latency is not None else "")
               + (f"; learned of {len(summary.added)} more" if summary.added else ""))


@peers.command("rm")
@click.argument("peer")
@pass_node
def peers_rm(node: CliContext, peer: str) -> None:
    """Forget a peer (a node id or a name from the table), and the addresses pinned to it."""
    services = node.services
    entry = services.peers.find(peer)
    node_id = entry.node_id if entry is not None else peer
    if not services.peers.forget(node_id):
        raise P2PRCError(f"no peer {peer!r} in the table ('p2prc peers ls' lists them)")
    name = f" {entry.name!r}" if entry is not None and entry.name else ""
    click.echo(f"forgot{name} ({node_id}): a node answering at its addresses is a stranger "
               f"again")


@peers.command("ls")
@click.option("--gpu", "with_gpu", is_flag=True,
              help="Only peers that say they have a free GPU.")
@json_option
@pass_node
def peers_ls(node: CliContext, with_gpu: bool = False, as_json: bool = False) -> None:
    """List known peers, best first: those that said they would host you, then by
    p2prc_score_peer. 'hosts you' is what each peer last said ('peers update' asks)."""
    rows = node.services.peers.rows(with_gpu=with_gpu)
    now = time.time()
    if as_json:
        print_json([r.as_dict() for r in rows])
        return
    if not rows:
        click.echo("No peer in the table says it has a free GPU." if with_gpu and
                   node.services.peers.entries() else
                   "The table is empty: add a peer with 'p2prc peers add ADDRESS'.")
        return
    print_table(("name", "node id", "address", "path", "latency", "bandwidth", "last seen",
                 "gpus", "hosts you"),
                [(r.name, r.node_id, _shown_path(r.address), r.path,
                  f"{r.latency_ms:.1f} ms" if r.latency_ms is not None else "-",
                  f"{r.bandwidth_mbps:,.0f} Mbit/s" if r.bandwidth_mbps else "-",
                  format_ago(r.last_seen, now) + (f" ({r.failures} failed)"
                                               if r.failures else ""),
                  _gpus_shown(r.gpus, r.gpus_free), HOSTS_YOU[r.can_host]) for r in rows])


HOSTS_YOU = {True: "yes", False: "no", None: "-"}  # 'peers ls', by PeerRow.can_host


def _gpus_shown(names: Sequence[str], free: int) -> str:
    """``2x H200 (1 free)``: the names a record lists, and how many it says are free."""
    if not names:
        return "-"
    counted: dict[str, int] = {}
    for name in names:
        counted[name] = counted.get(name, 0) + 1
    shown = ", ".join(name if n == 1 else f"{n}x {name}" for name, n in counted.items())
    return f"{shown} ({free} free)"


def _shown_path(address: str) -> str:
    """``relay ID@ADDR`` as ``ADDR via relay IDPREFIX``, short enough for a table."""
    if not address.startswith("relay "):
        return address
    relay_id, _, where = address[6:].partition("@")
    return f"{where} (relay {relay_id[:8]})"


@peers.command("update")
@click.option("--hops", type=click.IntRange(0, 16), help="How far to go [default: 3].")
@click.option("--fanout", type=click.IntRange(1, 100_000),
              help="Peers each hop asks [default: update_fanout, 4].")
@click.option("--all", "everyone", is_flag=True, help="Ask every known peer.")
@json_option
@pass_node
def peers_update(node: CliContext, hops: int | None = None, fanout: int | None = None,
                 everyone: bool = False, as_json: bool = False) -> None:
    """Ask a few known peers for what this node lacks, then the peers they told of, HOPS
    deep."""
    from p2prc_core.discovery import UpdateStopped

    hops = node.settings.update_hops if hops is None else hops
    discovery = node.services.peers.discovery
    if everyone or fanout is not None:
        discovery.fanout = None if everyone else fanout
    try:
        with _second_interrupt_ends(), update_bar(get_console(stderr=True)) as bar:
            task = bar.add_task("update", total=None, hop=1, count="")

            def progress(done: int, total: int, hop: int) -> None:
                bar.update(task, completed=done, total=total, hop=hop,
                           count=f"{done}/{total} peers")

            summary = discovery.update(hops, progress)
    except UpdateStopped as stop:
        raise _stopped(stop, node.services.table.path) from None
    except KeyboardInterrupt:
        raise _stopped(None, node.services.table.path) from None
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


def update_bar(console: Console) -> Progress:
    """The bar of 'peers update': the hop, and how many of its peers answered (blank until
    the hop's count is known: never '0/None')."""
    from rich.progress import BarColumn, Progress, TextColumn

    return Progress(TextColumn("hop {task.fields[hop]}"), BarColumn(),
                    TextColumn("{task.fields[count]}"), console=console, transient=True)


@contextmanager
def _second_interrupt_ends() -> Iterator[None]:
    """The first Ctrl-C stops the update (what came back is saved); a second ends the
    process at once (the table is written atomically: it stays whole either way)."""
    def first(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, first)
    except ValueError:  # not the main thread (a test's runner): Ctrl-C as it was
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stopped(stop: UpdateStopped | None, table: Path) -> click.exceptions.Exit:
    """Say what an update stopped by Ctrl-C kept, and exit 130 (as a shell does)."""
    if stop is not None:
        summary = stop.summary
        click.echo(f"stopped: {summary.asked} peer(s) answered or failed, and what they "
                   f"brought is saved to {table} ({len(summary.added)} added, "
                   f"{len(summary.updated)} updated); {stop.left} still being asked are as "
                   f"they were", err=True)
    else:
        click.echo(f"stopped: {table} is as the last finished step of the update left it",
                   err=True)
    return click.exceptions.Exit(130)

@main.command()
@click.argument("peer", required=False)
@json_option
@pass_node
def specs(node: CliContext, peer: str | None, as_json: bool) -> None:
    """Show a peer's CPU, memory, disk, load and GPUs; with no PEER, this machine's."""
    holders: dict[int, list[str]] = {}
    if peer is None:
        data, where = node.services.own.specs_now(), "this machine"
        holders = node.services.own.gpu_holders()
    else:
        with errors_named(peer), node.client(peer) as client:
            data = client.specs()
            # Headed by the peer's name; the path (an address, or a relay) is the --json
            # caller's or 'peers ls''s to say.
            where = node.services.peers.names.label(client.node_id,
                                                    str(client.endpoint))
    if as_json:
        print_json(data)
        return
    # A peer's specs: each part read only where it has the expected shape.
    cpu, memory, disk, os_info, load = (_part(data, k) for k in
                                        ("cpu", "memory", "disk", "os", "load"))
    rows = [
        ("host", data.get("hostname")),
        ("os", f"{os_info.get('name', '?')} ({os_info.get('machine', '?')})"),
        ("cpu", f"{cpu.get('model', '?')}: {cpu.get('cores', '?')} cores, "
                f"{cpu.get('threads', '?')} threads, {cpu.get('percent', '?')}% busy"),
        ("load", " ".join(two_places(load.get(k)) for k in ("1m", "5m", "15m"))),
        ("memory", f"{human_bytes(memory.get('available'))} free of "
                   f"{human_bytes(memory.get('total'))}"),
        ("disk", f"{human_bytes(disk.get('free'))} free of {human_bytes(disk.get('total'))}"),
    ]
    gpus = [g for g in data.get("gpus") or [] if isinstance(g, dict)] \
        if isinstance(data.get("gpus"), list) else []
    for gpu in gpus:
        free = gpu.get("free")  # a peer's: shown only as true or false
        use = ", free" if free is True else ", in use" if free is False else ""
        held = holders.get(gpu.get("index", -1)) if peer is None else None  # ours
        if held:
            use = ", held by " + ", ".join(h[:12] for h in held)
        index = gpu.get("index")
        rows.append((f"gpu {index if isinstance(index, int) else '?'}",
                     f"{gpu.get('name')}: {human_bytes(gpu.get('memory_total'))}, driver "
                     f"{gpu.get('driver')}, {gpu.get('utilization_percent', '?')}% busy{use}"))
    if not gpus:
        rows.append(("gpus", "none"))
    print_table(("", where), rows)


def _part(data: dict[str, Any], key: str) -> dict[str, Any]:
    part = data.get(key)
    return part if isinstance(part, dict) else {}


@main.command()
@click.argument("peer")
@click.option("--bytes", "size", callback=size_option, metavar="SIZE",
              help="How much to send each way, e.g. 10M [default: speedtest_default_bytes].")
@click.option("--download-only", is_flag=True, help="Skip the upload.")
@json_option
@pass_node
def speedtest(node: CliContext, peer: str, size: int | None, download_only: bool,
              as_json: bool) -> None:
    """Measure download and upload speed to a peer, in Mbit/s."""
    total = size if size is not None else node.settings.speedtest_default_bytes
    with transfer_progress() as bar:
        def progress(direction: str, size: int) -> Callable[[int], None]:
            task = bar.add_task(direction, total=size)
            return lambda count: bar.advance(task, count)

        endpoint, results = node.services.peers.speedtest(peer, total, download_only, progress)
    if as_json:
        print_json({"peer": str(endpoint), "transfers": [r.as_dict() for r in results]})
        return
    print_table(("direction", "size", "seconds", "Mbit/s"),
                [(r.direction, human_bytes(r.bytes), f"{r.seconds:.3f}",
                  f"{r.mbit_per_second:,.1f}") for r in results])
