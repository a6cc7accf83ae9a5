"""A real systemd user manager in a private mount namespace, for tests and the demo.

Development and CI machines often do not run systemd as PID 1, but systemd's
binaries are installed and a user manager runs fine (as root) inside
`unshare --mount` once it sees a private /run/systemd/system. Everything that
lmproxy does then happens for real: socket activation, units with cgroups,
the D-Bus API on the session bus the manager activates, and journald.

The manager's sockets ($XDG_RUNTIME_DIR/bus, .../systemd/private) live in a
directory outside the namespace, so `systemctl --user` and D-Bus clients in
this process reach it with `environ` applied. Only the journal lives in the
namespace: `journalctl` must run inside it (`Sandbox.command`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SYSTEMD = "/lib/systemd/systemd"
JOURNALD = "/lib/systemd/systemd-journald"

# Runs as PID of the namespace's first process: private /run/systemd (so that the
# host's own state is never touched and systemd believes it was booted with it),
# a private journal, then the user manager itself in place of the shell.
_LAUNCH = """
set -e
for cgroup in $LMPROXY_SANDBOX_CGROUPS; do echo $$ > "$cgroup/cgroup.procs"; done
mount -t tmpfs -o mode=755 tmpfs /run/systemd
mkdir -p /run/systemd/system /run/systemd/journal
mount -t tmpfs -o mode=755 tmpfs /run/log
if [ "$LMPROXY_SANDBOX_JOURNAL" = 1 ]; then
    {journald} </dev/null >/dev/null 2>&1 &
    echo $! > "$LMPROXY_SANDBOX_ROOT/journald.pid"
fi
exec {systemd} --user
"""


class SandboxError(RuntimeError):
    """The sandboxed manager could not be started."""


def unavailable_reason() -> str | None:
    """Why a sandbox cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "the systemd sandbox needs root (for a private mount namespace)"
    for binary in (SYSTEMD, JOURNALD):
        if not os.access(binary, os.X_OK):
            return f"{binary} is not installed (apt-get install systemd)"
    for tool in ("unshare", "nsenter", "systemctl", "journalctl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def host_has_systemd() -> bool:
    """True when this machine was booted with systemd (it can run lmproxy directly)."""
    return os.path.isdir("/run/systemd/system")


@dataclass
class Sandbox:
    root: Path
    process: subprocess.Popen[bytes]
    environ: dict[str, str] = field(default_factory=dict)
    cgroups: list[Path] = field(default_factory=list)

    @property
    def manager_pid(self) -> int:
        return self.process.pid

    @property
    def runtime_dir(self) -> Path:
        return Path(self.environ["XDG_RUNTIME_DIR"])

    @property
    def config_home(self) -> Path:
        return Path(self.environ["XDG_CONFIG_HOME"])

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """This process's environment, pointed at the sandboxed manager."""
        merged = dict(os.environ)
        merged.update(self.environ)
        if extra:
            merged.update(extra)
        return merged

    def command(self, argv: Sequence[str], cwd: Path | None = None) -> list[str]:
        """argv, made to run inside the sandbox's mount namespace (needed for journalctl),
        in cwd or this process's working directory (nsenter would use the manager's)."""
        return [
            "nsenter",
            f"--target={self.manager_pid}",
            "--mount",
            f"--wd={cwd or os.getcwd()}",
            "--",
            *argv,
        ]

    def run(
        self, argv: Sequence[str], *, timeout: float = 60, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Runs argv inside the namespace with the sandbox's environment."""
        return subprocess.run(
            self.command(argv),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def systemctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["systemctl", "--user", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def stop(self, timeout: float = 15) -> None:
        """Stops the manager (which stops its units and their processes), then journald."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        pidfile = self.root / "journald.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        for cgroup in self.cgroups:
            remove_cgroup(cgroup)


def start(root: Path | None = None, *, journal: bool = True, timeout: float = 15) -> Sandbox:
    """Starts a user manager in a new private mount namespace, with state under root."""
    reason = unavailable_reason()
    if reason:
        raise SandboxError(reason)
    root = Path(tempfile.mkdtemp(prefix="lmproxy-sandbox-")) if root is None else root
    runtime, config_home = root / "run", root / "config"
    (config_home / "systemd" / "user").mkdir(parents=True, exist_ok=True)
    runtime.mkdir(parents=True, exist_ok=True)
    runtime.chmod(0o700)
    environ = {
        "XDG_RUNTIME_DIR": str(runtime),
        "XDG_CONFIG_HOME": str(config_home),
        "DBUS_SESSION_BUS_ADDRESS": f"unix:path={runtime}/bus",
        "LMPROXY_SANDBOX_ROOT": str(root),
        "LMPROXY_SANDBOX_JOURNAL": "1" if journal else "0",
        "SYSTEMD_LOG_LEVEL": "warning",
    }
    cgroups = private_cgroups(f"{os.getpid()}-{zlib.crc32(str(root).encode()):08x}")
    environ["LMPROXY_SANDBOX_CGROUPS"] = " ".join(str(c) for c in cgroups)
    launch = _LAUNCH.format(journald=JOURNALD, systemd=SYSTEMD)
    log = (root / "manager.log").open("wb")
    process = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", launch],
        env={**os.environ, **environ},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    sandbox = Sandbox(root=root, process=process, environ=environ, cgroups=cgroups)
    try:
        _wait_until_ready(sandbox, timeout)
    except BaseException:
        sandbox.stop()
        raise
    return sandbox


def private_cgroups(name: str) -> list[Path]:
    """A cgroup of its own for the manager, in each hierarchy systemd uses.

    A user manager takes the cgroup it starts in as its root and names units'
    cgroups after them (app.slice/NAME.service): two managers started in the
    same cgroup would share, and kill, each other's units.
    """
    created = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "name=systemd":
            base = Path("/sys/fs/cgroup/systemd")
        elif controllers == "":
            unified = Path("/sys/fs/cgroup/unified")
            base = unified if unified.is_dir() else Path("/sys/fs/cgroup")
        else:
            continue
        cgroup = base / path.lstrip("/") / f"lmproxy-sandbox-{name}"
        if (cgroup.parent / "cgroup.procs").exists():
            cgroup.mkdir(exist_ok=True)
            created.append(cgroup)
    return created


def remove_cgroup(cgroup: Path, *, within_s: float = 5.0) -> None:
    """Removes a cgroup and the ones systemd left inside it. Processes killed a moment ago
    leave their cgroups a moment later (journald, after its SIGKILL): it tries again until
    they are gone, for at most within_s."""
    deadline = time.monotonic() + within_s
    while cgroup.is_dir():
        for child in sorted(cgroup.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if child.is_dir():
                with contextlib.suppress(OSError):
                    child.rmdir()
        with contextlib.suppress(OSError):
            cgroup.rmdir()
        if not cgroup.is_dir() or time.monotonic() >= deadline:
            return
        time.sleep(0.05)


def _accepts(path: Path) -> bool:
    """The session bus socket exists a moment before it accepts connections."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _wait_until_ready(sandbox: Sandbox, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    private = sandbox.runtime_dir / "systemd" / "private"
    journal_socket = f"/proc/{sandbox.manager_pid}/root/run/systemd/journal/socket"
    delay = 0.005
    while time.monotonic() < deadline:
        if sandbox.process.poll() is not None:
            log = (sandbox.root / "manager.log").read_text(errors="replace")
            raise SandboxError(f"the user manager exited at start:\n{log}")
        journal_ready = sandbox.environ["LMPROXY_SANDBOX_JOURNAL"] != "1" or os.path.exists(
            journal_socket
        )
        if private.exists() and journal_ready and _accepts(sandbox.runtime_dir / "bus"):
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    raise SandboxError(f"the user manager did not start within {timeout:g} s")


@contextlib.contextmanager
def running(root: Path | None = None, *, journal: bool = True) -> Iterator[Sandbox]:
    sandbox = start(root, journal=journal)
    try:
        yield sandbox
    finally:
        sandbox.stop()
