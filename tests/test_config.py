import os
import subprocess
from pathlib import Path

import pytest

from conftest import P2PRC
from p2prc_core.config import ConfigError, default_config_text, load_settings


def write(home: Path, text: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path: Path) -> None:
    loaded = load_settings(tmp_path, environ={})
    assert loaded.settings.port == 8088
    assert loaded.settings.host == "::"
    assert set(loaded.sources.values()) == {"default"}


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, 'port = 9001\nname = "attic"\nworkers = 3\n')
    loaded = load_settings(tmp_path, overrides={"workers": 5, "name": None},
                           environ={"P2PRC_PORT": "9002"})
    s = loaded.settings
    assert (s.port, s.name, s.workers) == (9002, "attic", 5)
    assert loaded.sources["port"] == "P2PRC_PORT"
    assert loaded.sources["name"] == str(path)
    assert loaded.sources["workers"] == "command line"


def test_list_and_bool_from_environment(tmp_path: Path) -> None:
    s = load_settings(tmp_path, environ={"P2PRC_DISABLE_PLUGINS": "nvidia, scoring",
                                         "P2PRC_ALLOW_LOOPBACK": "yes"}).settings
    assert s.disable_plugins == ["nvidia", "scoring"]
    assert s.allow_loopback is True


@pytest.mark.parametrize("text, words", [
    ("port = 'eighty'", r"port: expected a whole number, got 'eighty'"),
    ("port = 70000", r"port: must be at most 65535"),
    ("prot = 80", r"unknown setting 'prot'; did you mean 'port'\?"),
    ("log_level = 'loud'", r"log_level: must be one of debug, info, warning, error"),
    ("port = ", r"not valid TOML"),
    ("allow_loopback = 1", r"allow_loopback: expected true or false"),
])
def test_invalid_file_names_file_key_and_problem(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=words) as caught:
        load_settings(tmp_path, environ={})
    assert str(caught.value).startswith(str(path))


def test_invalid_environment_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^P2PRC_PORT: port"):
        load_settings(tmp_path, environ={"P2PRC_PORT": "x"})
    with pytest.raises(ConfigError, match=r"^P2PRC_ALLOW_LOOPBACK: allow_loopback"):
        load_settings(tmp_path, environ={"P2PRC_ALLOW_LOOPBACK": "perhaps"})


def test_default_config_text_is_valid_once_uncommented(tmp_path: Path) -> None:
    uncommented = "\n".join(line[2:] for line in default_config_text().splitlines()
                            if line.startswith("# ") and " = " in line)
    write(tmp_path, uncommented)
    loaded = load_settings(tmp_path, environ={})
    assert loaded.settings.port == 8088
    assert loaded.sources["port"].endswith("config.toml")


def test_sizes_and_durations_as_people_write_them(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('container_max_memory = "4G"\n'
                                          'container_max_ttl = "7d"\n')
    loaded = load_settings(tmp_path, environ={"P2PRC_CONTAINER_DEFAULT_MEMORY": "512M"})
    assert loaded.settings.container_max_memory == 4 << 30
    assert loaded.settings.container_max_ttl == 7 * 86400
    assert loaded.settings.container_default_memory == 512 << 20
    (tmp_path / "config.toml").write_text('container_max_memory = "4X"\n')
    with pytest.raises(ConfigError, match="container_max_memory: '4X' is not a size"):
        load_settings(tmp_path, environ={})


def test_a_malformed_or_mistyped_variable_is_said_plainly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="P2PRC_PORT: port: expected a whole number, "
                                          "got 'abc'"):
        load_settings(tmp_path, environ={"P2PRC_PORT": "abc"})
    loaded = load_settings(tmp_path, environ={"P2PRC_PROT": "9000",
                                              "P2PRC_REQUIRE_INTEGRATION": "1"})
    assert loaded.warnings == ["P2PRC_PROT is not a p2prc setting and is ignored; did you "
                               "mean P2PRC_PORT?"]
    shown = subprocess.run([P2PRC, "config"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "P2PRC_HOME": str(tmp_path),
                                "P2PRC_NAME": "alice", "P2PRC_PROT": "9000"})
    assert "did you mean P2PRC_PORT?" in shown.stderr
    assert '"alice"' in shown.stdout and "'alice'" not in shown.stdout
    assert " true " in shown.stdout and " True " not in shown.stdout
