"""What a valid config is: the values lmproxy acts on, every one checked (lmproxy.config)."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from lmproxy import unitsyntax


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
    # Resources measured by a CheckCommand; their ResourcesAvailable is the Amount, or
    # UNBOUNDED without one (the measurement alone says what is free).
    resource_checks: Mapping[str, ResourceCheck] = field(default_factory=dict)
    # GPU resources whose Amount is "auto": the GPU's total less a reserve, which
    # `lmproxy install` reads from NVML (until then UNBOUNDED; lmproxy.gpuresources).
    auto_amounts: AbstractSet[str] = frozenset()

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
