"""The `lmproxy` command: a Click group; each verb lives in lmproxy.commands."""

from __future__ import annotations

import click

from lmproxy import __version__
from lmproxy.commands.analyze import analyze, plan
from lmproxy.commands.control import sleep, start, stop, wake
from lmproxy.commands.demo import demo
from lmproxy.commands.gpus import gpus
from lmproxy.commands.install import install, uninstall
from lmproxy.commands.logs import logs
from lmproxy.commands.render import render
from lmproxy.commands.run import run
from lmproxy.commands.shim import shim
from lmproxy.commands.status import status
from lmproxy.commands.validate import validate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lmproxy")
def cli() -> None:
    """Start model servers on demand through systemd socket activation.

    Every service in large-model-proxy's config.json gets a socket that systemd
    holds; the first client starts the model (stopping the least recently used
    ones if declared resources run short) and lmproxy relays its bytes.
    """


for command in (
    install,
    uninstall,
    run,
    render,
    validate,
    status,
    start,
    stop,
    sleep,
    wake,
    logs,
    gpus,
    analyze,
    plan,
    shim,
    demo,
):
    cli.add_command(command)
