"""The relay engine over real loopback TCP sockets.

Each test plays both ends: the "client app" and "backend app" sockets are ordinary blocking
sockets owned by the test; the relay gets the two sockets in the middle (the ones the shim would
have accepted and connected). Timeouts are generous (a loaded 2-core machine); the only timing
assertions are the idle-CPU bounds.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from lmproxy import relay as relay_module
from lmproxy.relay import Relay
from tests.unit.fastcopy import require_fast_copier

TIMEOUT = 30.0
MiB = 1024 * 1024


# --- helpers -------------------------------------------------------------------------------


class Worker(threading.Thread):
    """A thread whose exception or result comes back to the test on ``result()``."""

    def __init__(self, target: Callable[..., Any], *args: Any) -> None:
        super().__init__(daemon=True)
        self._call = target
        self._args = args
        self._value: Any = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._value = self._call(*self._args)
        except BaseException as exc:
            self._error = exc

    def result(self) -> Any:
        self.join(TIMEOUT)
        assert not self.is_alive(), "worker did not finish in time"
        if self._error is not None:
            raise self._error
        return self._value


class Flood(Worker):
    """Sends junk until the connection breaks; ``progress()`` counts the bytes sent."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(self._flood, sock)
        self.sent = 0

    def progress(self) -> int:
        return self.sent

    def _flood(self, sock: socket.socket) -> None:
        junk = b"J" * MiB
        try:
            while True:
                self.sent += sock.send(junk)
        except OSError:
            pass  # the relay closed its side


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def wait_stalled(progress: Callable[[], int], quiet: float = 0.5) -> int:
    """Wait until ``progress()`` stops changing for ``quiet`` seconds; return its value."""
    deadline = time.monotonic() + TIMEOUT
    last, since = progress(), time.monotonic()
    while True:
        time.sleep(0.05)
        value, now = progress(), time.monotonic()
        if value != last:
            last, since = value, now
        elif now - since >= quiet:
            return value
        assert now < deadline, "transfer never stalled"


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(MiB):
        chunks.append(chunk)
    return b"".join(chunks)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "closed early"
        data += chunk
    return bytes(data)


def exchange_on_all(
    pairs: list[tuple[socket.socket, socket.socket]], request: bytes, answer: bytes
) -> None:
    """Every pair at once: request from the client, answer from the backend, both arrive."""
    for client, backend in pairs:
        client.sendall(request)
        backend.sendall(answer)
    for client, backend in pairs:
        assert backend.recv(len(request)) == request
        assert client.recv(len(answer)) == answer


def hash_to_eof(sock: socket.socket) -> tuple[int, str]:
    digest = hashlib.sha256()
    buf = bytearray(MiB)
    total = 0
    while n := sock.recv_into(buf):
        digest.update(memoryview(buf)[:n])
        total += n
    return total, digest.hexdigest()


def send_and_shut(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def sees_close(sock: socket.socket) -> bool:
    """True once the peer closed or reset (reading past any data still queued)."""
    try:
        while sock.recv(MiB):
            pass
    except ConnectionResetError:
        pass
    return True


def reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Net:
    """Makes relayed connections: client app <-> [relay] <-> backend app."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.sockets: list[socket.socket] = [self.listener]

    def tcp_pair(self) -> tuple[socket.socket, socket.socket]:
        """(connecting end, accepted end) of one loopback TCP connection.

        Only the first is closed at teardown: the second goes to the relay, which owns it.
        """
        a = socket.create_connection(self.listener.getsockname(), timeout=TIMEOUT)
        b, _ = self.listener.accept()
        b.settimeout(TIMEOUT)
        self.sockets.append(a)
        return a, b

    def relayed(self, relay: Relay) -> tuple[socket.socket, socket.socket]:
        """A new pair handed to ``relay``; returns (client app, backend app)."""
        client_app, client_side = self.tcp_pair()
        backend_app, backend_side = self.tcp_pair()
        relay.add(client_side, backend_side)
        return client_app, backend_app

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class EchoServer:
    """A backend that echoes every connection until EOF, a thread per connection."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.address = self.listener.getsockname()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        with conn:
            while data := conn.recv(MiB):
                conn.sendall(data)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        self.thread.join(TIMEOUT)


@pytest.fixture(autouse=True, params=["fast-copier", "python-copy"])
def copier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every relay test runs twice: with the loops' plain reads copied in C (lmproxy._fastcopy,
    which the packages and tools/setup build) and copied by the loops themselves (where it was
    not built)."""
    mode: str = request.param
    if mode == "python-copy":
        monkeypatch.setattr(relay_module, "Copier", None)
    elif relay_module.Copier is None:
        require_fast_copier()
    return mode


@pytest.fixture(autouse=True)
def no_unexpected_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Resets and closed peers are ordinary life: the relay logs nothing for them."""
    caplog.set_level(logging.WARNING, logger="lmproxy.relay")
    yield
    assert [r.getMessage() for r in caplog.records if r.name == "lmproxy.relay"] == []


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net()
    yield n
    n.close()


@pytest.fixture
def relay() -> Iterator[Relay]:
    r = Relay()
    r.start()
    yield r
    r.stop()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


# --- data ----------------------------------------------------------------------------------


def test_bulk_both_ways_at_once_arrives_intact(relay: Relay, net: Net) -> None:
    client, backend = net.relayed(relay)
    up = random.randbytes(8 * MiB + 12345)
    down = random.randbytes(6 * MiB + 777)
    workers = [
        Worker(send_and_shut, client, up),
        Worker(send_and_shut, backend, down),
        received_up := Worker(hash_to_eof, backend),
        received_down := Worker(hash_to_eof, client),
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.result()
    assert received_up.result() == (len(up), hashlib.sha256(up).hexdigest())
    assert received_down.result() == (len(down), hashlib.sha256(down).hexdigest())
    # Both directions ended with a FIN: the relay closes the pair by itself.
    assert relay.wait_idle(TIMEOUT)


def test_large_payload_through_echo_backend(relay: Relay, net: Net, echo: EchoServer) -> None:
    client, client_side = net.tcp_pair()
    relay.add(client_side, socket.create_connection(echo.address))
    payload = random.randbytes(5 * MiB)
    sender = Worker(send_and_shut, client, payload)
    sender.start()
    assert hash_to_eof(client) == (len(payload), hashlib.sha256(payload).hexdigest())
    sender.result()
    assert relay.wait_idle(TIMEOUT)


def test_many_concurrent_pairs_all_complete(relay: Relay, net: Net, echo: EchoServer) -> None:
    clients = []
    for _ in range(200):
        client, client_side = net.tcp_pair()
        relay.add(client_side, socket.create_connection(echo.address))
        clients.append(client)
    assert relay.active == 200

    def exchange(client: socket.socket) -> bool:
        payload = random.randbytes(random.randrange(1, 48 * 1024))
        send_and_shut(client, payload)
        return read_to_eof(client) == payload

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(exchange, clients))
    assert all(results)
    assert relay.wait_idle(TIMEOUT)


# --- half-close and errors -----------------------------------------------------------------


@pytest.mark.parametrize("first", ["client", "backend"])
def test_half_close_is_passed_on(relay: Relay, net: Net, first: str) -> None:
    client, backend = net.relayed(relay)
    closer, other = (client, backend) if first == "client" else (backend, client)
    send_and_shut(closer, b"request")
    # The other side sees the request, then EOF...
    assert read_to_eof(other) == b"request"
    # ...and can still answer over its own half, which the closer receives in full.
    reply = random.randbytes(2 * MiB)
    other.sendall(reply)
    other.close()
    assert read_to_eof(closer) == reply
    assert relay.wait_idle(TIMEOUT)


def test_a_raw_pair_whose_client_sent_its_fin_is_not_in_use(relay: Relay, net: Net) -> None:
    """Every open raw pair is in use, except one whose client has closed its side: the
    model is free for eviction and idle stop, while the answer still reaches it."""
    client, backend = net.relayed(relay)
    assert relay.in_use == 1
    send_and_shut(client, b"request")
    assert read_to_eof(backend) == b"request"
    wait_until(lambda: relay.in_use == 0)
    assert relay.active == 1
    assert relay.stop_accepting_if_idle()
    backend.sendall(b"answer")
    backend.close()
    assert read_to_eof(client) == b"answer"
    assert relay.wait_idle(TIMEOUT)
    assert relay.in_use == 0


def test_a_fin_that_comes_with_the_last_bytes_is_passed_on(relay: Relay, net: Net) -> None:
    """A FIN that comes with (or right after) the last bytes must reach the other side: the
    read that finds it is the one that would otherwise find the socket drained."""
    for size in (1, 100, 4096, 40000):
        for _ in range(10):
            client, backend = net.relayed(relay)
            backend.sendall(b"r" * size)  # the answer, then FIN at once
            backend.shutdown(socket.SHUT_WR)
            client.settimeout(5)
            assert read_to_eof(client) == b"r" * size
            client.close()
            backend.close()
    assert relay.wait_idle(TIMEOUT)


def test_small_messages_both_ways_keep_their_order(relay: Relay, net: Net) -> None:
    """Request / response traffic of small messages mixed with bursts of several MiB, on
    one connection: every byte arrives, in order."""
    client, backend = net.relayed(relay)
    for round_ in range(200):
        request = f"request {round_}".encode()
        client.sendall(request)
        assert recv_exactly(backend, len(request)) == request
        answer = random.randbytes(3 * MiB if round_ % 50 == 0 else 1 + round_)
        backend.sendall(answer)
        assert recv_exactly(client, len(answer)) == answer


def test_a_pair_that_ends_on_its_extra_turn_closes_cleanly(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A direction that used up its per-wakeup budget gets another turn after the other ready
    connections. A pair that ends on that turn leaves the set of pairs owed one while the loop
    goes through it: that must neither crash the loop (it once did: "set changed size during
    iteration", and every connection of the loop was closed) nor lose the pair's last bytes."""
    monkeypatch.setattr(relay_module, "_BUDGET", 8192)
    relay = Relay(loops=1, pipe_size=4096)  # the budget is spent after two or more splices
    relay.start()
    try:
        for _ in range(5):
            client_app, client_side = net.tcp_pair()
            backend_app, backend_side = net.tcp_pair()
            # Everything is queued before the relay sees the pair: the answer is over, and
            # the request is a little over one budget, then FIN.
            backend_app.shutdown(socket.SHUT_WR)
            request = random.randbytes(8192 + 100)
            send_and_shut(client_app, request)
            relay.add(client_side, backend_side)
            assert read_to_eof(backend_app) == request
            assert read_to_eof(client_app) == b""
            assert relay.wait_idle(TIMEOUT)
        # The loop is still there for the next pair.
        client, backend = net.relayed(relay)
        send_and_shut(client, b"still relaying")
        assert read_to_eof(backend) == b"still relaying"
    finally:
        relay.stop()


@pytest.mark.parametrize("side", ["client", "backend"])
def test_reset_on_one_side_closes_the_other(relay: Relay, net: Net, side: str) -> None:
    client, backend = net.relayed(relay)
    client.sendall(b"ping")
    assert backend.recv(16) == b"ping"
    victim, other = (client, backend) if side == "client" else (backend, client)
    reset(victim)
    assert sees_close(other)
    assert relay.wait_idle(TIMEOUT)


# --- backpressure and memory ---------------------------------------------------------------


def test_backpressure_bounds_memory_and_everything_arrives(relay: Relay, net: Net) -> None:
    client, backend = net.relayed(relay)
    block = random.randbytes(MiB)
    blocks = 64
    expected = hashlib.sha256()
    for _ in range(blocks):
        expected.update(block)
    sent = [0]

    def produce() -> None:
        view = memoryview(block)
        for _ in range(blocks):
            offset = 0
            while offset < len(view):
                n = backend.send(view[offset:])
                offset += n
                sent[0] += n
        backend.close()

    rss_before = rss_bytes()
    producer = Worker(produce)
    producer.start()
    # The client reads nothing: the backend is stopped once the kernel buffers on the way
    # are full, instead of the relay buffering the rest.
    stalled_at = wait_stalled(lambda: sent[0])
    assert stalled_at < blocks * MiB, "the backend was never held back"
    cpu_before = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - cpu_before < 0.1, "a relay held back by its client spins"
    assert sent[0] == stalled_at
    growth = rss_bytes() - rss_before
    assert growth < 8 * MiB, f"RSS grew by {growth / MiB:.1f} MiB"
    # Once the client reads, everything arrives.
    assert hash_to_eof(client) == (blocks * MiB, expected.hexdigest())
    producer.result()
    client.close()
    assert relay.wait_idle(TIMEOUT)


def watched_for_reading(relay: Relay, fd: int) -> bool:
    """Whether a loop of relay watches fd for EPOLLIN (the masks in the epoll's fdinfo)."""
    for loop in relay._loops:
        assert loop.epoll is not None
        with open(f"/proc/self/fdinfo/{loop.epoll.fileno()}") as info:
            for line in info:
                fields = line.split()  # tfd: FD events: MASK data: ...
                if fields[:1] == ["tfd:"] and int(fields[1]) == fd:
                    return bool(int(fields[3], 16) & select.EPOLLIN)
    raise AssertionError(f"descriptor {fd} is not watched")


def test_a_source_is_not_watched_while_its_reader_is_full(net: Net) -> None:
    """While a direction waits for its reader, its source does not wake the loop for every
    segment that arrives (it is not read then anyway); once the reader took everything, the
    source is watched and read again, and nothing was lost."""
    relay = Relay(loops=1)
    relay.start()
    try:
        client, client_side = net.tcp_pair()
        backend, backend_side = net.tcp_pair()
        source_fd = client_side.fileno()
        relay.add(client_side, backend_side)
        data = random.randbytes(32 * MiB)
        producer = Worker(client.sendall, data)
        producer.start()
        # The backend reads nothing: the relay fills it and waits for it.
        wait_until(lambda: not watched_for_reading(relay, source_fd))
        assert recv_exactly(backend, len(data)) == data
        producer.result()
        wait_until(lambda: watched_for_reading(relay, source_fd))
        client.sendall(b"still relayed")
        assert recv_exactly(backend, 13) == b"still relayed"
    finally:
        relay.stop()


@pytest.mark.parametrize("pipe_size", [4096, 256 * 1024])
def test_a_message_its_reader_cannot_take_at_once_arrives_whole(net: Net, pipe_size: int) -> None:
    """Messages up to the copy size go through a buffer, not a pipe. When the reader's
    socket takes only part of one, the rest waits and goes first once the reader reads again
    (also with pipes smaller than a message); meanwhile the sender is not read."""
    relay = Relay(loops=1, pipe_size=pipe_size)
    relay.start()
    try:
        client, client_side = net.tcp_pair()
        backend, backend_side = net.tcp_pair()
        # Little room toward the client app, so that one message fills it.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        client_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        relay.add(client_side, backend_side)
        for _ in range(10):
            filler, message = (random.randbytes(random.randint(1, 32 * 1024)) for _ in "ab")
            backend.sendall(filler)
            time.sleep(0.02)  # the relay copies it, and the client's socket is full
            backend.sendall(message)
            time.sleep(0.02)  # the relay copies it, and keeps what the socket cannot take
            backend.sendall(b"next")  # read only once the rest of the message is sent
            expected = filler + message + b"next"
            assert recv_exactly(client, len(expected)) == expected
        send_and_shut(backend, b"end")
        assert read_to_eof(client) == b"end"
        client.close()
        assert relay.wait_idle(TIMEOUT)
    finally:
        relay.stop()


def test_pooled_pipe_is_empty_when_reused(net: Net) -> None:
    relay = Relay(loops=1)  # one loop, one pool: every new pair draws from it
    relay.start()
    try:
        for _ in range(2):
            # A clean exchange returns its pipes to the pool.
            client, backend = net.relayed(relay)
            send_and_shut(client, b"hello")
            assert read_to_eof(backend) == b"hello"
            send_and_shut(backend, b"world")
            assert read_to_eof(client) == b"world"
            assert relay.wait_idle(TIMEOUT)

            # A pair that takes those pipes and dies with bytes still in them.
            client, backend = net.relayed(relay)
            client.sendall(b"x")
            assert backend.recv(1) == b"x"
            flood = Flood(backend)
            flood.start()
            wait_stalled(flood.progress, quiet=0.3)  # the pipe toward the client is full now
            reset(client)
            flood.result()
            assert relay.wait_idle(TIMEOUT)

            # The next pair gets exactly its own bytes, both ways.
            client, backend = net.relayed(relay)
            send_and_shut(backend, b"fresh reply")
            send_and_shut(client, b"fresh request")
            assert read_to_eof(client) == b"fresh reply"
            assert read_to_eof(backend) == b"fresh request"
            assert relay.wait_idle(TIMEOUT)
    finally:
        relay.stop()


def pipes_open() -> set[str]:
    """The pipes this process holds open, by inode ("pipe:[1234]"; both ends give one)."""
    return {link for _, link in open_files() if link.startswith("pipe:")}


def test_idle_connections_hold_no_pipes(net: Net) -> None:
    relay = Relay(loops=1)
    relay.start()
    try:
        before = pipes_open()
        pairs = []
        for _ in range(50):
            client, backend = net.relayed(relay)
            client.sendall(b"request")
            assert backend.recv(16) == b"request"
            backend.sendall(b"answer")
            assert client.recv(16) == b"answer"
            pairs.append((client, backend))
        assert relay.active == 50
        # Each exchange gave its pipe back once it was empty, and the next one took it
        # again: 50 open, idle connections, and no more than the pool's pipe or two.
        assert len(pipes_open() - before) <= 2
        # They still work, both ways and all at once.
        exchange_on_all(pairs, b"again", b"more")
    finally:
        relay.stop()


def test_a_pipe_that_may_hold_bytes_is_closed_not_pooled(net: Net) -> None:
    relay = Relay(loops=1)
    relay.start()
    try:
        before = pipes_open()
        client, backend = net.relayed(relay)
        flood = Flood(backend)
        flood.start()
        wait_stalled(flood.progress, quiet=0.3)  # the client reads nothing: the pipe fills
        full = pipes_open() - before
        assert len(full) == 1, "the stalled direction holds exactly one pipe"
        reset(client)
        flood.result()
        assert relay.wait_idle(TIMEOUT)
        wait_until(lambda: not (pipes_open() & full))  # closed, so no one can draw it
    finally:
        relay.stop()


# --- loops that accept clients themselves -----------------------------------------------


class GivenBack:
    """Collects the clients a relay gives back (from its loop threads)."""

    def __init__(self) -> None:
        self.clients: list[socket.socket] = []
        self._cond = threading.Condition()

    def __call__(self, client: socket.socket) -> None:
        with self._cond:
            self.clients.append(client)
            self._cond.notify_all()

    def wait(self, count: int) -> list[socket.socket]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.clients) >= count, TIMEOUT)
            return list(self.clients)

    def close(self) -> None:
        for client in self.clients:
            client.close()


@contextlib.contextmanager
def accepting_relay(
    backend: tuple[str, int], connect_timeout: float = 0.02, **options: Any
) -> Iterator[tuple[Relay, socket.socket, GivenBack]]:
    """A relay whose loops accept from a listener of their own and connect to ``backend``."""
    given_back = GivenBack()
    relay = Relay(on_give_back=given_back, connect_timeout=connect_timeout, **options)
    relay.start()
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    listener.setblocking(False)
    try:
        relay.accept_from(listener, socket.AF_INET, backend)
        yield relay, listener, given_back
    finally:
        relay.stop()
        listener.close()
        given_back.close()


def black_hole() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full: it drops every further SYN."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    return listener, fillers


def test_loops_accept_and_connect_clients_themselves(echo: EchoServer) -> None:
    with accepting_relay(echo.address) as (relay, listener, given_back):
        assert relay.accepting
        clients = [
            socket.create_connection(listener.getsockname(), timeout=TIMEOUT) for _ in range(50)
        ]
        for client in clients:
            client.sendall(b"ping")
        for client in clients:
            assert client.recv(16) == b"ping"
        assert relay.active == 50
        # Counted from accept to close, and idle ones hold no pipe.
        assert not relay.stop_accepting_if_idle()
        assert relay.accepting
        payload = random.randbytes(3 * MiB)
        sender = Worker(send_and_shut, clients[0], payload)
        sender.start()
        assert read_to_eof(clients[0]) == payload
        sender.result()
        for client in clients:
            client.close()
        assert relay.wait_idle(TIMEOUT)
        assert relay.stop_accepting_if_idle()
        assert not relay.accepting
        # Not accepted any more: the client waits in the backlog, unanswered.
        late = socket.create_connection(listener.getsockname(), timeout=0.3)
        late.sendall(b"late")
        with pytest.raises(TimeoutError):
            late.recv(16)
        assert relay.active == 0
        assert given_back.clients == []
        late.close()


def test_clients_beyond_max_connections_are_closed_at_once(echo: EchoServer) -> None:
    refused: list[int] = []
    with accepting_relay(echo.address, max_connections=3, on_refused=refused.append) as (
        relay,
        listener,
        _,
    ):
        clients = [socket.create_connection(listener.getsockname(), timeout=TIMEOUT)]
        for client in clients:
            client.sendall(b"ping")
            assert client.recv(16) == b"ping"
        clients += [socket.create_connection(listener.getsockname(), timeout=TIMEOUT)]
        clients += [socket.create_connection(listener.getsockname(), timeout=TIMEOUT)]
        for client in clients[1:]:
            client.sendall(b"ping")
            assert client.recv(16) == b"ping"
        assert relay.full
        extra = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        assert sees_close(extra)
        wait_until(lambda: sum(refused) == 1)
        clients[0].close()  # one leaves: the next one is served
        wait_until(lambda: not relay.full)
        late = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        late.sendall(b"pong")
        assert late.recv(16) == b"pong"
        for client in [*clients[1:], late, extra]:
            client.close()


def test_a_pair_idle_past_the_idle_timeout_is_closed_and_a_busy_one_is_not(
    echo: EchoServer,
) -> None:
    closed: list[int] = []
    with accepting_relay(echo.address, idle_timeout=0.6, on_idle_closed=closed.append) as (
        relay,
        listener,
        _,
    ):
        idle = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        busy = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        started = time.monotonic()
        while time.monotonic() - started < 1.5:  # a byte every 0.1 s: never idle for long
            busy.sendall(b"x")
            assert busy.recv(16) == b"x"
            time.sleep(0.1)
        assert sees_close(idle)
        assert time.monotonic() - started >= 0.6
        assert sum(closed) == 1 and relay.active == 1
        busy.sendall(b"still")
        assert busy.recv(16) == b"still"
        busy.close()
        idle.close()


def test_accepted_clients_are_spread_over_the_loops(echo: EchoServer) -> None:
    """EPOLLEXCLUSIVE wakes the loops in a fixed order: an idle first loop would otherwise
    accept every client, and one core would relay them all."""
    with accepting_relay(echo.address) as (relay, listener, _):
        clients = [
            socket.create_connection(listener.getsockname(), timeout=TIMEOUT) for _ in range(40)
        ]
        for client in clients:
            client.sendall(b"ping")
            assert client.recv(16) == b"ping"
        counts = [loop.count for loop in relay._loops]
        assert sum(counts) == 40
        assert max(counts) - min(counts) <= relay_module._BALANCE_SLACK + 1, counts
        for client in clients:
            client.close()
        assert relay.wait_idle(TIMEOUT)


def test_no_client_is_accepted_once_stop_accepting_if_idle_said_yes(echo: EchoServer) -> None:
    """The shim ends its ledger claim only when this says yes: from then on, no loop may
    accept a client, however close its accept() came to the check."""
    with accepting_relay(echo.address) as (relay, listener, _):
        address = listener.getsockname()
        done = threading.Event()
        served: list[int] = []

        def hammer() -> None:
            while not done.is_set():
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(address, timeout=0.2) as client,
                ):
                    client.sendall(b"x")
                    if client.recv(1):
                        served.append(1)
                time.sleep(random.random() / 200)  # gaps, in which the relay may be idle

        hammers = [Worker(hammer) for _ in range(3)]
        for worker in hammers:
            worker.start()
        stops = 0
        deadline = time.monotonic() + TIMEOUT
        try:
            while (stops < 30 or len(served) < 150) and time.monotonic() < deadline:
                if relay.stop_accepting_if_idle():
                    stops += 1
                    # Open pairs may remain, but only those whose client has left (closing).
                    at_stop = relay.active
                    for _ in range(20):
                        assert relay.active <= at_stop, "a client was accepted after the stop"
                        assert relay.in_use == 0
                    relay.accept_from(listener, socket.AF_INET, echo.address)
                time.sleep(random.random() / 1000)  # the loops need the GIL to accept
        finally:
            done.set()
            for worker in hammers:
                worker.result()
        assert stops > 0


def test_a_client_accepted_just_before_stop_accepting_is_still_relayed(
    echo: EchoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shim stops the accepting when its backend goes away, whatever the loops are doing:
    here, between a loop's accept() and its connect to the backend."""
    connect = relay_module._Loop._connect

    def stop_then_connect(loop: Any, *args: Any) -> None:
        loop.relay.stop_accepting()
        connect(loop, *args)

    monkeypatch.setattr(relay_module._Loop, "_connect", stop_then_connect)
    with accepting_relay(echo.address) as (relay, listener, given_back):
        with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as client:
            client.sendall(b"x")
            assert client.recv(1) == b"x"
        assert not relay.accepting
        assert relay.wait_idle(TIMEOUT)
        assert given_back.clients == []


def test_a_refused_client_is_given_back_unread() -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    nobody = closed.getsockname()
    closed.close()  # nothing listens there now: connects are refused
    with accepting_relay(nobody) as (relay, listener, given_back):
        client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        client.sendall(b"request")
        (back,) = given_back.wait(1)
        back.settimeout(TIMEOUT)
        assert back.recv(16) == b"request"  # the relay read nothing of it
        assert relay.wait_idle(TIMEOUT)
        assert relay.accepting
        client.close()


def test_a_client_whose_backend_does_not_answer_in_time_is_given_back() -> None:
    hole, fillers = black_hole()
    try:
        with accepting_relay(hole.getsockname()) as (relay, listener, given_back):
            client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
            client.sendall(b"request")
            (back,) = given_back.wait(1)
            back.settimeout(TIMEOUT)
            assert back.recv(16) == b"request"
            assert relay.wait_idle(TIMEOUT)
            client.close()
    finally:
        hole.close()
        for filler in fillers:
            filler.close()


def test_close_all_gives_back_clients_still_connecting() -> None:
    hole, fillers = black_hole()
    try:
        with accepting_relay(hole.getsockname(), connect_timeout=60) as (relay, listener, back):
            client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
            wait_until(lambda: relay.active == 1)
            relay.stop_accepting()
            relay.close_all()
            assert relay.active == 0
            assert len(back.wait(1)) == 1
            client.close()
    finally:
        hole.close()
        for filler in fillers:
            filler.close()


class FailingListener(socket.socket):
    """A real listening socket (so epoll watches it) whose accept() fails."""

    def accept(self) -> tuple[socket.socket, Any]:
        raise OSError(errno.EMFILE, "Too many open files")


def test_an_accept_error_stops_accepting_and_is_reported(echo: EchoServer) -> None:
    errors: list[OSError] = []
    relay = Relay(on_accept_stopped=errors.append)
    relay.start()
    listener = FailingListener()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        relay.accept_from(listener, socket.AF_INET, echo.address)
        client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        wait_until(lambda: bool(errors))
        assert [e.errno for e in errors] == [errno.EMFILE]
        assert not relay.accepting
        assert relay.active == 0
        client.close()
    finally:
        relay.stop()
        listener.close()


def test_when_the_last_loop_ends_the_caller_takes_the_listener_back(
    echo: EchoServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def crash(loop: Any) -> None:
        raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(relay_module._Loop, "_accept", crash)
    errors: list[OSError] = []
    relay = Relay(loops=1, on_accept_stopped=errors.append)
    relay.start()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    try:
        relay.accept_from(listener, socket.AF_INET, echo.address)
        client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        wait_until(lambda: bool(errors))
        assert not relay.accepting
        client.close()
    finally:
        relay.stop()
        listener.close()
    assert "relay loop 0 failed" in caplog.text
    caplog.clear()  # expected here


# --- counts, callbacks, closing ------------------------------------------------------------


def test_active_on_change_and_last_activity(net: Net) -> None:
    seen: list[int] = []
    threads: set[str] = set()
    changed = threading.Condition()
    relay_box: list[Relay] = []

    def on_change(count: int) -> None:
        # Calling back into the relay must not deadlock: no relay lock is held here.
        assert relay_box[0].active >= 0
        with changed:
            seen.append(count)
            threads.add(threading.current_thread().name)
            changed.notify_all()

    def wait_seen(count: int) -> None:
        with changed:
            assert changed.wait_for(lambda: bool(seen) and seen[-1] == count, TIMEOUT)

    relay = Relay(on_change=on_change)
    relay_box.append(relay)
    relay.start()
    try:
        assert relay.active == 0
        assert relay.wait_idle(0)
        pairs = []
        for expected in (1, 2, 3):
            pairs.append(net.relayed(relay))
            assert relay.active == expected
            wait_seen(expected)
        assert not relay.wait_idle(0.05)

        before = relay.last_activity
        client, backend = pairs[0]
        client.sendall(b"tick")
        assert backend.recv(16) == b"tick"
        wait_until(lambda: relay.last_activity > before)

        for expected, (client, backend) in zip((2, 1, 0), pairs, strict=True):
            client.close()
            backend.close()
            wait_seen(expected)
            assert relay.active == expected
        assert relay.wait_idle(TIMEOUT)
        assert max(seen) == 3
        assert all(name.startswith("lmproxy-relay") for name in threads)
    finally:
        relay.stop()


def test_close_all_closes_every_pair(relay: Relay, net: Net) -> None:
    pairs = [net.relayed(relay) for _ in range(20)]
    for client, backend in pairs:
        client.sendall(b"hi")
        assert backend.recv(2) == b"hi"
    assert relay.active == 20
    relay.close_all()
    assert relay.active == 0
    for client, backend in pairs:
        assert sees_close(client)
        assert sees_close(backend)
    # The relay keeps working afterwards.
    client, backend = net.relayed(relay)
    send_and_shut(client, b"again")
    assert read_to_eof(backend) == b"again"


def test_idle_pairs_use_no_cpu(relay: Relay, net: Net) -> None:
    pairs = [net.relayed(relay) for _ in range(100)]
    exchange_on_all(pairs, b"q", b"a")
    assert relay.active == 100
    cpu_before = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - cpu_before < 0.05


def relay_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("lmproxy-relay")}


def test_stop_closes_pairs_and_joins_threads(net: Net) -> None:
    others = relay_threads()  # other tests' relays, if any are still around
    relay = Relay(loops=2)
    relay.start()
    ours = relay_threads() - others
    assert len(ours) == 2
    assert all(t.daemon for t in ours)
    client, backend = net.relayed(relay)
    client.sendall(b"hi")
    assert backend.recv(2) == b"hi"
    relay.stop()
    assert not any(t.is_alive() for t in ours)
    assert relay.active == 0
    assert sees_close(client)
    relay.stop()  # idempotent

    a, b = socket.socketpair()
    with pytest.raises(RuntimeError):
        relay.add(a, b)
    assert a.fileno() == -1 and b.fileno() == -1  # owned, hence closed


def open_files() -> set[tuple[int, str]]:
    """(descriptor, what it refers to) for this process: a reused number still differs."""
    files = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor
            files.add((int(name), os.readlink(f"/proc/self/fd/{name}")))
    return files


def test_stop_releases_every_descriptor() -> None:
    before = open_files()
    relay = Relay(loops=2)
    relay.start()
    ends: list[socket.socket] = []
    for _ in range(10):  # clean exchanges: their pipes go to the pools
        client, client_side = socket.socketpair()
        backend_side, backend = socket.socketpair()
        relay.add(client_side, backend_side)
        send_and_shut(client, b"a" * 1000)
        send_and_shut(backend, b"b" * 1000)
        assert read_to_eof(backend) == b"a" * 1000
        assert read_to_eof(client) == b"b" * 1000
        ends += (client, backend)
    assert relay.wait_idle(TIMEOUT)
    pooled = [link for _, link in open_files() - before if link.startswith("pipe:")]
    assert pooled, "no pipes were pooled"
    relay.stop()
    for end in ends:
        end.close()
    # Pooled pipes, epoll sets and wake-up descriptors are all gone.
    assert open_files() - before == set()


def test_pairs_added_before_start_are_relayed(net: Net) -> None:
    seen: list[int] = []
    relay = Relay(loops=1, on_change=seen.append)
    try:
        client, backend = net.relayed(relay)
        assert relay.active == 1
        relay.start()
        wait_until(lambda: seen == [1])
        send_and_shut(client, b"early")
        assert read_to_eof(backend) == b"early"
    finally:
        relay.stop()
    assert relay.active == 0


def test_unix_socket_pairs_work_too() -> None:
    relay = Relay(loops=1)
    relay.start()
    try:
        client, client_side = socket.socketpair()
        backend_side, backend = socket.socketpair()
        client.settimeout(TIMEOUT)
        backend.settimeout(TIMEOUT)
        relay.add(client_side, backend_side)
        payload = random.randbytes(3 * MiB)
        sender = Worker(send_and_shut, client, payload)
        sender.start()
        assert read_to_eof(backend) == payload
        sender.result()
        backend.close()
        assert read_to_eof(client) == b""
        assert relay.wait_idle(TIMEOUT)
        client.close()
    finally:
        relay.stop()


@pytest.mark.parametrize(("cpus", "loops"), [(1, 1), (2, 1), (3, 1), (4, 2), (64, 2)])
def test_one_loop_below_four_cpus(monkeypatch: pytest.MonkeyPatch, cpus: int, loops: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert relay_module.default_loops() == loops
    relay = Relay()
    try:
        assert len(relay._loops) == loops
    finally:
        relay.stop()
