"""lmproxy validate: check a config and change nothing."""

from __future__ import annotations

from pathlib import Path

import click

from lmproxy.commands.common import config_option, refuse_config
from lmproxy.config import ConfigError, load_config


@click.command()
@config_option
def validate(config_path: Path) -> None:
    """Check a config; exit 2 naming each bad value's JSON path."""
    try:
        config = load_config(config_path)
    except ConfigError as error:
        refuse_config(error, config_path)
        return
    click.echo(f"{config_path}: valid, {len(config.services)} service(s)")
