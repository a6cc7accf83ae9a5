"""lmproxy validate: check a config and change nothing."""

from __future__ import annotations

from pathlib import Path

import click

from lmproxy.commands.common import config_option, refuse_config
from lmproxy.config import ConfigError, load_config


@click.command()
@config_option
@click.option(
    "--syntax-only",
    is_flag=True,
    help="Check the file alone, not whether its commands exist on this machine.",
)
def validate(config_path: Path, syntax_only: bool) -> None:
    """Check a config, and that its commands exist here; exit 2 naming each bad
    value's JSON path. Nothing is changed."""
    from lmproxy.installer import refuse_missing_commands

    try:
        config = load_config(config_path)
        if not syntax_only:
            refuse_missing_commands(config)
    except ConfigError as error:
        refuse_config(error, config_path)
        return
    click.echo(f"{config_path}: valid, {len(config.services)} service(s)")
