"""Reading and validating large-model-proxy's config.json (JSON or JSONC).

The format is large-model-proxy's, read unchanged; lmproxy's own additions
use the same PascalCase style. Every error names the JSON path of the bad
value, so that `lmproxy validate` can point at it.

Parsing is strict where large-model-proxy is lax, because every value ends up
in a systemd unit file: types are checked exactly (no bool for an integer, no
number for a string), integers have documented ranges, strings must not hold
control characters, and all problems are collected and raised together as one
`ConfigError`. Keys match field names case-insensitively, as Go's
encoding/json does; the same field twice in one object, or a field lmproxy
does not know, is an error.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import shlex
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lmproxy import unitnames, unitsyntax


class ConfigError(ValueError):
    """A config that lmproxy refuses: one or more (JSON path, problem) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{path}: {problem}" for path, problem in problems))


@dataclass(frozen=True)
class Sleep:
    """How a service sleeps instead of stopping (lmproxy's "Sleep" object): vLLM's
    sleep API on its ProxyTarget by default, or the commands given."""

    level: int  # 1: weights kept in RAM; 2: weights dropped too
    holds: Mapping[str, int]  # what it still holds asleep (its ResourceRequirements)
    sleep_command: str | None = None  # both or neither
    wake_command: str | None = None


@dataclass(frozen=True)
class Service:
    name: str
    listen_port: int | None  # None: it listens on listen_path
    listen_address: str
    proxy_target_host: str
    proxy_target_port: int
    command: str
    args: str
    argv: tuple[str, ...]  # Command followed by Args split like a POSIX shell would
    work_dir: str | None
    log_file_path: str | None
    restart_on_connection_failure: bool
    resource_requirements: Mapping[str, int]
    healthcheck_command: str | None
    healthcheck_interval_ms: int
    startup_timeout_ms: int
    shutdown_after_inactivity_s: int  # 0: never
    kill_command: str | None
    consider_stopped_on_process_exit: bool
    environment: Mapping[str, str]
    user: str | None
    openai_api: bool
    openai_api_models: tuple[str, ...]
    service_url: str | None
    max_connections: int = 0  # 0: no limit
    idle_connection_timeout_s: int = 0  # 0: never
    swap_after_waiting_s: int = 5  # see Config
    min_loaded_s: int = 0
    sleep: Sleep | None = None  # None: it is stopped, never put to sleep
    # "http": a connection is in use while a request is in flight; "raw": while it is open.
    protocol: str = "http"
    listen_path: str | None = None  # a unix socket instead of ListenAddress:ListenPort
    socket_user: str | None = None
    socket_group: str | None = None
    socket_mode: str | None = None  # octal digits, as SocketMode= takes them

    @property
    def listen_stream(self) -> str:
        """Its socket unit's ListenStream= value, escaped: the unix socket's path, or
        address and port. Validated when the config was read: this cannot fail."""
        if self.listen_path is not None:
            return unitsyntax.listen_stream_path(self.listen_path)
        assert self.listen_port is not None
        return unitsyntax.listen_stream(self.listen_address, self.listen_port)


@dataclass(frozen=True)
class Config:
    resources_available: Mapping[str, int]
    services: tuple[Service, ...]
    max_wait_for_connection_close_s: int
    shutdown_after_inactivity_s: int
    # A model's clients wait at most this long while another model holds its room in
    # use; then that one drains and is swapped out (each service may say its own).
    swap_after_waiting_s: int
    # A model stays loaded at least this long before it is drained for another.
    min_loaded_s: int
    output_service_logs: bool
    listen_address: str
    openai_api_listen_port: int | None
    management_api_listen_port: int | None
    default_service_url: str | None
    # Where relative paths were resolved, and where a service without WorkDir runs: the
    # directory `lmproxy install` ran in, as large-model-proxy's are where it started.
    base_dir: str

    def service(self, name: str) -> Service:
        for service in self.services:
            if service.name == name:
                return service
        raise KeyError(name)


# --- Names, defaults and ranges -------------------------------------------------------------

DEFAULT_LISTEN_ADDRESS = "127.0.0.1"
DEFAULT_PROXY_TARGET_HOST = "localhost"
DEFAULT_MAX_WAIT_FOR_CONNECTION_CLOSE_S = 1200
DEFAULT_SHUTDOWN_AFTER_INACTIVITY_S = 0  # never
DEFAULT_SWAP_AFTER_WAITING_S = 5
DEFAULT_MIN_LOADED_S = 0
DEFAULT_HEALTHCHECK_INTERVAL_MS = 200
DEFAULT_STARTUP_TIMEOUT_MS = 600_000

MAX_PORT = 65535
MAX_RESOURCE_AMOUNT = 2**53
MAX_MILLISECONDS = 2**31 - 1
MAX_SECONDS = 2**31 - 1
MAX_CONNECTIONS = 1_000_000

# Field names as documented; keys in a file match them case-insensitively.
TOP_LEVEL_FIELDS = (
    "ShutDownAfterInactivitySeconds",
    "MaxTimeToWaitForServiceToCloseConnectionBeforeGivingUpSeconds",
    "OutputServiceLogs",
    "DefaultServiceUrl",
    "Services",
    "ResourcesAvailable",
    "OpenAiApi",
    "ManagementApi",
    "LogLevel",  # accepted: lmproxy logs to the journal (journalctl -p filters)
    "ClientRequestBufferLimitBytes",  # accepted: clients wait in the backlog, unbuffered
    "ListenAddress",  # lmproxy
    "SwapAfterWaitingSeconds",  # lmproxy
    "MinLoadedSeconds",  # lmproxy
)
SERVICE_FIELDS = (
    "Name",
    "ListenPort",
    "ListenAddress",  # lmproxy
    "ProxyTargetHost",
    "ProxyTargetPort",
    "Command",
    "Args",
    "KillCommand",
    "LogFilePath",
    "WorkDir",
    "HealthcheckCommand",
    "HealthcheckIntervalMilliseconds",
    "StartupTimeoutMilliseconds",
    "ShutDownAfterInactivitySeconds",
    "RestartOnConnectionFailure",
    "ConsiderStoppedOnProcessExit",
    "OpenAiApi",
    "OpenAiApiModels",
    "ServiceUrl",
    "ResourceRequirements",
    "Environment",  # lmproxy
    "User",  # lmproxy
    "AllowRoot",  # lmproxy
    "MaxConnections",  # lmproxy
    "IdleConnectionTimeoutSeconds",  # lmproxy
    "SwapAfterWaitingSeconds",  # lmproxy
    "MinLoadedSeconds",  # lmproxy
    "ListenPath",  # lmproxy
    "SocketUser",  # lmproxy
    "SocketGroup",  # lmproxy
    "SocketMode",  # lmproxy
    "Sleep",  # lmproxy
    "Protocol",  # lmproxy
)
# How a service's connections are counted (see Service.protocol); the first is the default.
PROTOCOLS = ("http", "raw")
SLEEP_FIELDS = ("Level", "ResourceRequirements", "SleepCommand", "WakeCommand")
SLEEP_LEVELS = (1, 2)
API_FIELDS = ("ListenPort",)

# All used with fullmatch().
_RESOURCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SHIM_USER = "lmproxy"  # system mode: the shims run as this user (system/lmproxy.sysusers)
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,30}")  # systemd warns past 31
_DIGITS_RE = re.compile(r"[0-9]+")
_SOCKET_MODE_RE = re.compile(r"0?[0-7]{3}")
_PLAIN_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

MAX_NAME_LENGTH = 255
_RESOURCE_RULE = "1 to 64 characters from A-Z a-z 0-9 _ . : -, starting with a letter or digit"


# --- Entry points ------------------------------------------------------------------------------


def load_config(path: Path, base_dir: Path | None = None) -> Config:
    """Read and validate the config file at `path`; relative paths in it are taken
    relative to `base_dir` (default: the current directory, where large-model-proxy
    resolves them)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError([("$", f"cannot read the config file: {error}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError([("$", f"the config file is not valid UTF-8: {error}")]) from None
    return parse_config(text.removeprefix("\ufeff"), base_dir)


def parse_config(text: str, base_dir: Path | None = None) -> Config:
    """Validate config text (JSON with optional comments and trailing commas).

    Relative WorkDir, LogFilePath and Command paths are resolved against `base_dir`
    (default: the current directory), which also becomes `Config.base_dir`.
    Raises ConfigError listing every problem found.
    """
    base = _absolute(os.getcwd(), str(base_dir) if base_dir is not None else ".")
    root = _decode(text)
    parser = _Parser(base)
    if not isinstance(root, _JsonObject):
        raise ConfigError([("$", f"the top level must be an object, got {_show(root)}")])
    config = parser.config(root)
    if parser.problems:
        raise ConfigError(parser.problems)
    return config


# --- JSONC -------------------------------------------------------------------------------------


class _JsonObject:
    """A JSON object, as its (key, value) pairs in document order (duplicates kept)."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        self.pairs = pairs


class _JsonNumber:
    """A number that is not an integer lmproxy could take: a fraction, an exponent,
    an integer too long to be in any range, or NaN/Infinity (not JSON at all)."""

    __slots__ = ("text", "valid_json")

    def __init__(self, text: str, valid_json: bool = True) -> None:
        self.text = text
        self.valid_json = valid_json


def _parse_int(text: str) -> int | _JsonNumber:
    return int(text) if len(text) <= 40 else _JsonNumber(text)


def _parse_constant(text: str) -> _JsonNumber:
    return _JsonNumber(text, valid_json=False)


def _line_column(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    return line, index - text.rfind("\n", 0, index)


def _strip_jsonc(text: str) -> str:
    """Blank out comments and trailing commas, keeping every other character (and so
    every line and column) where it was. Strings are copied untouched."""
    out = list(text)
    n = len(text)
    i = 0
    pending_comma = -1  # a comma followed so far only by whitespace and comments
    previous = ""  # the last significant character before it
    while i < n:
        char = text[i]
        if char == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            pending_comma, previous = -1, '"'
            continue
        if char == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end == -1 else end
            out[i:end] = " " * (end - i)
            i = end
            continue
        if char == "/" and text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end == -1:
                line, column = _line_column(text, i)
                raise ConfigError([("$", f"line {line} column {column}: unterminated /* comment")])
            for j in range(i, end + 2):
                if out[j] != "\n":
                    out[j] = " "
            i = end + 2
            continue
        if char in " \t\r\n":
            i += 1
            continue
        if char in "]}" and pending_comma >= 0:
            out[pending_comma] = " "
        # A comma right after "[", "{", "," or ":" is not a trailing one: json reports it.
        pending_comma = i if char == "," and previous not in ("", "[", "{", ",", ":") else -1
        previous = char
        i += 1
    return "".join(out)


def _decode(text: str) -> object:
    stripped = _strip_jsonc(text)
    try:
        return json.loads(
            stripped,
            object_pairs_hook=_JsonObject,
            parse_float=_JsonNumber,
            parse_int=_parse_int,
            parse_constant=_parse_constant,
        )
    except json.JSONDecodeError as error:
        raise ConfigError(
            [("$", f"line {error.lineno} column {error.colno}: {error.msg}")]
        ) from None
    except RecursionError:
        raise ConfigError([("$", "the JSON is nested too deeply")]) from None
    except ValueError as error:  # defensive: json.loads has no other documented errors
        raise ConfigError([("$", f"invalid JSON: {error}")]) from None


# --- Helpers -----------------------------------------------------------------------------------


def _show(value: object) -> str:
    """How a JSON value is named in a message."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, _JsonObject):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, _JsonNumber):
        text = value.text if value.valid_json else f"{value.text} (not valid JSON)"
    else:
        text = repr(value)
    if len(text) > 80:
        text = f"{text[:60]}...{text[-12:]} ({len(text)} characters)"
    return text


def _child(path: str, key: str) -> str:
    if _PLAIN_KEY_RE.fullmatch(key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key)}]"


_GO_FOLD = str.maketrans({"\u017f": "s", "\u212a": "k"})  # long s, Kelvin sign


def _fold(key: str) -> str | None:
    """The key as Go's encoding/json compares it with an (ASCII) field name."""
    key = key.translate(_GO_FOLD)
    return key.lower() if key.isascii() else None


def _absolute(base: str, path: str) -> str:
    normal = os.path.normpath(os.path.join(base, path))
    if normal.startswith("//"):  # normpath keeps a leading "//" (POSIX allows it to differ)
        normal = "/" + normal.lstrip("/")
    return normal


def _ip_literal(text: str) -> str | None:
    """The canonical form of an IPv4 or IPv6 address literal, or None."""
    if "%" in text:  # no IPv6 scope ids: '%' is special in systemd unit files
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _is_loopback_host(host: str) -> bool:
    """Whether connecting to `host` reaches this machine's loopback (or wildcard)."""
    lower = host.lower().rstrip(".")
    if lower == "localhost" or lower.endswith(".localhost"):
        return True
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:  # the resolver also takes legacy forms such as 127.1 or 0x7f.0.0.1
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except (OSError, ValueError):
            return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_unspecified


class _Fields:
    """An object's fields, matched to the known names; reports unknown and repeated keys."""

    def __init__(
        self, parser: _Parser, obj: _JsonObject, path: str, names: tuple[str, ...]
    ) -> None:
        self.path = path
        self._found: dict[str, tuple[str, str, object]] = {}  # name -> (key, path, value)
        by_fold = {name.lower(): name for name in names}
        for key, value in obj.pairs:
            key_path = _child(path, key)
            folded = _fold(key)
            name = by_fold.get(folded) if folded is not None else None
            if name is None:
                parser.error(key_path, _unknown_field(key, names))
            elif name in self._found:
                first = self._found[name][0]
                if first == key:
                    parser.error(key_path, f"duplicate field {key!r}")
                else:
                    parser.error(
                        key_path,
                        f"duplicate field {key!r}: the same field as {first!r} "
                        "(field names are case-insensitive)",
                    )
            else:
                self._found[name] = (key, key_path, value)

    def get(self, name: str) -> tuple[str, object] | None:
        """The field's path and value; None when absent or null: large-model-proxy (Go)
        writes null for every optional field it leaves unset, and reads it as the
        default, so lmproxy does the same for every field."""
        found = self._found.get(name)
        return None if found is None or found[2] is None else (found[1], found[2])

    def has(self, name: str) -> bool:
        return self.get(name) is not None

    def path_of(self, name: str) -> str:
        found = self._found.get(name)
        return found[1] if found is not None else _child(self.path, name)


def _unknown_field(key: str, names: tuple[str, ...]) -> str:
    message = f"unknown field {_show(key)}"
    if len(key) <= 100:
        lowered = {name.lower(): name for name in names}
        close = difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.8)
        if close:
            message += f" (did you mean {lowered[close[0]]!r}?)"
    return message


@dataclass(frozen=True)
class _Defaults:
    """What a service takes from the top level unless it says otherwise."""

    listen_address: str
    shutdown_s: int
    swap_after_waiting_s: int
    min_loaded_s: int


@dataclass
class _Entry:
    """What the checks across services need to know about one service."""

    index: int
    fields: _Fields
    name: str | None
    listen_port: int | None
    listen_address: str
    target_host: str | None
    target_port: int | None
    service: Service | None


# --- The parser --------------------------------------------------------------------------------


class _Parser:
    def __init__(self, base_dir: str) -> None:
        self.base_dir = base_dir
        self.problems: list[tuple[str, str]] = []
        self.resources: dict[str, int] = {}
        self.resources_known = True  # False when ResourcesAvailable itself is unusable
        self.bad_resources: set[str] = set()

    def error(self, path: str, message: str) -> None:
        self.problems.append((path, message))

    # Values

    def clean(self, path: str, value: str) -> bool:
        match = _CONTROL_RE.search(value)
        if match is None:
            return True
        self.error(
            path,
            f"{_show(value)} contains the control character {match.group()!r} "
            f"at index {match.start()}; control characters are not allowed",
        )
        return False

    def int_value(self, path: str, value: object, low: int, high: int) -> int | None:
        if isinstance(value, int) and not isinstance(value, bool):
            if low <= value <= high:
                return value
            self.error(path, f"must be between {low} and {high}, got {value}")
        elif (
            isinstance(value, _JsonNumber)
            and value.valid_json
            and _DIGITS_RE.fullmatch(value.text.removeprefix("-"))
        ):
            self.error(path, f"must be between {low} and {high}, got {_show(value)}")
        else:
            self.error(path, f"expected an integer between {low} and {high}, got {_show(value)}")
        return None

    def port_value(self, path: str, value: object) -> int | None:
        if isinstance(value, str) and _DIGITS_RE.fullmatch(value):
            digits = value.lstrip("0")
            if len(digits) <= 5 and 1 <= int(digits or "0") <= MAX_PORT:
                return int(digits)
        elif isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_PORT:
            return value
        self.error(
            path,
            f"expected a port number from 1 to {MAX_PORT} (an integer or a string of digits), "
            f"got {_show(value)}",
        )
        return None

    def string_value(self, path: str, value: object, what: str = "a string") -> str | None:
        if not isinstance(value, str):
            self.error(path, f"expected {what}, got {_show(value)}")
            return None
        return value if self.clean(path, value) else None

    # Fields

    def text(self, fields: _Fields, name: str, *, null_ok: bool = False) -> str | None:
        """A string field; None when absent, null or invalid. null_ok: an optional one,
        whose error says that null is welcome too."""
        got = fields.get(name)
        if got is None:
            return None
        path, value = got
        return self.string_value(path, value, "a string or null" if null_ok else "a string")

    def optional_text(self, fields: _Fields, name: str) -> str | None:
        """A string field where null, "" and absence all mean None."""
        return self.text(fields, name, null_ok=True) or None

    def boolean(self, fields: _Fields, name: str, default: bool) -> bool:
        got = fields.get(name)
        if got is None:
            return default
        path, value = got
        if isinstance(value, bool):
            return value
        self.error(path, f"expected true or false, got {_show(value)}")
        return default

    def choice(self, fields: _Fields, name: str, options: tuple[str, ...]) -> str:
        """One of options (the first when absent or null)."""
        got = fields.get(name)
        if got is None:
            return options[0]
        path, value = got
        if value not in options:
            listed = " or ".join(f'"{option}"' for option in options)
            self.error(path, f"expected {listed}, got {_show(value)}")
            return options[0]
        return str(value)

    def integer(self, fields: _Fields, name: str, low: int, high: int, default: int) -> int:
        got = fields.get(name)
        if got is None:
            return default
        value = self.int_value(got[0], got[1], low, high)
        return default if value is None else value

    def port(self, fields: _Fields, name: str, required: str | None = None) -> int | None:
        """A port field; "" means absent. `required`: the message when it is absent."""
        got = fields.get(name)
        if got is None or got[1] == "":
            if required is not None:
                self.error(fields.path_of(name), required)
            return None
        return self.port_value(got[0], got[1])

    def address(self, fields: _Fields, name: str, default: str) -> str:
        value = self.text(fields, name)
        if value is None:
            return default
        address = _ip_literal(value)
        if address is None:
            self.error(
                fields.path_of(name),
                "expected an IPv4 or IPv6 address (no brackets, no host names, no scope), "
                f"got {_show(value)}",
            )
            return default
        return address

    def object_field(self, fields: _Fields, name: str) -> tuple[str, _JsonObject] | None:
        got = fields.get(name)
        if got is None:
            return None
        path, value = got
        if isinstance(value, _JsonObject):
            return path, value
        self.error(path, f"expected an object, got {_show(value)}")
        return None

    # The top level

    def config(self, root: _JsonObject) -> Config:
        fields = _Fields(self, root, "$", TOP_LEVEL_FIELDS)
        shutdown = self.integer(
            fields,
            "ShutDownAfterInactivitySeconds",
            0,
            MAX_SECONDS,
            DEFAULT_SHUTDOWN_AFTER_INACTIVITY_S,
        )
        max_wait = self.integer(
            fields,
            "MaxTimeToWaitForServiceToCloseConnectionBeforeGivingUpSeconds",
            0,
            MAX_SECONDS,
            DEFAULT_MAX_WAIT_FOR_CONNECTION_CLOSE_S,
        )
        swap_after = self.integer(
            fields, "SwapAfterWaitingSeconds", 0, MAX_SECONDS, DEFAULT_SWAP_AFTER_WAITING_S
        )
        min_loaded = self.integer(fields, "MinLoadedSeconds", 0, MAX_SECONDS, DEFAULT_MIN_LOADED_S)
        output_service_logs = self.boolean(fields, "OutputServiceLogs", True)
        # large-model-proxy's, with no meaning here (README: Coming from large-model-proxy).
        self.text(fields, "LogLevel")
        self.integer(fields, "ClientRequestBufferLimitBytes", 0, MAX_RESOURCE_AMOUNT, 0)
        default_service_url = self.optional_text(fields, "DefaultServiceUrl")
        listen_address = self.address(fields, "ListenAddress", DEFAULT_LISTEN_ADDRESS)
        openai_port = self.api_port(fields, "OpenAiApi")
        management_port = self.api_port(fields, "ManagementApi")
        self.resources_available(fields)

        entries: list[_Entry] = []
        got = fields.get("Services")
        if got is not None:
            path, value = got
            if isinstance(value, list):
                for index, item in enumerate(value):
                    defaults = _Defaults(listen_address, shutdown, swap_after, min_loaded)
                    entry = self.service(index, f"{path}[{index}]", item, defaults)
                    if entry is not None:
                        entries.append(entry)
            else:
                self.error(path, f"expected an array of services, got {_show(value)}")
        self.check_names(entries)
        self.check_ports(entries)
        try:
            unitsyntax.path_value(self.base_dir)
        except ValueError as error:
            self.error("$", f"relative paths cannot be taken from this directory: {error}")

        return Config(
            resources_available=self.resources,
            services=tuple(entry.service for entry in entries if entry.service is not None),
            max_wait_for_connection_close_s=max_wait,
            shutdown_after_inactivity_s=shutdown,
            swap_after_waiting_s=swap_after,
            min_loaded_s=min_loaded,
            output_service_logs=output_service_logs,
            listen_address=listen_address,
            openai_api_listen_port=openai_port,
            management_api_listen_port=management_port,
            default_service_url=default_service_url,
            base_dir=self.base_dir,
        )

    def api_port(self, fields: _Fields, name: str) -> int | None:
        got = self.object_field(fields, name)
        if got is None:
            return None
        return self.port(_Fields(self, got[1], got[0], API_FIELDS), "ListenPort")

    def resources_available(self, fields: _Fields) -> None:
        got = fields.get("ResourcesAvailable")
        if got is None:
            return
        path, value = got
        if not isinstance(value, _JsonObject):
            self.error(path, f"expected an object of resource amounts, got {_show(value)}")
            self.resources_known = False
            return
        for key, amount in value.pairs:
            key_path = _child(path, key)
            if key in self.resources or key in self.bad_resources:
                self.error(key_path, f"duplicate resource {_show(key)}")
                continue
            if not _RESOURCE_RE.fullmatch(key):
                self.error(key_path, f"invalid resource name {_show(key)}: {_RESOURCE_RULE}")
                self.bad_resources.add(key)
                continue
            if isinstance(amount, _JsonObject):
                self.error(
                    key_path,
                    "expected an integer amount, got an object "
                    "(resources with a CheckCommand are not supported)",
                )
                self.bad_resources.add(key)
                continue
            checked = self.int_value(key_path, amount, 0, MAX_RESOURCE_AMOUNT)
            if checked is None:
                self.bad_resources.add(key)
            else:
                self.resources[key] = checked

    # Services

    def service(
        self,
        index: int,
        path: str,
        value: object,
        defaults: _Defaults,
    ) -> _Entry | None:
        if not isinstance(value, _JsonObject):
            self.error(path, f"expected a service object, got {_show(value)}")
            return None
        problems_before = len(self.problems)
        fields = _Fields(self, value, path, SERVICE_FIELDS)

        name = self.text(fields, "Name")
        if name is None:
            if not fields.has("Name"):
                self.error(fields.path_of("Name"), "Name is required")
        else:
            name = self.service_name(fields, name)

        listen_path, socket_user, socket_group, socket_mode = self.unix_socket(fields)
        listen_port = self.port(
            fields,
            "ListenPort",
            required=None
            if listen_path is not None
            else (
                "ListenPort is required (or ListenPath, for a unix socket): lmproxy has no "
                "OpenAI API router yet, so a service without either would be unreachable"
            ),
        )
        if listen_port is not None and listen_path is not None:
            self.error(
                fields.path_of("ListenPath"),
                "a service listens on a ListenPort or on a ListenPath, not both",
            )
        listen_address = self.address(fields, "ListenAddress", defaults.listen_address)
        target_host = self.proxy_target_host(fields)
        target_port = self.port(fields, "ProxyTargetPort", required="ProxyTargetPort is required")

        work_dir = self.optional_text(fields, "WorkDir")
        if work_dir is not None:
            work_dir = _absolute(self.base_dir, work_dir)
        log_file_path = self.optional_text(fields, "LogFilePath")
        if log_file_path is not None:
            log_file_path = _absolute(self.base_dir, log_file_path)
            if log_file_path == "/":
                self.error(fields.path_of("LogFilePath"), "LogFilePath must name a file, not '/'")
        command = self.command(fields, work_dir)
        args = self.text(fields, "Args") or ""
        try:
            split_args = shlex.split(args, posix=True)
        except ValueError as error:
            self.error(
                fields.path_of("Args"),
                f"cannot split {_show(args)} like a POSIX shell: {error}",
            )
            split_args = []

        healthcheck_command = self.optional_text(fields, "HealthcheckCommand")
        # 0 means the default, as in large-model-proxy.
        interval = self.integer(fields, "HealthcheckIntervalMilliseconds", 0, MAX_MILLISECONDS, 0)
        healthcheck_interval = interval or DEFAULT_HEALTHCHECK_INTERVAL_MS
        if interval > 0 and healthcheck_command is None:
            self.error(
                fields.path_of("HealthcheckIntervalMilliseconds"),
                "HealthcheckIntervalMilliseconds is set but there is no HealthcheckCommand",
            )
        startup_timeout = self.integer(
            fields, "StartupTimeoutMilliseconds", 1, MAX_MILLISECONDS, DEFAULT_STARTUP_TIMEOUT_MS
        )
        shutdown = self.integer(fields, "ShutDownAfterInactivitySeconds", 0, MAX_SECONDS, 0)
        kill_command = self.optional_text(fields, "KillCommand")
        restart = self.boolean(fields, "RestartOnConnectionFailure", False)
        consider_stopped = self.boolean(fields, "ConsiderStoppedOnProcessExit", True)
        openai_api = self.boolean(fields, "OpenAiApi", False)
        models = self.models(fields)
        service_url = self.optional_text(fields, "ServiceUrl")
        requirements = self.requirements(fields)
        sleep = self.sleep(fields)
        environment = self.environment(fields)
        user = self.user(fields)
        max_connections = self.integer(fields, "MaxConnections", 0, MAX_CONNECTIONS, 0)
        idle_timeout = self.integer(fields, "IdleConnectionTimeoutSeconds", 0, MAX_SECONDS, 0)
        swap_after = self.integer(
            fields, "SwapAfterWaitingSeconds", 0, MAX_SECONDS, defaults.swap_after_waiting_s
        )
        min_loaded = self.integer(fields, "MinLoadedSeconds", 0, MAX_SECONDS, defaults.min_loaded_s)
        protocol = self.choice(fields, "Protocol", PROTOCOLS)

        if len(self.problems) == problems_before and command is not None:
            self.unit_safe(fields, "Command", lambda: unitsyntax.exec_line([command]))
            self.unit_safe(fields, "Args", lambda: unitsyntax.exec_line([command, *split_args]))
        if work_dir is not None:
            self.unit_safe(fields, "WorkDir", lambda: unitsyntax.path_value(work_dir))
        if log_file_path is not None:
            self.unit_safe(
                fields, "LogFilePath", lambda: unitsyntax.exec_line(["/bin/true", log_file_path])
            )
        if kill_command is not None:
            self.unit_safe(
                fields, "KillCommand", lambda: unitsyntax.exec_line(["/bin/sh", "-c", kill_command])
            )
        for key, text in environment.items():
            self.unit_safe(
                fields,
                "Environment",
                lambda: unitsyntax.environment_assignment(key, text),  # noqa: B023 (called at once)
                key,
            )

        service = None
        if (
            len(self.problems) == problems_before
            and name is not None
            and (listen_port is not None or listen_path is not None)
            and target_host is not None
            and target_port is not None
            and command is not None
        ):
            service = Service(
                name=name,
                listen_port=listen_port,
                listen_address=listen_address,
                proxy_target_host=target_host,
                proxy_target_port=target_port,
                command=command,
                args=args,
                argv=(command, *split_args),
                work_dir=work_dir,
                log_file_path=log_file_path,
                restart_on_connection_failure=restart,
                resource_requirements=requirements,
                healthcheck_command=healthcheck_command,
                healthcheck_interval_ms=healthcheck_interval,
                startup_timeout_ms=startup_timeout,
                shutdown_after_inactivity_s=shutdown if shutdown > 0 else defaults.shutdown_s,
                kill_command=kill_command,
                consider_stopped_on_process_exit=consider_stopped,
                environment=environment,
                user=user,
                openai_api=openai_api,
                openai_api_models=models,
                service_url=service_url,
                max_connections=max_connections,
                idle_connection_timeout_s=idle_timeout,
                swap_after_waiting_s=swap_after,
                min_loaded_s=min_loaded,
                sleep=sleep,
                protocol=protocol,
                listen_path=listen_path,
                socket_user=socket_user,
                socket_group=socket_group,
                socket_mode=socket_mode,
            )
        return _Entry(
            index=index,
            fields=fields,
            name=name,
            listen_port=listen_port,
            listen_address=listen_address,
            target_host=target_host,
            target_port=target_port,
            service=service,
        )

    def service_name(self, fields: _Fields, name: str) -> str | None:
        """Any name, as large-model-proxy takes it: its units get a unit-safe form of it
        (unitnames.component), while status, logs and the APIs show it as written."""
        problem = None
        if not name:
            problem = "Name must not be empty"
        elif len(name) > MAX_NAME_LENGTH:
            problem = f"Name is longer than {MAX_NAME_LENGTH} characters"
        else:
            try:  # where the name is written verbatim: each unit's Description=
                unitsyntax.inner_value(name)
            except ValueError as error:
                problem = f"Name {_show(name)} is not usable in a systemd unit: {error}"
        if problem is not None:
            self.error(fields.path_of("Name"), problem)
            return None
        return name

    def unix_socket(self, fields: _Fields) -> tuple[str | None, str | None, str | None, str | None]:
        """ListenPath and who may connect to it: SocketUser, SocketGroup, SocketMode."""
        path = self.optional_text(fields, "ListenPath")
        if path is not None:
            self.unit_safe(fields, "ListenPath", lambda: unitsyntax.listen_stream_path(path))
        owners = [
            self.account(fields, "SocketUser", "a user name"),
            self.account(fields, "SocketGroup", "a group name"),
        ]
        mode = self.optional_text(fields, "SocketMode")
        if mode is not None and not _SOCKET_MODE_RE.fullmatch(mode):
            self.error(
                fields.path_of("SocketMode"),
                f'invalid SocketMode {_show(mode)}: expected an octal mode such as "0660"',
            )
            mode = None
        for field, value in (
            ("SocketUser", owners[0]),
            ("SocketGroup", owners[1]),
            ("SocketMode", mode),
        ):
            if value is not None and path is None:
                self.error(fields.path_of(field), f"{field} needs a ListenPath")
        return path, owners[0], owners[1], mode

    def account(self, fields: _Fields, name: str, what: str) -> str | None:
        """A user or group name field (null: absent); what: "a user name"."""
        value = self.text(fields, name, null_ok=True)
        if value is not None and not _USER_RE.fullmatch(value):
            self.error(
                fields.path_of(name),
                f"invalid {name} {_show(value)}: expected {what} (1 to 31 characters from "
                "a-z 0-9 _ -, starting with a letter or '_')",
            )
            return None
        return value

    def user(self, fields: _Fields) -> str | None:
        user = self.account(fields, "User", "a user name")
        allow_root = self.boolean(fields, "AllowRoot", False)
        if user is None:
            pass
        elif user == SHIM_USER:
            self.error(
                fields.path_of("User"),
                f"User {_show(user)} is the shims' own user: a model server running as it "
                "could start and stop every model (polkit) and rewrite the resource ledger; "
                "leave User out (models then run as lmproxy-model) or name another user",
            )
        elif user == "root" and not allow_root:
            self.error(
                fields.path_of("User"),
                'User "root" runs a network-facing model server with every privilege; '
                'if that is really meant, say so with "AllowRoot": true in this service',
            )
        return user

    def unit_safe(
        self, fields: _Fields, name: str, check: Callable[[], object], key: str | None = None
    ) -> None:
        """Records a value that systemd's unit syntax cannot carry safely, at its path:
        what validate accepts, render can always write."""
        try:
            check()
        except ValueError as error:
            path = fields.path_of(name)
            self.error(_child(path, key) if key else path, f"not usable in a systemd unit: {error}")

    def proxy_target_host(self, fields: _Fields) -> str | None:
        host = self.text(fields, "ProxyTargetHost")
        if host is None:
            return None if fields.has("ProxyTargetHost") else DEFAULT_PROXY_TARGET_HOST
        if host == "":
            return DEFAULT_PROXY_TARGET_HOST
        address = _ip_literal(host)
        if address is not None:
            return address
        if _HOSTNAME_RE.fullmatch(host):
            return host
        self.error(
            fields.path_of("ProxyTargetHost"),
            f"expected a host name or an IP address (no brackets, no port), got {_show(host)}",
        )
        return None

    def command(self, fields: _Fields, work_dir: str | None) -> str | None:
        command = self.text(fields, "Command")
        if command is None:
            if not fields.has("Command"):
                self.error(fields.path_of("Command"), "Command is required")
            return None
        if not command.strip():
            self.error(
                fields.path_of("Command"), f"Command must not be empty, got {_show(command)}"
            )
            return None
        if "/" not in command:
            return command  # a bare name: systemd looks it up in PATH
        return _absolute(work_dir or self.base_dir, command)

    def models(self, fields: _Fields) -> tuple[str, ...]:
        got = fields.get("OpenAiApiModels")
        if got is None:
            return ()
        path, value = got
        if not isinstance(value, list):
            self.error(path, f"expected an array of strings, got {_show(value)}")
            return ()
        models = []
        for index, item in enumerate(value):
            model = self.string_value(f"{path}[{index}]", item)
            if model is not None:
                models.append(model)
        return tuple(models)

    def requirements(self, fields: _Fields) -> dict[str, int]:
        got = self.object_field(fields, "ResourceRequirements")
        if got is None:
            return {}
        return self.amounts(*got)

    def sleep(self, fields: _Fields) -> Sleep | None:
        got = self.object_field(fields, "Sleep")
        if got is None:
            return None
        sleep_fields = _Fields(self, got[1], got[0], SLEEP_FIELDS)
        level = self.integer(sleep_fields, "Level", 1, 2, 1)
        holds = self.requirements(sleep_fields)
        sleep_command = self.optional_text(sleep_fields, "SleepCommand")
        wake_command = self.optional_text(sleep_fields, "WakeCommand")
        if (sleep_command is None) != (wake_command is None):
            given, missing = (
                ("SleepCommand", "WakeCommand")
                if wake_command is None
                else ("WakeCommand", "SleepCommand")
            )
            self.error(
                sleep_fields.path_of(given),
                f"{given} is set but {missing} is not: give both (commands), or neither "
                "(vLLM's sleep API on ProxyTargetHost:ProxyTargetPort)",
            )
        for name, command in (("SleepCommand", sleep_command), ("WakeCommand", wake_command)):
            if command is not None and not command.strip():
                self.error(sleep_fields.path_of(name), f"{name} must not be blank")
        return Sleep(level, holds, sleep_command, wake_command)

    def amounts(self, path: str, obj: _JsonObject) -> dict[str, int]:
        """Resource amounts, each in ResourcesAvailable and at most what it says."""
        requirements: dict[str, int] = {}
        for key, value in obj.pairs:
            key_path = _child(path, key)
            if key in requirements:
                self.error(key_path, f"duplicate resource {_show(key)}")
                continue
            amount = self.int_value(key_path, value, 0, MAX_RESOURCE_AMOUNT)
            if amount is None:
                continue
            requirements[key] = amount
            if not self.resources_known or key in self.bad_resources:
                continue  # already reported at ResourcesAvailable
            available = self.resources.get(key)
            if available is None:
                self.error(key_path, f"resource {_show(key)} is not in ResourcesAvailable")
            elif amount > available:
                self.error(
                    key_path,
                    f"needs {amount} of {_show(key)} but only {available} is available",
                )
        return requirements

    def environment(self, fields: _Fields) -> dict[str, str]:
        got = self.object_field(fields, "Environment")
        if got is None:
            return {}
        path, obj = got
        environment: dict[str, str] = {}
        for key, value in obj.pairs:
            key_path = _child(path, key)
            if key in environment:
                self.error(key_path, f"duplicate variable {_show(key)}")
            elif not _ENV_NAME_RE.fullmatch(key):
                self.error(
                    key_path,
                    f"invalid variable name {_show(key)}: expected letters, digits and '_', "
                    "not starting with a digit",
                )
            else:
                text = self.string_value(key_path, value)
                if text is not None:
                    environment[key] = text
        return environment

    # Checks across services

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
                    f"duplicate service name {_show(entry.name)}: "
                    f"$.Services[{first.index}] has it too",
                )
                continue
            first_with_name[entry.name] = entry
            unit = unitnames.component(entry.name)
            clash = first_with_unit.setdefault(unit, entry)
            if clash is not entry:
                self.error(
                    entry.fields.path_of("Name"),
                    f"the names {_show(clash.name)} ($.Services[{clash.index}]) and "
                    f"{_show(entry.name)} both give the unit name {unitnames.shim_unit(unit)!r}: "
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
            if _is_loopback_host(entry.target_host) or entry.target_host == listener.listen_address:
                self.error(
                    entry.fields.path_of("ProxyTargetPort"),
                    f"{entry.target_host!r} port {entry.target_port} is where lmproxy itself "
                    f"listens for {_describe(listener, entry)} ($.Services[{listener.index}]): "
                    "the service would connect back to lmproxy instead of to its backend",
                )


def _describe(entry: _Entry, viewer: _Entry) -> str:
    if entry is viewer:
        return "this service"
    return f"service {_show(entry.name)}" if entry.name is not None else "another service"
