"""Relay engine: moves bytes between client and backend sockets with epoll and splice.

Design (measured against systemd-socket-proxyd by bench/relay.py; figures in the README):

* Event loops, each a thread that owns an ``epoll`` set, its connections and its pipes (a thread
  per connection costs too much per connection). ``os.splice`` and ``epoll_wait`` release the
  GIL, but the Python between them does not: on 2 CPUs, shared with the clients and the backend,
  a second loop cost more in GIL hand-overs than it gained (new connections, one at a time:
  about 8,500/s with two loops against 13,000/s with one; every other row equal or better with
  one). So one loop below 4 CPUs, two from 4 CPUs on, where a second loop has a core to run on.
* Bulk bytes never pass through Python: a direction splices socket -> pipe -> socket, with the
  pipe resized to 256 KiB like systemd-socket-proxyd does. Small messages (a request, a streamed
  token, a short response) are copied instead: one ``recv_into`` of up to 32 KiB and one
  ``send``, where splicing takes three calls (in, out, and the read that finds the socket
  drained, which raises in Python). A read that returns less than asked for found the socket
  drained, and no further read is needed: under edge triggering every byte that arrives later
  raises a new event, and a FIN that came with the bytes is reported by ``EPOLLRDHUP`` (nginx
  relies on the same). With one keep-alive connection, the relay then spends about what
  systemd-socket-proxyd spends per request (9.4 µs of CPU against its 9.2; 11.5 when every read
  was spliced). A read that fills the buffer switches the direction to splicing until a wakeup
  moves less than that. What the destination cannot take of a copied message is kept (at most
  32 KiB per direction) and sent before anything else is read.
* That copy, the commonest event of all, is made in C where ``lmproxy._fastcopy`` was built
  (the packages build it; a checkout builds it with ``tools/setup``): ``Copier.poll`` waits on
  the loop's epoll set and copies the plain reads of the sockets the loop allows it to (those
  of connections with nothing pending either way), with the GIL released; everything else
  comes back to this loop, which stays the one place that knows the relay's rules. With one
  keep-alive connection that saves about 2 µs of the interpreter per request (CPU per request
  0.85 to 0.90 of systemd-socket-proxyd's, 0.99 to 1.08 with the copy in Python); without the
  module the loop copies those reads itself.
* Sockets are registered once, edge-triggered, for both reading and writing; the loop remembers
  which side is readable / writable. That needs no ``epoll_ctl`` on the hot path and cannot spin
  on a level-triggered ``EPOLLHUP`` while a direction waits for its destination. One exception:
  while a direction waits for its destination, its source is watched without ``EPOLLIN``, so
  that segments arriving at a source that is not read then do not wake the loop one by one
  (bulk with one stream: 103 to 106 ms of CPU per GB instead of 108 to 128, with
  systemd-socket-proxyd at 56 to 115 in the same runs); small messages never wait, so the
  keep-alive path makes no ``epoll_ctl``.
* Backpressure: a source is read only while its pipe is empty. A pipe is full when its *slots*
  run out, which can happen well below its byte size, so a non-blocking splice into a non-empty
  pipe could answer EAGAIN while the socket still has data; with an empty pipe, EAGAIN can only
  mean that the socket is drained, which is what edge-triggered readiness tracking needs. When
  the destination cannot take the whole pipe (or copied message), the source is left alone
  until ``EPOLLOUT``.
* Each wakeup reads until EAGAIN, up to a few MiB per direction (one chunk per wakeup kept TCP
  windows small); a direction that still had data gets another turn after the other ready
  connections.
* A direction holds a pipe only while the pipe may have bytes in it: it takes one from its loop's
  pool just before it reads its source, and gives it back as soon as the pipe is known to be
  empty (everything written on, or a read that found nothing). An idle connection holds just its
  two sockets. A pipe still held when its connection ends in an error may hold bytes, which
  would be delivered to the next connection that got it: it is closed, never pooled.
* New connections: pairs can be handed in (``add``, from any thread: a queue and an eventfd
  wake-up), or, after ``accept_from``, the loops accept clients from the shared listener
  themselves (registered level-triggered with ``EPOLLEXCLUSIVE``, so one loop wakes per client)
  and connect each to the backend without blocking. That takes the hand-over between threads
  out of most connections: ``EPOLLEXCLUSIVE`` wakes the loops in a fixed order, so a loop that
  relays a few pairs more than another hands the clients it accepts over to that one. A client
  is counted in ``active`` in the same locked step as its ``accept()``, and
  ``stop_accepting_if_idle`` stops the loops in the same locked step as its check that nothing
  is open: the caller can base a promise on the count (the shim's ledger claim) with no window
  in which a client is accepted uncounted. Until its backend is connected, only the backend
  socket is watched and the client is not read; a client whose backend refuses, or does not
  answer within ``connect_timeout`` (a full accept queue drops SYNs), is given back to the
  caller unread, which retries it patiently (the shim's ``connect_patiently`` and its restart
  rules). An accept() error such as EMFILE, which a loop cannot wait out, stops the accepting
  and goes to the caller too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

try:
    from lmproxy._fastcopy import Copier as Copier  # noqa: PLC0414 (re-exported for the tests)
    from lmproxy._fastcopy import Exchange, Gate
except ImportError:  # built without a C compiler: the loop copies every message itself,
    Copier = None  # type: ignore[assignment,misc]
    # and follows HTTP with the reference framer (as fast as the copy it rides on).
    from lmproxy.exchange import Exchange, Gate  # type: ignore[assignment]

logger = logging.getLogger(__name__)

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# Bytes one direction may move per wakeup before the other connections of the loop get a turn.
_BUDGET = 4 * 1024 * 1024
# Empty pipes kept per loop; beyond that, a pipe given back is closed (after a burst of
# transfers the pool would otherwise keep two descriptors per direction that moved bytes at once).
_POOL_MAX = 256
_MAX_EVENTS = 512
_SOCKET_EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
# A source whose direction waits for its destination (see _Loop._mute).
_MUTED_EVENTS = _SOCKET_EVENTS & ~select.EPOLLIN
# EPOLLHUP (both directions shut down) counts as both: the next splice finds EOF or the error.
_READ_EVENTS = select.EPOLLIN | select.EPOLLHUP | select.EPOLLRDHUP
# The first read of a wakeup is copied through a buffer of this size (see the docstring).
_COPY_SIZE = 32 * 1024
# What a direction holds of a copied message when it holds nothing: one object for all (a
# memoryview each would add some 200 bytes to every direction).
_NOTHING_HELD = memoryview(b"")
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLHUP
# An event that is only "readable" (EPOLLOUT aside): no error, no hang-up, no FIN.
_PLAIN_READ_CHECK = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP
# Errors that end a connection in ordinary life (a peer went away): no log record for them.
_EXPECTED_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.EPIPE,
        errno.ENOTCONN,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EHOSTDOWN,
    }
)

# accept() errors that only concern the client that was being accepted.
_ACCEPT_SKIP = frozenset({errno.ECONNABORTED, errno.EPROTO})
# Clients one loop accepts per wakeup before its connections get a turn again.
_ACCEPT_BATCH = 16
# A loop that accepts a client while it relays this many pairs more than another loop hands the
# client over to that loop.
_BALANCE_SLACK = 4

_NEW, _RUNNING, _DONE = "new", "running", "done"


class _Add:
    __slots__ = ("backend", "client")

    def __init__(self, client: socket.socket, backend: socket.socket) -> None:
        self.client = client
        self.backend = backend


class _CloseAll:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class _Stop:
    __slots__ = ()


class _Resume:
    """The gate opened: read the clients held back at it."""

    __slots__ = ()


# Where the loops connect the clients they accept: family, address, and whether the clients
# are TCP (TCP_NODELAY) too.
_Backend = tuple[int, tuple[str, int] | tuple[str, int, int, int], bool]


class _Connect:
    """A client another loop accepted, for this one to connect and relay."""

    __slots__ = ("client", "target")

    def __init__(self, client: socket.socket, target: _Backend) -> None:
        self.client = client
        self.target = target


_Command = _Add | _Connect | _CloseAll | _Stop | _Resume


class _Direction:
    """One direction of a pair: src socket -> pipe -> dst socket."""

    __slots__ = (
        "copy",
        "dst",
        "dst_fd",
        "eof",
        "exchange",
        "held",
        "knocked",
        "more",
        "muted",
        "other",
        "pending",
        "pipe_r",
        "pipe_w",
        "rdhup",
        "readable",
        "shut",
        "src",
        "src_fd",
        "upstream",
        "writable",
    )

    def __init__(
        self,
        src: socket.socket,
        dst: socket.socket,
        connection: Exchange | None = None,
        upstream: bool = False,
    ) -> None:
        self.src = src
        self.src_fd = src.fileno()
        self.dst = dst
        self.dst_fd = dst.fileno()
        # Held only while it may have bytes in it (see _Loop._pump); -1 when not held.
        self.pipe_r = -1
        self.pipe_w = -1
        self.pending = 0  # bytes in the pipe (or in held), not yet written to dst
        # A copied message that dst could not take at once: the rest, sent before anything
        # else. Empty when the pending bytes (if any) are in the pipe.
        self.held = _NOTHING_HELD
        # Edge-triggered readiness: set by EPOLLIN / EPOLLOUT, cleared by EAGAIN. A new socket
        # is writable (its send buffer is empty), and a direction is not writable only while
        # it has bytes pending: the fast copier, which handles an EPOLLOUT of a connection
        # with nothing pending by ignoring it, relies on that.
        self.readable = False
        self.writable = True
        self.eof = False  # src has sent FIN
        self.rdhup = False  # epoll reported src's FIN (EPOLLRDHUP): read until EOF
        self.copy = True  # the first read of a wakeup is copied (small messages)
        self.shut = False  # ...and everything before it went to dst, then shutdown(SHUT_WR)
        self.more = False  # stopped for the per-wakeup budget with src still readable
        self.muted = False  # src is registered without EPOLLIN (see _Loop._mute)
        # HTTP: the connection's requests and responses (shared by both directions), and
        # whether this direction carries the requests; None for a raw service.
        self.exchange = connection
        self.upstream = upstream
        self.knocked = False  # a request held back at the closed gate (see _Loop._knock)
        self.other: _Direction | None = None  # the pair's other direction


class _Pair:
    __slots__ = (
        "backend",
        "client",
        "client_left",
        "closed",
        "deadline",
        "down",
        "exchange",
        "fds",
        "up",
    )

    def __init__(
        self, client: socket.socket, backend: socket.socket, connection: Exchange | None
    ) -> None:
        self.client = client
        self.backend = backend
        self.fds = (client.fileno(), backend.fileno())
        self.exchange = connection
        self.up = _Direction(client, backend, connection, upstream=True)
        self.down = _Direction(backend, client, connection)
        self.up.other, self.down.other = self.down, self.up
        self.closed = False
        self.deadline = 0.0  # while the backend connects: when to give the client back
        # The client sent its FIN: the pair no longer counts as in use (see _client_left).
        self.client_left = False


class _Loop:
    """One event loop thread. Everything but ``inbox``, ``signalled``, ``state`` and ``count``
    (guarded by the relay's lock) belongs to the loop thread alone."""

    def __init__(self, relay: Relay, index: int) -> None:
        self.relay = relay
        self.index = index
        self.pipe_size = relay._pipe_size
        self.state = _NEW
        self.inbox: list[_Command] = []
        self.signalled = False
        self.count = 0  # pairs handed to this loop and not yet closed
        self.epoll: select.epoll | None = None
        self.copier: Copier | None = None
        self.wake_fd = -1
        self.thread: threading.Thread | None = None
        self.pairs: set[_Pair] = set()
        self.fds: dict[int, tuple[_Pair, _Direction, _Direction]] = {}
        self.pool: list[tuple[int, int]] = []
        self.buffer = memoryview(bytearray(_COPY_SIZE))
        self.again: set[_Pair] = set()
        self.knocked: set[_Pair] = set()  # requests held back at the closed gate
        # Pairs whose backend connects (accepted by this loop), by the backend's descriptor, in
        # the order of their deadlines. Only the backend is watched until it is connected.
        self.connecting: dict[int, _Pair] = {}
        self.changed = False  # pairs added or closed since the last on_change call
        self.last_activity = time.monotonic()
        # With an idle timeout, how often pairs are looked at, and when next.
        self.sweep_every = relay._sweep_every
        self.next_sweep = 0.0

    # --- called by other threads, with the relay's lock held --------------------------------

    def open_locked(self) -> None:
        epoll = select.epoll()
        try:
            # An eventfd wakes the loop for new work; epoll_wait itself has no timeout, so an
            # idle loop costs no CPU.
            wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                epoll.register(wake_fd, select.EPOLLIN)
            except BaseException:
                os.close(wake_fd)
                raise
        except BaseException:
            epoll.close()
            raise
        self.epoll = epoll
        self.wake_fd = wake_fd
        if Copier is not None:
            self.copier = Copier(epoll.fileno(), _MAX_EVENTS)
        self.state = _RUNNING
        self.thread = threading.Thread(
            target=self._run, name=f"lmproxy-relay-{self.index}", daemon=True
        )

    def post_locked(self, command: _Command) -> None:
        self.inbox.append(command)
        if self.state == _RUNNING and not self.signalled:
            self.signalled = True
            os.eventfd_write(self.wake_fd, 1)

    def take_adds_locked(self) -> list[_Add | _Connect]:
        """Take back the pairs and clients queued for a loop that is not running (not started
        or ended)."""
        adds = [c for c in self.inbox if isinstance(c, _Add | _Connect)]
        for command in self.inbox:
            if isinstance(command, _CloseAll):
                command.done.set()
        self.inbox = []
        self.count -= len(adds)
        return adds

    # --- the loop thread ---------------------------------------------------------------------

    def _run(self) -> None:
        assert self.epoll is not None
        epoll = self.epoll
        copier = self.copier
        wake_fd = self.wake_fd
        fds = self.fds
        try:
            stop = self._handle_inbox()  # work queued before start()
            while not stop:
                if self.changed:
                    # One on_change call per wakeup, however many pairs came or went.
                    self.changed = False
                    self.relay._publish()
                # The pairs owed another turn from the last wakeup. Pairs that run out of
                # budget in this one go to a fresh set (the loop below must not iterate a set
                # that _service adds to and _close removes from).
                again: set[_Pair] | tuple[()] = self.again
                if again:
                    self.again = set()
                    timeout: float = 0
                else:
                    again = ()
                    timeout = self._poll_timeout() if self.connecting else -1
                    if self.sweep_every and self.pairs:
                        until = max(0.0, self.next_sweep - time.monotonic())
                        timeout = until if timeout < 0 else min(timeout, until)
                if copier is None:
                    events = epoll.poll(timeout, _MAX_EVENTS)
                    busy = False
                else:
                    handled, events, copied = copier.poll(
                        -1 if timeout < 0 else math.ceil(timeout * 1000)
                    )
                    busy = handled > 0
                    for fd, n, rest in copied:
                        self._copied(fd, n, rest)
                        busy = True
                wake = False
                for fd, mask in events:
                    entry = fds.get(fd)
                    if entry is None:
                        if fd == wake_fd:
                            wake = True
                        elif fd in self.connecting:
                            self._connected(self.connecting.pop(fd), mask)
                            busy = True
                        elif fd == self.relay._listen_fd:
                            self._accept()
                            busy = True
                        continue
                    if self._event(*entry, mask):
                        busy = True
                    if copier is not None:
                        self._allow(entry[0])
                for pair in again:
                    if not pair.closed and self._service(pair, pair.up, pair.down):
                        busy = True
                    if copier is not None:
                        self._allow(pair)
                if self.connecting:
                    self._expire_connects()
                if self.sweep_every and time.monotonic() >= self.next_sweep:
                    self._close_idle_pairs()
                if wake:
                    stop = self._handle_inbox()
                    busy = True
                if busy or self.changed:
                    self.last_activity = time.monotonic()
        except BaseException:
            logger.exception("relay loop %d failed; closing its connections", self.index)
        finally:
            self._finish()

    def _handle_inbox(self) -> bool:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.wake_fd)
        with self.relay._lock:
            commands = self.inbox
            self.inbox = []
            self.signalled = False
        stop = False
        for command in commands:
            if isinstance(command, _Add):
                self._register(command.client, command.backend)
            elif isinstance(command, _Connect):
                self._connect(command.client, command.target)
            elif isinstance(command, _CloseAll):
                self._close_pairs(give_back=True)
                command.done.set()
            elif isinstance(command, _Resume):
                self._resume()
            else:
                stop = True
        return stop

    def _register(self, client: socket.socket, backend: socket.socket) -> None:
        assert self.epoll is not None
        pair = _Pair(client, backend, self.relay._new_exchange())
        self.pairs.add(pair)
        client_fd, backend_fd = pair.fds
        try:
            # Edge-triggered registration reports the current state once, so data that arrived
            # before the pair was added is not missed.
            self.fds[client_fd] = (pair, pair.up, pair.down)
            self.epoll.register(client_fd, _SOCKET_EVENTS)
            self.fds[backend_fd] = (pair, pair.down, pair.up)
            self.epoll.register(backend_fd, _SOCKET_EVENTS)
        except (OSError, ValueError):
            logger.exception("relay: cannot watch a new connection; closing it")
            self._close(pair)
            return
        self._allow(pair)
        self.changed = True

    def _close_idle_pairs(self) -> None:
        """Closes the pairs that moved no byte either way for the relay's idle timeout
        (the kernel keeps the time of each TCP socket's last data: nothing is counted
        per byte here), and looks again after sweep_every."""
        limit_ms = self.relay._idle_timeout * 1000
        idle = [pair for pair in self.pairs if _idle_ms(pair) >= limit_ms]
        for pair in idle:
            self._close(pair)
        self.next_sweep = time.monotonic() + self.sweep_every
        if idle and self.relay._on_idle_closed is not None:
            self.relay._on_idle_closed(len(idle))

    def _accept(self) -> None:
        """Accept waiting clients (the relay counts each at once) and start their backends'
        connects. The listener is level-triggered: what is left of a batch comes back.
        A client beyond max_connections is closed at once (systemd-socket-proxyd's
        --connections-max does the same)."""
        refused: list[socket.socket] = []
        try:
            self._accept_batch(refused)
        finally:
            for client in refused:
                client.close()
            if refused and self.relay._on_refused is not None:
                self.relay._on_refused(len(refused))

    def _accept_batch(self, refused: list[socket.socket]) -> None:
        relay = self.relay
        for _ in range(_ACCEPT_BATCH):
            stopped: OSError | None = None
            with relay._lock:
                # Under the lock: stop_accepting_if_idle() cannot end the claim on the clients
                # between this accept and the count that covers them.
                listener, backend = relay._listener, relay._backend
                if listener is None or backend is None or self.state != _RUNNING:
                    return
                try:
                    client, _ = listener.accept()
                except BlockingIOError:
                    return
                except OSError as error:
                    if error.errno in _ACCEPT_SKIP:
                        continue
                    relay._stop_accepting_locked()
                    stopped = error
                else:
                    if relay._full_locked():
                        refused.append(client)
                        continue
                    owner = self._least_loaded_locked()
                    owner.count += 1
                    relay._active += 1
                    if owner is not self:
                        owner.post_locked(_Connect(client, backend))
                        continue
            if stopped is not None:
                # Out of descriptors, or worse: not for a loop to wait out. The caller takes
                # the listener back and handles the error its own way.
                if relay._on_accept_stopped is not None:
                    relay._on_accept_stopped(stopped)
                return
            # What was read under the lock: a stop_accepting() since then changes nothing for
            # this client, which is counted already.
            self._connect(client, backend)

    def _least_loaded_locked(self) -> _Loop:
        """The loop that is to relay a client this loop accepted: this one, unless it has
        _BALANCE_SLACK pairs more than another. EPOLLEXCLUSIVE wakes the loops in a fixed
        order, so without this an idle first loop would take every client."""
        if self.count < _BALANCE_SLACK:
            return self
        least = min(
            (loop for loop in self.relay._loops if loop.state == _RUNNING),
            key=lambda loop: loop.count,
        )
        return least if least.count + _BALANCE_SLACK <= self.count else self

    def _connect(self, client: socket.socket, target: _Backend) -> None:
        assert self.epoll is not None
        family, address, client_tcp = target
        backend = None
        try:
            client.setblocking(False)
            if client_tcp:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            backend = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = backend.connect_ex(address)
            if code not in (0, errno.EINPROGRESS):
                raise OSError(code, os.strerror(code))
            # Completion (or refusal) is the backend's first event.
            self.epoll.register(backend.fileno(), _SOCKET_EVENTS)
        except OSError:
            self._give_back(client, backend)
            return
        pair = _Pair(client, backend, self.relay._new_exchange())
        pair.deadline = time.monotonic() + self.relay._connect_timeout
        self.pairs.add(pair)
        self.connecting[pair.fds[1]] = pair
        self.changed = True

    def _connected(self, pair: _Pair, mask: int) -> None:
        """The backend's first event: connected (relay from now on) or refused (give back)."""
        if mask & (select.EPOLLERR | select.EPOLLHUP):
            self._give_back_pair(pair)
            return
        assert self.epoll is not None
        client_fd, backend_fd = pair.fds
        self.fds[backend_fd] = (pair, pair.down, pair.up)
        self.fds[client_fd] = (pair, pair.up, pair.down)
        try:
            # Reports what the client sent meanwhile (edge-triggered: the current state once).
            self.epoll.register(client_fd, _SOCKET_EVENTS)
        except (OSError, ValueError):
            logger.exception("relay: cannot watch a new connection; closing it")
            self._close(pair)
            return
        if mask & _READ_EVENTS:
            pair.down.readable = True
        self._service(pair, pair.down, pair.up)
        self._allow(pair)

    def _poll_timeout(self) -> float:
        first = next(iter(self.connecting.values()))
        return max(0.0, first.deadline - time.monotonic())

    def _expire_connects(self) -> None:
        """Give back the clients whose backend did not answer in time (a full accept queue
        drops SYNs; the caller retries them its own, patient way)."""
        now = time.monotonic()
        while self.connecting:
            fd, pair = next(iter(self.connecting.items()))
            if pair.deadline > now:
                return
            del self.connecting[fd]
            self._give_back_pair(pair)

    def _give_back_pair(self, pair: _Pair) -> None:
        """A pair whose backend never connected: the client goes back, unread."""
        assert self.epoll is not None
        pair.closed = True
        self.pairs.discard(pair)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(pair.fds[1])
        self._give_back(pair.client, pair.backend)

    def _give_back(self, client: socket.socket, backend: socket.socket | None) -> None:
        if backend is not None:
            backend.close()
        relay = self.relay
        relay._closed(self, 1)
        self.changed = True
        if relay._on_give_back is None:
            client.close()
            return
        try:
            client.setblocking(True)
            relay._on_give_back(client)
        except Exception:
            logger.exception("relay: giving back a client failed; closing it")
            client.close()

    def _event(self, pair: _Pair, out: _Direction, into: _Direction, mask: int) -> bool:
        """Act on the epoll event of one of a pair's sockets (the one ``out`` reads from and
        ``into`` writes to); True if anything happened."""
        if (
            mask & _PLAIN_READ_CHECK == select.EPOLLIN
            and out.copy
            and not out.pending
            and not into.pending
            and not out.eof
            and not out.knocked
            and (not out.upstream or out.exchange is None or out.exchange.enter())
        ):
            # The common case: a message (a request, a token) on a connection with nothing
            # pending. One copy, without the general path's bookkeeping, which is what a
            # keep-alive exchange costs beyond the system calls; anything else it leaves goes
            # on to the general path. (The fast copier does the same in C.)
            if mask & select.EPOLLOUT:
                into.writable = True
            out.readable = True
            try:
                busy = self._copy(out) > 0
            except OSError as exc:
                self._fail(pair, exc)
                return True
            if (out.readable or out.pending or out.eof) and self._service(pair, out, None):
                busy = True
            return busy
        if mask & select.EPOLLERR:
            # A reset (or another hard error) on either side ends both at once.
            self._close(pair)
            return True
        # Only the directions this socket's readiness can advance are pumped: a readable
        # socket feeds `out`, a writable one drains `into` (if it holds bytes: EPOLLOUT comes
        # along with every EPOLLIN).
        drain = None
        if mask & _WRITE_EVENTS:
            into.writable = True
            if into.pending:
                drain = into
        if mask & _READ_EVENTS:
            out.readable = True
            if mask & select.EPOLLRDHUP:
                out.rdhup = True
            return self._service(pair, out, drain)
        return drain is not None and self._service(pair, None, drain)

    def _copied(self, fd: int, n: int, rest: bytes | None) -> None:
        """Finish a read the fast copier made from ``fd`` (what ``_copy`` does after its
        ``recv_into`` and ``send``): ``n`` bytes read, 0 at EOF, -errno after an error;
        ``rest``: what the destination did not take."""
        entry = self.fds.get(fd)
        if entry is None:  # closed by an earlier result of the same wakeup
            return
        pair, out, _ = entry
        if n < 0:
            self._fail(pair, OSError(-n, os.strerror(-n)))
            return
        out.readable = True
        if n == 0:
            out.eof = True
        elif rest is not None:
            self._hold(out, rest)
        else:
            out.copy = False  # a full buffer: bulk, splice the rest
        self._service(pair, out, None)
        self._allow(pair)

    def _allow(self, pair: _Pair) -> None:
        """Tell the fast copier which of the pair's sockets it may copy from: those whose
        direction copies, has not seen the FIN, and whose connection holds nothing pending
        either way (so that no byte it copies overtakes another, and an EPOLLOUT it ignores
        had nothing to drain)."""
        copier = self.copier
        if copier is None or pair.closed:
            return
        quiet = not pair.up.pending and not pair.down.pending
        for d in (pair.up, pair.down):
            if quiet and d.copy and not d.eof and not d.rdhup and not d.knocked:
                copier.allow(d.src_fd, d.dst_fd, d.exchange, d.upstream)
            else:
                copier.deny(d.src_fd)

    def _service(self, pair: _Pair, first: _Direction | None, second: _Direction | None) -> bool:
        """Pump the given directions of a pair; True if anything happened."""
        try:
            moved = 0
            if first is not None:
                moved += self._pump(first)
            if second is not None:
                moved += self._pump(second)
            up, down = pair.up, pair.down
            if up.pending or down.pending or up.muted or down.muted:
                self._mute(up)
                self._mute(down)
        except OSError as exc:
            self._fail(pair, exc)
            return True
        if pair.up.shut and pair.down.shut:
            self._close(pair)
            return True
        if pair.up.knocked:
            if pair.down.eof:
                if _closed_by_client(pair.client):
                    # A FIN, not a request: the client closed its pooled connection as
                    # the backend went (a proxy's pool does). Given back, it would count
                    # as a client waiting and start the model again for nobody.
                    self._close(pair)
                else:
                    self._detach(pair)
                return True
            if pair not in self.knocked:
                return self._knock(pair) or moved > 0
        if pair.up.more or pair.down.more:
            self.again.add(pair)
        return moved > 0

    def _knock(self, pair: _Pair) -> bool:
        """A request held back at the closed gate: an idle connection's client sent
        something. A FIN (the client closed the connection it kept in its pool) ends the
        pair here; bytes wait unread until the gate opens (``_resume``: the shim heard of
        them and claimed again) or the backend goes (``_detach``). True if the pair was
        closed."""
        try:
            peeked = pair.client.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            pair.up.knocked = False  # nothing after all: the next byte raises an event
            pair.up.readable = False
            return False
        except OSError:
            peeked = b""
        if not peeked:
            self._close(pair)
            return True
        self.knocked.add(pair)
        self._allow(pair)
        self.relay._knocks_changed(1)
        return False

    def _detach(self, pair: _Pair) -> None:
        """A pair whose request is held at the gate and whose backend is gone (it closed
        the connection, or the shim closes every pair): the client goes back to the caller
        with its request unread, to be relayed to the backend's next start like a client
        that waited in the backlog. An HTTP client sees its connection carry on."""
        self._forget(pair)
        self._give_back(pair.client, pair.backend)

    def _resume(self) -> None:
        """The gate opened: relay the requests it held back."""
        knocked = list(self.knocked)
        self.knocked.clear()
        if knocked:
            self.relay._knocks_changed(-len(knocked))
        for pair in knocked:
            if pair.closed:
                continue
            pair.up.knocked = False
            self._service(pair, pair.up, None)
            self._allow(pair)

    def _mute(self, d: _Direction) -> None:
        """Watch d's source without EPOLLIN while d waits for its destination (bytes pending,
        dst full), and with it again once d's bytes are gone: a source that is not read
        should not wake the loop for each segment that arrives (see the module's docstring).
        epoll_ctl checks readiness again, so bytes that came meanwhile raise an event once
        unmuted."""
        blocked = d.pending > 0 and not d.writable
        if blocked != d.muted:
            assert self.epoll is not None
            self.epoll.modify(d.src_fd, _MUTED_EVENTS if blocked else _SOCKET_EVENTS)
            d.muted = blocked

    def _fail(self, pair: _Pair, exc: OSError) -> None:
        if exc.errno not in _EXPECTED_ERRNOS:
            logger.warning("relay: closing a connection after an unexpected error: %s", exc)
        self._close(pair)

    def _pump(self, d: _Direction) -> int:
        """Move one direction as far as readiness, the pipe and the budget allow.

        The direction holds a pipe only while it may have bytes in it: one is taken from the
        pool just before reading the source, and given back as soon as it is known empty
        again (everything written to dst, or a read that found nothing)."""
        moved = 0
        d.more = False
        while True:
            if d.pending:
                if not d.writable:
                    return moved
                try:
                    if d.held:
                        n = d.dst.send(d.held)
                        d.held = d.held[n:]
                    else:
                        n = os.splice(d.pipe_r, d.dst_fd, d.pending, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    # dst is full: leave src alone (bytes are pending) until EPOLLOUT.
                    d.writable = False
                    return moved
                if n <= 0:  # cannot happen with bytes pending; never spin on it
                    raise OSError(errno.EIO, "a write to the socket moved nothing")
                d.pending -= n
                moved += n
                continue
            # The pipe, if the direction holds one, is empty here.
            if d.eof:
                if d.other is not None and d.other.knocked:
                    return moved  # the backend closed: the held request goes elsewhere
                # Half-close: everything before the FIN has been delivered; pass the FIN on.
                if not d.shut:
                    if d.upstream:
                        self._client_left(d)
                    d.dst.shutdown(socket.SHUT_WR)
                    d.shut = True
                return moved
            if not d.readable or moved >= _BUDGET:
                if d.readable:
                    d.more = True
                if d.pipe_w >= 0:
                    self._give_pipe(d)
                return moved
            connection = d.exchange
            if d.knocked or (connection is not None and d.upstream and not connection.enter()):
                # An idle connection's next request, and the claim has ended: held, unread,
                # until _resume (the shim claimed again) or _detach (see _knock).
                d.knocked = True
                if d.pipe_w >= 0:
                    self._give_pipe(d)
                return moved
            size = self.pipe_size
            if connection is not None:
                # Bytes the framing must see (a head, a chunk's size) are copied; a body's
                # known rest may be spliced unseen.
                budget = connection.budget(d.upstream)
                if budget == 0:
                    moved += self._copy(d)
                    continue
                if budget is not None:
                    size = min(size, budget)
            if moved == 0 and d.copy:
                moved += self._copy(d)  # leaves the state that the next turn acts on
                continue
            if d.pipe_w < 0:
                d.pipe_r, d.pipe_w = self._take_pipe()
            try:
                n = os.splice(d.src_fd, d.pipe_w, size, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                # The pipe is empty, so EAGAIN means the socket is drained.
                d.readable = False
                self._give_pipe(d)
                d.copy = moved < _COPY_SIZE  # small again: copy the next wakeup's first read
                if connection is not None:
                    connection.settle()
                return moved
            if n == 0:
                d.eof = True
                self._give_pipe(d)
                if connection is not None:
                    connection.settle()
            else:
                d.pending = n
                if connection is not None:
                    connection.unseen(d.upstream, n)

    def _client_left(self, up: _Direction) -> None:
        """The client has closed its side (FIN), every byte it sent delivered: its pair no
        longer keeps the model in use, for eviction and idle stop alike, as when
        large-model-proxy ends such a connection. The answer still flows to it: a client
        that only half-closed after its request (HTTP/1.0-style tools, `nc -N`) gets it,
        unless the model is stopped first. A client that closed for good refuses the
        answer's first bytes with a reset, which ends the pair."""
        entry = self.fds.get(up.src_fd)
        if entry is None:
            return
        pair = entry[0]
        pair.client_left = True
        connection = up.exchange
        if connection is not None:
            # No request can follow a FIN: the framing has nothing left to decide, and the
            # connection must never count again (settle() would count it while in flight).
            connection.release()
            up.exchange = None
            assert up.other is not None
            up.other.exchange = None
            pair.exchange = None
        else:
            self.relay._client_left()
        self.changed = True
        self._allow(pair)

    def _copy(self, d: _Direction) -> int:
        """The first read of a wakeup, copied: the bytes read. Leaves src not readable when it
        was drained, or dst not writable with the rest held when dst was full."""
        buffer = self.buffer
        connection = d.exchange
        try:
            n = d.src.recv_into(buffer)
        except BlockingIOError:
            d.readable = False
            if connection is not None:
                connection.settle()
            return 0
        if n == 0:
            d.eof = True
            if connection is not None:
                connection.settle()
            return 0
        try:
            sent = d.dst.send(buffer[:n])
        except BlockingIOError:
            sent = 0
        if connection is not None:  # all n bytes go on (now, or held): shown as read
            if d.upstream:
                connection.client(buffer[:n])
            else:
                connection.backend(buffer[:n])
        if sent < n:
            # dst is full: the rest waits for EPOLLOUT, as spliced bytes do. It is kept here,
            # not in a pipe: a pipe made while the user is over fs.pipe-user-pages-soft holds
            # only 8 KiB. At most 32 KiB per direction, and only while its reader is slow.
            self._hold(d, bytes(buffer[sent:n]))
            return n
        if n < _COPY_SIZE and not d.rdhup:
            d.readable = False  # drained when read: the next byte raises a new event
            return n
        if n == _COPY_SIZE:
            d.copy = False  # bulk: splice the rest of this wakeup and the next ones
        return n

    @staticmethod
    def _hold(d: _Direction, rest: bytes) -> None:
        """Keep what dst did not take of a copied message, to send before anything else."""
        d.held = memoryview(rest)
        d.pending = len(rest)
        d.writable = False  # until EPOLLOUT

    def _give_pipe(self, d: _Direction) -> None:
        """Take back the pipe of a direction whose pipe is known to be empty."""
        if len(self.pool) < _POOL_MAX:
            self.pool.append((d.pipe_r, d.pipe_w))
        else:
            os.close(d.pipe_r)
            os.close(d.pipe_w)
        d.pipe_r = d.pipe_w = -1

    def _take_pipe(self) -> tuple[int, int]:
        if self.pool:
            return self.pool.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self.pipe_size)
        except PermissionError:
            # EPERM: above fs.pipe-max-size, or the user's pipe pages are spent
            # (fs.pipe-user-pages-soft). The default size works, only with more wakeups.
            pass
        except BaseException:
            os.close(r)
            os.close(w)
            raise
        return r, w

    def _close(self, pair: _Pair) -> None:
        if pair.closed:
            return
        self._forget(pair)
        for sock in (pair.client, pair.backend):
            with contextlib.suppress(OSError):
                sock.close()
        # A raw pair whose client left stops being counted as such in the same step.
        left = 1 if pair.client_left and self.relay._gate is None else 0
        self.relay._closed(self, 1, left=left)
        self.changed = True

    def _forget(self, pair: _Pair) -> None:
        """Stop watching a pair's sockets (left open) and let go of what it holds."""
        pair.closed = True
        self.pairs.discard(pair)
        self.again.discard(pair)
        if pair in self.knocked:
            self.knocked.discard(pair)
            self.relay._knocks_changed(-1)
        if pair.exchange is not None:
            pair.exchange.release()
        assert self.epoll is not None
        for fd in pair.fds:
            if self.copier is not None:
                self.copier.deny(fd)  # before the descriptor can be reused
            self.fds.pop(fd, None)
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(fd)
        for d in (pair.up, pair.down):
            if d.pipe_w < 0:
                continue
            # An empty pipe went back to the pool already. One still held here either has
            # bytes in it or met an error (a splice that failed may have left bytes): it is
            # closed, never pooled, so that no stale byte reaches the next connection.
            os.close(d.pipe_r)
            os.close(d.pipe_w)
            d.pipe_r = d.pipe_w = -1

    def _close_pairs(self, *, give_back: bool = False) -> None:
        """Close every pair; with ``give_back``, clients whose backend is still connecting
        and those whose request waits at the gate (their request unread either way) go
        back to the caller instead."""
        connecting = list(self.connecting.values())
        self.connecting.clear()
        self._end_each(connecting, self._give_back_pair if give_back else self._close)
        if give_back:
            self._end_each(list(self.knocked), self._detach)
        self._end_each(list(self.pairs), self._close)

    @staticmethod
    def _end_each(pairs: list[_Pair], end: Callable[[_Pair], None]) -> None:
        """End every pair, whatever one of them raises."""
        for pair in pairs:
            try:
                end(pair)
            except Exception:
                logger.exception("relay: error while closing a connection")

    def _finish(self) -> None:
        """Close everything this loop owns; also runs after a crash."""
        self._close_pairs()
        relay = self.relay
        with relay._lock:
            self.state = _DONE
            adds = self.take_adds_locked()
            # The last loop gone (a crash, or stop()): nobody accepts any more. The caller
            # must hear of it, or clients would wait in the backlog for a loop that is gone.
            orphaned = relay._listener is not None and all(
                loop.state != _RUNNING for loop in relay._loops
            )
            if orphaned:
                relay._stop_accepting_locked()
        if orphaned and relay._on_accept_stopped is not None:
            relay._on_accept_stopped(OSError(errno.ESHUTDOWN, "the relay loops ended"))
        if adds:
            relay._drop(adds)
        elif self.changed:
            relay._publish()
        self.changed = False
        for r, w in self.pool:
            os.close(r)
            os.close(w)
        self.pool.clear()
        if self.epoll is not None:
            self.epoll.close()
        if self.wake_fd >= 0:
            os.close(self.wake_fd)
            self.wake_fd = -1


# struct tcp_info (linux/tcp.h): eight one-byte fields, nine u32, then tcpi_last_data_sent,
# tcpi_last_ack_sent, tcpi_last_data_recv, in milliseconds ago.
_TCP_INFO = struct.Struct("=8B12I")
_NEVER_MS = 2**32


def _idle_ms(pair: _Pair) -> int:
    """How long ago the pair's sockets last sent or received data, in milliseconds:
    the freshest of the kernel's times for its TCP sockets (a unix socket has none)."""
    freshest = _NEVER_MS
    for sock in (pair.client, pair.backend):
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            continue
        try:
            info = _TCP_INFO.unpack(
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
            )
        except OSError:
            continue
        freshest = min(freshest, info[17], info[19])
    return 0 if freshest == _NEVER_MS else freshest


def default_loops() -> int:
    """One relay loop below 4 CPUs, two from 4 on (see the module's docstring)."""
    return 1 if len(os.sched_getaffinity(0)) < 4 else 2


def _no_delay(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # Forward each piece as soon as it arrives: the sender applied (or disabled) Nagle
        # already, and a second Nagle here can wait out a delayed ACK (40 ms).
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _closed_by_client(client: socket.socket) -> bool:
    """Whether what a readable client sent is its FIN (or a reset), not a request."""
    try:
        return not client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True


class Relay:
    """Relays bytes between pairs of connected sockets until both sides are done.

    ``on_change`` is called from a loop thread with the number of open pairs after pairs were
    added or closed. Calls never overlap and are made without any lock of the relay held (so
    the callback may call back into the relay); changes that happen while a call is running
    are folded into one later call, whose count is then current.

    After ``accept_from``, the loops also accept clients themselves and connect them to the
    backend. A client whose backend refuses or does not connect within ``connect_timeout`` goes
    to ``on_give_back`` (from a loop thread, unread: it was sent nothing), as do the clients
    still connecting when ``close_all`` is called; without the callback they are closed. An
    accept() error other than a client that gave up stops the accepting and is passed to
    ``on_accept_stopped`` (from a loop thread).

    With ``max_connections``, a client the loops accept while that many pairs are open is
    closed at once, and ``on_refused`` hears how many were (from a loop thread). With
    ``idle_timeout`` (seconds), a pair whose sockets sent and received no data for that
    long is closed, and ``on_idle_closed`` hears how many were.
    """

    def __init__(
        self,
        loops: int | None = None,
        pipe_size: int = 256 * 1024,
        on_change: Callable[[int], None] | None = None,
        *,
        on_give_back: Callable[[socket.socket], None] | None = None,
        on_accept_stopped: Callable[[OSError], None] | None = None,
        connect_timeout: float = 0.02,
        max_connections: int = 0,
        on_refused: Callable[[int], None] | None = None,
        idle_timeout: float = 0,
        on_idle_closed: Callable[[int], None] | None = None,
        http: bool = False,
        on_knock: Callable[[], None] | None = None,
    ) -> None:
        if loops is None:
            loops = default_loops()
        if loops < 1:
            raise ValueError("loops must be at least 1")
        if not 1 <= pipe_size <= 1 << 30:
            raise ValueError("pipe_size must be between 1 and 2**30 bytes")
        self._pipe_size = pipe_size
        self._on_change = on_change
        self._on_give_back = on_give_back
        self._on_accept_stopped = on_accept_stopped
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._on_refused = on_refused
        self._idle_timeout = idle_timeout
        self._on_idle_closed = on_idle_closed
        self._sweep_every = max(0.05, min(1.0, idle_timeout / 4)) if idle_timeout > 0 else 0.0
        # HTTP: connections are in use while a request is in flight (lmproxy.exchange).
        self._gate = Gate() if http else None
        self._on_knock = on_knock
        self._knocks = 0  # requests held back at the closed gate, over every loop
        # Set by accept_from(), cleared by the stop_accepting*() methods, under the lock.
        self._listener: socket.socket | None = None
        self._listen_fd = -1
        self._backend: _Backend | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0
        self._left = 0  # raw: open pairs whose client has sent its FIN
        self._started = False
        self._stopped = False
        self._publishing = False
        self._dirty = False
        self._created = time.monotonic()
        self._loops = [_Loop(self, i) for i in range(loops)]

    def start(self) -> None:
        """Start the loop threads (daemon threads). Pairs added before are picked up then."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("relay is stopped")
            if self._started:
                return
            opened: list[_Loop] = []
            try:
                for loop in self._loops:
                    loop.open_locked()
                    opened.append(loop)
            except BaseException:
                for loop in opened:
                    assert loop.epoll is not None
                    loop.epoll.close()
                    os.close(loop.wake_fd)
                    loop.epoll, loop.wake_fd, loop.state = None, -1, _NEW
                raise
            self._started = True
            # Started under the lock, so that a concurrent stop() finds them alive to join.
            for loop in self._loops:
                assert loop.thread is not None
                loop.thread.start()

    def add(self, client: socket.socket, backend: socket.socket) -> None:
        """Relay between two connected sockets, which the relay now owns (and closes).

        The caller must not use or close them afterwards: the loop works on their descriptors,
        and a descriptor closed behind its back may be reused by an unrelated file.
        Thread-safe. The pair goes to the loop with the fewest pairs.
        """
        if client.fileno() < 0 or backend.fileno() < 0:
            raise ValueError("socket is closed")
        for sock in (client, backend):
            sock.setblocking(False)
            _no_delay(sock)
        with self._lock:
            loops = [loop for loop in self._loops if loop.state != _DONE]
            if self._stopped or not loops:
                refused = True
            else:
                refused = False
                loop = min(loops, key=lambda candidate: candidate.count)
                loop.count += 1
                self._active += 1
                loop.post_locked(_Add(client, backend))
        if refused:
            client.close()
            backend.close()
            raise RuntimeError("relay is stopped")

    def accept_from(
        self,
        listener: socket.socket,
        family: int,
        address: tuple[str, int] | tuple[str, int, int, int],
    ) -> None:
        """Let the running loops accept clients from ``listener`` (non-blocking, shared by the
        loops with EPOLLEXCLUSIVE) and connect each to the TCP ``address`` of ``family``, until
        a stop_accepting*() call. Each client counts in ``active`` from the moment it is
        accepted."""
        with self._lock:
            if self._stopped or not self._started:
                raise RuntimeError("relay is not running")
            self._open_gate_locked()
            if self._listener is not None:
                return
            self._listener = listener
            self._listen_fd = listener.fileno()
            client_tcp = listener.family in (socket.AF_INET, socket.AF_INET6)
            self._backend = (family, address, client_tcp)
            for loop in self._loops:
                if loop.state == _RUNNING:
                    assert loop.epoll is not None
                    loop.epoll.register(self._listen_fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)

    @property
    def accepting(self) -> bool:
        with self._lock:
            return self._listener is not None

    def stop_accepting(self) -> None:
        """The loops accept no more clients once this returns (nor, for HTTP, start the
        next request of a connection that has none in flight: the gate closes)."""
        with self._lock:
            if self._gate is not None:
                self._gate.close()
            self._stop_accepting_locked()

    def stop_accepting_if_idle(self) -> bool:
        """Stop accepting if nothing is in use, atomically with that check: False (and
        nothing changed) if a pair is in use, even one that was accepted a moment ago.
        For HTTP, in use means a request in flight, and the gate closes in the same step:
        an idle connection's next request waits for ``open_gate`` (``on_knock``)."""
        with self._lock:
            if self._gate is not None:
                if not self._gate.close_if_idle():
                    return False
            elif self._active - self._left:
                return False
            self._stop_accepting_locked()
            return True

    def open_gate(self) -> None:
        """Let idle connections start requests again (HTTP), and relay those held back."""
        with self._lock:
            self._open_gate_locked()

    def _open_gate_locked(self) -> None:
        if self._gate is None or (self._gate.is_open and not self._knocks):
            return
        self._gate.open()
        if self._knocks:
            for loop in self._loops:
                if loop.state == _RUNNING:
                    loop.post_locked(_Resume())

    @property
    def in_use(self) -> int:
        """Pairs in use: for HTTP, those with a request in flight; else every open pair.
        Never a pair whose client has closed its side (see _Loop._client_left)."""
        if self._gate is not None:
            return self._gate.in_flight
        with self._lock:
            return self._active - self._left

    def _client_left(self) -> None:
        """From a loop thread, raw pairs only: one more open pair whose client left (it
        stops counting in _closed)."""
        with self._lock:
            self._left += 1

    @property
    def knocking(self) -> bool:
        """Whether requests wait at the closed gate (clients, for the shim to claim)."""
        with self._lock:
            return self._knocks > 0

    def _new_exchange(self) -> Exchange | None:
        return None if self._gate is None else Exchange(self._gate)

    def _knocks_changed(self, n: int) -> None:
        """From a loop thread: n requests more (or fewer) wait at the gate."""
        with self._lock:
            self._knocks += n
        if n > 0 and self._on_knock is not None:
            self._on_knock()

    def _stop_accepting_locked(self) -> None:
        if self._listener is None:
            return
        for loop in self._loops:
            if loop.state == _RUNNING:
                assert loop.epoll is not None
                with contextlib.suppress(OSError, ValueError):
                    loop.epoll.unregister(self._listen_fd)
        self._listener = None
        self._listen_fd = -1
        self._backend = None

    @property
    def full(self) -> bool:
        """Whether max_connections pairs are open (never, without a limit)."""
        with self._lock:
            return self._full_locked()

    def _full_locked(self) -> bool:
        return 0 < self._max_connections <= self._active

    @property
    def active(self) -> int:
        """Pairs currently open (including pairs handed over but not yet picked up)."""
        with self._lock:
            return self._active

    @property
    def last_activity(self) -> float:
        """``time.monotonic()`` of the last byte moved or pair added or closed.

        Each loop stamps it at most once per wakeup, so it costs nothing per byte.
        """
        return max(self._created, *(loop.last_activity for loop in self._loops))

    def wait_idle(self, timeout: float | None) -> bool:
        """Block until no pair is open (True) or until ``timeout`` seconds passed (False)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    def close_all(self) -> None:
        """Close every open pair at once (e.g. the backend died); clients whose backend is
        still connecting are given back instead (``on_give_back``).

        Returns when the loops have closed them; called from a loop thread (from
        ``on_change``), it only asks the loops to and returns.
        """
        waits: list[threading.Event] = []
        adds: list[_Add | _Connect] = []
        with self._lock:
            for loop in self._loops:
                if loop.state == _RUNNING:
                    command = _CloseAll()
                    loop.post_locked(command)
                    waits.append(command.done)
                else:
                    adds.extend(loop.take_adds_locked())
        self._drop(adds)
        if self._in_loop_thread():
            return
        for done in waits:
            done.wait()

    def stop(self) -> None:
        """Close every pair, stop and join the loops, close pooled pipes. Idempotent."""
        adds: list[_Add | _Connect] = []
        with self._lock:
            self._stopped = True
            self._stop_accepting_locked()
            for loop in self._loops:
                if loop.state == _RUNNING:
                    loop.post_locked(_Stop())
                elif loop.state == _NEW:
                    adds.extend(loop.take_adds_locked())
        self._drop(adds)
        current = threading.current_thread()
        for loop in self._loops:
            if loop.thread is not None and loop.thread is not current and loop.thread.is_alive():
                loop.thread.join()

    # --- internals ------------------------------------------------------------------------

    def _in_loop_thread(self) -> bool:
        current = threading.current_thread()
        return any(loop.thread is current for loop in self._loops)

    def _drop(self, adds: list[_Add | _Connect]) -> None:
        """Close pairs and clients that never reached a loop (their counts were already taken
        back)."""
        if not adds:
            return
        for add in adds:
            add.client.close()
            if isinstance(add, _Add):
                add.backend.close()
        self._closed(None, len(adds), counted=True)
        self._publish()

    def _closed(self, loop: _Loop | None, n: int, *, counted: bool = False, left: int = 0) -> None:
        """Count ``n`` pairs as closed, ``left`` of them counted in ``_left``. The caller
        publishes the change."""
        with self._lock:
            if loop is not None and not counted:
                loop.count -= n
            self._active -= n
            self._left -= left
            if self._active == 0:
                self._idle.notify_all()

    def _publish(self) -> None:
        """Report the current count through ``on_change``, never under the lock.

        One thread at a time delivers; others only mark the count dirty, so calls never
        overlap and cannot arrive out of order, and the last call carries the final count.
        """
        if self._on_change is None:
            return
        with self._lock:
            self._dirty = True
            if self._publishing:
                return
            self._publishing = True
        while True:
            with self._lock:
                if not self._dirty:
                    self._publishing = False
                    return
                self._dirty = False
                count = self._active
            try:
                self._on_change(count)
            except Exception:
                logger.exception("relay: on_change callback failed")
            except BaseException:
                with self._lock:
                    self._publishing = False
                raise
