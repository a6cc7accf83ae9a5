"""lmproxy start|stop|sleep|wake NAME: load, unload, put to sleep or wake a model by
hand, through the same lifecycle as its clients (lmproxy.control)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from lmproxy.commands.common import fail, refuse_config, resolve_scope, scope_option
from lmproxy.config import ConfigError
from lmproxy.origin import load_installed
from lmproxy.paths import paths_for

if TYPE_CHECKING:
    from lmproxy.control import Control


def _carry_out(scope: str | None, name: str, request: Callable[[Control], None]) -> None:
    from lmproxy import control

    resolved = resolve_scope(scope)
    config_path = paths_for(resolved).installed_config
    if not config_path.exists():
        fail(f"nothing installed for the {resolved.value} manager ({config_path} is missing)")
    try:
        installed = load_installed(config_path)
    except ConfigError as error:
        refuse_config(error, config_path)
        return
    sys.exit(
        control.run(
            installed.config,
            resolved,
            name,
            request,
            click.echo,
            generation=installed.generation,
            installed_config=config_path,
        )
    )


@click.command()
@scope_option
@click.argument("name")
def start(scope: str | None, name: str) -> None:
    """Load NAME now, without a client: as a client would, it waits its turn and
    evicts idle models if room is short (a sleeping NAME is woken). Exits 0 once it
    runs."""
    _carry_out(scope, name, lambda c: c.start())


@click.command()
@scope_option
@click.option(
    "--force", is_flag=True, help="Stop it even while requests are in flight (cutting them)."
)
@click.argument("name")
def stop(scope: str | None, name: str, force: bool) -> None:
    """Unload NAME now (awake or asleep). Refused while clients use it (a request in
    flight; for a raw service, an open connection) or while it starts, unless --force.
    Exits 0 once its backend has stopped."""
    _carry_out(scope, name, lambda c: c.stop(force=force))


@click.command()
@scope_option
@click.option(
    "--level",
    type=click.IntRange(1, 2),
    default=None,
    help="1: keep the weights in RAM; 2: drop them (default: its Sleep.Level).",
)
@click.argument("name")
def sleep(scope: str | None, name: str, level: int | None) -> None:
    """Put NAME to sleep now (it needs a Sleep object in the config). Refused while
    clients use it, or when what it keeps asleep does not fit. Exits 0 once asleep;
    a sleep that fails stops it, and exits 1."""
    _carry_out(scope, name, lambda c: c.sleep(level or 0))


@click.command()
@scope_option
@click.argument("name")
def wake(scope: str | None, name: str) -> None:
    """Wake NAME now, as its next client would (evicting idle models if room is
    short). Exits 0 once it answers; 1 if it is not asleep and not running."""
    _carry_out(scope, name, lambda c: c.wake())
