"""lmproxy validate: check a config and change nothing."""

from __future__ import annotations

from pathlib import Path

import click

from lmproxy.commands.common import base_dir_option, config_option, refuse_config, warn
from lmproxy.config import ConfigError, load_config


@click.command()
@config_option
@base_dir_option
@click.option(
    "--syntax-only",
    is_flag=True,
    help="Check the file alone, not whether its commands exist on this machine.",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse a Command that cannot run on this machine (default: warn of it).",
)
def validate(config_path: Path, base_dir: Path | None, syntax_only: bool, strict: bool) -> None:
    """Check a config; exit 2 naming each bad value's JSON path. A Command that
    cannot run here is warned of (refused with --strict). Nothing is changed."""
    from lmproxy.installer import refuse_missing_commands, warn_of_missing_commands

    try:
        config = load_config(config_path, base_dir)
        if not syntax_only:
            if strict:
                refuse_missing_commands(config)
            else:
                warn_of_missing_commands(config, warn)
    except ConfigError as error:
        refuse_config(error, config_path)
        return
    click.echo(f"{config_path}: valid, {len(config.services)} service(s)")
