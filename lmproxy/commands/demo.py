"""lmproxy demo: the lazy start and the eviction, on two fake models."""

from __future__ import annotations

import click

from lmproxy.commands.common import fail


@click.command()
@click.option(
    "--port",
    type=int,
    default=18080,
    show_default=True,
    help="The first fake model's port; the second uses the next one, the management "
    "API the one after.",
)
def demo(port: int) -> None:
    """Show lmproxy at work on two fake models sharing one fake GPU.

    Runs in a private sandboxed systemd user manager when this machine was not
    booted with systemd (needs root), in your own user manager otherwise; it
    removes everything it installed when it ends.
    """
    from lmproxy import demo as core
    from lmproxy.sandbox import SandboxError

    try:
        core.run(port, port + 1, click.echo)
    except SandboxError as error:
        fail(f"cannot start a sandboxed systemd: {error}")
