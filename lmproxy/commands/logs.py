"""lmproxy logs NAME: the backend's output and the shim's decisions, from the journal."""

from __future__ import annotations

import os
import shutil

import click

from lmproxy import journal, unitnames
from lmproxy.commands.common import fail
from lmproxy.router import requestlog


def journalctl_argv(name: str, *, follow: bool, lines: int | None) -> list[str]:
    """Every source, interleaved: the backend's SyslogIdentifier, the shim's messages
    about this service, and the router's lines for its requests (journalctl's `+` is a
    logical or)."""
    argv = ["journalctl", "--no-pager", "--output=short-precise"]
    if follow:
        argv.append("--follow")
    if lines is not None:
        argv.append(f"--lines={lines}")
    argv += [
        f"SYSLOG_IDENTIFIER={unitnames.syslog_identifier(name)}",
        "+",
        f"SYSLOG_IDENTIFIER={journal.IDENTIFIER}",
        f"LMPROXY_SERVICE={name}",
        "+",
        f"SYSLOG_IDENTIFIER={requestlog.IDENTIFIER}",
        f"LMPROXY_SERVICE={name}",
    ]
    return argv


@click.command()
@click.argument("name")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new entries.")
@click.option("--lines", "-n", type=int, default=None, help="Show only the last N entries.")
def logs(name: str, follow: bool, lines: int | None) -> None:
    """Show NAME's backend output, the shim's decisions about it and the OpenAI
    router's line for each of its requests."""
    if shutil.which("journalctl") is None:
        fail("journalctl is not installed")
    argv = journalctl_argv(name, follow=follow, lines=lines)
    os.execvp(argv[0], argv)
