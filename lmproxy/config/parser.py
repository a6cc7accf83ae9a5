"""Assembling a Config from the settings tables (lmproxy.config.settings): the top level,
each service, the checks that span fields (is each value usable in a systemd unit) and
those that span services (names, unit names, ports)."""

from __future__ import annotations

from dataclasses import dataclass

from lmproxy import unitnames, unitsyntax
from lmproxy.config.jsonc import JsonObject, show
from lmproxy.config.kinds import ConfigReader, Defaults, Values
from lmproxy.config.model import Config, Service
from lmproxy.config.reader import Fields, is_loopback_host
from lmproxy.config.settings import (
    SERVICE_FIELDS,
    SERVICE_SETTINGS,
    TOP_LEVEL_FIELDS,
    TOP_LEVEL_SETTINGS,
)


@dataclass
class _Entry:
    """What the checks across services need to know about one service."""

    index: int
    fields: Fields
    name: str | None
    listen_port: int | None
    listen_address: str
    target_host: str | None
    target_port: int | None
    service: Service | None


# What a service's values are before they make a Service: read, not yet known good.
_REQUIRED = ("name", "proxy_target_host", "proxy_target_port", "command")


class Parser(ConfigReader):
    def config(self, root: JsonObject) -> Config:
        fields = Fields(self, root, "$", TOP_LEVEL_FIELDS)
        values: Values = {}
        for setting in TOP_LEVEL_SETTINGS:
            values.update(setting.read(self, fields, values, None))
        defaults = Defaults(
            listen_address=str(values["listen_address"]),
            shutdown_s=_int(values["shutdown_after_inactivity_s"]),
            swap_after_waiting_s=_int(values["swap_after_waiting_s"]),
            min_loaded_s=_int(values["min_loaded_s"]),
            service_url=_str(values["default_service_url"]),
            router=values["openai_api_listen_port"] is not None,
        )
        entries: list[_Entry] = []
        got = fields.get("Services")
        if got is not None:
            path, value = got
            if isinstance(value, list):
                for index, item in enumerate(value):
                    entry = self.service(index, f"{path}[{index}]", item, defaults)
                    if entry is not None:
                        entries.append(entry)
            else:
                self.error(path, f"expected an array of services, got {show(value)}")
        self.check_names(entries)
        self.check_ports(entries)
        self.check_api_ports(entries, values)
        if values["openai_api_listen_port"] is not None:
            self.check_model_ids(entries)
        try:
            unitsyntax.path_value(self.base_dir)
        except ValueError as error:
            self.error("$", f"relative paths cannot be taken from this directory: {error}")
        services = tuple(entry.service for entry in entries if entry.service is not None)
        return Config(**values, services=services, base_dir=self.base_dir)  # type: ignore[arg-type]

    def service(self, index: int, path: str, value: object, defaults: Defaults) -> _Entry | None:
        if not isinstance(value, JsonObject):
            self.error(path, f"expected a service object, got {show(value)}")
            return None
        problems_before = len(self.problems)
        fields = Fields(self, value, path, SERVICE_FIELDS)
        values: Values = {}
        for setting in SERVICE_SETTINGS:
            values.update(setting.read(self, fields, values, defaults))
        self.unit_safety(fields, values, clean=len(self.problems) == problems_before)
        service = None
        reachable = self.reachable(fields, values, defaults)
        known = all(values[attr] is not None for attr in _REQUIRED)
        if len(self.problems) == problems_before and reachable and known:
            service = Service(**values)  # type: ignore[arg-type]
        return _Entry(
            index=index,
            fields=fields,
            name=_str(values["name"]),
            listen_port=values["listen_port"],  # type: ignore[arg-type]
            listen_address=str(values["listen_address"]),
            target_host=_str(values["proxy_target_host"]),
            target_port=values["proxy_target_port"],  # type: ignore[arg-type]
            service=service,
        )

    def reachable(self, fields: Fields, values: Values, defaults: Defaults) -> bool:
        """A service listens on a port, a path, or (with "OpenAiApi": true and the top
        level's OpenAiApi) a private unix socket that only the router reaches."""
        if values["listen_port"] is not None or values["listen_path"] is not None:
            return True
        if values["openai_api"] is True and defaults.router:
            return True
        got = fields.get("ListenPort")
        if got is None or got[1] == "":  # (an invalid one was reported as such)
            self.error(
                fields.path_of("ListenPort"),
                "ListenPort is required (or ListenPath, for a unix socket): a service "
                'without either is unreachable, unless it has "OpenAiApi": true and the '
                "top level an OpenAiApi.ListenPort (then only the OpenAI router reaches it)",
            )
        return False

    def unit_safety(self, fields: Fields, values: Values, *, clean: bool) -> None:
        """Records each value that systemd's unit syntax cannot carry safely: what validate
        accepts, render can always write. The command line only when all else is clean
        (its parts may be missing otherwise)."""
        command, argv = values["command"], values["argv"]
        if clean and isinstance(command, str) and isinstance(argv, tuple):
            self.unit_safe(fields, "Command", lambda: unitsyntax.exec_line([command]))
            self.unit_safe(fields, "Args", lambda: unitsyntax.exec_line(list(argv)))
        work_dir, log_file_path = values["work_dir"], values["log_file_path"]
        if isinstance(work_dir, str):
            self.unit_safe(fields, "WorkDir", lambda: unitsyntax.path_value(work_dir))
        if isinstance(log_file_path, str):
            self.unit_safe(
                fields, "LogFilePath", lambda: unitsyntax.exec_line(["/bin/true", log_file_path])
            )
        kill_command = values["kill_command"]
        if isinstance(kill_command, str):
            self.unit_safe(
                fields, "KillCommand", lambda: unitsyntax.exec_line(["/bin/sh", "-c", kill_command])
            )
        environment = values["environment"]
        assert isinstance(environment, dict)
        for key, text in environment.items():
            self.unit_safe(
                fields,
                "Environment",
                lambda: unitsyntax.environment_assignment(key, text),  # noqa: B023 (called at once)
                key,
            )

    # Checks across services

    def check_api_ports(self, entries: list[_Entry], values: Values) -> None:
        """lmproxy's own ports (the router's, the management API's) are no service's, nor
        each other's."""
        router, management = values["openai_api_listen_port"], values["management_api_listen_port"]
        if router is not None and router == management:
            self.error(
                "$.ManagementApi.ListenPort",
                f"ListenPort {management} is already used by $.OpenAiApi.ListenPort",
            )
        for path, port in (
            ("$.OpenAiApi.ListenPort", router),
            ("$.ManagementApi.ListenPort", management),
        ):
            for entry in entries:
                if port is not None and entry.listen_port == port:
                    self.error(
                        path,
                        f"ListenPort {port} is already used by {_describe(entry, None)} "
                        f"($.Services[{entry.index}])",
                    )

    def check_model_ids(self, entries: list[_Entry]) -> None:
        """Each model id the router knows names one service: a request for it could not
        be routed otherwise."""
        owners: dict[str, _Entry] = {}
        for entry in entries:
            service = entry.service
            if service is None or not service.openai_api:
                continue
            for model in dict.fromkeys(service.model_ids):
                first = owners.setdefault(model, entry)
                if first is not entry:
                    self.error(
                        entry.fields.path_of(
                            "OpenAiApiModels" if service.openai_api_models else "Name"
                        ),
                        f"the model id {show(model)} is $.Services[{first.index}]'s "
                        f"({show(first.name)}) too: the OpenAI router would not know "
                        "which one to route it to",
                    )

    def check_names(self, entries: list[_Entry]) -> None:
        first_with_name: dict[str, _Entry] = {}
        first_with_unit: dict[str, _Entry] = {}
        for entry in entries:
            if entry.name is None:
                continue
            first = first_with_name.get(entry.name)
            if first is not None:
                self.error(
                    entry.fields.path_of("Name"),
                    f"duplicate service name {show(entry.name)}: "
                    f"$.Services[{first.index}] has it too",
                )
                continue
            first_with_name[entry.name] = entry
            unit = unitnames.component(entry.name)
            clash = first_with_unit.setdefault(unit, entry)
            if clash is not entry:
                self.error(
                    entry.fields.path_of("Name"),
                    f"the names {show(clash.name)} ($.Services[{clash.index}]) and "
                    f"{show(entry.name)} both give the unit name {unitnames.shim_unit(unit)!r}: "
                    "rename one of them",
                )

    def check_ports(self, entries: list[_Entry]) -> None:
        paths: dict[str, _Entry] = {}
        for entry in entries:
            path = entry.service.listen_path if entry.service else None
            if path is None:
                continue
            if path in paths:
                self.error(
                    entry.fields.path_of("ListenPath"),
                    f"ListenPath {path!r} is already used by "
                    f"{_describe(paths[path], entry)} ($.Services[{paths[path].index}])",
                )
            paths.setdefault(path, entry)
        listeners: dict[int, _Entry] = {}
        for entry in entries:
            if entry.listen_port is None:
                continue
            first = listeners.get(entry.listen_port)
            if first is not None:
                self.error(
                    entry.fields.path_of("ListenPort"),
                    f"ListenPort {entry.listen_port} is already used by "
                    f"{_describe(first, entry)} ($.Services[{first.index}])",
                )
            else:
                listeners[entry.listen_port] = entry
        for entry in entries:
            if entry.target_host is None or entry.target_port is None:
                continue
            listener = listeners.get(entry.target_port)
            if listener is None:
                continue
            if is_loopback_host(entry.target_host) or entry.target_host == listener.listen_address:
                self.error(
                    entry.fields.path_of("ProxyTargetPort"),
                    f"{entry.target_host!r} port {entry.target_port} is where lmproxy itself "
                    f"listens for {_describe(listener, entry)} ($.Services[{listener.index}]): "
                    "the service would connect back to lmproxy instead of to its backend",
                )


def _describe(entry: _Entry, viewer: _Entry | None) -> str:
    if entry is viewer:
        return "this service"
    return f"service {show(entry.name)}" if entry.name is not None else "another service"


def _int(value: object) -> int:
    assert isinstance(value, int)
    return value


def _str(value: object) -> str | None:
    assert value is None or isinstance(value, str)
    return value
