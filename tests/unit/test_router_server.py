"""The router's shell (lmproxy.router.server) in one process: real sockets, a real event loop,
upstreams that are plain asyncio servers doing exactly what each test needs (answering,
closing, stalling), and clients that write raw HTTP. What the end-to-end tests cannot
provoke on purpose: pipelining, chunked and 100-continue bodies, a pooled connection
closed under a request, a client leaving mid-answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from lmproxy.router.requestlog import RequestLog
from lmproxy.router.routing import Catalog, Listing, Upstream
from lmproxy.router.server import Router
from lmproxy.router.settings import Settings
from lmproxy.router.upstream import announce_close

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (Content-Length or chunked), as an upstream sees it."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                return head, body
            body += data[:-2]
    length = 0
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


def answer(document: object, status: str = "200 OK") -> bytes:
    body = json.dumps(document).encode()
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%b" % (status.encode(), len(body), body)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each request on the connection with what it received, until EOF."""
    try:
        while True:
            head, body = await read_request(reader)
            writer.write(answer({"head": head.decode(), "body": body.decode()}))
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


@asynccontextmanager
async def routed(
    handler: Handler = echo, *, timeout_s: int = 30, max_body: int = 10_000
) -> AsyncIterator[tuple[int, Router]]:
    upstream_server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = upstream_server.sockets[0].getsockname()[1]
    upstream = Upstream("svc", host="127.0.0.1", port=port)
    settings = Settings(
        Catalog({"svc": upstream}, [Listing("m", "svc")]), None, max_body, timeout_s, 0, Path("/")
    )
    loop = asyncio.get_running_loop()
    router = Router(loop, settings, RequestLog())
    server = await loop.create_server(router.client, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], router
    finally:
        server.close()
        router.close_idle()
        upstream_server.close()


async def exchange(port: int, data: bytes, answers: int = 1) -> list[tuple[int, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    found = []
    for _ in range(answers):
        found.append(await read_answer(reader))
    writer.close()
    return found


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, Any]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split()[1])
    if status == 100:
        return await read_answer(reader)
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    return status, json.loads(await reader.readexactly(length))


def post(body: bytes, *headers: bytes) -> bytes:
    extra = b"".join(h + b"\r\n" for h in headers)
    return b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n%bContent-Length: %d\r\n\r\n%b" % (
        extra,
        len(body),
        body,
    )


BODY = b'{"model": "m", "messages": []}'


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


def test_pipelined_requests_are_answered_in_order_each_routed() -> None:
    async def test() -> None:
        async with routed() as (port, _):
            unknown = b'{"model": "nope"}'
            found = await exchange(port, post(BODY) + post(unknown) + post(BODY), answers=3)
            assert [status for status, _ in found] == [200, 404, 200]
            assert found[0][1]["body"] == BODY.decode()
            # Hop-by-hop headers are not forwarded; the framing is the router's.
            assert "HTTP/1.1" in found[2][1]["head"]

    run(test)


def test_a_chunked_body_is_routed_and_forwarded_whole() -> None:
    async def test() -> None:
        async with routed() as (port, _):
            chunks = [BODY[:7], BODY[7:20], BODY[20:]]
            data = b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
            head = b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            ((status, document),) = await exchange(port, head + data)
            assert status == 200 and document["body"] == BODY.decode()
            assert "transfer-encoding: chunked" in document["head"].lower()

    run(test)


def test_expect_100_continue_is_answered_by_the_router_which_needs_the_body() -> None:
    async def test() -> None:
        async with routed() as (port, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            head = post(BODY, b"Expect: 100-continue").split(b"\r\n\r\n")[0] + b"\r\n\r\n"
            writer.write(head)
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(BODY)
            status, document = await read_answer(reader)
            assert status == 200 and "expect" not in document["head"].lower()
            writer.close()

    run(test)


def test_a_chunked_body_over_the_limit_gets_413_and_the_connection_ends() -> None:
    async def test() -> None:
        async with routed(max_body=100) as (port, _):
            head = b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + b"c8\r\n" + b"x" * 200 + b"\r\n")
            status, document = await read_answer(reader)
            assert status == 413 and document["error"]["code"] == "request_too_large"
            assert await reader.read() == b""
            writer.close()

    run(test)


def test_a_pooled_connection_closed_under_a_request_is_replaced_once() -> None:
    """The shim closes an idle connection whose model stopped; the request that was sent
    on it as it closed is sent again on a new one, not lost."""
    served = 0

    async def once_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal served
        await read_request(reader)
        served += 1
        writer.write(answer({"served": served}))
        await writer.drain()
        await read_request(reader)  # the next request arrives, and the connection ends
        writer.close()

    async def test() -> None:
        async with routed(once_per_connection) as (port, router):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for expected in (1, 2, 3):
                writer.write(post(BODY))
                assert await read_answer(reader) == (200, {"served": expected})
            writer.close()
            assert sum(len(pool) for pool in router.pools.values()) <= 1

    run(test)


def test_a_client_that_leaves_aborts_its_upstream_connection() -> None:
    upstream_gone = asyncio.Event()

    async def slow_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"6\r\ndata: \r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            upstream_gone.set()
        if await reader.read() == b"":
            upstream_gone.set()

    async def test() -> None:
        async with routed(slow_stream) as (port, router):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post(BODY))
            await reader.readuntil(b"data: ")
            writer.close()
            await asyncio.wait_for(upstream_gone.wait(), 2)
            assert not router.pools  # never given back

    run(test)


def test_no_answer_in_time_is_a_504_and_a_closed_one_a_502() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    async def closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()

    async def test() -> None:
        async with routed(silent, timeout_s=1) as (port, _):
            ((status, document),) = await exchange(port, post(BODY))
            assert status == 504 and document["error"]["code"] == "upstream_timeout"
        async with routed(closes) as (port, _):
            ((status, document),) = await exchange(port, post(BODY))
            assert status == 502 and "without answering" in document["error"]["message"]

    run(test)


def test_a_request_that_is_not_http_gets_a_400() -> None:
    async def test() -> None:
        async with routed() as (port, _):
            ((status, document),) = await exchange(port, b"\x16\x03\x01 hello\r\n\r\n")
            assert status == 400 and document["error"]["type"] == "invalid_request_error"

    run(test)


def test_a_client_that_asks_to_close_is_told_the_connection_ends_with_the_answer() -> None:
    async def keep_alive_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    async def test() -> None:
        async with routed(keep_alive_answer) as (port, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post(BODY, b"Connection: close"))
            answer = await reader.read()  # to the end: the router closes after it
            head = answer.split(b"\r\n\r\n")[0].lower()
            assert b"connection: close" in head and b"keep-alive" not in head
            assert answer.endswith(b"\r\n\r\n{}")
            writer.close()

    run(test)


def test_announce_close_rewrites_only_a_whole_head() -> None:
    head = b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\n{}"
    assert announce_close(head) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    assert announce_close(b"HTTP/1.1 200 OK\r\nContent-") == b"HTTP/1.1 200 OK\r\nContent-"
