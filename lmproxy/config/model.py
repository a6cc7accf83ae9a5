"""What a valid config is: the values lmproxy acts on, every one checked (lmproxy.config)."""

from __future__ import annotations

from binascii import crc32
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from lmproxy import unitnames, unitsyntax

# Where the sockets of services reachable only through the router are, in the manager's
# runtime directory (beside lmproxy's own, which its shims own: this one is systemd's).
PRIVATE_SOCKET_DIR = "lmproxy-private"


class ConfigError(ValueError):
    """A config that lmproxy refuses: one or more (JSON path, problem) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{path}: {problem}" for path, problem in problems))


@dataclass(frozen=True)
class ResourceCheck:
    """How a resource is measured, before each start that needs it and again every
    interval_ms while it is short (lmproxy.checks): by a CheckCommand (large-model-proxy's:
    a shell command that prints the amount free now), or as a GPU's free memory in MiB
    from NVML (lmproxy's `Gpu`: an index or a UUID)."""

    command: str | None
    interval_ms: int
    gpu: str | None = None


@dataclass(frozen=True)
class Sleep:
    """How a service sleeps instead of stopping (lmproxy's "Sleep" object): vLLM's
    sleep API on its ProxyTarget by default, or the commands given."""

    level: int  # 1: weights kept in RAM; 2: weights dropped too
    holds: Mapping[str, int]  # what it still holds asleep (its ResourceRequirements)
    sleep_command: str | None = None  # both or neither
    wake_command: str | None = None


# The router's body limit: a JSON body is read whole to find its model (a multipart one only
# up to its model field), so this bounds the memory one request can take.
DEFAULT_MAX_REQUEST_BODY_BYTES = 64 * 1024 * 1024
# How long the router waits for a model's answer to begin (a cold start included).
DEFAULT_RESPONSE_TIMEOUT_S = 600


@dataclass(frozen=True)
class OwnApi:
    """One of lmproxy's own socket-activated services that a config asks for: the OpenAI
    router or the management API (`lmproxy-api@NAME.socket` on ListenAddress)."""

    name: str  # unitnames.ROUTER or unitnames.MANAGEMENT
    field: str  # its top-level object: "OpenAiApi" or "ManagementApi"
    port: int

    @property
    def path(self) -> str:
        """Its port's JSON path, for errors."""
        return f"$.{self.field}.ListenPort"


@dataclass(frozen=True)
class Router:
    """lmproxy's additions to `OpenAiApi` (lmproxy.router): who may use it, and its limits."""

    api_keys: tuple[str, ...] = ()  # none (and no file): anyone who reaches the port
    api_keys_file: str | None = None  # one key per line, read at start and at each reload
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    response_timeout_s: int = DEFAULT_RESPONSE_TIMEOUT_S  # 0: no limit

    @property
    def needs_keys(self) -> bool:
        return bool(self.api_keys) or self.api_keys_file is not None


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
    service_url: str | None  # its own ServiceUrl, else DefaultServiceUrl; None: not shown
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
    # "TensorSplit": "auto" (llama.cpp): the model file its Args name, whose layers are
    # split across the GPUs by their free memory at each start (lmproxy.autosplit).
    split_model: str | None = None
    split_context: int | None = None  # its Args' -c/--ctx-size, for the KV cache

    @property
    def connect_host(self) -> str:
        """Where to connect to reach what listens on ListenAddress (any address: loopback)."""
        if self.listen_address == "0.0.0.0":
            return "127.0.0.1"
        if self.listen_address == "::":
            return "::1"
        return self.listen_address

    @property
    def router_only(self) -> bool:
        """Reachable only through the OpenAI router: it has neither ListenPort nor
        ListenPath, and listens on a private unix socket (`private_socket`)."""
        return self.listen_port is None and self.listen_path is None

    @property
    def private_socket_name(self) -> str:
        """Its private socket's file name: short, for a unix socket's path has at most
        107 bytes wherever the runtime directory is."""
        return f"{crc32(self.name.encode('utf-8', 'surrogatepass')):08x}.sock"

    @property
    def model_ids(self) -> tuple[str, ...]:
        """The model ids the router knows it by: its OpenAiApiModels, else its Name."""
        return self.openai_api_models or (self.name,)

    @property
    def listen_stream(self) -> str:
        """Its socket unit's ListenStream= value, escaped: the unix socket's path, or
        address and port. Validated when the config was read: this cannot fail."""
        if self.listen_path is not None:
            return unitsyntax.listen_stream_path(self.listen_path)
        if self.router_only:
            # %t: the manager's runtime directory, as lmproxy.paths.Paths.socket_path says.
            return f"%t/{PRIVATE_SOCKET_DIR}/{self.private_socket_name}"
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
    openai_api_listen_port: int | None  # the router's port (lmproxy.router); None: no router
    management_api_listen_port: int | None
    default_service_url: str | None
    # Where relative paths were resolved, and where a service without WorkDir runs: the
    # directory `lmproxy install` ran in, as large-model-proxy's are where it started.
    base_dir: str
    # Resources measured by a CheckCommand; their ResourcesAvailable is the Amount, or
    # UNBOUNDED without one (the measurement alone says what is free).
    resource_checks: Mapping[str, ResourceCheck] = field(default_factory=dict)
    # GPU resources whose Amount is "auto": the GPU's total less a reserve, which
    # `lmproxy install` reads from NVML (until then UNBOUNDED; lmproxy.gpuresources).
    auto_amounts: AbstractSet[str] = frozenset()
    router: Router = field(default_factory=Router)

    @property
    def apis(self) -> tuple[OwnApi, ...]:
        """lmproxy's own services this config has: the router's first."""
        ports = (
            (unitnames.ROUTER, "OpenAiApi", self.openai_api_listen_port),
            (unitnames.MANAGEMENT, "ManagementApi", self.management_api_listen_port),
        )
        return tuple(OwnApi(name, field, port) for name, field, port in ports if port is not None)

    @property
    def routed(self) -> tuple[Service, ...]:
        """The services the OpenAI router serves ("OpenAiApi": true), none without it."""
        if self.openai_api_listen_port is None:
            return ()
        return tuple(s for s in self.services if s.openai_api)

    def service(self, name: str) -> Service:
        for service in self.services:
            if service.name == name:
                return service
        raise KeyError(name)

    def checks_of(self, service: Service) -> dict[str, ResourceCheck]:
        """The measured resources (CheckCommand, Gpu) that service needs some of."""
        return {
            resource: check
            for resource, check in self.resource_checks.items()
            if service.resource_requirements.get(resource)
        }

    def gpus_of(self, service: Service) -> dict[str, str]:
        """The GPU resources that service needs some of: resource -> its GPU."""
        return {r: c.gpu for r, c in self.checks_of(service).items() if c.gpu is not None}
