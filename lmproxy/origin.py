"""Where an installed config came from: the directory its relative paths resolve in.

large-model-proxy resolves a relative WorkDir, LogFilePath or Command against the
directory it was started in, and runs a service without WorkDir there. lmproxy's
counterpart is the directory `lmproxy install` ran in (or its --base-dir): the
installer records it beside the installed copy of the config, and everything that
reads that copy later (the shims, status, start and stop) resolves paths the same
way, whatever directory it runs in itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmproxy.config import Config, ConfigError, load_config

ORIGIN_FILE = "origin.json"


def origin_path(installed_config: Path) -> Path:
    return installed_config.with_name(ORIGIN_FILE)


def render_origin(config: Config, source: Path) -> str:
    """The record written beside the installed config."""
    record = {"base_dir": config.base_dir, "source": str(source.absolute())}
    return json.dumps(record, indent=1, sort_keys=True) + "\n"


def installed_base_dir(installed_config: Path) -> Path:
    """The base directory recorded at install. An install made before lmproxy recorded
    one resolved paths against the config file's own directory."""
    path = origin_path(installed_config)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return installed_config.absolute().parent
    except (OSError, ValueError) as error:
        raise ConfigError([(str(path), f"cannot read the install record: {error}")]) from None
    base = record.get("base_dir") if isinstance(record, dict) else None
    if not isinstance(base, str) or not base.startswith("/"):
        raise ConfigError([(str(path), "the install record names no absolute base_dir")])
    return Path(base)


def load_installed_config(installed_config: Path) -> Config:
    """The installed config, its relative paths resolved as they were at install."""
    return load_config(installed_config, installed_base_dir(installed_config))
