"""The names of lmproxy's units: one place, so that lmproxy only touches its own.

A service may have any name, as in large-model-proxy ("Qwen/Qwen2.5-7B-Instruct"),
but a unit name may not: each name maps to a unit-safe component (`component`).
Built-in modules only: the shim's first stage (lmproxy.earlystart) imports this.
"""

from __future__ import annotations

from binascii import crc32

PREFIX = "lmproxy-"
TARGET = "lmproxy.target"  # groups every socket, so that one command starts or stops them all
SLICE = "lmproxy.slice"  # every shim and backend runs in it, for accounting and limits


# What a component is made of; never "@" (see BACKEND_PREFIX), nor a glob character
# (ListUnitsByPatterns takes unit names as patterns).
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
PLAIN_MAX = 63  # a name this long at most, made of _SAFE, is its own component
SLUG_MAX = 40


def is_plain(name: str) -> bool:
    """Whether a name is its own component: 1 to 63 characters from A-Z a-z 0-9 _ . -,
    starting with a letter or digit (the names lmproxy took before any other)."""
    return (
        0 < len(name) <= PLAIN_MAX and name[0] not in "_.-" and all(char in _SAFE for char in name)
    )


def component(name: str) -> str:
    """The unit-safe part of a service's unit names: a plain name itself, and any other
    a readable slug of it and the CRC-32 of its UTF-8 ("Qwen/Qwen2.5-7B-Instruct" is
    Qwen_Qwen2.5-7B-Instruct-1bb1e77d). Stable from one install to the next; the
    config refuses two names with one component, so it is never ambiguous."""
    if is_plain(name):
        return name
    slug: list[str] = []
    for char in name:
        if char in _SAFE:
            slug.append(char)
        elif slug and slug[-1] != "_":
            slug.append("_")
    text = "".join(slug).strip("_.-")[:SLUG_MAX].rstrip("_.-") or "service"
    checksum = crc32(name.encode("utf-8", "surrogatepass"))
    return f"{text}-{checksum:08x}"


def socket_unit(service: str) -> str:
    return f"{PREFIX}{component(service)}.socket"


def shim_unit(service: str) -> str:
    """Socket activation starts the service of the socket's own name: the shim."""
    return f"{PREFIX}{component(service)}.service"


# Backend units carry a marker no socket or shim unit can: "@" is not allowed in a
# service's own unit names, so polkit's rule for the shims (system/60-lmproxy.rules)
# can match backends by their prefix and never match a shim or socket unit.
BACKEND_PREFIX = f"{PREFIX}backend@"


def backend_unit(service: str) -> str:
    return f"{BACKEND_PREFIX}{component(service)}.service"


# lmproxy's own services (the management API, later the OpenAI router) carry "@" too: no
# service's units can take their names, and polkit's rule for backends never matches them.
API_PREFIX = f"{PREFIX}api@"
MANAGEMENT = "management"
ROUTER = "openai"  # the OpenAI-compatible router (lmproxy.router)


def api_socket(api: str) -> str:
    return f"{API_PREFIX}{api}.socket"


def api_service(api: str) -> str:
    return f"{API_PREFIX}{api}.service"


def is_backend_unit(unit: str) -> bool:
    return unit.startswith(BACKEND_PREFIX) and unit.endswith(".service")


def units_of(service: str) -> tuple[str, str, str]:
    return socket_unit(service), shim_unit(service), backend_unit(service)


def syslog_identifier(service: str) -> str:
    """What the backend's output is tagged with in the journal: `journalctl -t lmproxy-NAME`."""
    return f"{PREFIX}{component(service)}"
