"""The ``p2prc`` group, its context object, and what every command shares."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from p2prc_core import __version__
from p2prc_core.config import (
    ConfigError,
    LoadedSettings,
    Settings,
    default_home,
    load_settings,
)
from p2prc_core.containers import parse_gpu_text
from p2prc_core.errors import P2PRCError
from p2prc_core.models import Endpoint, parse_duration, parse_endpoint, parse_size
from p2prc_core.output import err_console
from p2prc_core.plugins import PluginHooks, PluginLoadError, make_plugin_manager
from p2prc_core.services import NodeServices

if TYPE_CHECKING:  # httpx and what uses it load only for commands that talk to peers
    from p2prc_core.client import PeerClient


class Node:
    """The click context object: this node's home, settings and plugins, and the
    ``NodeServices`` over them, each built on demand (after options have set overrides)."""

    def __init__(self, home: Path | None):
        self.home = home or default_home()
        self.overrides: dict[str, Any] = {}
        self._loaded: LoadedSettings | None = None
        self._hooks: PluginHooks | None = None
        self._services: NodeServices | None = None

    @property
    def loaded(self) -> LoadedSettings:
        if self._loaded is None:
            self._loaded = load_settings(self.home, self.overrides)
            for warning in self._loaded.warnings:
                click.echo(f"warning: {warning}", err=True)
        return self._loaded

    @property
    def settings(self) -> Settings:
        return self.loaded.settings

    @property
    def hooks(self) -> PluginHooks:
        if self._hooks is None:
            self._hooks = make_plugin_manager(disabled=self.settings.disable_plugins)
        return self._hooks

    @property
    def services(self) -> NodeServices:
        if self._services is None:
            self._services = NodeServices(self.settings, self.home, self.hooks,
                                          notice=lambda line: click.echo(line, err=True))
        return self._services

    def client(self, peer: str | Endpoint) -> PeerClient:
        """A client for PEER; an argument that is neither a known peer nor an address is a
        usage error."""
        try:
            return self.services.client(peer)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="PEER") from None


def resolve_peer(text: str) -> Endpoint:
    """ADDRESS[:PORT] (IPv6 in brackets)."""
    try:
        return parse_endpoint(text)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="PEER") from None


# How 'p2prc --help' groups the commands (any command not named here goes under "More").
SECTIONS = [
    ("Get started", ["init", "server", "status", "doctor", "id", "invite", "join"]),
    ("Peers", ["peers", "specs", "speedtest", "trust", "untrust", "interfaces"]),
    ("Containers", ["touch", "ssh", "forward", "ssh-config", "containers", "rm", "group"]),
    ("Tasks", ["playbooks", "run", "runs"]),
    ("This node", ["ui", "config", "plugins", "image", "version"]),
]
EXAMPLES = """\
  p2prc server                       run your peer server (keep it running)
  p2prc invite                       a token for a friend; they run: p2prc join TOKEN
  p2prc peers update && p2prc peers  learn of more peers; list them, near and fast first
  p2prc touch alice --ports 1        a container on alice's machine
  p2prc ssh 3f2a9c1d0b7e             log in (through alice's p2prc port)
  p2prc run http --on 3f2a9c1d0b7e   an Ansible playbook on containers
"""
# The original P2PRC's flags, shown in a section of their own.
ORIGINAL_FLAGS = {"serve_flag", "add_address", "list_flag", "update_flag", "touch_peer",
                  "touch_ports", "touch_gpu", "tracked_flag", "rm_container", "add_playbook",
                  "list_playbooks", "rm_playbook", "plugin_name", "plugin_ids"}


class P2PRCGroup(click.Group):
    """Turns every p2prc error into one line on stderr and a non-zero exit; its help leads
    with the commands, by topic and whole, and a few examples."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (P2PRCError, ConfigError, PluginLoadError) as err:
            raise click.ClickException(str(err)) from None

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.format_usage(ctx, formatter)
        self.format_help_text(ctx, formatter)
        self.format_commands(ctx, formatter)
        with formatter.section("Examples"):
            formatter.write(EXAMPLES)
        self.format_options(ctx, formatter)
        self.format_epilog(ctx, formatter)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        listed: set[str] = set()
        commands = {name: self.get_command(ctx, name) for name in self.list_commands(ctx)}
        for title, names in SECTIONS + [("More", sorted(commands))]:
            rows = []
            for name in names:
                command = commands.get(name)
                if command is None or command.hidden or name in listed:
                    continue
                listed.add(name)
                rows.append((name, command.get_short_help_str(limit=300)))
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        ours: list[tuple[str, str]] = []
        original: list[tuple[str, str]] = []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                (original if param.name in ORIGINAL_FLAGS else ours).append(record)
        with formatter.section("Options"):
            formatter.write_dl(ours)
        with formatter.section("The original P2PRC's flags (each stands alone)"):
            formatter.write_dl(original)


class ListingGroup(click.Group):
    """A group that lists (runs its ``ls``) when given no command: ``p2prc runs``."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["invoke_without_command"] = True
        super().__init__(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        # click 8.2 keeps the subcommand in _protected_args (protected_args is deprecated)
        protected = getattr(ctx, "_protected_args", None)
        if protected is None:
            protected = ctx.protected_args
        if not protected and not ctx.args:
            return ctx.invoke(self.commands["ls"])
        return super().invoke(ctx)


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
    # The commands the original spellings stand for live in the other cli modules.
    from p2prc_core.cli.containers import containers_ls, remove_container, touch
    from p2prc_core.cli.local import server
    from p2prc_core.cli.peers import peers_add, peers_ls, peers_update
    from p2prc_core.cli.tasks import playbooks_add, playbooks_ls, playbooks_rm, run_playbook

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


# -- helpers shared by the commands ---------------------------------------------

def _parsed_by(parse: Callable[[str], Any]) -> Callable[..., Any]:
    """A click callback that parses an option's text, a ValueError becoming a usage error."""
    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as err:
            raise click.BadParameter(str(err)) from None
    return callback


size_option = _parsed_by(parse_size)  # 512, 64k, 10M, 1G
duration_option = _parsed_by(parse_duration)  # 90s, 30m, 2h, 7d
gpu_option = _parsed_by(parse_gpu_text)  # all, 2, 0,1, device=1


def transfer_progress() -> Progress:
    return Progress(TextColumn("{task.description:>8}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), console=err_console, transient=True)


def format_setting(value: Any) -> str:
    """A setting's value as config.toml would write it."""
    from p2prc_core.config import toml_value

    return toml_value(value)
