"""Reading and validating large-model-proxy's config.json (JSON or JSONC).

The format is large-model-proxy's, read unchanged; lmproxy's own additions
use the same PascalCase style. Every error names the JSON path of the bad
value, so that `lmproxy validate` can point at it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A config that lmproxy refuses: one or more (JSON path, problem) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{path}: {problem}" for path, problem in problems))


@dataclass(frozen=True)
class Service:
    name: str
    listen_port: int
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


@dataclass(frozen=True)
class Config:
    resources_available: Mapping[str, int]
    services: tuple[Service, ...]
    max_wait_for_connection_close_s: int
    shutdown_after_inactivity_s: int
    output_service_logs: bool
    listen_address: str
    openai_api_listen_port: int | None
    management_api_listen_port: int | None
    default_service_url: str | None

    def service(self, name: str) -> Service:
        for service in self.services:
            if service.name == name:
                return service
        raise KeyError(name)


def load_config(path: Path) -> Config:
    raise NotImplementedError


def parse_config(text: str) -> Config:
    raise NotImplementedError
