"""Rendering a config into systemd units, with the Jinja2 templates in templates/.

Every value reaches a unit through one of the escaping filters of
`lmproxy.unitsyntax`: the environment's `finalize` refuses anything else, so a
template cannot put a raw config string into a unit by mistake, and a config
cannot inject a directive, a specifier or another unit.
"""

from __future__ import annotations

import binascii
import json
import site
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2

from lmproxy import autosplit, earlystart, ledger, resources, unitnames, unitsyntax
from lmproxy.config import SHIM_USER, Config, Service
from lmproxy.paths import Scope

BACKEND_STOP_TIMEOUT_S = 30
# What a shim unit runs (python3 -c): lmproxy.earlystart reads its arguments from sys.argv.
FIRST_STAGE = "from lmproxy.earlystart import main; main()"
# Beside the installed config: the backends' environments, readable by their owner only.
ENVIRONMENT_DIR = "environment"


class Escaped(str):
    """A string already made safe for a unit file by lmproxy.unitsyntax."""


def _refuse_unescaped(value: object) -> object:
    if isinstance(value, Escaped):
        return value
    raise TypeError(f"unescaped value {value!r} in a unit template")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.data_dir("templates"))),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        finalize=_refuse_unescaped,
    )
    return env


@dataclass(frozen=True)
class Interpreter:
    """How units run lmproxy's own Python modules (the shim, the log tee)."""

    executable: str
    environment: Mapping[str, str]
    package_parent: str  # the folder lmproxy's package is in

    def module(self, module: str, *args: str) -> list[str]:
        """-P: the unit's working directory (a models folder) stays off the module path."""
        return [self.executable, "-P", "-m", module, *args]

    def first_stage(self, *args: str) -> tuple[list[str], dict[str, str]]:
        """The shim's command and environment: its first stage (lmproxy.earlystart).
        Every millisecond before its StartUnit is a cold start's: it skips site's
        start-up (-S; it runs site later), so lmproxy's own folder comes through
        PYTHONPATH, and runpy's imports (-c rather than -m); -P keeps the working
        directory off the module path."""
        argv = [self.executable, "-P", "-S", "-c", FIRST_STAGE, *args]
        return argv, {**self.environment, "PYTHONPATH": self.package_parent}


def current_interpreter() -> Interpreter:
    """The interpreter running now: right for Debian's package, a venv and a
    source checkout alike. A checkout is not on the interpreter's path, so its
    units get PYTHONPATH."""
    package_parent = str(Path(__file__).resolve().parent.parent)
    site_dirs = {
        str(Path(p).resolve()) for p in [*site.getsitepackages(), site.getusersitepackages()]
    }
    environment = {} if package_parent in site_dirs else {"PYTHONPATH": package_parent}
    return Interpreter(sys.executable, environment, package_parent)


def environment_dir(config_path: Path) -> Path:
    """The folder of the backends' environment files, beside the installed config."""
    return config_path.parent / ENVIRONMENT_DIR


def environment_file(config_path: Path, service: str) -> Path:
    """Where the backend of service finds its environment: systemd reads the file (as
    root, for the system manager) before it starts the model server as its user.

    Not Environment= lines: unit files are readable by every local user, and systemd
    publishes Environment= over D-Bus to anyone who asks (`systemctl show`), where
    EnvironmentFile= shows only this path."""
    return environment_dir(config_path) / f"{unitnames.component(service)}.env"


def backend_environment(service: Service, interpreter: Interpreter) -> dict[str, str]:
    """What the backend's process gets: the config's Environment and, when lmproxy's log
    tee runs the command, what the tee needs to import lmproxy."""
    environment = dict(service.environment)
    if service.log_file_path:
        for key, value in interpreter.environment.items():
            # The tee must import lmproxy even when the service sets its own PYTHONPATH.
            own = environment.get(key)
            environment[key] = f"{value}:{own}" if own else value
    return environment


def render_environment_files(config: Config, interpreter: Interpreter) -> dict[str, str]:
    """The contents of each backend's environment file, by service name; a service
    whose backend needs no environment has none."""
    files = {}
    for service in config.services:
        environment = backend_environment(service, interpreter)
        if environment:
            files[service.name] = "".join(
                unitsyntax.environment_file_line(k, v) for k, v in environment.items()
            )
    return files


def render_start_plan(config: Config, config_bytes: bytes, generation: int = 0) -> str:
    """What the shim's first stage (lmproxy.earlystart) reads instead of the config:
    what is available, what each service needs (as the lifecycle knows them), the
    checksum of the config's bytes that it was made from, and the install's
    generation (lmproxy.ledger)."""
    plan = {
        "version": earlystart.PLAN_VERSION,
        "generation": generation,
        "checked": sorted(config.resource_checks),
        "split": sorted(s.name for s in config.services if s.split_model is not None),
        "config_size": len(config_bytes),
        "config_crc32": binascii.crc32(config_bytes),
        "available": dict(config.resources_available),
        "needs": {name: dict(p.needs) for name, p in ledger.profiles(config).items()},
    }
    return json.dumps(plan, indent=1, sort_keys=True) + "\n"


def _working_directory(work_dir: str | None, base_dir: str) -> Escaped:
    """WorkingDirectory=: the service's WorkDir, or else the config's base directory
    with "-": a unit whose user cannot enter it (a home directory, a model user under
    the system manager) then runs in its default rather than not at all."""
    if work_dir is not None:
        return Escaped(unitsyntax.path_value(work_dir))
    return Escaped("-" + unitsyntax.path_value(base_dir))


def _quoted(value: str | None) -> Escaped | None:
    return None if value is None else Escaped(unitsyntax.quote_value(value))


def render_units(
    config: Config,
    *,
    scope: Scope,
    config_path: Path,
    interpreter: Interpreter,
) -> dict[str, str]:
    """Every unit file lmproxy installs for config: file name -> contents."""
    env = _environment()
    units: dict[str, str] = {}
    for service in config.services:
        values = _values(service, scope, config_path, interpreter, config.base_dir)
        values["gpu"] = service.split_model is not None or bool(config.gpus_of(service))
        units[unitnames.socket_unit(service.name)] = env.get_template("socket.j2").render(values)
        units[unitnames.shim_unit(service.name)] = env.get_template("shim.service.j2").render(
            values
        )
        units[unitnames.backend_unit(service.name)] = env.get_template("backend.service.j2").render(
            values
        )
    for api in config.apis:
        description, module = _API_SERVICES[api.name]
        units.update(
            _api_units(
                api.name,
                description,
                module,
                unitsyntax.listen_stream(config.listen_address, api.port),
                scope=scope,
                config_path=config_path,
                interpreter=interpreter,
                reloads=api.name == unitnames.ROUTER,  # it reads the config again on SIGHUP
            )
        )
    for static in sorted(resources.data_dir("units").iterdir()):
        if static.suffix in (".target", ".slice"):
            units[static.name] = static.read_text()
    return units


# What each of lmproxy's own services is (its Description=) and runs.
_API_SERVICES = {
    unitnames.ROUTER: ("OpenAI-compatible router", "lmproxy.router"),
    unitnames.MANAGEMENT: ("management API and status page", "lmproxy.management"),
}


def _api_units(
    api: str,
    description: str,
    module: str,
    listen: str,
    *,
    scope: Scope,
    config_path: Path,
    interpreter: Interpreter,
    reloads: bool = False,
) -> dict[str, str]:
    """One of lmproxy's own socket-activated services (the router, the management API):
    its socket unit and its service unit, which runs `python3 -P -m module --user|--system
    --config PATH` unprivileged and hardened like the shims in system mode. reloads: it
    reads the installed config again on SIGHUP (`systemctl reload`)."""
    env = _environment()
    argv = interpreter.module(module, scope.systemctl_flag, "--config", str(config_path))
    values = {
        "config_path": Escaped(unitsyntax.quote_value(str(config_path))),
        "description": Escaped(description),
        "socket": Escaped(unitnames.api_socket(api)),
        "listen": Escaped(listen),
        "exec_start": Escaped(unitsyntax.exec_line(argv)),
        "environment": [
            Escaped(unitsyntax.environment_assignment(k, v))
            for k, v in interpreter.environment.items()
        ],
        "syslog_identifier": Escaped(f"lmproxy-{api}"),
        "system": scope is Scope.SYSTEM,
        "reloads": reloads,
    }
    return {
        unitnames.api_socket(api): env.get_template("api.socket.j2").render(values),
        unitnames.api_service(api): env.get_template("api.service.j2").render(values),
    }


def _socket_owner(service: Service, scope: Scope) -> dict[str, Escaped | None]:
    """A ListenPath's owner and mode as the config says; the private socket of a service
    that only the router reaches is for its shim and the router alone (both run as
    lmproxy under the system manager, as the user under theirs)."""
    if service.router_only:
        system = scope is Scope.SYSTEM
        return {
            "socket_user": Escaped(SHIM_USER) if system else None,
            "socket_group": Escaped(SHIM_USER) if system else None,
            "socket_mode": Escaped("0600"),
        }
    return {
        "socket_user": _quoted(service.socket_user),
        "socket_group": _quoted(service.socket_group),
        "socket_mode": _quoted(service.socket_mode),
    }


def _values(
    service: Service,
    scope: Scope,
    config_path: Path,
    interpreter: Interpreter,
    base_dir: str,
) -> dict[str, object]:
    name = service.name
    shim_argv, shim_environment = interpreter.first_stage(
        scope.systemctl_flag, "--config", str(config_path), name
    )
    backend_argv: Sequence[str] = service.argv
    if service.log_file_path:
        # LogFilePath gets the output as well as the journal: a small tee runs the command.
        backend_argv = interpreter.module(
            "lmproxy.logtee", service.log_file_path, "--", *service.argv
        )
    environment_path = environment_file(config_path, name)
    return {
        # Written only between other text ("Description=lmproxy: NAME shim").
        "name": Escaped(unitsyntax.inner_value(name)),
        "config_path": Escaped(unitsyntax.quote_value(str(config_path))),
        "socket": Escaped(unitnames.socket_unit(name)),
        "backend": Escaped(unitnames.backend_unit(name)),
        "listen": Escaped(service.listen_stream),
        **_socket_owner(service, scope),
        "unix_socket": service.listen_path is not None or service.router_only,
        "shim_exec": Escaped(unitsyntax.exec_line(shim_argv)),
        "shim_environment": [
            Escaped(unitsyntax.environment_assignment(k, v)) for k, v in shim_environment.items()
        ],
        # TensorSplit: the split its shim computed at this start, as separate words.
        "exec_start": Escaped(
            unitsyntax.exec_line(backend_argv)
            + (f" ${autosplit.SPLIT_VARIABLE}" if service.split_model is not None else "")
        ),
        "split_file": Escaped(autosplit.unit_split_file(name))
        if service.split_model is not None
        else None,
        "exec_stop": Escaped(unitsyntax.exec_line(["/bin/sh", "-c", service.kill_command]))
        if service.kill_command
        else None,
        "work_dir": _working_directory(service.work_dir, base_dir),
        # The shim's shell commands (HealthcheckCommand, SleepCommand, WakeCommand) run
        # where large-model-proxy runs them: where it was started.
        "shim_work_dir": _working_directory(None, base_dir),
        "environment_file": Escaped(unitsyntax.path_value(str(environment_path)))
        if backend_environment(service, interpreter)
        else None,
        "user": Escaped(unitsyntax.quote_value(service.user)) if service.user else None,
        # Under the system manager a model server never runs as root by default.
        "default_user": scope is Scope.SYSTEM and not service.user,
        "system": scope is Scope.SYSTEM,
        "remain_after_exit": Escaped("yes")
        if not service.consider_stopped_on_process_exit
        else None,
        "syslog_identifier": Escaped(unitnames.syslog_identifier(name)),
        "stop_timeout_s": Escaped(str(BACKEND_STOP_TIMEOUT_S)),
    }
