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
from p2prc_core.errors import BadAddress, P2PRCError
from p2prc_core.models import Endpoint, parse_duration, parse_endpoint, parse_size
from p2prc_core.output import err_console
from p2prc_core.plugins import PluginHooks, PluginLoadError, make_plugin_manager
from p2prc_core.services import NodeServices

if TYPE_CHECKING:  # httpx and what uses it load only for commands that talk to peers
    from p2prc_core.client import PeerClient


class CliContext:
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
        """A client for PEER (an argument that is neither a known peer nor an address is a
        usage error: ``BadAddress``, mapped in ``P2PRCGroup``)."""
        return self.services.peers.client(peer)


def resolve_peer(text: str) -> Endpoint:
    """ADDRESS[:PORT] (IPv6 in brackets)."""
    try:
        return parse_endpoint(text)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="PEER") from None


# How 'p2prc --help' groups the commands (any command not named here goes under "More").
SECTIONS = [
    ("Get started", ["init", "server", "status", "doctor", "id", "invite", "join"]),
    ("Run one thing", ["exec", "jobs"]),
    ("Peers", ["peers", "specs", "speedtest", "trust", "untrust", "interfaces"]),
    ("Containers", ["touch", "ssh", "forward", "ssh-config", "containers", "rm", "group"]),
    ("Tasks", ["playbooks", "run", "runs"]),
    ("This node", ["ui", "config", "plugins", "image", "version"]),
]
EXAMPLES = """\
  p2prc exec -i train.py -o /job/out -- python3 train.py
                                     run a script on the best friend's machine, results back
  p2prc server                       run your peer server (keep it running)
  p2prc invite                       a token for a friend; they run: p2prc join TOKEN
  p2prc peers update && p2prc peers  learn of more peers; list them, near and fast first
  p2prc touch alice --ports 1        a container on alice's machine
  p2prc ssh 3f2a9c1d0b7e             log in (through alice's p2prc port)
  p2prc run http --on 3f2a9c1d0b7e   an Ansible playbook on containers
"""


class P2PRCGroup(click.Group):
    """Turns every p2prc error into one line on stderr and a non-zero exit; its help leads
    with the commands, by topic and whole, and a few examples."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BadAddress as err:
            raise click.UsageError(str(err)) from None
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
                (original if isinstance(param, OriginalFlag) else ours).append(record)
        with formatter.section("Options"):
            formatter.write_dl(ours)
        if original:
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


pass_node = click.make_pass_decorator(CliContext)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


class OriginalFlag(click.Option):
    """One of the original P2PRC's flags (``-s``, ``--as``, ``--ls`` ...), shown in a
    section of its own. ``cli.original`` declares them and carries them out."""


# What carries out the original flags (``cli.original`` registers it): it imports the
# commands they stand for, which import this module, so this module never imports them.
run_original: list[Callable[[click.Context, dict[str, Any]], None]] = []


@click.group(cls=P2PRCGroup, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(path_type=Path), envvar="P2PRC_HOME",
              help="This node's home directory [default: ~/.p2prc; env P2PRC_HOME].")
@click.version_option(__version__, "--version", prog_name="p2prc")
@click.pass_context
def main(ctx: click.Context, home: Path | None, **original: Any) -> None:
    """p2prc: connect to a friend's machine, or one close by, and run anything on it."""
    ctx.obj = CliContext(home)
    for run in run_original:
        run(ctx, original)
    if ctx.invoked_subcommand is None and not any(original.values()):
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
