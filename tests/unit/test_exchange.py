"""A connection's request in flight, from its bytes: every case "in use" must cover
(a long prompt, an early head and a slow body, a paused stream) and every one it must
not (an answered connection left in a client's pool)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmproxy import exchange as reference
from tests.unit.fastcopy import require_fast_copier

try:
    from lmproxy import _fastcopy
except ImportError:  # not built: the C twin's tests skip (or fail in CI)
    _fastcopy = None  # type: ignore[assignment]

# Both implementations answer alike: every test runs with each.
Make = Callable[..., Any]


def c_exchange(gate: Any = None) -> Any:
    if _fastcopy is None:
        require_fast_copier()
    return _fastcopy.Exchange(gate)


def c_gate() -> Any:
    if _fastcopy is None:
        require_fast_copier()
    return _fastcopy.Gate()


IMPLEMENTATIONS = pytest.mark.parametrize(
    "make", [reference.Exchange, c_exchange], ids=["python", "c"]
)

GET = b"GET /v1/models HTTP/1.1\r\nHost: m\r\n\r\n"
POST = b'POST /v1/completions HTTP/1.1\r\nHost: m\r\nContent-Length: 11\r\n\r\n{"a": "b"}\n'
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
EVENT = b'data: {"token": "tok"}\n\n'
TOKEN = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
LAST = b"0\r\n\r\n"


def fed(make: Make, *steps: tuple[str, bytes]) -> Any:
    exchange = make()
    for side, data in steps:
        getattr(exchange, side)(memoryview(data))
    return exchange


@IMPLEMENTATIONS
def test_an_answered_connection_is_not_in_use(make: Make) -> None:
    exchange = make()
    assert not exchange.in_flight
    exchange.client(memoryview(GET))
    assert exchange.in_flight
    exchange.backend(memoryview(OK))
    assert not exchange.in_flight  # left in the client's pool: the model may go


@IMPLEMENTATIONS
def test_the_first_byte_of_a_request_puts_it_in_use(make: Make) -> None:
    assert fed(make, ("client", b"P")).in_flight


@IMPLEMENTATIONS
def test_a_long_prompt_with_no_answer_yet_is_in_use(make: Make) -> None:
    assert fed(make, ("client", POST)).in_flight


@IMPLEMENTATIONS
def test_an_early_head_and_a_slow_body_are_in_use_until_the_last_byte(make: Make) -> None:
    exchange = fed(make, ("client", POST), ("backend", OK[:-1]))
    assert exchange.in_flight
    exchange.backend(memoryview(OK[-1:]))
    assert not exchange.in_flight


@IMPLEMENTATIONS
def test_a_stream_is_in_use_through_its_pauses_until_its_last_chunk(make: Make) -> None:
    exchange = fed(make, ("client", POST), ("backend", STREAM_HEAD))
    for _ in range(3):
        exchange.backend(memoryview(TOKEN))
        assert exchange.in_flight
    exchange.backend(memoryview(LAST))
    assert not exchange.in_flight


@IMPLEMENTATIONS
def test_trailers_end_a_chunked_body_at_the_empty_line(make: Make) -> None:
    exchange = fed(make, ("client", POST), ("backend", STREAM_HEAD + TOKEN + b"0\r\nX-T: 1\r\n"))
    assert exchange.in_flight
    exchange.backend(memoryview(b"\r\n"))
    assert not exchange.in_flight


@IMPLEMENTATIONS
def test_responses_without_a_body_end_at_their_head(make: Make) -> None:
    head_request = b"HEAD / HTTP/1.1\r\nHost: m\r\n\r\n"
    assert not fed(make, ("client", head_request), ("backend", OK[: -len(b"hello")])).in_flight
    for status in (b"204 No Content", b"304 Not Modified"):
        response = b"HTTP/1.1 " + status + b"\r\nContent-Length: 9\r\n\r\n"
        assert not fed(make, ("client", GET), ("backend", response)).in_flight


@IMPLEMENTATIONS
def test_an_interim_response_is_not_the_end(make: Make) -> None:
    exchange = fed(make, ("client", POST), ("backend", b"HTTP/1.1 100 Continue\r\n\r\n"))
    assert exchange.in_flight
    exchange.backend(memoryview(OK))
    assert not exchange.in_flight


@IMPLEMENTATIONS
def test_pipelined_requests_are_in_use_until_every_response_ended(make: Make) -> None:
    exchange = fed(make, ("client", GET + POST), ("backend", OK))
    assert exchange.in_flight
    exchange.backend(memoryview(OK))
    assert not exchange.in_flight


@IMPLEMENTATIONS
def test_a_chunked_request_body_is_followed(make: Make) -> None:
    request = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    exchange = fed(make, ("client", request), ("backend", OK))
    assert not exchange.in_flight
    assert not exchange.opaque


@IMPLEMENTATIONS
def test_what_it_cannot_follow_is_in_use_while_open(make: Make) -> None:
    until_close = b"HTTP/1.0 200 OK\r\n\r\nbody"
    assert fed(make, ("client", GET), ("backend", until_close)).in_flight
    upgrade = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
    assert fed(make, ("client", GET), ("backend", upgrade)).opaque
    assert fed(make, ("client", b"\x16\x03\x01 not http at all\r\n\r\n")).opaque
    assert fed(make, ("backend", OK)).opaque  # a response to no request
    assert fed(make, ("client", b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n")).opaque
    assert fed(make, ("client", b"G" * 70_000)).opaque  # a head past 64 KiB
    chunk_without_crlf = STREAM_HEAD + b"3\r\nabcX"
    assert fed(make, ("client", GET), ("backend", chunk_without_crlf)).opaque


@IMPLEMENTATIONS
def test_bytes_moved_unseen_within_the_budget_are_counted(make: Make) -> None:
    exchange = fed(
        make, ("client", GET), ("backend", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    )
    assert exchange.budget(False) == 1000
    assert exchange.budget(True) == 0  # the next request's head must be seen
    exchange.unseen(False, 600)
    assert exchange.budget(False) == 400 and exchange.in_flight
    exchange.unseen(False, 400)
    assert not exchange.in_flight and exchange.budget(False) == 0


@IMPLEMENTATIONS
def test_bytes_moved_unseen_past_the_budget_lose_the_framing(make: Make) -> None:
    exchange = fed(make, ("client", GET), ("backend", OK[:-5]))
    exchange.unseen(False, 6)
    assert exchange.opaque and exchange.in_flight and exchange.budget(False) is None


CONVERSATION = [
    ("client", POST),
    ("backend", STREAM_HEAD + TOKEN + TOKEN + LAST),
    ("client", GET),
    ("backend", OK),
    ("client", b"HEAD / HTTP/1.1\r\n\r\n"),
    ("backend", b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"),
]


@IMPLEMENTATIONS
@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_how_the_bytes_are_split_changes_nothing(make: Make, cuts: list[int]) -> None:
    """Reads come in any sizes: fed in pieces, each exchange is in flight until its
    response's last byte, and the connection ends idle."""
    exchange = make()
    pieces = itertools.cycle(cuts)
    for side, message in CONVERSATION:
        at = 0
        while at < len(message):
            size = next(pieces)
            getattr(exchange, side)(memoryview(message[at : at + size]))
            at += size
            if side == "backend" and at < len(message):
                assert exchange.in_flight
        assert not exchange.opaque
    assert not exchange.in_flight


# --- the gate: no request starts unseen once the claim has ended -----------------------

GATES = pytest.mark.parametrize(
    ("make", "make_gate"),
    [(reference.Exchange, reference.Gate), (c_exchange, c_gate)],
    ids=["python", "c"],
)


@GATES
def test_the_gate_counts_the_connections_with_a_request_in_flight(
    make: Make, make_gate: Make
) -> None:
    gate = make_gate()
    first, second = make(gate), make(gate)
    assert first.enter() and gate.in_flight == 1
    first.client(GET)
    assert second.enter()
    second.client(POST)
    assert gate.in_flight == 2
    first.backend(OK)
    assert gate.in_flight == 1 and not first.counted
    second.release()  # closed in flight
    assert gate.in_flight == 0


@GATES
def test_an_entry_that_brings_nothing_is_not_counted(make: Make, make_gate: Make) -> None:
    gate = make_gate()
    exchange = make(gate)
    assert exchange.enter()
    exchange.settle()  # the read found a FIN, or nothing
    assert gate.in_flight == 0 and not exchange.counted


@GATES
def test_a_closed_gate_holds_back_the_next_request_of_an_idle_connection(
    make: Make, make_gate: Make
) -> None:
    gate = make_gate()
    busy, idle = make(gate), make(gate)
    busy.enter()
    busy.client(GET)
    assert not gate.close_if_idle() and gate.is_open  # a request in flight: stays open
    busy.backend(OK)
    assert gate.close_if_idle() and not gate.is_open
    assert not idle.enter() and gate.in_flight == 0  # held back, counted nothing
    gate.open()
    assert idle.enter() and gate.in_flight == 1


@GATES
def test_a_response_nobody_asked_for_is_counted_while_open(make: Make, make_gate: Make) -> None:
    gate = make_gate()
    exchange = make(gate)
    exchange.backend(OK)
    assert exchange.opaque and exchange.counted and gate.in_flight == 1
    exchange.release()
    assert gate.in_flight == 0


# --- the C twin answers as the reference does, whatever the bytes ------------------------

HEADERS = st.sampled_from(
    [
        b"Host: m",
        b"Content-Length: 0",
        b"Content-Length: 7",
        b"content-length:  12 ",
        b"Content-Length: 12345678901234567890",
        b"Content-Length: 1x",
        b"Transfer-Encoding: chunked",
        b"transfer-encoding: gzip, Chunked",
        b"Transfer-Encoding: gzip",
        b"Transfer-Encoding: chunked, gzip",
        b"Transfer-Encoding: ,",
        b" Folded: no",
        b"NoColon",
        b": empty name",
        b"Upgrade: websocket",
    ]
)
START_LINES = st.sampled_from(
    [
        b"GET / HTTP/1.1",
        b"POST /v1/completions HTTP/1.1",
        b"HEAD / HTTP/1.1",
        b"CONNECT h:1 HTTP/1.1",
        b"GET  HTTP/1.0",
        b"GET / HTTP/2.0",
        b"GET /  HTTP/1.1",
        b"\r\nGET / HTTP/1.1",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 100 Continue",
        b"HTTP/1.1 101 Switching",
        b"HTTP/1.1 204 No Content",
        b"HTTP/1.1 304 Not Modified",
        b"HTTP/1.0 200",
        b"HTTP/1.1 2x0 Odd",
        b"HTTP/1.1 099 Low",
        b"PRI * HTTP/2.0",
    ]
)
HEADS = st.builds(
    lambda start, headers: start + b"".join(b"\r\n" + h for h in headers) + b"\r\n\r\n",
    START_LINES,
    st.lists(HEADERS, max_size=3),
)
CHUNKS = st.sampled_from(
    [
        b"7\r\npayload\r\n",
        b"0\r\n\r\n",
        b"0\r\nX-T: 1\r\n\r\n",
        b"A;ext=1\r\n0123456789\r\n",
        b"+5\r\nhello\r\n",
        b"0x5\r\nhello\r\n",
        b"5\r\nhelloXX",
        b" 3 \r\nabc\r\n",
        b"12345678901234567\r\n",
    ]
)
# Whole requests and responses, fed in order most of the time, so that conversations stay
# well-formed long enough to reach every rule (HEAD, 204/304, interim responses, pipelining)
# before noise makes them opaque.
REQUESTS = st.sampled_from(
    [
        GET,
        POST,
        b"HEAD / HTTP/1.1\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"\r\nGET / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
    ]
)
RESPONSES = st.sampled_from(
    [
        OK,
        STREAM_HEAD + TOKEN + LAST,
        STREAM_HEAD + TOKEN + b"0\r\nX-T: 1\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nContent-Length: 4\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 4\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n" + OK,
        b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\nuntil close",
    ]
)
PIECES = st.one_of(HEADS, CHUNKS, st.binary(max_size=40), st.sampled_from([b"\r\n", b"payload"]))
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("client"), REQUESTS),
        st.tuples(st.just("backend"), RESPONSES),
        st.tuples(st.just("client"), REQUESTS),
        st.tuples(st.just("backend"), RESPONSES),
        st.tuples(st.sampled_from(["client", "backend"]), PIECES),
        st.tuples(st.sampled_from(["unseen-up", "unseen-down"]), st.integers(0, 20)),
        st.tuples(st.sampled_from(["enter", "settle", "close", "open"]), st.just(b"")),
    ),
    max_size=25,
)


def answers(exchange: Any, gate: Any) -> tuple[object, ...]:
    return (
        exchange.in_flight,
        exchange.opaque,
        exchange.budget(True),
        exchange.budget(False),
        exchange.counted,
        gate.in_flight,
        gate.is_open,
    )


@settings(max_examples=2000, deadline=None)
@given(STEPS, st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=8))
def test_the_c_exchange_answers_as_the_reference_does(
    steps: list[tuple[str, Any]], cuts: list[int]
) -> None:
    python_gate, c_twin_gate = reference.Gate(), c_gate()
    pair = [(reference.Exchange(python_gate), python_gate), (c_exchange(c_twin_gate), c_twin_gate)]
    pieces = itertools.cycle(cuts)
    for action, value in steps:
        for exchange, gate in pair:
            if action in ("client", "backend"):
                at = 0
                while at < len(value):
                    size = next(pieces)
                    getattr(exchange, action)(value[at : at + size])
                    at += size
            elif action.startswith("unseen"):
                exchange.unseen(action == "unseen-up", value)
            elif action == "enter":
                exchange.enter()
            elif action == "settle":
                exchange.settle()
            else:
                getattr(gate, action)()
        # (The cuts cycle on for the second one: the same bytes, split elsewhere.)
        assert answers(*pair[0]) == answers(*pair[1]), (action, value)
