"""The relay for a service that speaks HTTP: a connection is in use while a request is in
flight, an answered one left in a client's pool is not, and once the claim has ended (the
gate closed) an idle connection's next request waits, unread, for the shim.

Every test runs with the fast copier and without it (test_relay's ``copier`` fixture), and
with the C framer and the reference one (``framer``).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from lmproxy import exchange as reference
from lmproxy import relay as relay_module
from lmproxy.relay import Relay
from tests.unit import test_relay as base
from tests.unit.test_relay import MiB, Net, recv_exactly, wait_until

# The fixtures every relay test runs under (with and without the fast copier, no errors).
copier = base.copier
no_unexpected_errors = base.no_unexpected_errors
net = base.net

GET = b"GET /v1/models HTTP/1.1\r\nHost: m\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
STREAM_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
TOKEN = b"9\r\ndata: x\n\n\r\n"
LAST = b"0\r\n\r\n"
QUIET_S = 0.3  # long enough for a byte that was going to pass to have passed


def post(body: bytes) -> bytes:
    return b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@pytest.fixture(params=["c-framer", "python-framer"])
def framer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The C Exchange and Gate (built with the fast copier), or the reference ones."""
    if request.param == "python-framer":
        monkeypatch.setattr(relay_module, "Copier", None)  # the C copier needs the C framer
        monkeypatch.setattr(relay_module, "Exchange", reference.Exchange)
        monkeypatch.setattr(relay_module, "Gate", reference.Gate)
    return str(request.param)


class Knocks:
    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            self.count += 1


@pytest.fixture
def knocks() -> Knocks:
    return Knocks()


@pytest.fixture
def relay(framer: str, knocks: Knocks) -> Iterator[Relay]:
    r = Relay(http=True, on_knock=knocks)
    r.start()
    yield r
    r.stop()


def silent(sock: socket.socket) -> bool:
    """Nothing arrives on sock for QUIET_S."""
    sock.settimeout(QUIET_S)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(30)
    return False


def answered_and_unclaimed(relay: Relay, net: Net) -> tuple[socket.socket, socket.socket]:
    """A connection answered once and left open, after the claim ended (gate closed)."""
    client, backend = net.relayed(relay)
    client.sendall(GET)
    recv_exactly(backend, len(GET))
    backend.sendall(OK)
    recv_exactly(client, len(OK))
    wait_until(lambda: relay.in_use == 0)
    assert relay.stop_accepting_if_idle()
    return client, backend


def test_an_answered_connection_left_open_is_not_in_use(relay: Relay, net: Net) -> None:
    client, backend = net.relayed(relay)
    client.sendall(GET)
    assert recv_exactly(backend, len(GET)) == GET
    wait_until(lambda: relay.in_use == 1)
    backend.sendall(OK)
    assert recv_exactly(client, len(OK)) == OK
    wait_until(lambda: relay.in_use == 0)
    assert relay.active == 1  # still open, in the client's pool


def test_a_slow_prompt_and_a_paused_stream_are_in_use_until_the_last_byte(
    relay: Relay, net: Net
) -> None:
    client, backend = net.relayed(relay)
    request = post(b'{"prompt": "long"}')
    client.sendall(request)
    assert recv_exactly(backend, len(request)) == request
    time.sleep(QUIET_S)  # the model reads the prompt: nothing is sent either way
    assert relay.in_use == 1
    backend.sendall(STREAM_HEAD + TOKEN)
    recv_exactly(client, len(STREAM_HEAD + TOKEN))
    time.sleep(QUIET_S)  # a pause between tokens
    assert relay.in_use == 1
    backend.sendall(TOKEN + LAST)
    recv_exactly(client, len(TOKEN + LAST))
    wait_until(lambda: relay.in_use == 0)


def test_a_client_that_sends_its_fin_stops_counting_and_still_gets_the_answer(
    relay: Relay, net: Net
) -> None:
    """A FIN frees the model at once (large-model-proxy ends such a connection), yet a
    client that only half-closed after its request (`nc -N`) is answered in full; the
    connection never counts again, whatever the answer's framing does."""
    client, backend = net.relayed(relay)
    request = post(b'{"prompt": "long"}')
    client.sendall(request)
    assert recv_exactly(backend, len(request)) == request
    wait_until(lambda: relay.in_use == 1)
    client.shutdown(socket.SHUT_WR)
    assert backend.recv(1) == b""  # the FIN is passed on
    wait_until(lambda: relay.in_use == 0)
    assert relay.active == 1  # still open: the answer may come
    assert relay.stop_accepting_if_idle()
    backend.sendall(STREAM_HEAD + TOKEN)
    assert recv_exactly(client, len(STREAM_HEAD + TOKEN)) == STREAM_HEAD + TOKEN
    assert relay.in_use == 0
    backend.sendall(TOKEN + LAST)
    assert recv_exactly(client, len(TOKEN + LAST)) == TOKEN + LAST
    backend.close()
    assert client.recv(1) == b""
    assert relay.wait_idle(5)
    assert relay.in_use == 0


def test_large_bodies_are_spliced_within_their_length_and_followed(relay: Relay, net: Net) -> None:
    """Bodies of a known length move unseen (spliced), and the framing still finds the
    next message after them."""
    client, backend = net.relayed(relay)
    body = bytes(range(256)) * (8 * MiB // 256)
    request = post(body)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    sender = threading.Thread(target=client.sendall, args=(request,))
    sender.start()
    assert recv_exactly(backend, len(request)) == request
    sender.join()
    assert relay.in_use == 1
    sender = threading.Thread(target=backend.sendall, args=(answer,))
    sender.start()
    assert recv_exactly(client, len(answer)) == answer
    sender.join()
    wait_until(lambda: relay.in_use == 0)
    client.sendall(GET)  # the next request on the same connection is seen as one
    assert recv_exactly(backend, len(GET)) == GET
    wait_until(lambda: relay.in_use == 1)


def test_bytes_that_are_not_http_keep_the_connection_in_use_while_open(
    relay: Relay, net: Net
) -> None:
    client, backend = net.relayed(relay)
    client.sendall(b"\x16\x03\x01 a TLS hello, say\r\n\r\n")
    backend.recv(100)
    wait_until(lambda: relay.in_use == 1)
    client.close()
    backend.close()
    wait_until(lambda: relay.in_use == 0 and relay.active == 0)


def test_no_claim_no_request_the_gate_holds_an_idle_connections_next_one(
    relay: Relay, net: Net, knocks: Knocks
) -> None:
    busy_client, busy_backend = net.relayed(relay)
    idle_client, idle_backend = net.relayed(relay)
    busy_client.sendall(GET)
    recv_exactly(busy_backend, len(GET))
    wait_until(lambda: relay.in_use == 1)
    assert not relay.stop_accepting_if_idle()  # a request in flight: the claim stays

    busy_backend.sendall(OK)
    recv_exactly(busy_client, len(OK))
    wait_until(lambda: relay.in_use == 0)
    assert relay.stop_accepting_if_idle()  # the claim ends: the model may be evicted now

    idle_client.sendall(GET)  # ...so this request must not reach it unclaimed
    assert silent(idle_backend)
    wait_until(lambda: relay.knocking and knocks.count == 1)
    assert relay.in_use == 0

    relay.open_gate()  # the shim claimed again
    assert recv_exactly(idle_backend, len(GET)) == GET
    assert relay.in_use == 1 and not relay.knocking
    idle_backend.sendall(OK)
    assert recv_exactly(idle_client, len(OK)) == OK
    wait_until(lambda: relay.in_use == 0)


def test_a_client_that_closes_its_idle_connection_at_the_closed_gate_ends_it(
    relay: Relay, net: Net, knocks: Knocks
) -> None:
    client, backend = answered_and_unclaimed(relay, net)
    client.close()  # its pool let it go
    wait_until(lambda: relay.active == 0)
    assert knocks.count == 0 and not relay.knocking
    assert backend.recv(10) == b""


def test_a_request_in_flight_passes_the_closed_gate_to_its_end(relay: Relay, net: Net) -> None:
    """Closing the gate (draining) holds back new requests only: one in flight goes on."""
    client, backend = net.relayed(relay)
    request = post(b"0123456789")
    client.sendall(request[:-4])
    recv_exactly(backend, len(request) - 4)
    relay.stop_accepting()
    client.sendall(request[-4:])
    assert recv_exactly(backend, 4) == request[-4:]
    backend.sendall(OK)
    assert recv_exactly(client, len(OK)) == OK
    wait_until(lambda: relay.in_use == 0)
    client.sendall(GET)  # the next one waits
    assert silent(backend)
    wait_until(lambda: relay.knocking)


class GivenBack:
    def __init__(self) -> None:
        self.clients: list[socket.socket] = []

    def __call__(self, client: socket.socket) -> None:
        self.clients.append(client)


def test_a_held_request_whose_backend_goes_is_given_back_unread(
    framer: str, net: Net, knocks: Knocks
) -> None:
    """The backend closes (it was stopped) while a request waits at the gate: the client,
    its request unread, goes back to the shim for the backend's next start."""
    given_back = GivenBack()
    relay = Relay(http=True, on_knock=knocks, on_give_back=given_back)
    relay.start()
    try:
        client, backend = answered_and_unclaimed(relay, net)
        client.sendall(GET)
        wait_until(lambda: relay.knocking)
        backend.close()
        wait_until(lambda: len(given_back.clients) == 1 and relay.active == 0)
        assert not relay.knocking
        returned = given_back.clients[0]
        with returned:
            assert returned.recv(len(GET), socket.MSG_PEEK) == GET  # unread, whole
            returned.sendall(OK)  # as the next backend would answer
            assert recv_exactly(client, len(OK)) == OK  # the client's connection carries on
    finally:
        relay.stop()


def test_a_pool_that_closes_its_idle_connection_as_the_backend_goes_gets_nothing_back(
    framer: str, net: Net, knocks: Knocks
) -> None:
    """The backend goes (its model was evicted) and the client closes its idle pooled
    connection (the router's pool, an SDK's): a FIN is no request. Given back, it counted
    as a client waiting, and the shim started the model again for nobody."""
    given_back = GivenBack()
    relay = Relay(http=True, on_knock=knocks, on_give_back=given_back)
    relay.start()
    try:
        client, backend = answered_and_unclaimed(relay, net)
        backend.close()
        client.close()
        wait_until(lambda: relay.active == 0)
        time.sleep(QUIET_S)
        assert given_back.clients == [] and not relay.knocking
    finally:
        relay.stop()


def test_close_all_gives_back_the_requests_held_at_the_gate(
    framer: str, net: Net, knocks: Knocks
) -> None:
    given_back = GivenBack()
    relay = Relay(http=True, on_knock=knocks, on_give_back=given_back)
    relay.start()
    try:
        held_client, _ = net.relayed(relay)
        idle_client, _ = net.relayed(relay)
        relay.stop_accepting()
        held_client.sendall(GET)
        wait_until(lambda: relay.knocking)
        relay.close_all()
        assert len(given_back.clients) == 1 and relay.active == 0
        given_back.clients[0].close()
        idle_client.settimeout(30)
        assert idle_client.recv(10) == b""  # no request: simply closed
    finally:
        relay.stop()
