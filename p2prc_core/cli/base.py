"""The ``p2prc`` group, its context object, and what every command shares.

The group loads a command's module only when that command runs (``COMMANDS``), and what a
command needs (httpx, rich's progress bars, Docker's SDK, the plugins) only inside it, so
that no command pays at start for what only others use (tests/test_cli_start.py)."""

from __future__ import annotations

import atexit
import importlib
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from p2prc_core import __version__
from p2prc_core.config import ConfigError, LoadedSettings, Settings, default_home, load_settings
from p2prc_core.disk import disk_full, full_message
from p2prc_core.errors import BadAddress, P2PRCError
from p2prc_core.models import Endpoint, parse_duration, parse_endpoint, parse_size

if TYPE_CHECKING:  # each loads only for the commands that use it
    from rich.progress import Progress

    from p2prc_core.client import PeerClient
    from p2prc_core.plugins import PluginHooks
    from p2prc_core.services import NodeServices


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
            from p2prc_core.plugins import make_plugin_manager

            self._hooks = make_plugin_manager(disabled=self.settings.disable_plugins,
                                              home=self.home)
        return self._hooks

    @property
    def services(self) -> NodeServices:
        if self._services is None:
            from p2prc_core.services import NodeServices

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


# Each command: the module of p2prc_core.cli that defines it, and its short help as
# 'p2prc --help' shows it. The group imports a module when one of its commands runs, and the
# help imports none (tests/test_cli_start.py keeps this equal to the commands themselves).
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("local", "Show the home directory and the effective settings, with where each "
                        "came from."),
    "containers": ("containers", "Containers this client started (ls)."),
    "doctor": ("local", "Check what this node needs to work well, with a fix for each problem; "
                        "exit 1 if any check fails."),
    "exec": ("jobs", "Run COMMAND on the best peer that fits (or --on one): a fresh container, "
                     "the -i inputs sent, output live, the -o outputs back, the container "
                     "removed."),
    "forward": ("containers", "Serve PORT of CONTAINER on 127.0.0.1:LOCAL_PORT (default: the "
                              "same number if free, else any), through the host's p2prc port, "
                              "until Ctrl-C."),
    "group": ("containers", "Groups of containers: a group name works wherever a container id "
                            "does (ls is the default)."),
    "id": ("trust", "Print this node's id (the key is created on first use) and, on stderr, "
                    "the fingerprint of the TLS certificate its server presents."),
    "image": ("local", "The base container image."),
    "init": ("local", "Create this node's home directory and a commented config.toml."),
    "interfaces": ("local", "Every local address, and which one p2prc advertises and why."),
    "invite": ("trust", "Print a one-time token for a friend: 'p2prc join TOKEN' on their "
                        "machine makes them trusted here (they can start work on this node) "
                        "and puts each node in the other's table."),
    "jobs": ("jobs", "Jobs that 'p2prc exec' ran: ls, show, logs, get, rm."),
    "join": ("trust", "Redeem a friend's invite: you are trusted there, and their node joins "
                      "your table."),
    "peers": ("peers", "The peer table: add peers, list them (the default), and discover "
                       "more."),
    "playbooks": ("tasks", "Playbook bundles (site.yml + p2prc.toml) installed here."),
    "plugins": ("local", "List every plugin with its distribution, version and hooks."),
    "rm": ("containers", "Stop and remove a container (or every container of a group) and "
                         "forget it."),
    "run": ("tasks", "Run a playbook on containers and groups, all at once, with progress per "
                     "host."),
    "runs": ("tasks", "Past runs and their artifacts."),
    "server": ("local", "Run the peer server (Ctrl-C or SIGTERM stops it)."),
    "specs": ("peers", "Show a peer's CPU, memory, disk, load and GPUs; with no PEER, this "
                       "machine's."),
    "speedtest": ("peers", "Measure download and upload speed to a peer, in Mbit/s."),
    "ssh": ("containers", "Log into a container with your key, checking its pinned host key."),
    "ssh-config": ("containers", "OpenSSH Host entries (p2prc-ID) for your containers, through "
                                 "the tunnel with the pinned host keys: for scp, rsync, VS Code "
                                 "Remote, or ssh itself."),
    "status": ("local", "This node at a glance: id, server, transport, addresses as peers see "
                        "them, peers, the containers it hosts for peers and those you hold on "
                        "peers, and GPUs."),
    "touch": ("containers", "Start a container on PEER with SSH access (your key) and open "
                            "ports."),
    "trust": ("trust", "Let NODE (a node id, or a peer's name from the table) run work here; "
                       "with no NODE, list the nodes trusted here."),
    "tunnel": ("containers", "Join standard input and output to PORT of CONTAINER, through its "
                             "host's p2prc port (what 'p2prc ssh' gives OpenSSH as its "
                             "ProxyCommand)."),
    "ui": ("local", "Serve a local web dashboard: peers, your containers, this host's "
                    "containers and trusted nodes, runs, and specs."),
    "untrust": ("trust", "Stop trusting NODE (its id, a unique start of it, or its name): its "
                         "next signed request here gets 403."),
    "version": ("local", "Versions of p2prc, Python, the Docker engine, Ansible and each "
                         "plugin."),
}


def load_all_commands() -> None:
    """Import every command's module (for what needs the whole tree: the docs' checks)."""
    for module in sorted({module for module, _ in COMMANDS.values()}):
        importlib.import_module(f"p2prc_core.cli.{module}")


def _reported_in_one_line(err: Exception) -> bool:
    """Whether ERR is an error p2prc states in one line: its own, a config error or a plugin
    that failed to load (looked up only once loaded: it cannot have been raised before)."""
    plugins = sys.modules.get("p2prc_core.plugins")
    return isinstance(err, P2PRCError | ConfigError) or (
        plugins is not None and isinstance(err, plugins.PluginLoadError))


def quick_exit(code: str | int | None) -> NoReturn:
    """End the process as ``sys.exit(code)`` would, less the interpreter's teardown: with
    the modules a command loads, freeing every object one by one takes longer (about 0.1 s)
    than many commands' own work. What an exit must still do is done first: other threads
    finished (else the normal exit waits for them), ``atexit`` callbacks run, standard
    output and error flushed (a closed pipe is exit status 120, as Python's own). Under a
    profiler or a tracer (``python -m cProfile``, a debugger), the usual exit, so that they
    can report."""
    if threading.active_count() > 1 or sys.getprofile() is not None \
            or sys.gettrace() is not None:
        sys.exit(code)
    status = code if isinstance(code, int) else 0 if code is None else 1
    if isinstance(code, str) and sys.stderr is not None:
        print(code, file=sys.stderr)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # its descriptor was closed when Python started
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 120
    os._exit(status)


class P2PRCGroup(click.Group):
    """Loads each command's module when that command runs (``COMMANDS``); turns every p2prc
    error into one line on stderr and a non-zero exit; its help leads with the commands, by
    topic and whole, and a few examples."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The ``p2prc`` command itself (tests call ``main``, which this leaves alone)."""
        try:
            return self.main(*args, **kwargs)
        except SystemExit as end:
            quick_exit(end.code)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            importlib.import_module(f"p2prc_core.cli.{COMMANDS[cmd_name][0]}")
        return self.commands.get(cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BadAddress as err:
            raise click.UsageError(str(err)) from None
        except Exception as err:
            if _reported_in_one_line(err):
                raise click.ClickException(str(err)) from None
            if disk_full(err):
                raise click.ClickException(full_message(err, "p2prc's home")) from None
            raise

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.format_usage(ctx, formatter)
        self.format_help_text(ctx, formatter)
        self.format_commands(ctx, formatter)
        with formatter.section("Examples"):
            formatter.write(EXAMPLES)
        self.format_options(ctx, formatter)
        self.format_epilog(ctx, formatter)

    def help_line(self, name: str) -> str | None:
        """NAME's line in 'p2prc --help' (None: hidden), without loading its module."""
        command = self.commands.get(name)
        if command is not None:
            return None if command.hidden else command.get_short_help_str(limit=300)
        return COMMANDS[name][1] if name in COMMANDS else None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        listed: set[str] = set()
        names = self.list_commands(ctx)
        for title, section in SECTIONS + [("More", names)]:
            rows = []
            for name in section:
                short = self.help_line(name) if name in names else None
                if short is None or name in listed:
                    continue
                listed.add(name)
                rows.append((name, short))
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


# What carries out the original flags (``cli.original`` registers it): it loads the commands
# they stand for through the group, only when one is given.
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


def _gpu_text(text: str) -> bool | int | list[int]:
    """``--gpu``'s text as a request's ``gpu`` (the containers module loads only now)."""
    from p2prc_core.containers import parse_gpu_text

    return parse_gpu_text(text)


gpu_option = _parsed_by(_gpu_text)  # all, 2, 0,1, device=1


def transfer_progress() -> Progress:
    """A transient bar of bytes sent or received, on stderr."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    from p2prc_core.output import err_console

    return Progress(TextColumn("{task.description:>8}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), console=err_console, transient=True)


def format_setting(value: Any) -> str:
    """A setting's value as config.toml would write it."""
    from p2prc_core.config import toml_value

    return toml_value(value)
