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

The package, by concern: `jsonc` reads the text, `reader` reads JSON values and
fields as strictly as described, `settings` is the table of every field (adding one is
an entry there), `parser` assembles a `Config` (`model`) and checks across fields and
services.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmproxy.config.jsonc import JsonObject, decode, show
from lmproxy.config.kinds import (
    DEFAULT_HEALTHCHECK_INTERVAL_MS,
    DEFAULT_LISTEN_ADDRESS,
    DEFAULT_MAX_WAIT_FOR_CONNECTION_CLOSE_S,
    DEFAULT_MIN_LOADED_S,
    DEFAULT_PROXY_TARGET_HOST,
    DEFAULT_SHUTDOWN_AFTER_INACTIVITY_S,
    DEFAULT_STARTUP_TIMEOUT_MS,
    DEFAULT_SWAP_AFTER_WAITING_S,
    MAX_CONNECTIONS,
    MAX_MILLISECONDS,
    MAX_NAME_LENGTH,
    MAX_RESOURCE_AMOUNT,
    MAX_SECONDS,
    PROTOCOLS,
    SHIM_USER,
    SLEEP_LEVELS,
    UNBOUNDED,
)
from lmproxy.config.model import Config, ConfigError, ResourceCheck, Service, Sleep
from lmproxy.config.parser import Parser
from lmproxy.config.reader import MAX_PORT, absolute
from lmproxy.config.settings import API_FIELDS, SERVICE_FIELDS, SLEEP_FIELDS, TOP_LEVEL_FIELDS

__all__ = [
    "API_FIELDS",
    "DEFAULT_HEALTHCHECK_INTERVAL_MS",
    "DEFAULT_LISTEN_ADDRESS",
    "DEFAULT_MAX_WAIT_FOR_CONNECTION_CLOSE_S",
    "DEFAULT_MIN_LOADED_S",
    "DEFAULT_PROXY_TARGET_HOST",
    "DEFAULT_SHUTDOWN_AFTER_INACTIVITY_S",
    "DEFAULT_STARTUP_TIMEOUT_MS",
    "DEFAULT_SWAP_AFTER_WAITING_S",
    "MAX_CONNECTIONS",
    "MAX_MILLISECONDS",
    "MAX_NAME_LENGTH",
    "MAX_PORT",
    "MAX_RESOURCE_AMOUNT",
    "MAX_SECONDS",
    "PROTOCOLS",
    "SERVICE_FIELDS",
    "SHIM_USER",
    "SLEEP_FIELDS",
    "SLEEP_LEVELS",
    "TOP_LEVEL_FIELDS",
    "UNBOUNDED",
    "Config",
    "ConfigError",
    "ResourceCheck",
    "Service",
    "Sleep",
    "load_config",
    "parse_config",
]


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
    base = absolute(os.getcwd(), str(base_dir) if base_dir is not None else ".")
    root = decode(text)
    parser = Parser(base)
    if not isinstance(root, JsonObject):
        raise ConfigError([("$", f"the top level must be an object, got {show(root)}")])
    config = parser.config(root)
    if parser.problems:
        raise ConfigError(parser.problems)
    return config
