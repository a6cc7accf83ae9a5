"""The router's shell: client connections in (lmproxy.router.client), one exchange per
request, upstream out (lmproxy.router.upstream); here, what they share: the settings, the
pools of idle upstream connections, the response deadlines.

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
import time
from collections.abc import Callable

from lmproxy.router.client import ClientConnection
from lmproxy.router.requestlog import RequestLog
from lmproxy.router.routing import Upstream
from lmproxy.router.settings import Settings
from lmproxy.router.upstream import Exchange, UpstreamConnection

# Idle upstream connections are closed after this long (llama-server's keep-alive is 5 s).
POOL_IDLE_S = 2.0
POOL_MAX_IDLE = 256  # per service
DEADLINE_SWEEP_S = 0.5  # a 504 comes at most this late


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
