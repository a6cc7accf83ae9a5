"""One client connection of the router: its requests, one at a time, each routed on its own.

httptools parses the requests; lmproxy.router.routing decides where each goes; the
router answers what it can itself (the model list, health, errors in OpenAI's shape) and
sends the rest through an `Exchange` (lmproxy.router.upstream). See ROUTER.md.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import TYPE_CHECKING, Any

import httptools

from lmproxy.router import answers
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
from lmproxy.router.settings import KeysFileError, service_states
from lmproxy.router.upstream import Exchange

if TYPE_CHECKING:
    from lmproxy.router.server import Router

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
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


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
        if request is self.requests[0]:
            self._route_body(request)

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
        else:
            self._route_body(request)

    # Requests

    def _begin(self, request: Request) -> None:
        """The request at the head of the queue: answer it, or find where it goes."""
        settings = self.router.settings
        route = classify(request.method, request.target.decode("latin-1"))
        request.route_kind = route.kind
        # Every route needs a key where there are keys, but /health: it says nothing more
        # than that the router answers, which a load balancer asks without one.
        authorized = (
            True if route.kind is Kind.HEALTH else settings.authorized(request.authorization)
        )
        if authorized is not True:
            refusal = (
                answers.keys_unreadable()
                if isinstance(authorized, KeysFileError)
                else answers.missing_key()
            )
            self.answer(request, refusal)
            return
        if route.kind is Kind.BODY:
            if (request.content_length or 0) > settings.max_body_bytes:
                self._refuse_connection(answers.too_large(settings.max_body_bytes))
                return
            boundary = multipart_boundary(request.content_type)
            if boundary is not None:
                request.multipart = MultipartModel(boundary)
            if request.expect_continue:
                self.transport.write(CONTINUE)
            self._route_body(request)  # (a pipelined one may have come whole already)
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
            self.answer(request, answers.wrong_method(request.method, route.path))
        else:
            self.answer(request, answers.unknown_url(request.method, route.path))

    def _route_body(self, request: Request) -> None:
        """Routes a request whose model is in its body once enough of the body is here:
        a multipart one up to its model field, a JSON one whole. (A body over the limit
        was refused as it came, in on_body.)"""
        if request.route_kind is not Kind.BODY or request.upstream is not None:
            return
        if request.answered:
            return
        if request.multipart is not None:
            self._route_multipart(request)
        elif request.complete:
            self._route(request, model_from_json(request.body))

    def _reply_model(self, request: Request, model: str) -> None:
        settings = self.router.settings
        for entry in settings.catalog.listing:
            if entry.id == model:
                state = service_states(settings.runtime_dir).get(entry.service, "stopped")
                self._reply(request, 200, answers.model_entry(entry, settings.created, state))
                return
        self.answer(request, unknown_model(model, [e.id for e in settings.catalog.listing]))

    def _route_multipart(self, request: Request) -> None:
        assert request.multipart is not None
        found = request.multipart.feed(bytes(request.body), complete=request.complete)
        if found is not None:
            request.multipart = None  # routed (or refused): the rest is forwarded
            self._route(request, found)

    def _route(self, request: Request, model: str | Refusal) -> None:
        if isinstance(model, Refusal):
            self.answer(request, model)
            return
        request.model = model
        upstream = self.router.settings.catalog.route(model)
        if isinstance(upstream, Refusal):
            self.answer(request, upstream)
            return
        request.upstream = upstream
        connection = self.router.take(upstream)
        if connection is not None:
            Exchange(self, request, connection, reused=True).start()
        else:
            self.router.loop.create_task(self.connect(request, upstream))

    async def connect(
        self, request: Request, upstream: Upstream, replay: list[bytes] | None = None
    ) -> None:
        """Sends request over a new connection to upstream: from its start, or again
        (replay: the bytes it was sent with before, on a connection found closed)."""
        try:
            connection = await self.router.connect(upstream)
        except OSError as error:
            if not self.closed:
                where = upstream.path or f"{upstream.host}:{upstream.port}"
                why = f"is not reachable at {where} ({error.strerror or error})"
                self.answer(request, answers.unavailable(upstream.service, why))
            return
        if self.closed:
            connection.close()
            return
        exchange = Exchange(self, request, connection, reused=False)
        if replay is None:
            exchange.start()
        else:
            exchange.resend(replay)

    # An answer of the router's own: the rest of the request's body, if any, is read and
    # dropped, and the connection goes on with the next request.

    def _reply(self, request: Request, status: int, document: object) -> None:
        request.answered = True
        keep = request.keep_alive
        head_only = request.method == "HEAD"
        data = answers.response(status, document, keep_alive=keep, head_only=head_only)
        self.transport.write(data)
        self.log(request, status, len(data))
        if request.complete:
            self._done(request)

    def answer(self, request: Request, refusal: Refusal) -> None:
        """An error in OpenAI's shape."""
        request.answered = True
        data = answers.error(refusal, keep_alive=request.keep_alive)
        self.transport.write(data)
        self.log(request, refusal.status, len(data), service=request.upstream)
        if request.complete:
            self._done(request)

    def _refuse_connection(self, refusal: Refusal) -> None:
        request = self.requests[0] if self.requests else (self.building or Request())
        request.answered = True
        if not self.closed:
            self.transport.write(answers.error(refusal, keep_alive=False))
            self.log(request, refusal.status, 0, service=request.upstream)
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

    def log(
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
