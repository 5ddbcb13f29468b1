from pathlib import Path

import pytest

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
