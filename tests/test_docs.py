"""The docs stay true to the code: hooks, commands and routes are all documented and tested."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from falcon import testing

from p2prc_core import hookdocs
from p2prc_core.cli import main
from p2prc_core.server import create_app, openapi
from p2prc_core.services import NodeServices

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_hooks_md_is_generated_from_the_specs() -> None:
    assert (DOCS / "hooks.md").read_text() == hookdocs.render(), \
        "docs/hooks.md is stale: python -m p2prc_core.hookdocs > docs/hooks.md"


def test_every_hook_is_documented_with_its_parameters() -> None:
    import inspect

    from p2prc_core import hookspecs

    for name in hookdocs.hook_names():
        function = getattr(hookspecs, name)
        doc = inspect.getdoc(function) or ""
        assert len(doc.splitlines()[0]) > 10, f"{name} has no summary line"
        for parameter in inspect.signature(function).parameters:
            assert f":param {parameter}:" in doc, f"{name} does not document {parameter}"


def test_every_hook_has_a_test_that_implements_it() -> None:
    tests = {path.name: path.read_text() for path in (ROOT / "tests").glob("test_*.py")
             if path.name != Path(__file__).name}
    for name in hookdocs.hook_names():
        implemented = [file for file, text in tests.items() if re.search(rf"def {name}\(", text)]
        assert implemented, f"no test implements {name}"


def all_commands(group: click.Group, prefix: str = "") -> list[str]:
    """Every command path, the lazily loaded ones too (``list_commands``, not ``commands``)."""
    found = []
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        path = f"{prefix}{name}"
        found.append(path)
        if isinstance(command, click.Group):
            found.extend(all_commands(command, path + " "))
    return found


def test_every_command_is_in_the_cli_docs() -> None:
    text = (DOCS / "cli.md").read_text()
    for path in all_commands(main):
        assert f"p2prc {path}" in text, f"docs/cli.md does not describe 'p2prc {path}'"


def test_every_route_is_in_the_api_docs(hooks, settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    text = (DOCS / "api.md").read_text()
    app = create_app(NodeServices(settings, tmp_path, hooks))
    assert testing.TestClient(app).simulate_get("/v1/health").status_code == 200
    for template, method, _ in openapi.routes(app):
        assert f"{method.upper()} {template}" in text, f"docs/api.md lacks {method} {template}"


def test_the_systemd_unit_parses(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not on this machine")
    unit = (ROOT / "contrib" / "systemd" / "p2prc.service").read_text()
    assert "ExecStart=/opt/p2prc/.venv/bin/p2prc server" in unit  # as its comment says
    here = tmp_path / "p2prc.service"  # this checkout's p2prc, so the command exists
    here.write_text(unit.replace("/opt/p2prc/.venv/bin/p2prc",
                                 str(Path(sys.executable).with_name("p2prc"))))
    checked = subprocess.run(["systemd-analyze", "verify", str(here)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    broken = tmp_path / "broken.service"
    broken.write_text(unit.replace("/opt/p2prc/.venv/bin/p2prc", "no/such/p2prc"))
    assert subprocess.run(["systemd-analyze", "verify", str(broken)],
                          capture_output=True, timeout=60).returncode != 0


def test_shell_completion_completes_commands() -> None:
    import os
    import subprocess
    import sys

    result = subprocess.run([str(Path(sys.executable).with_name("p2prc"))],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "_P2PRC_COMPLETE": "bash_complete",
                                 "COMP_WORDS": "p2prc pe", "COMP_CWORD": "1"})
    assert "plain,peers" in result.stdout.split()  # click: TYPE,VALUE a line
