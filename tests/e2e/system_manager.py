"""A real systemd *system* manager in private PID and mount namespaces, for system-mode tests.

systemd runs as PID 1 of a new PID namespace and starts only what the test needs:
journald, the system bus (dbus-daemon) and polkit. That is enough to check what
system mode promises: the rendered system units load, a shim runs as the
unprivileged `lmproxy` user, and polkit lets it start and stop its own
backend's unit and nothing else.

A system manager does far more to its machine than a user manager, and this
machine's own /tmp, /etc and kernel settings must not feel any of it (a first
attempt let systemd-tmpfiles-setup, pulled in by sysinit.target, empty the
host's /tmp). So, inside the namespaces, before systemd starts:

* /run, /tmp, /var/tmp and the persistent journal's folder are empty tmpfs;
* /etc is an overlay whose writes land on a tmpfs (the polkit rule, the
  installed config, users made by systemd-sysusers), and /etc/systemd/system,
  where `lmproxy install --system` writes units, is an empty tmpfs;
* /proc/sys is read-only, and the UTS namespace is private (systemd sets the
  hostname and some sysctls at boot);
* systemd's unit search path is only /etc/systemd/system and a folder of units
  written here (SYSTEMD_UNIT_PATH), none of them with default dependencies, and
  sysinit.target & co. are empty: no distribution unit can ever be pulled in.

The namespace's files are reached from outside through /proc/PID/root;
commands run inside with nsenter. SIGTERM makes PID 1 re-execute, so `stop`
kills it with SIGKILL, which takes the whole PID namespace with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmproxy.sandbox import JOURNALD, SYSTEMD, private_cgroups, remove_cgroup

DBUS_DAEMON = "/usr/bin/dbus-daemon"
POLKITD = "/usr/lib/polkit-1/polkitd"
SYSUSERS = "systemd-sysusers"
TARGET = "lmproxy-sandbox.target"
# Inside the namespace: the base units, and (for a source checkout) lmproxy's copy.
STATE = "/run/lmproxy-sandbox"
SOURCE_COPY = f"{STATE}/python"
CHECKOUT = Path(__file__).resolve().parents[2]
CHECKOUT_PARTS = ("lmproxy", "templates", "units", "system")

# New PID, mount and UTS namespaces; the PID namespace's own /proc.
_NAMESPACES = ("unshare", "--pid", "--fork", "--mount", "--uts", "--propagation=private")
# What PID 1 of the namespace runs: private file systems first, then systemd.
_LAUNCH = """
set -eu
for cgroup in $LMPROXY_SANDBOX_CGROUPS; do echo $$ > "$cgroup/cgroup.procs"; done
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p {state}/etc-upper {state}/etc-work /run/systemd/system /run/lock
cp -r "$LMPROXY_SANDBOX_ROOT/units" {state}/units
if [ -n "$LMPROXY_SANDBOX_SOURCE" ]; then
    mkdir {source}
    for part in {parts}; do cp -r "$LMPROXY_SANDBOX_SOURCE/$part" {source}/; done
fi
mount -t overlay overlay -o lowerdir=/etc,upperdir={state}/etc-upper,workdir={state}/etc-work /etc
mount -t tmpfs -o mode=755 tmpfs /etc/systemd/system
mkdir -p /etc/systemd/journald.conf.d
printf '[Journal]\\nStorage=volatile\\nReadKMsg=no\\n' > /etc/systemd/journald.conf.d/sandbox.conf
if [ -n "$LMPROXY_SANDBOX_POLKIT_RULE" ]; then
    # The checkout's rule, and not an installed package's (polkit would read both).
    mkdir -p /etc/polkit-1/rules.d
    cp "$LMPROXY_SANDBOX_POLKIT_RULE" /etc/polkit-1/rules.d/
    packaged=/usr/share/polkit-1/rules.d/$(basename "$LMPROXY_SANDBOX_POLKIT_RULE")
    if [ -e "$packaged" ]; then mount --bind /dev/null "$packaged"; fi
fi
{sysusers} "$LMPROXY_SANDBOX_ROOT/units/lmproxy.sysusers" >/dev/null
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
if [ -d /var/log/journal ]; then mount -t tmpfs -o mode=755 tmpfs /var/log/journal; fi
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
exec env SYSTEMD_UNIT_PATH=/etc/systemd/system:{state}/units container=lmproxy-sandbox \\
    {systemd} --system --unit={target} --log-target=console --log-level=warning
"""

# Units with DefaultDependencies=no, and the targets that units with default
# dependencies (lmproxy's) ask for, empty: nothing else can be pulled in.
_BASE_UNITS = {
    TARGET: """[Unit]
Description=lmproxy sandbox: journald, the system bus, polkit
Wants=systemd-journald.service dbus.socket dbus.service polkit.service
After=systemd-journald.service dbus.service polkit.service
""",
    "systemd-journald.service": f"""[Unit]
Description=Journal (volatile, private to the sandbox)
DefaultDependencies=no

[Service]
Type=notify
ExecStart={JOURNALD}
""",
    "dbus.socket": """[Unit]
Description=System bus socket
DefaultDependencies=no

[Socket]
ListenStream=/run/dbus/system_bus_socket
""",
    "dbus.service": f"""[Unit]
Description=System bus
DefaultDependencies=no
Requires=dbus.socket
After=dbus.socket systemd-journald.service

[Service]
Type=notify
NotifyAccess=main
ExecStart={DBUS_DAEMON} --system --address=systemd: --nofork --nopidfile --systemd-activation
""",
    "polkit.service": f"""[Unit]
Description=Authorization manager
DefaultDependencies=no
Requires=dbus.socket
After=dbus.service

[Service]
Type=dbus
BusName=org.freedesktop.PolicyKit1
ExecStart={POLKITD} --no-debug
""",
    "system.slice": "[Unit]\nDefaultDependencies=no\n",
    **{
        target: "[Unit]\nDefaultDependencies=no\n"
        for target in ("sysinit.target", "basic.target", "sockets.target", "shutdown.target")
    },
}


class SystemManagerError(RuntimeError):
    """The sandboxed system manager could not be started."""


def unavailable_reason() -> str | None:
    """Why a system manager cannot be sandboxed here, or None when it can."""
    if os.geteuid() != 0:
        return "the system manager sandbox needs root (PID and mount namespaces)"
    for binary in (SYSTEMD, JOURNALD, DBUS_DAEMON, POLKITD):
        if not os.access(binary, os.X_OK):
            return f"{binary} is not installed (tools/setup installs it)"
    for tool in ("unshare", "nsenter", "systemctl", SYSUSERS):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlay file system (for a private /etc)"
    return None


@dataclass
class SystemManager:
    root: Path  # on this machine: the launch log and the base units
    process: subprocess.Popen[bytes]  # unshare, which waits for the namespace's PID 1
    pid1: int  # systemd, as this machine's PID namespace numbers it
    cgroups: list[Path]
    source: Path | None  # the checkout copied in, or None for the installed lmproxy

    @property
    def python_path(self) -> str | None:
        """PYTHONPATH inside the namespace for the lmproxy under test."""
        return SOURCE_COPY if self.source else None

    def path(self, inside: str) -> Path:
        """A path of the namespace, as seen from this machine."""
        return Path(f"/proc/{self.pid1}/root") / inside.lstrip("/")

    def command(self, argv: Sequence[str]) -> list[str]:
        return ["nsenter", f"--target={self.pid1}", "--mount", "--pid", "--wd=/", "--", *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """argv inside the namespaces, with a plain environment (and PYTHONPATH for a
        checkout). Every call is bounded: a call into a dying manager can hang."""
        environ = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        if self.python_path:
            environ["PYTHONPATH"] = self.python_path
        environ.update(env or {})
        return subprocess.run(
            self.command(argv),
            env=environ,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def systemctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-ask-password", *args], timeout=timeout)

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", f"--property={prop}", "--value", unit).stdout.strip()

    def log(self) -> str:
        return (self.root / "manager.log").read_text(errors="replace")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid1, signal.SIGKILL)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for cgroup in self.cgroups:
            remove_cgroup(cgroup)  # the namespace's processes leave them a moment after SIGKILL
        shutil.rmtree(self.root, ignore_errors=True)


def start(*, source: Path | None = CHECKOUT, timeout: float = 30) -> SystemManager:
    """Boots a system manager in new PID, mount and UTS namespaces.

    source: a checkout whose lmproxy (and polkit rule) the namespace gets a copy of, where
    the unprivileged users can read it; None tests the installed lmproxy and its rule."""
    reason = unavailable_reason()
    if reason:
        raise SystemManagerError(reason)
    root = Path(tempfile.mkdtemp(prefix="lmproxy-system-"))
    units = root / "units"
    units.mkdir()
    for name, text in _BASE_UNITS.items():
        (units / name).write_text(text)
    shutil.copy(CHECKOUT / "system" / "lmproxy.sysusers", units / "lmproxy.sysusers")
    cgroups = private_cgroups(f"system-{os.getpid()}-{zlib.crc32(str(root).encode()):08x}")
    environ = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LMPROXY_SANDBOX_ROOT": str(root),
        "LMPROXY_SANDBOX_CGROUPS": " ".join(str(c) for c in cgroups),
        "LMPROXY_SANDBOX_SOURCE": str(source) if source else "",
        "LMPROXY_SANDBOX_POLKIT_RULE": str(source / "system" / "60-lmproxy.rules")
        if source
        else "",
    }
    launch = _LAUNCH.format(
        state=STATE,
        source=SOURCE_COPY,
        parts=" ".join(CHECKOUT_PARTS),
        sysusers=SYSUSERS,
        systemd=SYSTEMD,
        target=TARGET,
    )
    with (root / "manager.log").open("wb") as log:
        process = subprocess.Popen(
            [*_NAMESPACES, "--mount-proc", "sh", "-c", launch],
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    manager = None
    try:
        pid1 = _namespace_init(process, root, timeout)
        manager = SystemManager(root, process, pid1, cgroups, source)
        _wait_until_ready(manager, timeout)
    except BaseException:
        if manager is None:
            process.kill()
            process.wait()
            for cgroup in cgroups:
                remove_cgroup(cgroup)
            shutil.rmtree(root, ignore_errors=True)
        else:
            manager.stop()
        raise
    return manager


@contextlib.contextmanager
def running(*, source: Path | None = CHECKOUT) -> Iterator[SystemManager]:
    manager = start(source=source)
    try:
        yield manager
    finally:
        manager.stop()


def _namespace_init(process: subprocess.Popen[bytes], root: Path, timeout: float) -> int:
    """The PID (in this machine's numbering) of the child that unshare forked: PID 1 inside."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = (root / "manager.log").read_text(errors="replace")
            raise SystemManagerError(f"the namespace's first process exited:\n{log}")
        with contextlib.suppress(FileNotFoundError):
            pids = children.read_text().split()
            if pids:
                return int(pids[0])
        time.sleep(0.01)
    raise SystemManagerError(f"unshare forked no child within {timeout:g} s")


def _wait_until_ready(manager: SystemManager, timeout: float) -> None:
    """Until the sandbox's target is reached and the bus and polkit run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if manager.process.poll() is not None:
            raise SystemManagerError(f"the system manager exited at start:\n{manager.log()}")
        if manager.path("/run/systemd/private").exists():
            with contextlib.suppress(subprocess.TimeoutExpired):
                result = manager.systemctl(
                    "is-active", TARGET, "dbus.service", "polkit.service", timeout=5
                )
                states = result.stdout.split()
                if states == ["active"] * 3:
                    return
                if "failed" in states:
                    status = manager.systemctl("status", "--no-pager", "--all", timeout=5)
                    raise SystemManagerError(
                        f"sandbox units failed ({states}):\n{status.stdout}\n{manager.log()}"
                    )
        time.sleep(0.05)
    raise SystemManagerError(f"the system manager was not ready within {timeout:g} s")
