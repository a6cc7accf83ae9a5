"""lmproxy render: write the units a config gives to a folder; systemd is not touched."""

from __future__ import annotations

import os
from pathlib import Path

import click

from lmproxy import unitnames
from lmproxy.commands.common import (
    base_dir_option,
    config_option,
    fail,
    refuse_config,
    resolve_scope,
    scope_option,
)
from lmproxy.config import ConfigError, load_config


@click.command()
@config_option
@base_dir_option
@scope_option
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Folder to write the unit files to (created if missing).",
)
def render(config_path: Path, base_dir: Path | None, scope: str | None, output: Path) -> None:
    """Write the systemd units for a config to a folder, for packagers and the curious.

    Backends' environments go to environment/NAME.env in the folder, readable by you
    only (install puts them beside the installed config, where the units look)."""
    from lmproxy.installer import environment_files_for, render_for

    try:
        config = load_config(config_path, base_dir)
        units = render_for(config, resolve_scope(scope))
    except ConfigError as error:
        refuse_config(error, config_path)
        return
    environment = environment_files_for(config)
    clashes = [name for name in units if (output / name).exists() and not (output / name).is_file()]
    if clashes:
        fail(f"{output}: {', '.join(clashes)} exist and are not files; nothing was written")
    output.mkdir(parents=True, exist_ok=True)
    for name, text in sorted(units.items()):
        (output / name).write_text(text)
        click.echo(str(output / name))
    for name, text in sorted(environment.items()):
        path = output / "environment" / f"{unitnames.component(name)}.env"
        path.parent.mkdir(mode=0o700, exist_ok=True)
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(text)
        click.echo(str(path))
