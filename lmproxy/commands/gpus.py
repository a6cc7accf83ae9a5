"""lmproxy gpus: the GPUs by free memory, and which model (or other program) holds it."""

from __future__ import annotations

import json

import click

from lmproxy.commands.common import fail, resolve_scope, scope_option


@click.command()
@scope_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document.")
def gpus(scope: str | None, as_json: bool) -> None:
    """List the NVIDIA GPUs, most free memory first, and under each one the processes
    holding its memory: lmproxy's models by service name, the rest as outside lmproxy.

    Needs NVIDIA's NVML binding (`pip install nvidia-ml-py`) and its driver."""
    from lmproxy import gpus as core
    from lmproxy.config import ConfigError
    from lmproxy.nvml import NvmlError, session
    from lmproxy.origin import load_installed_config
    from lmproxy.paths import paths_for

    installed = paths_for(resolve_scope(scope)).installed_config
    services: list[str] = []
    if installed.exists():
        try:
            services = [s.name for s in load_installed_config(installed).services]
        except (ConfigError, OSError):
            services = []  # models are then shown by their units' names
    try:
        with session() as nvml:
            readings = core.by_free_memory(nvml.readings())
    except NvmlError as error:
        fail(str(error))
        return
    held = {r.facts.index: core.holders(r, services) for r in readings}
    if as_json:
        click.echo(json.dumps(core.as_json(readings, held), indent=2))
    else:
        click.echo(core.as_text(readings, held))
