"""lmproxy status: every service's state, reservations and connections."""

from __future__ import annotations

import json

import click

from lmproxy.commands.common import fail, refuse_config, resolve_scope, scope_option
from lmproxy.config import ConfigError
from lmproxy.origin import load_installed_config
from lmproxy.paths import paths_for


@click.command()
@scope_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document (see the README).")
def status(scope: str | None, as_json: bool) -> None:
    """Show each service (cold, starting, running, draining, falling-asleep, sleeping,
    waking, stopping, failed) and each resource."""
    from lmproxy import status as core
    from lmproxy.ledger import LedgerError
    from lmproxy.systemd import SystemdError

    resolved = resolve_scope(scope)
    config_path = paths_for(resolved).installed_config
    if not config_path.exists():
        fail(f"nothing installed for the {resolved.value} manager ({config_path} is missing)")
    try:
        services, resources = core.collect(load_installed_config(config_path), resolved)
    except ConfigError as error:
        refuse_config(error, config_path)
        return
    except (SystemdError, LedgerError) as error:
        fail(str(error))
        return
    if as_json:
        click.echo(json.dumps(core.as_json(resolved, services, resources), indent=2))
    else:
        click.echo(core.as_table(services, resources))
