"""The router's shell: client connections in, one exchange per request, upstream out.

Protocol-level asyncio (uvloop where installed): request heads are parsed by httptools,
the routing decision is lmproxy.router.routing's, and everything else is bytes. A
request's head is rewritten only for its framing and hop-by-hop headers; its body and the
whole response are forwarded as they come, so a stream's events reach the client as the
model writes them. Each request on a keep-alive connection is routed on its own.

Upstream connections go to each service's own socket (its shim: one path for start,
eviction, sleep), and are kept for reuse between requests. The shim counts a connection
as in use only while a request is in flight on it (lmproxy.exchange), so an idle pooled
connection never holds a model loaded, and one whose model was stopped meanwhile is
closed by the shim: a request that finds its reused connection closed before any answer
is sent again once, on a new one. A client that goes away (closes, or resets) cancels its
request: the upstream connection is aborted at once and never reused.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

import httptools

from lmproxy.router import answers
from lmproxy.router.requestlog import RequestLog
from lmproxy.router.routing import (
    Kind,
    MultipartModel,
    Refusal,
    Upstream,
    classify,
    model_from_json,
    model_from_query,
    multipart_boundary,
    unknown_model,
)
from lmproxy.router.settings import KeysFileError, Settings, service_states
from lmproxy.turnaway import reason_since

# Headers that belong to one connection, not to the request: never forwarded upstream.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
    }
)
# Idle upstream connections are closed after this long (llama-server's keep-alive is 5 s).
POOL_IDLE_S = 2.0
POOL_MAX_IDLE = 256  # per service
# A request whose bytes are kept to be sent again on a new connection, at most.
REPLAY_LIMIT = 1024 * 1024
DEADLINE_SWEEP_S = 0.5  # a 504 comes at most this late
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Router:
    """What every connection shares: the settings (replaced whole at a reload), the pools
    of idle upstream connections, and the request log."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, settings: Settings, log: RequestLog
    ) -> None:
        self.loop = loop
        self.settings = settings
        self.log = log
        self.pools: dict[Upstream, list[UpstreamConnection]] = {}
        self.clients: set[ClientConnection] = set()
        self._sweeping: asyncio.TimerHandle | None = None
        # Exchanges whose answer has not begun, under ResponseTimeoutSeconds: a sweep a
        # second while there are any, rather than a timer per request.
        self.waiting: set[Exchange] = set()
        self._deadlines: asyncio.TimerHandle | None = None

    def awaiting(self, exchange: Exchange) -> None:
        timeout = self.settings.response_timeout_s
        if not timeout:
            return
        exchange.deadline = time.monotonic() + timeout
        self.waiting.add(exchange)
        if self._deadlines is None:
            self._deadlines = self.loop.call_later(DEADLINE_SWEEP_S, self._sweep_deadlines)

    def _sweep_deadlines(self) -> None:
        self._deadlines = None
        now = time.monotonic()
        for exchange in [e for e in self.waiting if e.deadline <= now]:
            self.waiting.discard(exchange)
            exchange.timed_out(self.settings.response_timeout_s)
        if self.waiting:
            self._deadlines = self.loop.call_later(DEADLINE_SWEEP_S, self._sweep_deadlines)

    def client(self) -> ClientConnection:
        return ClientConnection(self)

    # Pools

    def take(self, upstream: Upstream) -> UpstreamConnection | None:
        pool = self.pools.get(upstream)
        while pool:
            connection = pool.pop()
            if not connection.closed:
                return connection
        return None

    def give_back(self, connection: UpstreamConnection) -> None:
        pool = self.pools.setdefault(connection.upstream, [])
        if connection.closed or len(pool) >= POOL_MAX_IDLE:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        pool.append(connection)
        if self._sweeping is None:
            self._sweeping = self.loop.call_later(POOL_IDLE_S, self._sweep)

    def _sweep(self) -> None:
        """Closes what stayed idle too long; runs only while something is pooled (an idle
        router takes no CPU)."""
        self._sweeping = None
        now = time.monotonic()
        pooled = False
        for upstream, pool in list(self.pools.items()):
            keep = [c for c in pool if not c.closed and now - c.idle_since < POOL_IDLE_S]
            for connection in pool:
                if connection not in keep:
                    connection.close()
            if keep:
                self.pools[upstream] = keep
                pooled = True
            else:
                del self.pools[upstream]
        if pooled:
            self._sweeping = self.loop.call_later(POOL_IDLE_S / 2, self._sweep)

    def reload(self, settings: Settings) -> None:
        """New settings for new requests; those in flight go on. Pools of services
        that are gone (or moved) are closed once idle: now."""
        self.settings = settings
        current = set(settings.catalog.upstreams.values())
        for upstream in [u for u in self.pools if u not in current]:
            for connection in self.pools.pop(upstream):
                connection.close()

    async def connect(self, upstream: Upstream) -> UpstreamConnection:
        factory: Callable[[], UpstreamConnection] = lambda: UpstreamConnection(self, upstream)  # noqa: E731
        if upstream.path is not None:
            _, protocol = await self.loop.create_unix_connection(factory, upstream.path)
        else:
            assert upstream.host is not None and upstream.port is not None
            _, protocol = await self.loop.create_connection(factory, upstream.host, upstream.port)
        return protocol

    def busy(self) -> bool:
        """Some client has a request that is not answered yet."""
        return any(client.requests for client in self.clients)

    def close_idle(self) -> None:
        for pool in self.pools.values():
            for connection in pool:
                connection.close()
        self.pools.clear()


def announce_close(data: bytes) -> bytes:
    """The first bytes of an answer whose connection ends after it, as a client that
    asked for that (or spoke HTTP/1.0) is told: `Connection: close` in its head, in place
    of what the model said. A head split across reads is left as it is (the connection
    ends all the same)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data
    lines = [
        line
        for line in data[:end].split(b"\r\n")
        if not line[:11].lower().startswith(b"connection:")
        and not line[:11].lower().startswith(b"keep-alive:")
    ]
    return b"\r\n".join([*lines, b"Connection: close"]) + data[end:]


class Request:
    """One request of a client connection, from its head to the end of its answer."""

    __slots__ = (
        "answered",
        "authorization",
        "body",
        "body_size",
        "chunked",
        "complete",
        "content_length",
        "content_type",
        "exchange",
        "expect_continue",
        "headers",
        "keep_alive",
        "method",
        "model",
        "multipart",
        "replay",
        "route_kind",
        "started",
        "target",
        "upstream",
    )

    def __init__(self) -> None:
        self.method = ""
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.content_type = b""
        self.authorization: bytes | None = None
        self.expect_continue = False
        self.body = bytearray()  # what came before the route was known
        self.body_size = 0
        self.complete = False
        self.route_kind: Kind | None = None
        self.multipart: MultipartModel | None = None
        self.upstream: Upstream | None = None
        self.model = ""
        self.exchange: Exchange | None = None
        self.replay: list[bytes] | None = []  # what was sent upstream, to send again
        self.started = time.monotonic()
        self.answered = False  # the router answered it itself

    @property
    def path(self) -> str:
        return self.target.split(b"?", 1)[0].decode("latin-1")

    def upstream_head(self) -> bytes:
        lines = [self.method.encode(), b" ", self.target, b" HTTP/1.1\r\n"]
        for name, value in self.headers:
            if name.lower() not in HOP_BY_HOP:
                lines += [name, b": ", value, b"\r\n"]
        if self.chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        else:
            lines += [b"Content-Length: ", str(self.content_length or 0).encode(), b"\r\n"]
        lines.append(b"\r\n")
        return b"".join(lines)

    def framed(self, data: bytes) -> bytes:
        """Body bytes as they go upstream: chunked bodies are chunked anew (httptools
        hands over their content)."""
        if not self.chunked or not data:
            return data
        return b"%x\r\n%b\r\n" % (len(data), data)


class ClientConnection(asyncio.Protocol):
    """One client connection: its requests, one at a time (pipelined ones wait)."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.requests: collections.deque[Request] = collections.deque()
        self.building: Request | None = None
        self.closed = False
        self.paused_reading = False

    # asyncio.Protocol

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.router.clients.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._malformed("protocol upgrades are not supported here")
        except httptools.HttpParserError as error:
            self._malformed(f"malformed HTTP request: {error}")

    def _malformed(self, why: str) -> None:
        """Bytes that are no request: a 400, unless an answer is on its way already (no
        answer can be cut into); the connection ends either way."""
        if self.closed:
            return
        exchange = self._active_exchange()
        if exchange is not None and exchange.first_byte is not None:
            exchange.cancel()
            self.close()
            return
        if exchange is not None:
            exchange.cancel()
        self._refuse_connection(Refusal(400, why))

    def eof_received(self) -> bool:
        # A client that closes its side has gone (as Go's and nginx's proxies read it):
        # what it asked for is cancelled.
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.router.clients.discard(self)
        for request in self.requests:
            if request.exchange is not None:
                request.exchange.cancel()
        self.requests.clear()

    def pause_writing(self) -> None:
        exchange = self._active_exchange()
        if exchange is not None:
            exchange.connection.pause_reading()

    def resume_writing(self) -> None:
        exchange = self._active_exchange()
        if exchange is not None:
            exchange.connection.resume_reading()

    # httptools' callbacks

    def on_message_begin(self) -> None:
        self.building = Request()

    def on_url(self, url: bytes) -> None:
        assert self.building is not None
        self.building.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.building
        assert request is not None
        request.headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length":
            request.content_length = int(value) if value.isdigit() else None
        elif lower == b"transfer-encoding":
            request.chunked = b"chunked" in value.lower()
        elif lower == b"content-type":
            request.content_type = value
        elif lower == b"authorization":
            request.authorization = value
        elif lower == b"expect":
            request.expect_continue = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        request = self.building
        assert request is not None
        request.method = self.parser.get_method().decode("latin-1")
        request.keep_alive = self.parser.should_keep_alive()
        if request.chunked:
            request.content_length = None
        self.requests.append(request)
        if len(self.requests) == 1:
            self._begin(request)
        elif not self.paused_reading:
            # Pipelined: its body waits in memory until its turn; read no further.
            self.paused_reading = True
            self.transport.pause_reading()

    def on_body(self, data: bytes) -> None:
        request = self.building
        assert request is not None
        request.body_size += len(data)
        if request.answered:
            return  # answered already: the rest of its body is read and dropped
        settings = self.router.settings
        if request.body_size > settings.max_body_bytes:
            # (Content-Length said so before any of it came; a chunked body says it late.)
            if request.exchange is not None:
                request.exchange.cancel()
            self._refuse_connection(answers.too_large(settings.max_body_bytes))
            return
        exchange = request.exchange
        if exchange is not None:
            exchange.send_body(data)
            return
        request.body += data
        if request is self.requests[0] and request.multipart is not None:
            self._route_multipart(request)

    def on_message_complete(self) -> None:
        request = self.building
        assert request is not None
        self.building = None
        request.complete = True
        if request.answered:
            self._done(request)
            return
        if request is not self.requests[0]:
            return
        if request.exchange is not None:
            request.exchange.end_body()
        elif request.upstream is None and request.route_kind is Kind.BODY:
            if request.multipart is not None:
                self._route_multipart(request)
            else:
                self._route(request, model_from_json(request.body))

    # Requests

    def _begin(self, request: Request) -> None:
        """The request at the head of the queue: answer it, or find where it goes."""
        settings = self.router.settings
        authorized = settings.authorized(request.authorization)
        if authorized is not True:
            refusal = (
                answers.keys_unreadable()
                if isinstance(authorized, KeysFileError)
                else answers.missing_key()
            )
            self._answer(request, refusal)
            return
        route = classify(request.method, request.target.decode("latin-1"))
        request.route_kind = route.kind
        if route.kind is Kind.BODY:
            if (request.content_length or 0) > settings.max_body_bytes:
                self._refuse_connection(answers.too_large(settings.max_body_bytes))
                return
            boundary = multipart_boundary(request.content_type)
            if boundary is not None:
                request.multipart = MultipartModel(boundary)
            if request.expect_continue:
                self.transport.write(CONTINUE)
            if request.body:
                self.on_body_so_far(request)
            elif request.complete:
                self.on_message_complete_so_far(request)
        elif route.kind is Kind.QUERY:
            self._route(request, model_from_query(route.query))
        elif route.kind is Kind.MODELS:
            states = service_states(settings.runtime_dir)
            document = answers.models_document(settings.catalog.listing, settings.created, states)
            self._reply(request, 200, document)
        elif route.kind is Kind.MODEL:
            self._reply_model(request, route.model or "")
        elif route.kind is Kind.HEALTH:
            self._reply(request, 200, {"status": "ok"})
        elif route.kind is Kind.WRONG_METHOD:
            self._answer(request, answers.wrong_method(request.method, route.path))
        else:
            self._answer(request, answers.unknown_url(request.method, route.path))

    def on_body_so_far(self, request: Request) -> None:
        """A pipelined request's body came before its turn."""
        if request.body_size > self.router.settings.max_body_bytes:
            self._refuse_connection(answers.too_large(self.router.settings.max_body_bytes))
        elif request.multipart is not None:
            self._route_multipart(request)
        elif request.complete:
            self._route(request, model_from_json(bytes(request.body)))

    def on_message_complete_so_far(self, request: Request) -> None:
        if request.multipart is not None:
            self._route_multipart(request)
        else:
            self._route(request, model_from_json(bytes(request.body)))

    def _reply_model(self, request: Request, model: str) -> None:
        settings = self.router.settings
        for entry in settings.catalog.listing:
            if entry.id == model:
                state = service_states(settings.runtime_dir).get(entry.service, "stopped")
                self._reply(request, 200, answers.model_entry(entry, settings.created, state))
                return
        self._answer(request, unknown_model(model, [e.id for e in settings.catalog.listing]))

    def _route_multipart(self, request: Request) -> None:
        assert request.multipart is not None
        found = request.multipart.feed(bytes(request.body), complete=request.complete)
        if found is not None:
            request.multipart = None  # routed (or refused): the rest is forwarded
            self._route(request, found)

    def _route(self, request: Request, model: str | Refusal) -> None:
        if isinstance(model, Refusal):
            self._answer(request, model)
            return
        request.model = model
        upstream = self.router.settings.catalog.route(model)
        if isinstance(upstream, Refusal):
            self._answer(request, upstream)
            return
        request.upstream = upstream
        connection = self.router.take(upstream)
        if connection is not None:
            Exchange(self, request, connection, reused=True).start()
        else:
            self.router.loop.create_task(self._connect(request, upstream))

    async def _connect(self, request: Request, upstream: Upstream) -> None:
        try:
            connection = await self.router.connect(upstream)
        except OSError as error:
            if not self.closed:
                where = upstream.path or f"{upstream.host}:{upstream.port}"
                why = f"is not reachable at {where} ({error.strerror or error})"
                self._answer(request, answers.unavailable(upstream.service, why))
            return
        if self.closed:
            connection.close()
            return
        Exchange(self, request, connection, reused=False).start()

    # An answer of the router's own: the rest of the request's body, if any, is read and
    # dropped, and the connection goes on with the next request.

    def _reply(self, request: Request, status: int, document: object) -> None:
        request.answered = True
        keep = request.keep_alive
        head_only = request.method == "HEAD"
        data = answers.response(status, document, keep_alive=keep, head_only=head_only)
        self.transport.write(data)
        self._log(request, status, len(data))
        if request.complete:
            self._done(request)

    def _answer(self, request: Request, refusal: Refusal) -> None:
        """An error in OpenAI's shape."""
        request.answered = True
        data = answers.error(refusal, keep_alive=request.keep_alive)
        self.transport.write(data)
        self._log(request, refusal.status, len(data), service=request.upstream)
        if request.complete:
            self._done(request)

    def _refuse_connection(self, refusal: Refusal) -> None:
        request = self.requests[0] if self.requests else (self.building or Request())
        request.answered = True
        if not self.closed:
            self.transport.write(answers.error(refusal, keep_alive=False))
            self._log(request, refusal.status, 0, service=request.upstream)
        self.close()

    def finished(self, request: Request, *, keep_alive: bool) -> None:
        """Its exchange is over: the answer went out whole. (A request still sending its
        body when its answer ended is rare enough to end its connection.)"""
        request.answered = True
        if not keep_alive or not request.complete:
            self.close()
            return
        self._done(request)

    def _done(self, request: Request) -> None:
        if self.requests and self.requests[0] is request:
            self.requests.popleft()
        if not request.keep_alive:
            self.close()
            return
        if self.requests:
            self._begin(self.requests[0])
        if self.paused_reading and len(self.requests) <= 1 and not self.closed:
            self.paused_reading = False
            self.transport.resume_reading()

    def _active_exchange(self) -> Exchange | None:
        return self.requests[0].exchange if self.requests else None

    def _log(
        self,
        request: Request,
        status: int,
        bytes_out: int,
        *,
        service: Upstream | None = None,
        ttfb_ms: float | None = None,
    ) -> None:
        self.router.log.request(
            service=service.service if service is not None else "-",
            model=request.model or "-",
            method=request.method or "-",
            path=request.path,
            status=status,
            duration_ms=(time.monotonic() - request.started) * 1000,
            ttfb_ms=ttfb_ms,
            bytes_in=request.body_size,
            bytes_out=bytes_out,
        )

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()


class Exchange:
    """One request sent upstream and its answer coming back."""

    __slots__ = (
        "body_sent",
        "bytes_out",
        "cancelled",
        "client",
        "connection",
        "deadline",
        "first_byte",
        "replayed",
        "request",
        "response_done",
        "reused",
        "status",
    )

    def __init__(
        self,
        client: ClientConnection,
        request: Request,
        connection: UpstreamConnection,
        *,
        reused: bool,
    ) -> None:
        self.client = client
        self.request = request
        self.connection = connection
        self.reused = reused
        self.status = 0
        self.first_byte: float | None = None
        self.bytes_out = 0
        self.response_done = False
        self.body_sent = False
        self.deadline = 0.0  # when its answer must have begun (0: no limit)
        self.cancelled = False
        self.replayed = 0  # bytes kept in request.replay

    def start(self) -> None:
        request = self.request
        request.exchange = self
        self.connection.exchange = self
        data = request.upstream_head()
        if request.body:
            data += request.framed(bytes(request.body))
            request.body = bytearray()
        if request.complete:
            data += b"0\r\n\r\n" if request.chunked else b""
            self.body_sent = True
        self._send(data)
        self.client.router.awaiting(self)

    def _send(self, data: bytes) -> None:
        replay = self.request.replay
        if replay is not None:
            replay.append(data)
            self.replayed += len(data)
            if self.replayed > REPLAY_LIMIT:
                self.request.replay = None
        self.connection.transport.write(data)

    def send_body(self, data: bytes) -> None:
        self._send(self.request.framed(data))

    def end_body(self) -> None:
        if self.request.chunked:
            self._send(b"0\r\n\r\n")
        self.body_sent = True

    # Upstream's bytes

    def received(self, data: bytes) -> None:
        """The model's bytes, to the client as they are (the answer's head is told that the
        connection ends with it when the client asked for that)."""
        if self.first_byte is None:
            self.first_byte = time.monotonic()
            self._stop_timer()
            if not self.request.keep_alive:
                data = announce_close(data)
        self.bytes_out += len(data)
        self.client.transport.write(data)

    def headers_complete(self, status: int) -> None:
        self.status = status

    def message_complete(self, keep_alive: bool) -> None:
        if 100 <= self.status < 200:
            return  # an interim answer: the final one follows
        self.response_done = True
        self._finish(upstream_reusable=keep_alive and self.body_sent, keep_alive=keep_alive)

    def upstream_closed(self) -> None:
        """The upstream connection ended before the answer did."""
        if self.cancelled or self.response_done:
            return
        if self.first_byte is None:
            request = self.request
            if self.reused and request.replay is not None and self.body_sent:
                self._retry()
                return
            self._stop_timer()
            request.exchange = None
            why = reason_since(
                self.client.router.settings.runtime_dir,
                self.connection.upstream.service,
                request.started - 1.0,
            )
            service = self.connection.upstream.service
            if why is not None:
                self.client._answer(request, answers.unavailable(service, f"cannot serve: {why}"))
            else:
                refusal = answers.bad_gateway(
                    service,
                    f"closed the connection without answering; see `lmproxy logs {service}`",
                )
                self.client._answer(request, refusal)
            return
        if self.status and not self.connection.parser.should_keep_alive():
            # A body that ends with the connection: this is its end.
            self.response_done = True
            self._finish(upstream_reusable=False, keep_alive=False)
            return
        self._fail_midway()

    def _retry(self) -> None:
        """The reused connection was closed (its model stopped while it idled): the
        request goes again, once, on a new connection."""
        request = self.request
        replay = request.replay or []
        request.exchange = None
        self._stop_timer()
        client = self.client

        async def again() -> None:
            upstream = self.connection.upstream
            try:
                connection = await client.router.connect(upstream)
            except OSError as error:
                if not client.closed:
                    why = f"is not reachable ({error.strerror or error})"
                    client._answer(request, answers.unavailable(upstream.service, why))
                return
            if client.closed:
                connection.close()
                return
            exchange = Exchange(client, request, connection, reused=False)
            request.exchange = exchange
            connection.exchange = exchange
            exchange.body_sent = True
            request.replay = None
            for data in replay:
                connection.transport.write(data)
            client.router.awaiting(exchange)

        client.router.loop.create_task(again())

    def timed_out(self, seconds: int) -> None:
        """From the router's sweep: no answer began before the deadline."""
        if self.first_byte is not None or self.cancelled:
            return
        self.cancelled = True
        self.connection.abort()
        self.request.exchange = None
        self.client._answer(
            self.request, answers.timed_out(self.connection.upstream.service, seconds)
        )

    def _fail_midway(self) -> None:
        """The answer broke off (or was not HTTP): the client's connection ends with it,
        the only way left to say so."""
        self._stop_timer()
        self.cancelled = True
        self.connection.abort()
        self._log(self.status or 502)
        self.client.close()

    def _finish(self, *, upstream_reusable: bool, keep_alive: bool) -> None:
        self._stop_timer()
        request = self.request
        request.exchange = None
        self.connection.exchange = None
        self._log(self.status)
        if upstream_reusable:
            self.client.router.give_back(self.connection)
        else:
            self.connection.close()
        self.client.finished(request, keep_alive=keep_alive)

    def cancel(self) -> None:
        """The client went away: the model stops working for it now."""
        if self.response_done or self.cancelled:
            return
        self.cancelled = True
        self._stop_timer()
        self.connection.abort()
        self._log(499)

    def _stop_timer(self) -> None:
        if self.deadline:
            self.deadline = 0.0
            self.client.router.waiting.discard(self)

    def _log(self, status: int) -> None:
        ttfb = None if self.first_byte is None else (self.first_byte - self.request.started) * 1000
        self.client._log(
            self.request,
            status,
            self.bytes_out,
            service=self.connection.upstream,
            ttfb_ms=ttfb,
        )


class UpstreamConnection(asyncio.Protocol):
    """A connection to a service's socket; carries one exchange at a time."""

    def __init__(self, router: Router, upstream: Upstream) -> None:
        self.router = router
        self.upstream = upstream
        self.transport: Any = None
        self.exchange: Exchange | None = None
        self.closed = False
        self.idle_since = 0.0
        # One parser for the connection's answers, one after the other: it says where each
        # ends (the connection is reused) and with what status (the journal line).
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            self.close()  # bytes nobody asked for: this connection is not to be trusted
            return
        exchange.received(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.exchange is not None:
                self.exchange._fail_midway()
            else:
                self.close()

    # httptools' callbacks, for the exchange under way

    def on_headers_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.headers_complete(self.parser.get_status_code())

    def on_message_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.message_complete(self.parser.should_keep_alive())

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.upstream_closed()

    def pause_writing(self) -> None:
        exchange = self.exchange
        if exchange is not None and not exchange.client.closed:
            exchange.client.transport.pause_reading()

    def resume_writing(self) -> None:
        exchange = self.exchange
        if exchange is not None and not exchange.client.closed:
            exchange.client.transport.resume_reading()

    def pause_reading(self) -> None:
        if not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.exchange = None
        self.transport.abort()
