"""Every field lmproxy reads, in one table per object: its name, where its value goes, and
how it is read (the order of each table is the order of reading, and of the problems
reported). Adding a field is one entry here and the attribute it fills in
lmproxy.config.model; README's field tables document each one.

A `Setting` reads one field, or a few that only make sense together (ListenPath and its
socket's owner and mode), and returns the attributes they fill; what the settings before
it returned is passed along, for the fields that depend on another (Command on WorkDir).
Simple values are read by lmproxy.config.kinds, the others by lmproxy.config.fields.
"""

from __future__ import annotations

import re

from lmproxy.config.fields import (
    accepted,
    args,
    command,
    environment,
    healthcheck_interval,
    listen_address,
    listen_port,
    log_file_path,
    models,
    path,
    proxy_target_host,
    required_port,
    requirements,
    service_name,
    service_shutdown,
    service_url,
    strings,
    tensor_split,
    unix_socket,
    user,
)
from lmproxy.config.jsonc import JsonObject, child, show
from lmproxy.config.kinds import (
    DEFAULT_CHECK_INTERVAL_MS,
    DEFAULT_MAX_WAIT_FOR_CONNECTION_CLOSE_S,
    DEFAULT_MIN_LOADED_S,
    DEFAULT_SHUTDOWN_AFTER_INACTIVITY_S,
    DEFAULT_STARTUP_TIMEOUT_MS,
    DEFAULT_SWAP_AFTER_WAITING_S,
    MAX_CONNECTIONS,
    MAX_MILLISECONDS,
    MAX_RESOURCE_AMOUNT,
    MAX_SECONDS,
    PROTOCOLS,
    RESOURCE_RE,
    RESOURCE_RULE,
    SLEEP_LEVELS,
    UNBOUNDED,
    ConfigReader,
    Defaults,
    Setting,
    Values,
    boolean,
    choice,
    field,
    integer,
    names,
    optional_text,
)
from lmproxy.config.model import (
    DEFAULT_MAX_REQUEST_BODY_BYTES,
    DEFAULT_RESPONSE_TIMEOUT_S,
    ResourceCheck,
    Router,
    Sleep,
)
from lmproxy.config.reader import Fields


def sleep(r: ConfigReader, f: Fields, name: str, _v: Values, _d: Defaults | None) -> object:
    got = r.object_field(f, name)
    if got is None:
        return None
    sleep_fields = Fields(r, got[1], got[0], names(SLEEP_SETTINGS))
    values: Values = {}
    for setting in SLEEP_SETTINGS:
        values.update(setting.read(r, sleep_fields, values, None))
    sleep_command, wake_command = values["sleep_command"], values["wake_command"]
    if (sleep_command is None) != (wake_command is None):
        given, missing = (
            ("SleepCommand", "WakeCommand")
            if wake_command is None
            else ("WakeCommand", "SleepCommand")
        )
        r.error(
            sleep_fields.path_of(given),
            f"{given} is set but {missing} is not: give both (commands), or neither "
            "(vLLM's sleep API on ProxyTargetHost:ProxyTargetPort)",
        )
    for command_name, value in (("SleepCommand", sleep_command), ("WakeCommand", wake_command)):
        if isinstance(value, str) and not value.strip():
            r.error(sleep_fields.path_of(command_name), f"{command_name} must not be blank")
    return Sleep(**values)  # type: ignore[arg-type]


def api_port(r: ConfigReader, f: Fields, name: str, _v: Values, _d: Defaults | None) -> object:
    """An API's object: {"ListenPort": ...}; its port, or None."""
    got = r.object_field(f, name)
    if got is None:
        return None
    return r.port(Fields(r, got[1], got[0], names(API_SETTINGS)), "ListenPort")


def openai_api(r: ConfigReader, f: Fields, _v: Values, _d: Defaults | None) -> Values:
    """The router's object: large-model-proxy's {"ListenPort": ...} and lmproxy's additions."""
    got = r.object_field(f, "OpenAiApi")
    if got is None:
        return {"openai_api_listen_port": None, "router": Router()}
    router_fields = Fields(r, got[1], got[0], names(ROUTER_SETTINGS))
    values: Values = {}
    for setting in ROUTER_SETTINGS:
        values.update(setting.read(r, router_fields, values, None))
    port = values.pop("listen_port")
    return {"openai_api_listen_port": port, "router": Router(**values)}  # type: ignore[arg-type]


def api_keys(r: ConfigReader, f: Fields, name: str, _v: Values, _d: Defaults | None) -> object:
    """Bearer keys: printable, no spaces (an Authorization header carries them)."""
    keys = []
    for where, key in strings(r, f, name):
        if API_KEY_RE.fullmatch(key):
            keys.append(key)
        else:
            # The key itself is not repeated: an error message may end up in a log.
            r.error(where, f"an API key must be {API_KEY_RULE}")
    return tuple(keys)


def resources_available(r: ConfigReader, f: Fields, _v: Values, _d: Defaults | None) -> Values:
    """Each resource: an amount, or large-model-proxy's object form (`RESOURCE_SETTINGS`)."""
    got = f.get("ResourcesAvailable")
    checks: dict[str, ResourceCheck] = {}
    result: Values = {
        "resources_available": r.resources,
        "resource_checks": checks,
        "auto_amounts": r.auto_amounts,
    }
    if got is None:
        return result
    where, value = got
    if not isinstance(value, JsonObject):
        r.error(where, f"expected an object of resource amounts, got {show(value)}")
        r.resources_known = False
        return result
    for key, amount in value.pairs:
        key_path = child(where, key)
        if key in r.resources or key in r.bad_resources:
            r.error(key_path, f"duplicate resource {show(key)}")
            continue
        if not RESOURCE_RE.fullmatch(key):
            r.error(key_path, f"invalid resource name {show(key)}: {RESOURCE_RULE}")
            r.bad_resources.add(key)
            continue
        check = None
        if isinstance(amount, JsonObject):
            checked, check, auto = resource_object(r, key_path, amount)
            if auto:
                r.auto_amounts.add(key)
        else:
            checked = r.int_value(key_path, amount, 0, MAX_RESOURCE_AMOUNT)
        if checked is None:
            r.bad_resources.add(key)
            continue
        r.resources[key] = checked
        if check is not None:
            checks[key] = check
    return result


def resource_object(
    r: ConfigReader, where: str, obj: JsonObject
) -> tuple[int | None, ResourceCheck | None, bool]:
    """{"Amount": N} and/or {"CheckCommand": ...}, as large-model-proxy writes a resource,
    or a GPU's memory ({"Gpu": "0", "Amount": N or "auto"}, lmproxy's): its amount
    (UNBOUNDED when measured alone, or "auto" until install reads it), its check, and
    whether the amount is "auto"."""
    fields = Fields(r, obj, where, names(RESOURCE_SETTINGS))
    problems = len(r.problems)
    values: Values = {}
    for setting in RESOURCE_SETTINGS:
        values.update(setting.read(r, fields, values, None))
    command, amount, interval, gpu_id = (
        values["check_command"],
        values["amount"],
        values["check_interval_ms"],
        values["gpu"],
    )
    if isinstance(command, str) and not command.strip():
        r.error(fields.path_of("CheckCommand"), "CheckCommand must not be blank")
    if command is not None and gpu_id is not None:
        r.error(
            fields.path_of("Gpu"),
            "a resource is measured by its Gpu or by a CheckCommand, not both",
        )
    if amount == AUTO and gpu_id is None:
        r.error(fields.path_of("Amount"), 'Amount "auto" is a GPU\'s total: it needs a Gpu')
    if command is None and gpu_id is None and amount is None and len(r.problems) == problems:
        r.error(fields.path_of("Amount"), "Amount is required (or a CheckCommand, or a Gpu)")
    if len(r.problems) != problems:
        return None, None, False
    assert isinstance(interval, int)
    check = None
    if command is not None or gpu_id is not None:
        check = ResourceCheck(
            None if command is None else str(command),
            interval,
            None if gpu_id is None else str(gpu_id),
        )
    if amount == AUTO or amount is None:
        return UNBOUNDED, check, amount == AUTO
    assert isinstance(amount, int)
    return amount, check, False


def optional_amount(
    r: ConfigReader, f: Fields, name: str, _v: Values, _d: Defaults | None
) -> object:
    """An amount, or "auto" (a GPU resource's: its total less a reserve, at install)."""
    got = f.get(name)
    if got is None:
        return None
    if got[1] == AUTO:
        return AUTO
    return r.int_value(got[0], got[1], 0, MAX_RESOURCE_AMOUNT)


def gpu(r: ConfigReader, f: Fields, name: str, _v: Values, _d: Defaults | None) -> object:
    """A GPU, as NVML numbers it ("0", or 0) or names it (its UUID, "GPU-...")."""
    got = f.get(name)
    if got is None:
        return None
    where, value = got
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1024:
        return str(value)
    if isinstance(value, str) and (value.isdigit() or _GPU_UUID_RE.fullmatch(value)):
        return value
    r.error(
        where,
        'expected a GPU index ("0") or UUID ("GPU-8f3c...", as `nvidia-smi -L` prints it), '
        f"got {show(value)}",
    )
    return None


AUTO = "auto"
_GPU_UUID_RE = re.compile(r"(GPU|MIG)-[0-9A-Fa-f-]{8,64}")


# --- The tables ------------------------------------------------------------------------------

SLEEP_SETTINGS: tuple[Setting, ...] = (
    field("Level", "level", integer(SLEEP_LEVELS[0], SLEEP_LEVELS[-1], 1)),
    field("ResourceRequirements", "holds", requirements),
    field("SleepCommand", "sleep_command", optional_text),
    field("WakeCommand", "wake_command", optional_text),
)

API_SETTINGS: tuple[Setting, ...] = (field("ListenPort", None, lambda *_: None),)

API_KEY_RE = re.compile(r"[\x21-\x7e]{1,4096}")
API_KEY_RULE = "1 to 4096 printable ASCII characters without spaces"

# Top-level "OpenAiApi": the router (lmproxy.router).
ROUTER_SETTINGS: tuple[Setting, ...] = (
    # Absent or "": no router (large-model-proxy's reading), whatever else the object says.
    field("ListenPort", "listen_port", lambda r, f, name, _v, _d: r.port(f, name)),
    field("ApiKeys", "api_keys", api_keys, lmproxy=True),
    field("ApiKeysFile", "api_keys_file", path, lmproxy=True),
    field(
        "MaxRequestBodyBytes",
        "max_request_body_bytes",
        integer(1, MAX_RESOURCE_AMOUNT, DEFAULT_MAX_REQUEST_BODY_BYTES),
        lmproxy=True,
    ),
    field(
        "ResponseTimeoutSeconds",
        "response_timeout_s",
        integer(0, MAX_SECONDS, DEFAULT_RESPONSE_TIMEOUT_S),
        lmproxy=True,
    ),
)

# A resource in object form (large-model-proxy's), instead of an amount.
RESOURCE_SETTINGS: tuple[Setting, ...] = (
    field("Amount", "amount", optional_amount),
    field("CheckCommand", "check_command", optional_text),
    field("Gpu", "gpu", gpu, lmproxy=True),
    field(
        "CheckWhenNotEnoughIntervalMilliseconds",
        "check_interval_ms",
        integer(1, MAX_MILLISECONDS, DEFAULT_CHECK_INTERVAL_MS),
    ),
)

# Read before the services, which take their defaults and resources from them.
TOP_LEVEL_SETTINGS: tuple[Setting, ...] = (
    field(
        "ShutDownAfterInactivitySeconds",
        "shutdown_after_inactivity_s",
        integer(0, MAX_SECONDS, DEFAULT_SHUTDOWN_AFTER_INACTIVITY_S),
    ),
    field(
        "MaxTimeToWaitForServiceToCloseConnectionBeforeGivingUpSeconds",
        "max_wait_for_connection_close_s",
        integer(0, MAX_SECONDS, DEFAULT_MAX_WAIT_FOR_CONNECTION_CLOSE_S),
    ),
    field(
        "SwapAfterWaitingSeconds",
        "swap_after_waiting_s",
        integer(0, MAX_SECONDS, DEFAULT_SWAP_AFTER_WAITING_S),
        lmproxy=True,
    ),
    field(
        "MinLoadedSeconds",
        "min_loaded_s",
        integer(0, MAX_SECONDS, DEFAULT_MIN_LOADED_S),
        lmproxy=True,
    ),
    field("OutputServiceLogs", "output_service_logs", boolean(True)),
    # large-model-proxy's, with no meaning here (README: Coming from large-model-proxy).
    field("LogLevel", None, accepted),
    field("ClientRequestBufferLimitBytes", None, integer(0, MAX_RESOURCE_AMOUNT, 0)),
    field("DefaultServiceUrl", "default_service_url", optional_text),
    field("ListenAddress", "listen_address", listen_address, lmproxy=True),
    Setting(("OpenAiApi",), openai_api),
    field("ManagementApi", "management_api_listen_port", api_port),
    Setting(("ResourcesAvailable",), resources_available),
    Setting(("Services",), lambda *_: {}),  # read by lmproxy.config.parser, one by one
)

SERVICE_SETTINGS: tuple[Setting, ...] = (
    Setting(("Name",), service_name),
    Setting(("ListenPath", "SocketUser", "SocketGroup", "SocketMode"), unix_socket, lmproxy=True),
    Setting(("ListenPort",), listen_port),
    field("ListenAddress", "listen_address", listen_address, lmproxy=True),
    Setting(("ProxyTargetHost",), proxy_target_host),
    field("ProxyTargetPort", "proxy_target_port", required_port("ProxyTargetPort is required")),
    field("WorkDir", "work_dir", path),
    field("LogFilePath", "log_file_path", log_file_path),
    Setting(("Command",), command),
    Setting(("Args",), args),
    field("HealthcheckCommand", "healthcheck_command", optional_text),
    Setting(("HealthcheckIntervalMilliseconds",), healthcheck_interval),
    field(
        "StartupTimeoutMilliseconds",
        "startup_timeout_ms",
        integer(1, MAX_MILLISECONDS, DEFAULT_STARTUP_TIMEOUT_MS),
    ),
    field("ShutDownAfterInactivitySeconds", "shutdown_after_inactivity_s", service_shutdown),
    field("KillCommand", "kill_command", optional_text),
    field("RestartOnConnectionFailure", "restart_on_connection_failure", boolean(False)),
    field("ConsiderStoppedOnProcessExit", "consider_stopped_on_process_exit", boolean(True)),
    field("OpenAiApi", "openai_api", boolean(False)),
    field("OpenAiApiModels", "openai_api_models", models),
    field("ServiceUrl", "service_url", service_url),
    field("ResourceRequirements", "resource_requirements", requirements),
    field("Sleep", "sleep", sleep, lmproxy=True),
    field("Environment", "environment", environment, lmproxy=True),
    Setting(("User", "AllowRoot"), user, lmproxy=True),
    field("MaxConnections", "max_connections", integer(0, MAX_CONNECTIONS, 0), lmproxy=True),
    field(
        "IdleConnectionTimeoutSeconds",
        "idle_connection_timeout_s",
        integer(0, MAX_SECONDS, 0),
        lmproxy=True,
    ),
    field(
        "SwapAfterWaitingSeconds",
        "swap_after_waiting_s",
        integer(0, MAX_SECONDS, lambda d: d.swap_after_waiting_s),
        lmproxy=True,
    ),
    field(
        "MinLoadedSeconds",
        "min_loaded_s",
        integer(0, MAX_SECONDS, lambda d: d.min_loaded_s),
        lmproxy=True,
    ),
    field("Protocol", "protocol", choice(PROTOCOLS), lmproxy=True),
    Setting(("TensorSplit",), tensor_split, lmproxy=True),
)

TOP_LEVEL_FIELDS = names(TOP_LEVEL_SETTINGS)
SERVICE_FIELDS = names(SERVICE_SETTINGS)
SLEEP_FIELDS = names(SLEEP_SETTINGS)
API_FIELDS = names(API_SETTINGS)
ROUTER_FIELDS = names(ROUTER_SETTINGS)
RESOURCE_FIELDS = names(RESOURCE_SETTINGS)
