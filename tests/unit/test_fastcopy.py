"""lmproxy._fastcopy.Copier on its own: which events it handles, and what it hands back.

Each test registers sockets with an edge-triggered epoll set, as the relay loop does, lets the
Copier copy from the ones it is allowed to, and checks the bytes and the results that reach
the caller. The relay's own tests (test_relay.py) run every scenario with and without it.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from lmproxy import relay as relay_module
from tests.unit.fastcopy import require_fast_copier

if TYPE_CHECKING:
    from lmproxy._fastcopy import Copier

EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET


class Setup:
    """An epoll set, a Copier on it, and the sockets of the test."""

    def __init__(self, copier_type: type[Copier]) -> None:
        self.epoll = select.epoll()
        self.copier = copier_type(self.epoll.fileno(), 64)
        self.sockets: list[socket.socket] = []

    def pair(self, family: int = socket.AF_UNIX) -> tuple[socket.socket, socket.socket]:
        if family == socket.AF_UNIX:
            a, b = socket.socketpair()
        else:
            with socket.create_server(("127.0.0.1", 0)) as listener:
                a = socket.create_connection(listener.getsockname())
                b, _ = listener.accept()
        self.sockets += [a, b]
        return a, b

    def watch(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.epoll.register(sock.fileno(), EVENTS)

    def poll(self) -> tuple[int, list[tuple[int, int]], list[tuple[int, int, bytes | None]]]:
        """The results of the next wakeup (registration reports the current state once)."""
        return self.copier.poll(5000)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.epoll.close()


@pytest.fixture
def setup() -> Iterator[Setup]:
    if relay_module.Copier is None:
        require_fast_copier()
    assert relay_module.Copier is not None
    s = Setup(relay_module.Copier)
    yield s
    s.close()


def relay_pair(setup: Setup, family: int = socket.AF_UNIX) -> tuple[socket.socket, ...]:
    """(sender, source, destination, reader): the Copier may copy source -> destination."""
    sender, source = setup.pair(family)
    destination, reader = setup.pair(family)
    setup.watch(source)
    destination.setblocking(False)  # as the relay's are
    setup.copier.allow(source.fileno(), destination.fileno())
    return sender, source, destination, reader


def test_a_small_message_is_copied_without_the_caller(setup: Setup) -> None:
    sender, _, _, reader = relay_pair(setup)
    sender.sendall(b"hello")
    assert setup.poll() == (1, [], [])
    assert reader.recv(100) == b"hello"


def test_a_socket_it_may_not_copy_from_is_left_alone(setup: Setup) -> None:
    sender, source = setup.pair()
    setup.watch(source)
    sender.sendall(b"hello")
    handled, plain, copied = setup.poll()
    assert (handled, copied) == (0, [])
    assert plain == [(source.fileno(), select.EPOLLIN | select.EPOLLOUT)]
    assert source.recv(100) == b"hello"  # untouched


def test_denied_sockets_go_back_to_the_caller(setup: Setup) -> None:
    sender, source, _, reader = relay_pair(setup)
    setup.copier.deny(source.fileno())
    sender.sendall(b"hello")
    handled, plain, _ = setup.poll()
    assert handled == 0
    assert [fd for fd, _ in plain] == [source.fileno()]
    with pytest.raises(BlockingIOError):
        reader.recv(100, socket.MSG_DONTWAIT)


def test_a_full_buffer_is_copied_and_handed_on_for_the_rest(setup: Setup) -> None:
    assert relay_module.Copier is not None
    from lmproxy import _fastcopy

    assert relay_module._COPY_SIZE == _fastcopy.COPY_SIZE  # the two paths cut bulk alike
    sender, source, _, reader = relay_pair(setup)
    data = os.urandom(_fastcopy.COPY_SIZE + 1000)
    sender.sendall(data)
    assert setup.poll() == (0, [], [(source.fileno(), _fastcopy.COPY_SIZE, None)])
    assert recv_exactly(reader, _fastcopy.COPY_SIZE) == data[: _fastcopy.COPY_SIZE]
    assert source.recv(4096) == data[_fastcopy.COPY_SIZE :]  # the rest is the caller's


def test_what_the_destination_cannot_take_comes_back(setup: Setup) -> None:
    sender, source, destination, reader = relay_pair(setup, socket.AF_INET)
    destination.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    filled = 0
    while True:  # the reader reads nothing: fill what the destination can hold
        try:
            filled += destination.send(b"f" * 4096)
        except BlockingIOError:
            break
    message = os.urandom(20000)
    sender.sendall(message)
    handled, plain, copied = setup.poll()
    assert (handled, plain) == (0, [])
    [(fd, n, rest)] = copied
    assert (fd, n) == (source.fileno(), len(message))
    assert rest is not None
    delivered = drain(reader)
    assert len(delivered) >= filled
    assert delivered[filled:] + rest == message  # nothing lost, nothing twice


def test_eof_and_errors_go_back_to_the_caller(setup: Setup) -> None:
    sender, source, _, _ = relay_pair(setup)
    sender.shutdown(socket.SHUT_WR)
    handled, plain, copied = setup.poll()
    # A FIN comes with EPOLLRDHUP: not a plain read, so the Copier does not even read it.
    assert (handled, copied) == (0, [])
    assert [fd for fd, _ in plain] == [source.fileno()]

    sender, source, _, reader = relay_pair(setup)
    reader.close()  # the destination's peer is gone: the send fails
    sender.sendall(b"hello")
    handled, plain, copied = setup.poll()
    assert (handled, plain) == (0, [])
    assert copied == [(source.fileno(), -errno.EPIPE, None)]


def test_descriptors_above_the_first_table_size(setup: Setup) -> None:
    sender, source, destination, reader = relay_pair(setup)
    high = 1500 if os.sysconf("SC_OPEN_MAX") > 1600 else 1000
    high_fd = os.dup2(destination.fileno(), high)
    try:
        setup.copier.allow(source.fileno(), high_fd)
        sender.sendall(b"up high")
        assert setup.poll() == (1, [], [])
        assert reader.recv(100) == b"up high"
    finally:
        os.close(high_fd)


def test_only_writable_is_nothing_to_do_for_an_allowed_socket(setup: Setup) -> None:
    relay_pair(setup)
    assert setup.poll() == (1, [], [])  # EPOLLOUT alone, reported on registration
    _, other = setup.pair()
    setup.watch(other)  # not allowed: its EPOLLOUT is the caller's
    assert setup.poll() == (0, [(other.fileno(), select.EPOLLOUT)], [])


def test_a_wait_with_nothing_to_report(setup: Setup) -> None:
    assert setup.copier.poll(10) == (0, [], [])


def test_bad_arguments_are_refused() -> None:
    if relay_module.Copier is None:
        require_fast_copier()
    assert relay_module.Copier is not None
    with pytest.raises(ValueError, match="max_events"):
        relay_module.Copier(0, 0)
    with pytest.raises(ValueError, match="epoll_fd"):
        relay_module.Copier(-1, 8)
    with select.epoll() as epoll:
        copier = relay_module.Copier(epoll.fileno(), 8)
        with pytest.raises(ValueError, match="descriptors"):
            copier.allow(-1, 3)
        copier.deny(123456)  # never allowed: nothing to do
    not_epoll = os.open(os.devnull, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="Invalid argument"):
            relay_module.Copier(not_epoll, 8).poll(0)
    finally:
        os.close(not_epoll)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(5)
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk
        data += chunk
    return bytes(data)


def drain(sock: socket.socket) -> bytes:
    """Everything readable now, waiting briefly for more to arrive."""
    data = bytearray()
    sock.settimeout(0.2)
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk
