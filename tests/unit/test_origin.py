"""The install record: where an installed config's relative paths resolve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmproxy.config import ConfigError, parse_config
from lmproxy.origin import (
    installed_base_dir,
    load_installed,
    load_installed_config,
    next_generation,
    origin_path,
    render_origin,
)

CONFIG = {
    "Services": [
        {
            "Name": "m",
            "ListenPort": 8080,
            "ProxyTargetPort": 18080,
            "Command": "./serve",
            "LogFilePath": "logs/m.log",
        }
    ]
}


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(CONFIG))
    return path


def test_the_installed_config_resolves_where_install_ran(
    installed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    monkeypatch.chdir(tmp_path)
    config = parse_config(json.dumps(CONFIG), models)
    origin_path(installed).write_text(render_origin(config, Path("config.json"), 42))
    monkeypatch.chdir(installed.parent)  # wherever the reader runs
    assert load_installed(installed).generation == 42
    loaded = load_installed_config(installed)
    assert loaded.base_dir == str(models)
    assert loaded.services[0].command == str(models / "serve")
    assert loaded.services[0].log_file_path == str(models / "logs" / "m.log")
    assert json.loads(origin_path(installed).read_text())["source"] == str(tmp_path / "config.json")


def test_an_install_without_a_record_resolves_beside_the_config(installed: Path) -> None:
    """What lmproxy did before it recorded the directory (and generations)."""
    assert installed_base_dir(installed) == installed.parent
    assert load_installed_config(installed).base_dir == str(installed.parent)
    assert load_installed(installed).generation == 0


def test_each_install_has_a_greater_generation(installed: Path) -> None:
    config = parse_config(json.dumps(CONFIG), installed.parent)
    first = next_generation(installed)
    origin_path(installed).write_text(render_origin(config, installed, first))
    assert next_generation(installed) > first
    far = 2**62  # a clock set back cannot make a generation go back either
    origin_path(installed).write_text(render_origin(config, installed, far))
    assert next_generation(installed) == far + 1


@pytest.mark.parametrize(
    "record",
    [
        "{",
        "[]",
        '{"base_dir": 3}',
        '{"base_dir": "relative/dir"}',
        "{}",
        '{"base_dir": "/srv", "generation": -1}',
        '{"base_dir": "/srv", "generation": "1"}',
    ],
)
def test_a_damaged_record_is_a_config_error_naming_it(installed: Path, record: str) -> None:
    origin_path(installed).write_text(record)
    with pytest.raises(ConfigError) as caught:
        load_installed_config(installed)
    [(where, _)] = caught.value.problems
    assert where == str(origin_path(installed))
