"""The command line starts fast: ``p2prc --help``, ``version`` and ``peers ls`` load only what
they need (issue 27). Checked by the modules a fresh interpreter holds after the command, not
by milliseconds (timings are bench/'s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from p2prc_core.cli import main
from p2prc_core.cli.base import COMMANDS, SECTIONS, load_all_commands

COMMAND_MODULES = {f"p2prc_core.cli.{module}" for module, _ in COMMANDS.values()}
# What a command that talks to no peer, or shows no bar, must not pay for at start.
HTTP = {"httpx", "httpcore", "trio", "h11", "h2"}
SLOW = HTTP | {"rich.progress", "docker", "p2prc_core.services", "p2prc_core.exec_job"}

# Runs the command line in this interpreter as the p2prc script does, then writes the
# modules it holds to the file named by the first argument.
RUN_AND_LIST = """\
import json, sys
from p2prc_core.cli import main
try:
    main(sys.argv[2:], prog_name="p2prc", standalone_mode=False)
finally:
    with open(sys.argv[1], "w") as out:
        json.dump(sorted(sys.modules), out)
"""


def modules_after(tmp_path: Path, *args: str, **more: str) -> set[str]:
    """The modules a fresh interpreter holds after 'p2prc ARGS' (on a fresh home), with the
    environment variables ``more``."""
    listing = tmp_path / "modules.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PRC_")}
    env["P2PRC_HOME"] = str(tmp_path / "home")
    env.update(more)
    done = subprocess.run([sys.executable, "-c", RUN_AND_LIST, str(listing), *args],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return set(json.loads(listing.read_text()))


def loaded(modules: set[str], names: set[str]) -> set[str]:
    """Those of NAMES (packages included with their submodules) that MODULES hold."""
    return {m for m in modules if m in names or m.split(".")[0] in names}


def test_help_loads_no_command_module_and_nothing_slow(tmp_path: Path) -> None:
    modules = modules_after(tmp_path, "--help")
    assert not modules & COMMAND_MODULES
    assert not loaded(modules, SLOW | {"rich", "p2prc_core.plugins", "p2prc_core.wire"})


def test_version_loads_its_own_module_only(tmp_path: Path) -> None:
    modules = modules_after(tmp_path, "version")
    assert modules & COMMAND_MODULES == {"p2prc_core.cli.local"}
    assert not loaded(modules, {"p2prc_core.exec_job"})


def test_version_asks_the_engine_without_the_docker_sdk_or_importlib_metadata(
        tmp_path: Path) -> None:
    """The engine's version over its socket, the packages' from their metadata folders'
    names, the plugins' from what the home kept: none of the 0.1 s imports."""
    (tmp_path / "home").mkdir()
    engine = {"DOCKER_HOST": f"unix://{tmp_path}/docker.sock"}  # (whether one answers or not)
    modules_after(tmp_path, "version", **engine)  # (the first finds the plugins)
    modules = modules_after(tmp_path, "version", **engine)
    assert not loaded(modules, {"docker", "requests", "urllib3", "importlib.metadata"})


def test_peers_ls_loads_its_own_module_only(tmp_path: Path) -> None:
    modules = modules_after(tmp_path, "peers", "ls")
    assert modules & COMMAND_MODULES == {"p2prc_core.cli.peers"}
    assert not loaded(modules, {"docker", "p2prc_core.exec_job"})


@pytest.mark.parametrize("args", [("version",), ("peers", "ls"), ("peers", "ls", "--json")])
def test_version_and_peers_ls_load_no_http_client(tmp_path: Path, args: tuple[str, ...]) -> None:
    assert not loaded(modules_after(tmp_path, *args), HTTP | {"rich.progress"})


def test_peers_ls_json_loads_no_rich(tmp_path: Path) -> None:
    """What a program reads needs no terminal tables (rich: 20 ms of a command's start)."""
    assert not loaded(modules_after(tmp_path, "peers", "ls", "--json"), {"rich"})


def test_the_table_of_commands_is_the_commands() -> None:
    """``COMMANDS`` names each command's module and its help line exactly as the command
    itself says them, so 'p2prc --help' (which loads no command) says the same."""
    load_all_commands()
    assert set(main.commands) == set(COMMANDS)
    for name, command in main.commands.items():
        module, line = COMMANDS[name]
        assert command.callback is not None
        assert command.callback.__module__ == f"p2prc_core.cli.{module}", name
        assert line == command.get_short_help_str(limit=300), name
    assert {name for _, names in SECTIONS for name in names} <= set(COMMANDS)


def help_text(first: str = "") -> str:
    """'p2prc --help' in a fresh interpreter, after the statement FIRST."""
    code = f"{first}\nfrom p2prc_core.cli import main\nmain(['--help'], 'p2prc')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True, env={**os.environ, "COLUMNS": "80"}).stdout


def test_help_is_the_same_before_and_after_the_commands_load() -> None:
    """The help that reads ``COMMANDS`` and the one that reads the loaded commands agree."""
    before = help_text()
    for name in COMMANDS:
        assert f"\n  {name} " in before
    assert help_text("from p2prc_core.cli.base import load_all_commands; "
                     "load_all_commands()") == before


def test_every_command_resolves_through_the_group() -> None:
    ctx = click.Context(main)
    assert main.list_commands(ctx) == sorted(COMMANDS)
    for name in COMMANDS:
        command = main.get_command(ctx, name)
        assert command is not None and command.name == name
    assert main.get_command(ctx, "no-such-command") is None


# -- the quick exit: no interpreter teardown, nothing an exit owes left undone ----------------

ATEXIT_THEN_CLI = """\
import atexit, sys
from pathlib import Path
atexit.register(lambda: Path(sys.argv[1]).write_text("atexit ran"))
from p2prc_core.cli import main
main(sys.argv[2:], prog_name="p2prc")
"""


def cli(tmp_path: Path, *args: str, code: str = ATEXIT_THEN_CLI,
        **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PRC_")}
    env["P2PRC_HOME"] = str(tmp_path / "home")
    return subprocess.run([sys.executable, "-c", code, str(tmp_path / "mark"), *args],
                          capture_output=True, text=True, timeout=120, env=env,
                          **kwargs)  # type: ignore[call-overload]


def test_a_command_ends_with_its_output_its_code_and_its_atexit_work_done(
        tmp_path: Path) -> None:
    done = cli(tmp_path, "--help")
    assert done.returncode == 0 and "Examples" in done.stdout  # all of it, flushed
    assert (tmp_path / "mark").read_text() == "atexit ran"
    (tmp_path / "mark").unlink()
    refused = cli(tmp_path, "peers", "rm", "no-such-peer")
    assert refused.returncode == 1 and "no-such-peer" in refused.stderr
    assert (tmp_path / "mark").read_text() == "atexit ran"
    usage = cli(tmp_path, "no-such-command")
    assert usage.returncode == 2 and "No such command" in usage.stderr


def test_output_larger_than_a_pipe_arrives_whole(tmp_path: Path) -> None:
    """Written through a pipe the reader empties slowly: every byte arrives before the
    process ends, none is lost to the quick exit."""
    code = ATEXIT_THEN_CLI.replace("main(sys.argv[2:], prog_name=\"p2prc\")", (
        "import click\n"
        "@main.command('flood')\n"
        "def flood():\n"
        "    click.echo('x' * 1_000_000)\n"
        "main(sys.argv[2:], prog_name='p2prc')"))
    done = cli(tmp_path, "flood", code=code)
    assert done.returncode == 0 and done.stdout == "x" * 1_000_000 + "\n"


def test_a_reader_that_goes_away_early_gets_no_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PRC_")}
    env["P2PRC_HOME"] = str(tmp_path / "home")
    proc = subprocess.Popen([sys.executable, "-c", ATEXIT_THEN_CLI, str(tmp_path / "mark"),
                             "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(1)
    proc.stdout.close()
    said = proc.stderr.read().decode()
    assert proc.wait(60) in (0, 1, 120) and "Traceback" not in said, said


def test_a_command_whose_threads_still_run_ends_the_usual_way(tmp_path: Path) -> None:
    """A thread of its own still working (not a daemon): the exit waits for it, as
    Python's does, and what it writes arrives."""
    code = ATEXIT_THEN_CLI.replace("main(sys.argv[2:], prog_name=\"p2prc\")", (
        "import threading, time\n"
        "def late():\n"
        "    time.sleep(0.3)\n"
        "    print('the thread finished', flush=True)\n"
        "threading.Thread(target=late).start()\n"
        "main(sys.argv[2:], prog_name='p2prc')"))
    done = cli(tmp_path, "--help", code=code)
    assert done.returncode == 0 and done.stdout.endswith("the thread finished\n")


@pytest.mark.parametrize("closed", [">&-", "2>&-"])
def test_a_command_whose_output_was_closed_before_it_started_still_ends_well(
        tmp_path: Path, closed: str) -> None:
    """Python gives a command started with its standard output or error closed None for
    it: nothing to flush, no traceback, exit 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PRC_")}
    env["P2PRC_HOME"] = str(tmp_path / "home")
    done = subprocess.run(["bash", "-c", f"'{sys.executable}' -m p2prc_core --version {closed}"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stdout + done.stderr, done


def test_peers_ls_finds_the_plugins_without_importlib_metadata_once_they_were_found(
        tmp_path: Path) -> None:
    """The first command on a home reads every distribution's metadata for the plugins'
    entry points; the next ones read what it kept (tens of milliseconds less each). (A
    home that does not exist yet is not made for it.)"""
    (tmp_path / "home").mkdir()
    first = modules_after(tmp_path, "peers", "ls")
    assert "importlib.metadata" in first
    assert (tmp_path / "home" / "entry-points.json").exists()
    again = modules_after(tmp_path, "peers", "ls")
    assert "importlib.metadata" not in again
    assert {"p2prc_plugins.docker", "p2prc_plugins.scoring"} <= again  # the same plugins
