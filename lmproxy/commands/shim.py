"""lmproxy shim: what a socket unit starts; not meant to be run by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lmproxy.commands.common import resolve_scope, scope_option


@click.command()
@click.argument("name")
@scope_option
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="The installed config.",
)
def shim(name: str, scope: str | None, config_path: Path) -> None:
    """Serve NAME's socket (started by lmproxy-NAME.socket through socket activation)."""
    from lmproxy.shim import main

    sys.exit(main(name, resolve_scope(scope), config_path))
