"""Installing, updating and removing lmproxy's units in a systemd manager.

The config is validated and every unit rendered before anything is written,
so a bad config changes nothing. A manifest of the unit files written by the
last install lets a later install remove the units of services that left the
config, and uninstall remove exactly what lmproxy installed.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmproxy import render, unitnames, unitsyntax
from lmproxy.config import SHIM_USER, Config, ConfigError, load_config
from lmproxy.files import write_atomically
from lmproxy.gpuresources import DEFAULT_RESERVE_MIB, settle
from lmproxy.origin import next_generation, render_origin
from lmproxy.paths import Paths, Scope, paths_for
from lmproxy.render import (
    current_interpreter,
    render_environment_files,
    render_start_plan,
    render_units,
)
from lmproxy.systemd import Manager, SystemdError
from lmproxy.trust import require_root_owned_code

JOB_TIMEOUT_S = 120.0

Say = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    """What an install changes, computed before anything is touched."""

    write: dict[str, str]  # unit file name -> new contents (new or changed)
    keep: tuple[str, ...]  # unit files already as they should be
    remove: tuple[str, ...]  # unit files of a previous install that are no longer wanted


# The search path systemd uses for a bare command name in ExecStart= (systemd.service(5)).
SYSTEMD_EXEC_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def refuse_missing_commands(config: Config) -> None:
    """Refuses (as a config error) a Command this machine cannot run (--strict)."""
    problems = missing_commands(config)
    if problems:
        raise ConfigError(problems)


def missing_commands(config: Config) -> list[tuple[str, str]]:
    """Each Command this machine cannot run now, as (JSON path, why): better said at
    install than found out by the first client. Not an error by default: the server
    may be installed later (large-model-proxy accepts such a config too)."""
    problems = []
    for index, service in enumerate(config.services):
        command = service.command
        if "/" in command:
            runnable = os.path.isfile(command) and os.access(command, os.X_OK)
        else:
            runnable = shutil.which(command, path=SYSTEMD_EXEC_PATH) is not None
        if not runnable:
            where = "" if "/" in command else f" in {SYSTEMD_EXEC_PATH}"
            problems.append(
                (f"$.Services[{index}].Command", f"{command!r} is not an executable file{where}")
            )
    return problems


def warn_of_missing_commands(config: Config, warn: Say) -> None:
    for path, why in missing_commands(config):
        warn(f"warning: {path}: {why}: its model cannot start until it is installed")


def render_for(config: Config, scope: Scope) -> dict[str, str]:
    if scope is Scope.USER:
        # A user manager cannot run a unit as someone else.
        users = [
            (f"$.Services[{index}].{field}", f"{field} needs the system manager (--system)")
            for index, service in enumerate(config.services)
            for field, value in (
                ("User", service.user),
                ("SocketUser", service.socket_user),
                ("SocketGroup", service.socket_group),
            )
            if value
        ]
        if users:
            raise ConfigError(users)
    paths = paths_for(scope)
    return render_units(
        config, scope=scope, config_path=paths.installed_config, interpreter=current_interpreter()
    )


def environment_files_for(config: Config) -> dict[str, str]:
    """Each backend's environment file, by service name (see render.environment_file)."""
    return render_environment_files(config, current_interpreter())


def environment_dir(paths: Paths) -> Path:
    return render.environment_dir(paths.installed_config)


def _environment_changes(
    config: Config, paths: Paths
) -> tuple[dict[Path, tuple[bytes, int]], list[Path]]:
    """The environment files to write (0600: they may hold secrets) and the ones left
    from services that have none now."""
    folder = environment_dir(paths)
    wanted = {
        render.environment_file(paths.installed_config, name): (text.encode(), 0o600)
        for name, text in environment_files_for(config).items()
    }
    stale = sorted(set(folder.glob("*.env")) - set(wanted)) if folder.is_dir() else []
    if wanted:
        _make_private_dir(folder)
    return wanted, stale


def _make_private_dir(folder: Path) -> None:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)


def plan_install(units: dict[str, str], paths: Paths) -> Plan:
    previous = read_manifest(paths)
    write, keep = {}, []
    for name, text in units.items():
        current = paths.unit_dir / name
        if current.is_file() and current.read_text() == text:
            keep.append(name)
        else:
            write[name] = text
    remove = tuple(sorted(name for name in previous if name not in units))
    return Plan(write, tuple(sorted(keep)), remove)


def install(
    config_path: Path,
    scope: Scope,
    *,
    now: bool,
    say: Say,
    warn: Say,
    strict: bool = False,
    base_dir: Path | None = None,
    run_pid: int | None = None,
    reserve_mib: int = DEFAULT_RESERVE_MIB,
) -> Config:
    """Validates, renders, writes, reloads, enables (and with now, starts). A Command
    that cannot run here is refused with strict, else warned of. Relative paths resolve
    in base_dir (default: the current directory), which is recorded (lmproxy.origin),
    with run_pid for `lmproxy run`'s install."""
    config, amounts = settle(load_config(config_path, base_dir), reserve_mib)
    if strict:
        refuse_missing_commands(config)
    else:
        warn_of_missing_commands(config, warn)
    if scope is Scope.SYSTEM:
        require_root_owned_code()
    config_text = config_path.read_bytes()
    paths = paths_for(scope)
    units = render_for(config, scope)
    with Manager.connect(scope) as manager, _install_lock(paths):
        recover(paths)
        _refuse_ports_in_use(config, paths, manager)
        plan = plan_install(units, paths)
        _stop_units(manager, _stop_order(plan.remove), say)
        if plan.remove:
            manager.disable_unit_files([n for n in plan.remove if _enableable(n)])
        files = {paths.unit_dir / name: (text.encode(), 0o644) for name, text in plan.write.items()}
        files[paths.installed_config] = (config_text, config_mode(scope))
        generation = next_generation(paths.installed_config)
        plan_text = render_start_plan(config, config_text, generation).encode()
        files[paths.start_plan] = (plan_text, config_mode(scope))
        origin = render_origin(config, config_path, generation, run_pid, amounts).encode()
        files[paths.origin] = (origin, config_mode(scope))
        files[paths.manifest] = (json.dumps(sorted(units), indent=1).encode(), 0o644)
        environment, stale = _environment_changes(config, paths)
        files.update(environment)
        switch_files(paths, files, [paths.unit_dir / name for name in plan.remove] + stale)
        manager.reload()
        manager.enable_unit_files([n for n in sorted(units) if _enableable(n)])
        sockets = _sockets(config)
        if now:
            _start_sockets(manager, sockets, plan, say)
        _reload_router(manager, config, say)
    for name in plan.remove:
        say(f"removed {name}")
    for name in plan.write:
        say(f"wrote {paths.unit_dir / name}")
    say(
        f"installed {len(config.services)} service(s) for the {scope.value} manager"
        + (
            "; sockets listening"
            if now
            else "; start them with --now or `systemctl "
            f"{scope.systemctl_flag} start {unitnames.TARGET}`"
        )
    )
    return config


def uninstall(scope: Scope, *, say: Say) -> None:
    """Stops and removes every unit the last install wrote, and nothing else."""
    paths = paths_for(scope)
    with Manager.connect(scope) as manager, _install_lock(paths):
        recover(paths)
        installed = read_manifest(paths)
        if not installed:
            say(f"nothing to uninstall for the {scope.value} manager")
            return
        _stop_units(manager, _stop_order(installed), say)
        manager.disable_unit_files([n for n in installed if _enableable(n)])
        for name in installed:
            with contextlib.suppress(FileNotFoundError):
                (paths.unit_dir / name).unlink()
        folder = environment_dir(paths)
        environment = list(folder.glob("*.env")) if folder.is_dir() else []
        splits = paths.runtime_dir / "split"  # TensorSplit's (lmproxy.autosplit)
        environment += list(splits.glob("*.env")) if splits.is_dir() else []
        leftovers = (
            paths.installed_config,
            paths.start_plan,
            paths.origin,
            paths.manifest,
            paths.ledger,
        )
        for leftover in (*leftovers, *environment):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        for emptied in (folder, splits):
            with contextlib.suppress(OSError):
                emptied.rmdir()
        manager.reload()
    say(f"removed {len(installed)} unit(s) from the {scope.value} manager")


def read_manifest(paths: Paths) -> list[str]:
    try:
        names = json.loads(paths.manifest.read_text())
    except FileNotFoundError:
        return []
    # Only names lmproxy could have written: a tampered manifest cannot make
    # uninstall remove someone else's units.
    return [
        n
        for n in names
        if isinstance(n, str)
        and "/" not in n
        and (n.startswith(unitnames.PREFIX) or n in (unitnames.TARGET, unitnames.SLICE))
    ]


def _listeners(config: Config) -> list[tuple[str, str, str, int]]:
    """Every TCP port lmproxy listens on: (JSON path, socket unit, address, port)."""
    found = [
        (
            f"$.Services[{index}].ListenPort",
            unitnames.socket_unit(service.name),
            service.listen_address,
            service.listen_port,
        )
        for index, service in enumerate(config.services)
        if service.listen_port is not None  # a unix socket: systemd replaces a stale one
    ]
    found += [
        (api.path, unitnames.api_socket(api.name), config.listen_address, api.port)
        for api in config.apis
    ]
    return found


def _sockets(config: Config) -> list[str]:
    """Every socket unit of an install, to start with --now."""
    sockets = [unitnames.socket_unit(s.name) for s in config.services]
    return sockets + [unitnames.api_socket(api.name) for api in config.apis]


def _refuse_ports_in_use(config: Config, paths: Paths, manager: Manager) -> None:
    """Refuses (as a config error: nothing is changed) a port another program holds.
    A port held by systemd for this same installed socket is of course fine."""
    problems = []
    for json_path, socket_unit, address, port in _listeners(config):
        listen = unitsyntax.listen_stream(address, port)
        installed = paths.unit_dir / socket_unit
        if (
            installed.is_file()
            and f"ListenStream={listen}\n" in installed.read_text()
            and manager.unit_state(socket_unit).running
        ):
            continue
        if not _can_bind(address, port):
            problems.append((json_path, f"{listen} is already in use by another program"))
    if problems:
        raise ConfigError(problems)


def _can_bind(address: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


def _stop_order(units: Sequence[str]) -> list[str]:
    """Sockets first (no new shims), then shims, then backends."""

    def rank(name: str) -> int:
        if name.endswith(".socket") or name == unitnames.TARGET:
            return 0
        if unitnames.is_backend_unit(name):
            return 2
        return 1

    return sorted((n for n in units if n != unitnames.SLICE), key=rank)


def _enableable(name: str) -> bool:
    return name.endswith(".socket") or name == unitnames.TARGET


def _reload_router(manager: Manager, config: Config, say: Say) -> None:
    """A running router reads the new config (models added or removed) without a
    restart: requests in flight go on. One that is not running reads it when it starts."""
    if config.openai_api_listen_port is None:
        return
    name = unitnames.api_service(unitnames.ROUTER)
    if manager.unit_state(name).active_state != "active":
        return
    try:
        manager.reload_unit(name, JOB_TIMEOUT_S)
    except SystemdError as error:
        say(f"warning: {error}")
    else:
        say(f"reloaded {name}")


def _stop_units(manager: Manager, units: Sequence[str], say: Say) -> None:
    for name in units:
        try:
            manager.stop_unit(name, JOB_TIMEOUT_S)
        except SystemdError as error:
            say(f"warning: {error}")


def _start_sockets(manager: Manager, sockets: Sequence[str], plan: Plan, say: Say) -> None:
    for name in sockets:
        if name in plan.write and manager.unit_state(name).running:
            # A changed socket (new port or address) only binds anew when restarted;
            # its shim stops with it, its backend keeps running and is adopted.
            manager.stop_unit(name, JOB_TIMEOUT_S)
            say(f"restarting {name}: its settings changed")
        manager.start_unit(name, JOB_TIMEOUT_S)
    manager.start_unit(unitnames.TARGET, JOB_TIMEOUT_S)


STAGED_SUFFIX = ".lmproxy-new"  # not a unit type: systemd ignores staged files


SHIM_GROUP = SHIM_USER  # sysusers gives the shims' user a group of its name


def config_mode(scope: Scope) -> int:
    """The config may hold secrets (Environment): only those who run the shims read
    it. Under the system manager the shims run as lmproxy, which reads it by group."""
    return 0o640 if scope is Scope.SYSTEM and _shim_gid() is not None else 0o600


def _shim_gid() -> int | None:
    try:
        return grp.getgrnam(SHIM_GROUP).gr_gid
    except KeyError:
        return None


def switch_files(paths: Paths, files: dict[Path, tuple[bytes, int]], remove: list[Path]) -> None:
    """Replaces the installed set of files by a new one, as one step.

    Every new file is first written in full beside its final name; then an
    intent (what to rename, what to remove) is written atomically: that is the
    commit point. If lmproxy dies before it, `recover` deletes the staged files
    and the old set stands; after it, `recover` finishes the switch. systemd
    only reads the files at the reload that follows, so it sees one set or the
    other, never a mix.
    """
    renames = []
    for path, (data, mode) in files.items():
        staged = path.with_name(f".{path.name}{STAGED_SUFFIX}")
        _write_file(staged, data, mode)
        renames.append((str(staged), str(path)))
    intent = {"rename": renames, "remove": [str(path) for path in remove]}
    write_atomically(paths.intent, json.dumps(intent).encode(), 0o600)
    _finish_switch(paths)


def recover(paths: Paths) -> None:
    """Completes a switch that was committed, or drops one that was not."""
    if paths.intent.exists():
        _finish_switch(paths)
    for folder in (paths.unit_dir, paths.config_dir, environment_dir(paths)):
        if folder.is_dir():
            for staged in folder.glob(f".*{STAGED_SUFFIX}"):
                staged.unlink()


def _finish_switch(paths: Paths) -> None:
    intent = json.loads(paths.intent.read_text())
    for staged, final in intent["rename"]:
        if os.path.exists(staged):
            os.replace(staged, final)
    for path in intent["remove"]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    for folder in {Path(final).parent for _, final in intent["rename"]}:
        _fsync_dir(folder)
    paths.intent.unlink()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Writes a whole file; one readable by group (0640) belongs to the shims' group."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as file:
        if mode & 0o077 == 0o040 and (gid := _shim_gid()) is not None:
            os.fchown(file.fileno(), -1, gid)
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.chmod(path, mode)


@contextlib.contextmanager
def _install_lock(paths: Paths) -> Iterator[None]:
    """One install or uninstall at a time per manager."""
    paths.config_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.config_dir / ".install.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
