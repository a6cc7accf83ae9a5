"""What the settings tables are made of (lmproxy.config.settings): the names, defaults and
ranges of values, a `Setting` (fields read together, and the attributes they fill), and
the readers of simple values that most fields use."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from lmproxy.config.reader import Fields, Reader

# --- Names, defaults and ranges ------------------------------------------------------------

DEFAULT_LISTEN_ADDRESS = "127.0.0.1"
DEFAULT_PROXY_TARGET_HOST = "localhost"
DEFAULT_MAX_WAIT_FOR_CONNECTION_CLOSE_S = 1200
DEFAULT_SHUTDOWN_AFTER_INACTIVITY_S = 0  # never
DEFAULT_SWAP_AFTER_WAITING_S = 5
DEFAULT_MIN_LOADED_S = 0
DEFAULT_HEALTHCHECK_INTERVAL_MS = 200
DEFAULT_STARTUP_TIMEOUT_MS = 600_000
DEFAULT_CHECK_INTERVAL_MS = 1000  # large-model-proxy's CheckWhenNotEnoughIntervalMilliseconds

MAX_RESOURCE_AMOUNT = 2**53
# What a resource measured by a CheckCommand alone (no Amount) has in ResourcesAvailable:
# no total, so the measurement alone bounds it.
UNBOUNDED = MAX_RESOURCE_AMOUNT
MAX_MILLISECONDS = 2**31 - 1
MAX_SECONDS = 2**31 - 1
MAX_CONNECTIONS = 1_000_000
MAX_NAME_LENGTH = 255

# How a service's connections are counted (see Service.protocol); the first is the default.
PROTOCOLS = ("http", "raw")
SLEEP_LEVELS = (1, 2)
RESOURCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")  # fullmatch
RESOURCE_RULE = "1 to 64 characters from A-Z a-z 0-9 _ . : -, starting with a letter or digit"
SHIM_USER = "lmproxy"  # system mode: the shims run as this user (system/lmproxy.sysusers)


Values = dict[str, object]


@dataclass(frozen=True)
class Defaults:
    """What a service takes from the top level unless it says otherwise."""

    listen_address: str
    shutdown_s: int
    swap_after_waiting_s: int
    min_loaded_s: int
    service_url: str | None = None
    router: bool = False  # the top level has an OpenAiApi.ListenPort


class ConfigReader(Reader):
    """A Reader that also knows the config's resources, for the fields that name them."""

    def __init__(self, base_dir: str) -> None:
        super().__init__(base_dir)
        self.resources: dict[str, int] = {}
        self.resources_known = True  # False when ResourcesAvailable itself is unusable
        self.bad_resources: set[str] = set()
        self.auto_amounts: set[str] = set()  # GPU resources whose Amount is "auto"


Read = Callable[[ConfigReader, Fields, Values, Defaults | None], Values]


@dataclass(frozen=True)
class Setting:
    """Fields read together, and how: `read` returns the attributes they fill."""

    fields: tuple[str, ...]
    read: Read
    lmproxy: bool = False  # lmproxy's addition (else large-model-proxy's)


def names(settings: tuple[Setting, ...]) -> tuple[str, ...]:
    """The field names of a table, as documented; keys match them case-insensitively."""
    return tuple(name for setting in settings for name in setting.fields)


# --- Simple fields: one field, one attribute ------------------------------------------------

ReadOne = Callable[[ConfigReader, Fields, str, Values, Defaults | None], object]


def field(name: str, attr: str | None, read: ReadOne, *, lmproxy: bool = False) -> Setting:
    """A field that fills one attribute (None: read and checked, with no meaning here)."""

    def read_field(r: ConfigReader, f: Fields, v: Values, d: Defaults | None) -> Values:
        value = read(r, f, name, v, d)
        return {} if attr is None else {attr: value}

    return Setting((name,), read_field, lmproxy)


def integer(low: int, high: int, default: int | Callable[[Defaults], int]) -> ReadOne:
    """An integer in [low, high]; default: when absent or null (or from the top level)."""

    def read(r: ConfigReader, f: Fields, name: str, _v: Values, d: Defaults | None) -> int:
        fallback = default if isinstance(default, int) else default(given(d))
        return r.integer(f, name, low, high, fallback)

    return read


def boolean(default: bool) -> ReadOne:
    return lambda r, f, name, _v, _d: r.boolean(f, name, default)


def optional_text(r: ConfigReader, f: Fields, name: str, _v: Values, _d: Defaults | None) -> object:
    """A string where null, "" and absence all mean None."""
    return r.optional_text(f, name)


def choice(options: tuple[str, ...]) -> ReadOne:
    return lambda r, f, name, _v, _d: r.choice(f, name, options)


def given(defaults: Defaults | None) -> Defaults:
    assert defaults is not None, "a service setting read without the top level's defaults"
    return defaults
