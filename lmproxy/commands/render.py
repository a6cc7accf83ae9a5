"""lmproxy render: write the units a config gives to a folder; systemd is not touched."""

from __future__ import annotations

from pathlib import Path

import click

from lmproxy.commands.common import config_option, fail, refuse_config, resolve_scope, scope_option
from lmproxy.config import ConfigError, load_config


@click.command()
@config_option
@scope_option
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Folder to write the unit files to (created if missing).",
)
def render(config_path: Path, scope: str | None, output: Path) -> None:
    """Write the systemd units for a config to a folder, for packagers and the curious."""
    from lmproxy.installer import render_for

    try:
        units = render_for(load_config(config_path), resolve_scope(scope))
    except ConfigError as error:
        refuse_config(error, config_path)
        return
    clashes = [name for name in units if (output / name).exists() and not (output / name).is_file()]
    if clashes:
        fail(f"{output}: {', '.join(clashes)} exist and are not files; nothing was written")
    output.mkdir(parents=True, exist_ok=True)
    for name, text in sorted(units.items()):
        (output / name).write_text(text)
        click.echo(str(output / name))
