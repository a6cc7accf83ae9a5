"""Where lmproxy keeps things, for the user manager and for the system manager."""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmproxy.config.model import PRIVATE_SOCKET_DIR

if TYPE_CHECKING:
    from lmproxy.config import Service


class Scope(enum.Enum):
    """Which systemd instance owns the units: the system manager or a user's manager."""

    SYSTEM = "system"
    USER = "user"

    @classmethod
    def default(cls) -> Scope:
        """Root manages the system; everyone else their own user manager."""
        return cls.SYSTEM if os.geteuid() == 0 else cls.USER

    @property
    def bus(self) -> str:
        """jeepney's name for the bus that this manager listens on."""
        return "SYSTEM" if self is Scope.SYSTEM else "SESSION"

    @property
    def systemctl_flag(self) -> str:
        return f"--{self.value}"


@dataclass(frozen=True)
class Paths:
    """Every path lmproxy writes to or reads from, for one scope."""

    unit_dir: Path  # where rendered units are installed
    config_dir: Path  # where the installed copy of the config lives
    runtime_dir: Path  # the ledger and other run-time state (tmpfs, gone at reboot)

    @property
    def installed_config(self) -> Path:
        return self.config_dir / "config.json"

    @property
    def start_plan(self) -> Path:
        """What the shims' first stage reads (lmproxy.earlystart); beside the config."""
        return self.config_dir / "start-plan.json"

    @property
    def origin(self) -> Path:
        """Where relative paths in the installed config resolve (lmproxy.origin)."""
        return self.config_dir / "origin.json"

    @property
    def ledger(self) -> Path:
        return self.runtime_dir / "ledger.json"

    @property
    def intent(self) -> Path:
        """A switch of installed files under way (see lmproxy.installer.switch_files)."""
        return self.config_dir / ".install-intent.json"

    def socket_path(self, service: Service) -> str | None:
        """The unix socket a service listens on: its ListenPath, or the private one of a
        service that only the OpenAI router reaches; None for a TCP port."""
        if service.listen_path is not None:
            return service.listen_path
        if service.router_only:
            # The unit says %t/...: the manager's runtime directory, this one's parent.
            return str(self.runtime_dir.parent / PRIVATE_SOCKET_DIR / service.private_socket_name)
        return None

    @property
    def manifest(self) -> Path:
        """The list of unit files the last `lmproxy install` wrote, so that a later
        install or uninstall removes exactly those and nothing else."""
        return self.config_dir / "installed-units.json"


def paths_for(scope: Scope, environ: Mapping[str, str] | None = None) -> Paths:
    env = os.environ if environ is None else environ
    if scope is Scope.SYSTEM:
        return Paths(
            unit_dir=Path("/etc/systemd/system"),
            config_dir=Path("/etc/lmproxy"),
            runtime_dir=Path("/run/lmproxy"),
        )
    home = Path(env.get("HOME") or Path.home())
    config_home = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    runtime = env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return Paths(
        unit_dir=config_home / "systemd" / "user",
        config_dir=config_home / "lmproxy",
        runtime_dir=Path(runtime) / "lmproxy",
    )
