"""The names of lmproxy's units: one place, so that lmproxy only touches its own."""

from __future__ import annotations

PREFIX = "lmproxy-"
TARGET = "lmproxy.target"  # groups every socket, so that one command starts or stops them all
SLICE = "lmproxy.slice"  # every shim and backend runs in it, for accounting and limits


def socket_unit(service: str) -> str:
    return f"{PREFIX}{service}.socket"


def shim_unit(service: str) -> str:
    """Socket activation starts the service of the socket's own name: the shim."""
    return f"{PREFIX}{service}.service"


# Backend units carry a marker no socket or shim unit can: "@" is not allowed in a
# service's own unit names, so polkit's rule for the shims (system/60-lmproxy.rules)
# can match backends by their prefix and never match a shim or socket unit.
BACKEND_PREFIX = f"{PREFIX}backend@"


def backend_unit(service: str) -> str:
    return f"{BACKEND_PREFIX}{service}.service"


def is_backend_unit(unit: str) -> bool:
    return unit.startswith(BACKEND_PREFIX) and unit.endswith(".service")


def units_of(service: str) -> tuple[str, str, str]:
    return socket_unit(service), shim_unit(service), backend_unit(service)


def syslog_identifier(service: str) -> str:
    """What the backend's output is tagged with in the journal: `journalctl -t lmproxy-NAME`."""
    return f"{PREFIX}{service}"
