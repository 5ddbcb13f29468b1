"""The command line through click's CliRunner, on a fresh home."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from click.testing import CliRunner

from p2prc_core.cli import main
from p2prc_core.models import Address
from p2prc_plugins import address


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_init_creates_a_private_home_and_a_commented_config(home: Path) -> None:
    code, out, _ = run("init")
    assert code == 0 and "wrote" in out
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    text = (home / "config.toml").read_text()
    assert "# port = 8088" in text
    code, out, _ = run("init")
    assert code == 0 and "already exists" in out
    assert (home / "config.toml").read_text() == text


def test_init_reports_an_invalid_existing_config(home: Path) -> None:
    home.mkdir()
    (home / "config.toml").write_text("workers = 0\n")
    code, _, err = run("init")
    assert code == 1
    assert "config.toml: workers: must be at least 1, got 0" in err


def test_config_shows_home_values_and_sources(home: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    home.mkdir()
    (home / "config.toml").write_text('name = "attic"\n')
    monkeypatch.setenv("P2PRC_PORT", "9123")
    code, out, _ = run("config", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["home"] == str(home) and data["config_file_exists"] is True
    assert data["settings"]["name"] == "attic" and data["settings"]["port"] == 9123
    assert data["sources"]["port"] == "P2PRC_PORT"
    assert data["sources"]["name"] == str(home / "config.toml")
    code, out, _ = run("config")
    assert "9123" in out and "P2PRC_PORT" in out and str(home) in out


def test_invalid_config_is_one_line_for_every_command(home: Path) -> None:
    home.mkdir()
    (home / "config.toml").write_text("prot = 1\n")
    code, out, err = run("plugins")
    assert code == 1 and out == ""
    assert err.strip() == f"Error: {home / 'config.toml'}: unknown setting 'prot'; " \
                          f"did you mean 'port'?"


def test_interfaces_explains_the_choice(home: Path) -> None:
    code, out, _ = run("interfaces", "--json")
    assert code == 0
    data = json.loads(out)
    rows = data["addresses"]
    assert any(r["address"] == "127.0.0.1" for r in rows)
    loopback = next(r for r in rows if r["address"] == "127.0.0.1")
    assert not loopback["advertised"] and "allow_loopback" in loopback["why"]
    chosen = [r for r in rows if r["advertised"]]
    if data["chosen"]:
        assert [r["address"] for r in chosen] == [data["chosen"]]
        assert chosen[0]["preference"] == 1
        # Nothing that ranks better was passed over.
        ranks = [address.rank(Address.parse(r["address"])) for r in rows
                 if r["preference"] is not None]
        assert address.rank(Address.parse(data["chosen"])) == min(r for r in ranks if r)


def test_interfaces_with_loopback_allowed(home: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("P2PRC_ALLOW_LOOPBACK", "true")
    data = json.loads(run("interfaces", "--json")[1])
    loopback = next(r for r in data["addresses"] if r["address"] == "127.0.0.1")
    assert loopback["preference"] is not None and "loopback" in loopback["why"]


def test_bad_peer_address_is_a_usage_error(home: Path) -> None:
    code, _, err = run("specs", "[fd00::1")
    assert code == 2 and "missing ']'" in err


def test_bad_size_is_a_usage_error(home: Path) -> None:
    code, _, err = run("speedtest", "127.0.0.1", "--bytes", "lots")
    assert code == 2 and "not a size" in err


def test_dash_s_with_a_command_is_refused(home: Path) -> None:
    code, _, err = run("-s", "plugins")
    assert code == 2 and "stand alone" in err


def test_no_command_prints_help(home: Path) -> None:
    code, out, _ = run()
    assert code == 0 and "speedtest" in out and "interfaces" in out
