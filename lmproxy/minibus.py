"""Just enough D-Bus for a cold start's first stage (lmproxy.earlystart): two calls.

A cold start waits for everything the shim does before StartUnit, and jeepney's
import alone costs more than the rest of that path. This client speaks the wire
protocol for exactly what the first stage asks of systemd: which units run
(`ListUnitsByPatterns`) and `StartUnit`, after the bus's `Hello`, on one blocking
unix socket, with the standard library's built-in modules only. Everything else,
and every later call, is lmproxy.systemd's (jeepney). Anything it does not expect
raises BusError, and the caller falls back to the full path: this module never
has the last word.

Wire format: the D-Bus specification, "Message Protocol" (little-endian only,
which is all it writes; it reads either).
"""

from __future__ import annotations

import posix  # os without its imports: this runs before a cold model's StartUnit
import select
import time
from _socket import AF_UNIX, SOCK_CLOEXEC, SOCK_STREAM
from _socket import socket as _socket_type
from _struct import Struct

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
# A reply bigger than this is not one of the three this module asks for.
MAX_MESSAGE = 16 * 1024 * 1024

_METHOD_CALL, _METHOD_RETURN, _ERROR = 1, 2, 3
# Header field codes (D-Bus specification, "Header Fields").
_PATH, _INTERFACE, _MEMBER, _ERROR_NAME, _REPLY_SERIAL, _DESTINATION = 1, 2, 3, 4, 5, 6
_SIGNATURE = 8
_U32 = {"<": Struct("<I"), ">": Struct(">I")}
_ALIGN = {"y": 1, "g": 1, "b": 4, "u": 4, "i": 4, "s": 4, "o": 4, "a": 4, "(": 8, "v": 1}


class BusError(Exception):
    """The bus or systemd said no, or said something this client does not read."""


def _pad(data: bytearray, alignment: int) -> None:
    data.extend(b"\0" * (-len(data) % alignment))


def _put_string(data: bytearray, value: str) -> None:
    raw = value.encode()
    _pad(data, 4)
    data += _U32["<"].pack(len(raw)) + raw + b"\0"


def _put_signature(data: bytearray, value: str) -> None:
    data += bytes((len(value),)) + value.encode() + b"\0"


def _put_string_array(data: bytearray, values: list[str]) -> None:
    _pad(data, 4)
    at = len(data)
    data += b"\0\0\0\0"
    start = len(data)  # strings align to 4, so no padding before the first
    for value in values:
        _put_string(data, value)
    data[at : at + 4] = _U32["<"].pack(len(data) - start)


def method_call(serial: int, destination: str, path: str, interface: str, member: str, *,
                signature: str = "", args: tuple[str | list[str], ...] = ()) -> bytes:  # fmt: skip
    """One method call message; args are strings (s, o) and string arrays (as)."""
    body = bytearray()
    for code, value in zip(_split_signature(signature), args, strict=True):
        if code == "as" and isinstance(value, list):
            _put_string_array(body, value)
        elif code in ("s", "o") and isinstance(value, str):
            _put_string(body, value)
        else:
            raise BusError(f"cannot marshal {code!r}")
    fields = bytearray()
    for field_code, kind, value in (
        (_PATH, "o", path),
        (_INTERFACE, "s", interface),
        (_MEMBER, "s", member),
        (_DESTINATION, "s", destination),
        (_SIGNATURE, "g", signature),
    ):
        if not value:
            continue
        _pad(fields, 8)
        fields += bytes((field_code,))
        _put_signature(fields, kind)
        if kind == "g":
            _put_signature(fields, value)
        else:
            _put_string(fields, value)
    head = bytearray(b"l" + bytes((_METHOD_CALL, 0, 1)))
    head += _U32["<"].pack(len(body)) + _U32["<"].pack(serial) + _U32["<"].pack(len(fields))
    head += fields
    _pad(head, 8)
    return bytes(head + body)


def _split_signature(signature: str) -> list[str]:
    """Top-level types of a signature made of s, o and as (all method_call writes)."""
    codes, i = [], 0
    while i < len(signature):
        width = 2 if signature[i] == "a" else 1
        codes.append(signature[i : i + width])
        i += width
    return codes


class _Reader:
    """Unmarshals one message's values: s, o, g, u, b, y, arrays and structs."""

    def __init__(self, data: bytes, order: str, offset: int = 0) -> None:
        self.data, self.u32, self.at = data, _U32[order], offset

    def align(self, alignment: int) -> None:
        self.at += -self.at % alignment

    def read(self, signature: str) -> list[object]:
        values, i = [], 0
        while i < len(signature):
            value, i = self._value(signature, i)
            values.append(value)
        return values

    def _value(self, signature: str, i: int) -> tuple[object, int]:
        code = signature[i]
        self.align(_ALIGN.get(code, 1))
        if code in ("s", "o", "g", "u", "b", "i", "y"):
            return self._basic(code), i + 1
        if code == "a":
            end = self._element_end(signature, i + 1)
            length = self.u32.unpack_from(self.data, self.at)[0]
            self.at += 4
            self.align(_ALIGN.get(signature[i + 1], 1))
            stop = self.at + length
            items = []
            while self.at < stop:
                item, _ = self._value(signature, i + 1)
                items.append(item)
            return items, end
        if code == "(":
            end = self._element_end(signature, i)
            return tuple(self.read(signature[i + 1 : end - 1])), end
        raise BusError(f"cannot read D-Bus type {code!r}")

    def _basic(self, code: str) -> object:
        data = self.data
        if code in ("u", "i"):
            value = self.u32.unpack_from(data, self.at)[0]
            self.at += 4
            return value
        if code == "b":
            self.at += 4
            return self.u32.unpack_from(data, self.at - 4)[0] != 0
        if code == "y":
            self.at += 1
            return data[self.at - 1]
        if code == "g":
            length = data[self.at]
            self.at += 1
        else:
            length = self.u32.unpack_from(data, self.at)[0]
            self.at += 4
        text = data[self.at : self.at + length].decode()
        self.at += length + 1
        return text

    @staticmethod
    def _element_end(signature: str, i: int) -> int:
        """The index just past the single complete type starting at i."""
        if signature[i] == "a":
            return _Reader._element_end(signature, i + 1)
        if signature[i] != "(":
            return i + 1
        depth = 0
        for j in range(i, len(signature)):
            depth += {"(": 1, ")": -1}.get(signature[j], 0)
            if depth == 0:
                return j + 1
        raise BusError(f"unbalanced signature {signature!r}")


class Bus:
    """One authenticated connection to a message bus."""

    def __init__(self, address: str, timeout: float) -> None:
        """Connects, authenticates and says Hello (a bus wants it before any call)."""
        path = _unix_path(address)
        self.deadline = time.monotonic() + timeout
        self.sock = _socket_type(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC)
        self.buffer = b""
        self.serial = 0
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            # Pipelined, as sd-bus does: BEGIN and Hello go with AUTH, without waiting for
            # the bus's OK; a bus that refuses closes the connection instead.
            uid = str(posix.geteuid()).encode().hex().encode()
            self.sock.sendall(b"\0AUTH EXTERNAL " + uid + b"\r\nBEGIN\r\n")
            self.send("org.freedesktop.DBus", "/org/freedesktop/DBus",
                      "org.freedesktop.DBus", "Hello")  # fmt: skip
            if not self._line().startswith(b"OK "):
                raise BusError("the bus refused EXTERNAL authentication")
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def send(self, destination: str, path: str, interface: str, member: str, *,
             signature: str = "", args: tuple[str | list[str], ...] = ()) -> int:  # fmt: skip
        """Sends a call; returns its serial, for `reply`. Calls may be sent back to back."""
        self.serial += 1
        message = method_call(
            self.serial, destination, path, interface, member, signature=signature, args=args
        )
        self.sock.sendall(message)
        return self.serial

    def reply(self, serial: int, signature: str) -> list[object]:
        """The body of the reply to call `serial`, read as signature; other messages (the
        bus's NameAcquired signal, replies to earlier calls) are skipped. An error reply
        raises BusError with its name and text."""
        while True:
            kind, fields, body, order = self._message()
            if fields.get(_REPLY_SERIAL) != serial:
                continue
            reader = _Reader(body, order)
            got = fields.get(_SIGNATURE, "")
            if kind == _ERROR:
                text = reader.read("s")[0] if str(got).startswith("s") else ""
                raise BusError(f"[{fields.get(_ERROR_NAME)}] {text}")
            if kind != _METHOD_RETURN or got != signature:
                raise BusError(f"unexpected reply {kind} with signature {got!r}")
            return reader.read(signature)

    def call(self, member: str, signature: str = "", args: tuple[str | list[str], ...] = (),
             reply: str = "") -> list[object]:  # fmt: skip
        """A call to systemd's manager, and its reply."""
        serial = self.send(SYSTEMD, MANAGER_PATH, MANAGER, member, signature=signature, args=args)
        return self.reply(serial, reply)

    # --- reading ---------------------------------------------------------------------------

    def _fill(self, need: int) -> None:
        while len(self.buffer) < need:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise BusError("no answer from the bus in time")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BusError("the bus closed the connection")
            self.buffer += chunk

    def _take(self, count: int) -> bytes:
        self._fill(count)
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill(len(self.buffer) + 1)
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def _message(self) -> tuple[int, dict[int, object], bytes, str]:
        fixed = self._take(16)
        order = {ord("l"): "<", ord("B"): ">"}.get(fixed[0])
        if order is None:
            raise BusError("not a D-Bus message")
        u32 = _U32[order]
        body_length, fields_length = u32.unpack_from(fixed, 4)[0], u32.unpack_from(fixed, 12)[0]
        header_end = 16 + fields_length + (-(16 + fields_length) % 8)
        if header_end + body_length > MAX_MESSAGE:
            raise BusError("a message too large")
        rest = self._take(header_end - 16 + body_length)
        data = fixed + rest
        reader = _Reader(data, order, 16)
        fields: dict[int, object] = {}
        while reader.at < 16 + fields_length:
            reader.align(8)
            code, kind = reader.read("yg")
            fields[int(code)] = reader.read(str(kind))[0]  # type: ignore[call-overload]
        return fixed[1], fields, data[header_end:], order


def _unix_path(address: str) -> str:
    """The socket of the first unix:path= address; BusError for any other kind."""
    for entry in address.split(";"):
        kind, _, options = entry.partition(":")
        pairs = dict(option.partition("=")[::2] for option in options.split(","))
        if kind == "unix" and pairs.get("path"):
            return _unescape(pairs["path"])
    raise BusError(f"no unix:path= in the bus address {address!r}")


def _unescape(value: str) -> str:
    """D-Bus addresses escape bytes as %XX."""
    if "%" not in value:
        return value
    raw, i = bytearray(), 0
    encoded = value.encode()
    while i < len(encoded):
        if encoded[i] == ord("%"):
            raw.append(int(encoded[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(encoded[i])
            i += 1
    return raw.decode()
