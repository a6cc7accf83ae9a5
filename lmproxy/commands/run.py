"""lmproxy run: try a config in the foreground, as `large-model-proxy -c config.json` runs.

It installs the config into the calling user's systemd manager, follows the journal of
every model here (their output and the shims' decisions, as large-model-proxy prints
its services' output with OutputServiceLogs), and on Ctrl-C or SIGTERM removes exactly
what it installed, closing every port. The models still run under systemd meanwhile:
this is `install`, `logs -f` and `uninstall` in one command, not a second way to run
them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import click

from lmproxy.commands.common import (
    base_dir_option,
    config_option,
    fail,
    refuse_config,
    reserve_option,
    warn,
)
from lmproxy.config import Config, ConfigError


@click.command()
@config_option
@base_dir_option
@reserve_option
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse a Command that cannot run on this machine (default: warn of it).",
)
def run(config_path: Path, base_dir: Path | None, reserve_mib: int, strict: bool) -> None:
    """Try a config in the foreground, as `large-model-proxy -c config.json` does.

    Installs it into your user manager with its sockets listening, prints every
    model's output and the shims' decisions as they come, and on Ctrl-C (or SIGTERM)
    stops and removes exactly what it installed. Refused where `lmproxy install
    --user` has installed a config: that one stays as it is.
    """
    from lmproxy import installer
    from lmproxy.paths import Scope, paths_for
    from lmproxy.systemd import SystemdError
    from lmproxy.trust import UntrustedCode

    if shutil.which("journalctl") is None:
        fail("journalctl is not installed")
    paths = paths_for(Scope.USER)
    refusal = _in_the_way(paths.installed_config, bool(installer.read_manifest(paths)))
    if refusal is not None:
        fail(refusal)
    stopping = _Stopping()
    since = time.time()  # the log from here on: a client may come before it is followed
    try:
        config = installer.install(
            config_path,
            Scope.USER,
            now=True,
            say=click.echo,
            warn=warn,
            strict=strict,
            base_dir=base_dir,
            run_pid=os.getpid(),
            reserve_mib=reserve_mib,
        )
    except ConfigError as error:
        refuse_config(error, config_path)
        return
    except (SystemdError, UntrustedCode) as error:
        fail(str(error))
        return
    try:
        click.echo("following the models' logs; Ctrl-C stops and removes them", err=True)
        _follow(config, stopping, since)
    finally:
        _remove(paths.installed_config)


class _Stopping:
    """SIGINT and SIGTERM end the run (after the uninstall), not the process."""

    def __init__(self) -> None:
        self.follower: subprocess.Popen[bytes] | None = None
        self.requested = False  # a signal came (also while installing)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._stop)

    def _stop(self, _signum: int, _frame: FrameType | None) -> None:
        self.requested = True
        if self.follower is not None and self.follower.poll() is None:
            self.follower.terminate()


def _in_the_way(installed_config: Path, installed: bool) -> str | None:
    """Why `run` must not touch this manager, or None."""
    from lmproxy.origin import read_origin

    if not installed:
        return None
    try:
        pid = read_origin(installed_config).run_pid
    except ConfigError:
        pid = None
    if pid is None:
        return (
            "a config is installed in your user manager (`lmproxy install --user`); "
            "`lmproxy run` leaves it alone: `lmproxy uninstall --user` removes it"
        )
    if _alive(pid):
        return f"`lmproxy run` (process {pid}) is running for your user manager already"
    return None  # an earlier run killed before it could clean up: replaced now


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _follow(config: Config, stopping: _Stopping, since: float) -> None:
    """Prints the models' journal from `since` until a signal comes."""
    from lmproxy import journal, unitnames

    identifiers = [journal.IDENTIFIER]
    if config.output_service_logs:
        identifiers += [unitnames.syslog_identifier(s.name) for s in config.services]
    argv = [
        "journalctl",
        "--follow",
        f"--since=@{since:.6f}",
        "--no-pager",
        "--output=short-precise",
        *(f"SYSLOG_IDENTIFIER={identifier}" for identifier in identifiers),
    ]
    if stopping.requested:
        return
    # Its own session: Ctrl-C reaches this process alone, which ends journalctl itself
    # and then uninstalls (journalctl would otherwise get the SIGINT too).
    follower = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    stopping.follower = follower
    if stopping.requested:  # the signal came between the check and the Popen
        follower.terminate()
    follower.wait()


def _remove(installed_config: Path) -> None:
    """Uninstalls what this run installed, unless an install has replaced it since."""
    from lmproxy import installer
    from lmproxy.origin import read_origin
    from lmproxy.paths import Scope
    from lmproxy.systemd import SystemdError

    try:
        ours = read_origin(installed_config).run_pid == os.getpid()
    except ConfigError:
        ours = False
    if not ours:
        click.echo("a later `lmproxy install` replaced this run's config: left installed", err=True)
        return
    try:
        installer.uninstall(Scope.USER, say=click.echo)
    except SystemdError as error:
        click.echo(f"lmproxy: could not remove the units: {error}", err=True)
        sys.exit(1)
