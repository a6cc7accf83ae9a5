"""A request sent to a service and its answer coming back (`Exchange`), over a connection
to that service's socket that carries one exchange at a time (`UpstreamConnection`).

The answer's bytes go to the client as they arrive; one httptools parser per connection
follows them only to know where each answer ends (the connection is reused), with what
status (the journal line), and whether it began (ResponseTimeoutSeconds). See ROUTER.md.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import httptools

from lmproxy.router import answers
from lmproxy.turnaway import reason_since

if TYPE_CHECKING:
    from lmproxy.router.client import ClientConnection, Request
    from lmproxy.router.routing import Upstream
    from lmproxy.router.server import Router

# A request whose bytes are kept to be sent again on a new connection, at most.
REPLAY_LIMIT = 1024 * 1024


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
        if not line[:11].lower().startswith((b"connection:", b"keep-alive:"))
    ]
    return b"\r\n".join([*lines, b"Connection: close"]) + data[end:]


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
                self.client.answer(request, answers.unavailable(service, f"cannot serve: {why}"))
            else:
                refusal = answers.bad_gateway(
                    service,
                    f"closed the connection without answering; see `lmproxy logs {service}`",
                )
                self.client.answer(request, refusal)
            return
        if self.status and not self.connection.parser.should_keep_alive():
            # A body that ends with the connection: this is its end.
            self.response_done = True
            self._finish(upstream_reusable=False, keep_alive=False)
            return
        self.fail_midway()

    def _retry(self) -> None:
        """The reused connection was closed (its model stopped while it idled): the
        request goes again, once, on a new connection."""
        request = self.request
        replay = request.replay or []
        request.exchange = None
        self._stop_timer()
        client = self.client
        client.router.loop.create_task(client.connect(request, self.connection.upstream, replay))

    def resend(self, replay: list[bytes]) -> None:
        """start() for a request sent before: its bytes as they went, whole."""
        request = self.request
        request.exchange = self
        self.connection.exchange = self
        self.body_sent = True
        request.replay = None  # not a third time
        for data in replay:
            self.connection.transport.write(data)
        self.client.router.awaiting(self)

    def timed_out(self, seconds: int) -> None:
        """From the router's sweep: no answer began before the deadline."""
        if self.first_byte is not None or self.cancelled:
            return
        self.cancelled = True
        self.connection.abort()
        self.request.exchange = None
        self.client.answer(
            self.request, answers.timed_out(self.connection.upstream.service, seconds)
        )

    def fail_midway(self) -> None:
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
        self.client.log(
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
                self.exchange.fail_midway()
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
