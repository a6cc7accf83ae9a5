"""A connection's request in flight, from its bytes: every case "in use" must cover
(a long prompt, an early head and a slow body, a paused stream) and every one it must
not (an answered connection left in a client's pool)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from lmproxy.exchange import Exchange

GET = b"GET /v1/models HTTP/1.1\r\nHost: m\r\n\r\n"
POST = b'POST /v1/completions HTTP/1.1\r\nHost: m\r\nContent-Length: 11\r\n\r\n{"a": "b"}\n'
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
EVENT = b'data: {"token": "tok"}\n\n'
TOKEN = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
LAST = b"0\r\n\r\n"


def fed(*steps: tuple[str, bytes]) -> Exchange:
    exchange = Exchange()
    for side, data in steps:
        getattr(exchange, side)(memoryview(data))
    return exchange


def test_an_answered_connection_is_not_in_use() -> None:
    exchange = Exchange()
    assert not exchange.in_flight
    exchange.client(memoryview(GET))
    assert exchange.in_flight
    exchange.backend(memoryview(OK))
    assert not exchange.in_flight  # left in the client's pool: the model may go


def test_the_first_byte_of_a_request_puts_it_in_use() -> None:
    assert fed(("client", b"P")).in_flight


def test_a_long_prompt_with_no_answer_yet_is_in_use() -> None:
    assert fed(("client", POST)).in_flight


def test_an_early_head_and_a_slow_body_are_in_use_until_the_last_byte() -> None:
    exchange = fed(("client", POST), ("backend", OK[:-1]))
    assert exchange.in_flight
    exchange.backend(memoryview(OK[-1:]))
    assert not exchange.in_flight


def test_a_stream_is_in_use_through_its_pauses_until_its_last_chunk() -> None:
    exchange = fed(("client", POST), ("backend", STREAM_HEAD))
    for _ in range(3):
        exchange.backend(memoryview(TOKEN))
        assert exchange.in_flight
    exchange.backend(memoryview(LAST))
    assert not exchange.in_flight


def test_trailers_end_a_chunked_body_at_the_empty_line() -> None:
    exchange = fed(("client", POST), ("backend", STREAM_HEAD + TOKEN + b"0\r\nX-T: 1\r\n"))
    assert exchange.in_flight
    exchange.backend(memoryview(b"\r\n"))
    assert not exchange.in_flight


def test_responses_without_a_body_end_at_their_head() -> None:
    head_request = b"HEAD / HTTP/1.1\r\nHost: m\r\n\r\n"
    assert not fed(("client", head_request), ("backend", OK[: -len(b"hello")])).in_flight
    for status in (b"204 No Content", b"304 Not Modified"):
        response = b"HTTP/1.1 " + status + b"\r\nContent-Length: 9\r\n\r\n"
        assert not fed(("client", GET), ("backend", response)).in_flight


def test_an_interim_response_is_not_the_end() -> None:
    exchange = fed(("client", POST), ("backend", b"HTTP/1.1 100 Continue\r\n\r\n"))
    assert exchange.in_flight
    exchange.backend(memoryview(OK))
    assert not exchange.in_flight


def test_pipelined_requests_are_in_use_until_every_response_ended() -> None:
    exchange = fed(("client", GET + POST), ("backend", OK))
    assert exchange.in_flight
    exchange.backend(memoryview(OK))
    assert not exchange.in_flight


def test_a_chunked_request_body_is_followed() -> None:
    request = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    exchange = fed(("client", request), ("backend", OK))
    assert not exchange.in_flight
    assert not exchange.opaque


def test_what_it_cannot_follow_is_in_use_while_open() -> None:
    until_close = b"HTTP/1.0 200 OK\r\n\r\nbody"
    assert fed(("client", GET), ("backend", until_close)).in_flight
    upgrade = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
    assert fed(("client", GET), ("backend", upgrade)).opaque
    assert fed(("client", b"\x16\x03\x01 not http at all\r\n\r\n")).opaque
    assert fed(("backend", OK)).opaque  # a response to no request
    assert fed(("client", b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n")).opaque
    assert fed(("client", b"G" * 70_000)).opaque  # a head past 64 KiB
    chunk_without_crlf = STREAM_HEAD + b"3\r\nabcX"
    assert fed(("client", GET), ("backend", chunk_without_crlf)).opaque


def test_bytes_moved_unseen_within_the_budget_are_counted() -> None:
    exchange = fed(("client", GET), ("backend", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"))
    assert exchange.budget(upstream=False) == 1000
    assert exchange.budget(upstream=True) == 0  # the next request's head must be seen
    exchange.unseen(False, 600)
    assert exchange.budget(upstream=False) == 400 and exchange.in_flight
    exchange.unseen(False, 400)
    assert not exchange.in_flight and exchange.budget(upstream=False) == 0


def test_bytes_moved_unseen_past_the_budget_lose_the_framing() -> None:
    exchange = fed(("client", GET), ("backend", OK[:-5]))
    exchange.unseen(False, 6)
    assert exchange.opaque and exchange.in_flight and exchange.budget(upstream=False) is None


CONVERSATION = [
    ("client", POST),
    ("backend", STREAM_HEAD + TOKEN + TOKEN + LAST),
    ("client", GET),
    ("backend", OK),
    ("client", b"HEAD / HTTP/1.1\r\n\r\n"),
    ("backend", b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"),
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_how_the_bytes_are_split_changes_nothing(cuts: list[int]) -> None:
    """Reads come in any sizes: fed in pieces, each exchange is in flight until its
    response's last byte, and the connection ends idle."""
    exchange = Exchange()
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
