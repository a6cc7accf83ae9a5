"""lmproxy install / uninstall: put the units into systemd, or take them out."""

from __future__ import annotations

from pathlib import Path

import click

from lmproxy.commands.common import (
    base_dir_option,
    config_option,
    fail,
    refuse_config,
    reserve_option,
    resolve_scope,
    scope_option,
    warn,
)
from lmproxy.config import ConfigError


@click.command()
@config_option
@base_dir_option
@reserve_option
@scope_option
@click.option("--now", is_flag=True, help="Also start the sockets (they listen at once).")
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse a Command that cannot run on this machine (default: warn of it).",
)
def install(
    *,
    config_path: Path,
    base_dir: Path | None,
    reserve_mib: int,
    scope: str | None,
    now: bool,
    strict: bool,
) -> None:
    """Render units from a config and install them into systemd.

    Re-running it with a changed config updates the units in place, removes
    those of services that left the config, and leaves the others running; a
    running OpenAI router (OpenAiApi) is reloaded, without dropping a request.
    A bad config is refused (exit 2) and nothing is changed. A Command that
    cannot run here is warned of (its model's start fails until it is
    installed), or refused with --strict. Relative paths in the config resolve
    in the current directory (or --base-dir), which is recorded: a service
    without WorkDir runs there, as under large-model-proxy.
    """
    from lmproxy import installer
    from lmproxy.systemd import SystemdError
    from lmproxy.trust import UntrustedCode

    try:
        installer.install(
            config_path,
            resolve_scope(scope),
            now=now,
            say=click.echo,
            warn=warn,
            strict=strict,
            base_dir=base_dir,
            reserve_mib=reserve_mib,
        )
    except ConfigError as error:
        refuse_config(error, config_path)
    except (SystemdError, UntrustedCode) as error:
        fail(str(error))


@click.command()
@scope_option
def uninstall(scope: str | None) -> None:
    """Stop and remove every unit lmproxy installed, and nothing else."""
    from lmproxy import installer
    from lmproxy.systemd import SystemdError

    try:
        installer.uninstall(resolve_scope(scope), say=click.echo)
    except SystemdError as error:
        fail(str(error))
