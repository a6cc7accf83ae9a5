"""The first stage's D-Bus client speaks the protocol as jeepney (lmproxy.systemd's) does:
its calls parse as jeepney's, it reads jeepney's replies in either byte order, it skips
what is not its reply, and a bus that says no is a BusError. The real bus and systemd
are the end-to-end tests' (tests/e2e/test_earlystart.py)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from jeepney import (
    DBusAddress,
    Message,
    Parser,
    new_error,
    new_method_call,
    new_method_return,
    new_signal,
)
from jeepney.low_level import Endianness

from lmproxy import minibus
from lmproxy.minibus import BusError

ROW = ("a.service", "desc", "loaded", "active", "running", "", "/o/a", 0, "", "/")
ROWS = [ROW, ("b@x.service", "é ünicode", "not-found", "inactive", "dead", "", "/o/b", 7, "", "/")]


def parse(data: bytes) -> Message:
    parser = Parser()
    parser.add_data(data)
    message = parser.get_next_message()
    assert message is not None
    return message


@pytest.mark.parametrize(
    ("signature", "args"),
    [("", ()), ("ss", ("lmproxy-backend@a.service", "replace")), ("asas", ([], ["x", "yé"]))],
)
def test_a_call_is_what_jeepney_would_send(
    signature: str, args: tuple[str | list[str], ...]
) -> None:
    data = minibus.method_call(
        7,
        minibus.SYSTEMD,
        minibus.MANAGER_PATH,
        minibus.MANAGER,
        "Member",
        signature=signature,
        args=args,
    )
    got = parse(data)
    address = DBusAddress(minibus.MANAGER_PATH, minibus.SYSTEMD, minibus.MANAGER)
    expected = new_method_call(address, "Member", signature or None, args)
    assert got.header.serial == 7
    assert got.header.fields == expected.header.fields
    assert got.body == expected.body


@pytest.mark.parametrize("endianness", [Endianness.little, Endianness.big])
def test_a_reply_is_read_in_either_byte_order(endianness: Endianness) -> None:
    call = new_method_call(DBusAddress("/", "x", "y"), "ListUnitsByPatterns")
    call.header.serial = 3
    reply = new_method_return(call, "a(ssssssouso)", (ROWS,))
    reply.header.endianness = endianness
    reader_data = reply.serialise(serial=9)
    bus = _bus_reading(reader_data)
    assert bus.reply(3, "a(ssssssouso)") == [[tuple(row) for row in ROWS]]


def _bus_reading(data: bytes) -> minibus.Bus:
    """A Bus whose socket has data waiting (its connect and auth are not under test here)."""
    ours, theirs = socket.socketpair()
    theirs.sendall(data)
    theirs.close()
    bus = minibus.Bus.__new__(minibus.Bus)
    bus.sock, bus.buffer, bus.serial = ours, b"", 0
    bus.deadline = time.monotonic() + 5
    return bus


class FakeBus:
    """A unix socket that authenticates a client and answers each call with answer(call)."""

    def __init__(self, path: Path, answer: Callable[[Message], list[Message]]) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen()
        self.answer = answer
        self.calls: list[Message] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            data = b""
            while b"\r\n" not in data:
                data += conn.recv(4096)
            assert data.startswith(b"\0AUTH EXTERNAL " + str(os.geteuid()).encode().hex().encode())
            conn.sendall(b"OK 0123456789abcdef0123456789abcdef\r\n")
            while b"BEGIN\r\n" not in data:
                data += conn.recv(4096)
            parser = Parser()
            serial = 100
            chunk = data.partition(b"BEGIN\r\n")[2]  # the client pipelines its first call
            while True:
                parser.add_data(chunk)
                while (call := parser.get_next_message()) is not None:
                    self.calls.append(call)
                    for message in self.answer(call):
                        serial += 1
                        conn.sendall(message.serialise(serial=serial))
                chunk = conn.recv(65536)
                if not chunk:
                    break


@pytest.fixture
def bus_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "bus"


def systemd_answers(call: Message) -> list[Message]:
    member = call.header.fields[3]  # HeaderFields.member
    if member == "Hello":
        hello = new_method_return(call, "s", (":1.5",))
        acquired = new_signal(
            DBusAddress("/org/freedesktop/DBus", interface="org.freedesktop.DBus"),
            "NameAcquired",
            "s",
            (":1.5",),
        )
        return [hello, acquired]
    if member == "ListUnitsByPatterns":
        return [new_method_return(call, "a(ssssssouso)", (ROWS,))]
    return [new_error(call, "org.freedesktop.systemd1.NoSuchUnit", "s", ("Unit x not found.",))]


def test_calls_to_systemd_over_a_bus(bus_path: Path) -> None:
    fake = FakeBus(bus_path, systemd_answers)
    bus = minibus.Bus(f"unix:path={bus_path}", 5)
    try:
        rows = bus.call("ListUnitsByPatterns", "asas", ([], ["a.service"]), "a(ssssssouso)")
        assert rows == [[tuple(row) for row in ROWS]]
        with pytest.raises(BusError, match=r"NoSuchUnit\] Unit x not found"):
            bus.call("StartUnit", "ss", ("x.service", "replace"), "o")
    finally:
        bus.close()
    fake.thread.join(5)
    members = [call.header.fields[3] for call in fake.calls]
    assert members == ["Hello", "ListUnitsByPatterns", "StartUnit"]
    assert fake.calls[1].body == ([], ["a.service"])


def test_an_unexpected_reply_is_a_bus_error(bus_path: Path) -> None:
    FakeBus(bus_path, lambda call: [new_method_return(call, "s", ("surprise",))])
    bus = minibus.Bus(f"unix:path={bus_path}", 5)
    try:
        with pytest.raises(BusError, match="unexpected reply"):
            bus.call("StartUnit", "ss", ("x.service", "replace"), "o")
    finally:
        bus.close()


def test_a_bus_that_does_not_answer_is_a_bus_error(bus_path: Path) -> None:
    FakeBus(bus_path, lambda call: [])
    bus = minibus.Bus(f"unix:path={bus_path}", 0.3)
    try:
        with pytest.raises(BusError, match="no answer"):
            bus.call("StartUnit", "ss", ("x.service", "replace"), "o")
    finally:
        bus.close()


def test_addresses() -> None:
    assert minibus._unix_path("unix:path=/run/user/1000/bus") == "/run/user/1000/bus"
    assert minibus._unix_path("tcp:host=x;unix:path=/a%20b,guid=1") == "/a b"
    with pytest.raises(BusError, match="no unix:path"):
        minibus._unix_path("unix:abstract=/tmp/dbus-x")
