"""The command line through click's CliRunner, on a fresh home."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from p2prc_core.cli import main


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


@pytest.mark.usefixtures("fake_interfaces")
def test_interfaces_explains_the_choice(home: Path) -> None:
    code, out, _ = run("interfaces", "--json")
    assert code == 0  # an interface that vanished while it was read is skipped
    data = json.loads(out)
    rows = {r["address"]: r for r in data["addresses"]}
    assert set(rows) == {"127.0.0.1", "::1", "192.168.7.5", "fe80::5", "fd42::5",
                         "2a00:1450:4001::5", "8.8.4.4", "172.17.0.1"}
    assert data["chosen"] == "2a00:1450:4001::5"
    assert [a for a, r in rows.items() if r["advertised"]] == ["2a00:1450:4001::5"]
    assert {a: r["preference"] for a, r in rows.items()} == {
        "2a00:1450:4001::5": 1, "8.8.4.4": 2, "fd42::5": 3, "192.168.7.5": 4,
        "127.0.0.1": None, "::1": None, "fe80::5": None, "172.17.0.1": None}
    assert "container or VM bridge" in rows["172.17.0.1"]["why"]
    assert "allow_loopback" in rows["127.0.0.1"]["why"]
    assert "global IPv6 is preferred" in rows["2a00:1450:4001::5"]["why"]
    assert "never chosen: link-local" in rows["fe80::5"]["why"]


@pytest.mark.usefixtures("fake_interfaces")
def test_interfaces_with_loopback_allowed(home: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("P2PRC_ALLOW_LOOPBACK", "true")
    data = json.loads(run("interfaces", "--json")[1])
    rows = {r["address"]: r for r in data["addresses"]}
    assert (rows["::1"]["preference"], rows["127.0.0.1"]["preference"]) == (5, 6)
    assert "loopback IPv4" in rows["127.0.0.1"]["why"]


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


def test_sizes_and_durations_read_as_people_write_them() -> None:
    from p2prc_core.text import human_bytes, human_duration

    assert human_bytes(100 << 30) == "100 GiB" and human_bytes(1536 << 20) == "1.5 GiB"
    assert human_bytes(1 << 30) == "1 GiB" and human_bytes(512) == "512 B"
    assert human_duration(30 * 86400) == "30 days" and human_duration(86400) == "1 day"
    assert human_duration(7200) == "2 h" and human_duration(90) == "1.5 min"
    assert human_duration(42) == "42 s"


def test_peers_and_group_list_like_the_other_groups(home: Path) -> None:
    for words in (("peers",), ("group",), ("containers",), ("runs",), ("playbooks",)):
        code, out, err = run(*words)
        assert code == 0, (words, err)
        assert out.strip(), words  # a listing, or what to do when it is empty


def test_ids_are_never_wrapped_in_a_narrow_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from p2prc_core import output
    from p2prc_core.identity import NodeIdentity

    node_id = NodeIdentity.generate().node_id
    screen = io.StringIO()
    monkeypatch.setattr(output, "console", Console(file=screen, width=60, highlight=False,
                                                   soft_wrap=False))
    output.print_table(("name", "node id", "gpus"),
                       [("a-peer-with-a-rather-long-name-indeed", node_id,
                         "NVIDIA H200 with a long product name")])
    assert node_id in screen.getvalue()  # whole, on one line: it can be copied


def test_version_and_this_machines_specs(home: Path) -> None:
    import platform

    from p2prc_core import __version__

    code, out, _ = run("version", "--json")
    found = json.loads(out)
    assert code == 0 and found["p2prc"] == __version__
    assert found["python"] == platform.python_version() and "docker" in found["plugins"]
    assert found["docker engine"]  # a version, or why there is none
    code, out, _ = run("specs", "--json")
    mine = json.loads(out)
    assert code == 0 and mine["cpu"]["threads"] >= 1 and mine["memory"]["total"] > 0


def test_help_leads_with_commands_and_examples_and_cuts_nothing(home: Path) -> None:
    code, out, _ = run("--help")
    assert code == 0 and "..." not in out.split("\n", 1)[1]  # past the usage line
    assert out.index("Get started:") < out.index("Examples:") < out.index("Options:") < \
        out.index("The original P2PRC's flags")
    original = out[out.index("The original P2PRC's flags"):]
    for flag in ("--as", "--ls", "--us", "--tc", "--pp", "--vp", "--rp"):
        assert flag in original and flag not in out[out.index("Options:"):
                                                     out.index("The original")]
    for command in ("server", "invite", "touch", "ssh", "forward", "run", "version"):
        assert f"\n  {command} " in out


def test_an_ipv6_address_as_a_table_header_is_shown_whole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from p2prc_core import output

    screen = io.StringIO()
    monkeypatch.setattr(output, "console", Console(file=screen, width=100))
    output.print_table(("", "[fd42:7:7::1]:18300"), [("host", "vm")])
    assert "[fd42:7:7::1]:18300" in screen.getvalue()


def test_a_long_table_looks_as_a_short_one_and_its_cells_are_cleaned(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """From LONG_TABLE rows on, a table is written as plain columns (rich takes about a
    millisecond a row): the same columns, widths and spacing, wide characters counted as
    two, and a peer's escape sequences removed as in a short one."""
    import io

    from rich.console import Console

    from p2prc_core import output

    rows = [(f"peer{i}", "\u540d\u524d" if i == 3 else "x" * (i % 7), f"2001:db8::{i:x}",
             None if i == 5 else "\x1b[31mred\x1b[0m") for i in range(output.LONG_TABLE)]
    columns = ("name", "node id", "address", "gpus")
    shown = {}
    for long_from in (10 ** 9, output.LONG_TABLE):
        screen = io.StringIO()
        monkeypatch.setattr(output, "console", Console(file=screen, width=200,
                                                       highlight=False, soft_wrap=False))
        monkeypatch.setattr(output, "LONG_TABLE", long_from)
        output.print_table(columns, rows)
        shown[long_from] = screen.getvalue()
    assert shown[output.LONG_TABLE] == shown[10 ** 9]
    assert "\x1b" not in shown[output.LONG_TABLE] and "red" in shown[output.LONG_TABLE]


def test_a_long_table_with_a_short_row_keeps_its_header_whole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A row with fewer cells than the table has columns shows the cells it has; the
    header still names every column, and a table with no rows but its header prints."""
    import io

    from rich.console import Console

    from p2prc_core import output

    screen = io.StringIO()
    monkeypatch.setattr(output, "console", Console(file=screen, width=200, highlight=False,
                                                   soft_wrap=False))
    rows = [("a", "b", "c")] * (output.LONG_TABLE - 1) + [("short",)]
    output.print_table(("one", "two", "three"), rows)
    lines = screen.getvalue().splitlines()
    assert lines[0].split() == ["one", "two", "three"]
    assert lines[-1] == "short" and lines[1].split() == ["a", "b", "c"]
    assert len(lines) == output.LONG_TABLE + 1


def test_a_long_json_list_is_the_same_json_an_item_a_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    """From LONG_TABLE items on, ``--json`` writes an item a line (the C encoder; indenting
    takes the pure-Python one): the same data when read, text and escapes kept exactly."""
    from p2prc_core import output

    data = [{"name": f"peer{i}", "gpus": ["H200"] * (i % 3), "latency_ms": i / 7 or None,
             "said": "\x1b[31m\u540d\"q\"\n"} for i in range(output.LONG_TABLE)]
    output.print_json(data)
    shown = capsys.readouterr().out
    assert json.loads(shown) == data
    assert len(shown.splitlines()) == len(data) + 2
    output.print_json(data[:3])  # a short one is indented as before
    assert capsys.readouterr().out == json.dumps(data[:3], indent=2) + "\n"


@pytest.mark.parametrize("text, ask", [("all", True), ("", True), ("2", 2), ("0,1", [0, 1]),
                                       ("device=1", [1]), ("1,", [1]), (" 3 , 0 ", [3, 0])])
def test_gpu_asks_read_as_people_write_them(text: str, ask: object) -> None:
    from p2prc_core.containers import parse_gpu_text

    assert parse_gpu_text(text) == ask


def test_a_gpu_option_that_reads_as_a_peer_says_where_it_goes(home: Path) -> None:
    code, _, err = run("touch", "--gpu", "friend")
    assert code == 2 and "'friend' is not 'all', a count" in err and "after PEER" in err
    for bad in ("0", "device=", "1,a", "two"):
        code, _, err = run("touch", "friend", "--gpu", bad)
        assert code == 2 and "is not 'all', a count (2), or GPU indexes" in err, err
