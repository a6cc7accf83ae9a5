"""Reading JSON values and fields as lmproxy checks them: exact types, ranges, no control
characters, every problem recorded at its JSON path and none raised, so that one run
reports them all. lmproxy.config.settings says which field is read how."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
from collections.abc import Callable

from lmproxy.config.jsonc import JsonNumber, JsonObject, child, show

MAX_PORT = 65535
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,30}")  # systemd warns past 31
_DIGITS_RE = re.compile(r"[0-9]+")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_GO_FOLD = str.maketrans({"\u017f": "s", "\u212a": "k"})  # long s, Kelvin sign


def _fold(key: str) -> str | None:
    """The key as Go's encoding/json compares it with an (ASCII) field name."""
    key = key.translate(_GO_FOLD)
    return key.lower() if key.isascii() else None


def absolute(base: str, path: str) -> str:
    normal = os.path.normpath(os.path.join(base, path))
    if normal.startswith("//"):  # normpath keeps a leading "//" (POSIX allows it to differ)
        normal = "/" + normal.lstrip("/")
    return normal


def ip_literal(text: str) -> str | None:
    """The canonical form of an IPv4 or IPv6 address literal, or None."""
    if "%" in text:  # no IPv6 scope ids: '%' is special in systemd unit files
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def is_loopback_host(host: str) -> bool:
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


class Fields:
    """An object's fields, matched to the known names; reports unknown and repeated keys."""

    def __init__(self, reader: Reader, obj: JsonObject, path: str, names: tuple[str, ...]) -> None:
        self.path = path
        self._found: dict[str, tuple[str, str, object]] = {}  # name -> (key, path, value)
        by_fold = {name.lower(): name for name in names}
        for key, value in obj.pairs:
            key_path = child(path, key)
            folded = _fold(key)
            name = by_fold.get(folded) if folded is not None else None
            if name is None:
                reader.error(key_path, _unknown_field(key, names))
            elif name in self._found:
                first = self._found[name][0]
                if first == key:
                    reader.error(key_path, f"duplicate field {key!r}")
                else:
                    reader.error(
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

    def is_null(self, name: str) -> bool:
        """Whether the field is there, as null (for the one field where large-model-proxy
        reads null apart from absence: a service's ServiceUrl)."""
        found = self._found.get(name)
        return found is not None and found[2] is None

    def path_of(self, name: str) -> str:
        found = self._found.get(name)
        return found[1] if found is not None else child(self.path, name)


def _unknown_field(key: str, names: tuple[str, ...]) -> str:
    message = f"unknown field {show(key)}"
    if len(key) <= 100:
        lowered = {name.lower(): name for name in names}
        close = difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.8)
        if close:
            message += f" (did you mean {lowered[close[0]]!r}?)"
    return message


class Reader:
    """Reads values and fields, recording each problem (`problems`) instead of raising."""

    def __init__(self, base_dir: str) -> None:
        self.base_dir = base_dir  # where relative paths resolve
        self.problems: list[tuple[str, str]] = []

    def error(self, path: str, message: str) -> None:
        self.problems.append((path, message))

    # Values

    def clean(self, path: str, value: str) -> bool:
        match = _CONTROL_RE.search(value)
        if match is None:
            return True
        self.error(
            path,
            f"{show(value)} contains the control character {match.group()!r} "
            f"at index {match.start()}; control characters are not allowed",
        )
        return False

    def int_value(self, path: str, value: object, low: int, high: int) -> int | None:
        if isinstance(value, int) and not isinstance(value, bool):
            if low <= value <= high:
                return value
            self.error(path, f"must be between {low} and {high}, got {value}")
        elif (
            isinstance(value, JsonNumber)
            and value.valid_json
            and _DIGITS_RE.fullmatch(value.text.removeprefix("-"))
        ):
            self.error(path, f"must be between {low} and {high}, got {show(value)}")
        else:
            self.error(path, f"expected an integer between {low} and {high}, got {show(value)}")
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
            f"got {show(value)}",
        )
        return None

    def string_value(self, path: str, value: object, what: str = "a string") -> str | None:
        if not isinstance(value, str):
            self.error(path, f"expected {what}, got {show(value)}")
            return None
        return value if self.clean(path, value) else None

    # Fields

    def text(self, fields: Fields, name: str, *, null_ok: bool = False) -> str | None:
        """A string field; None when absent, null or invalid. null_ok: an optional one,
        whose error says that null is welcome too."""
        got = fields.get(name)
        if got is None:
            return None
        path, value = got
        return self.string_value(path, value, "a string or null" if null_ok else "a string")

    def optional_text(self, fields: Fields, name: str) -> str | None:
        """A string field where null, "" and absence all mean None."""
        return self.text(fields, name, null_ok=True) or None

    def boolean(self, fields: Fields, name: str, default: bool) -> bool:
        got = fields.get(name)
        if got is None:
            return default
        path, value = got
        if isinstance(value, bool):
            return value
        self.error(path, f"expected true or false, got {show(value)}")
        return default

    def choice(self, fields: Fields, name: str, options: tuple[str, ...]) -> str:
        """One of options (the first when absent or null)."""
        got = fields.get(name)
        if got is None:
            return options[0]
        path, value = got
        if value not in options:
            listed = " or ".join(f'"{option}"' for option in options)
            self.error(path, f"expected {listed}, got {show(value)}")
            return options[0]
        return str(value)

    def integer(self, fields: Fields, name: str, low: int, high: int, default: int) -> int:
        got = fields.get(name)
        if got is None:
            return default
        value = self.int_value(got[0], got[1], low, high)
        return default if value is None else value

    def port(self, fields: Fields, name: str, required: str | None = None) -> int | None:
        """A port field; "" means absent. `required`: the message when it is absent."""
        got = fields.get(name)
        if got is None or got[1] == "":
            if required is not None:
                self.error(fields.path_of(name), required)
            return None
        return self.port_value(got[0], got[1])

    def address(self, fields: Fields, name: str, default: str) -> str:
        value = self.text(fields, name)
        if value is None:
            return default
        address = ip_literal(value)
        if address is None:
            self.error(
                fields.path_of(name),
                "expected an IPv4 or IPv6 address (no brackets, no host names, no scope), "
                f"got {show(value)}",
            )
            return default
        return address

    def object_field(self, fields: Fields, name: str) -> tuple[str, JsonObject] | None:
        got = fields.get(name)
        if got is None:
            return None
        path, value = got
        if isinstance(value, JsonObject):
            return path, value
        self.error(path, f"expected an object, got {show(value)}")
        return None

    def account(self, fields: Fields, name: str, what: str) -> str | None:
        """A user or group name field (null: absent); what: "a user name"."""
        value = self.text(fields, name, null_ok=True)
        if value is not None and not _USER_RE.fullmatch(value):
            self.error(
                fields.path_of(name),
                f"invalid {name} {show(value)}: expected {what} (1 to 31 characters from "
                "a-z 0-9 _ -, starting with a letter or '_')",
            )
            return None
        return value

    def unit_safe(
        self, fields: Fields, name: str, check: Callable[[], object], key: str | None = None
    ) -> None:
        """Records a value that systemd's unit syntax cannot carry safely, at its path:
        what validate accepts, render can always write."""
        try:
            check()
        except ValueError as error:
            path = fields.path_of(name)
            self.error(child(path, key) if key else path, f"not usable in a systemd unit: {error}")
