"""What "in use" means for a connection that speaks HTTP/1.1: a request in flight.

HTTP clients keep answered connections open in a pool (the OpenAI SDKs, Open WebUI,
LangChain...). Counted as in use, such a connection would keep its model loaded for
ever; the relay counts instead, per connection, whether a request is in flight: from
its first byte until the last byte of its response. That covers a long prompt being
processed with nothing sent yet, a response whose head came early and whose body is
slow, and a stream with pauses between tokens.

`Exchange` follows both directions' messages from their bytes: request heads (the
method, and the body's length or chunking), response heads (interim 1xx, no body for
HEAD, 204 and 304, a length, chunks, or until the connection closes) and bodies. The
relay feeds it what it reads, or where it moved bytes without looking at them (splice),
how many: `budget` says how many it may move unseen before the next byte the framing
needs to see. Whatever it cannot follow (a malformed or huge head, an upgrade, CONNECT,
a response nobody asked for, more than 64 requests pipelined) makes the connection opaque:
in use while open, as every connection of a raw service is.

`Gate` counts a relay's connections that have a request in flight, and holds back the next
request of an idle one while the shim has no claim (see `Gate`). The relay uses the C twins
of both (`lmproxy._fastcopy`, tested against these byte for byte) where they were built, so
that the fast copier follows what it copies without the interpreter.
"""

from __future__ import annotations

import enum
import threading
from collections import deque

# Longest head (or chunk-size line, or trailer section) followed; longer is opaque.
HEAD_LIMIT = 64 * 1024
# Requests whose responses have not ended, at most (pipelining deeper is opaque).
MAX_PENDING = 64
# Content-Length digits, at most (no body is longer).
MAX_LENGTH_DIGITS = 18
_UNLIMITED = -1
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


class _State(enum.Enum):
    HEAD = enum.auto()  # between messages, or inside a head
    LENGTH = enum.auto()  # a body of known length
    CHUNK_SIZE = enum.auto()  # a chunk-size line
    CHUNK_DATA = enum.auto()
    CHUNK_END = enum.auto()  # the CRLF after a chunk's data
    TRAILERS = enum.auto()  # after the last chunk: trailer lines, then an empty line
    UNTIL_CLOSE = enum.auto()  # a response body that ends with the connection


class FramingError(Exception):
    """The bytes do not follow HTTP/1.1 as this module understands it."""


class Gate:
    """How many of a relay's connections have a request in flight, and whether an idle one
    may start the next (open) or must wait, unread, for the shim's claim (closed).

    ``Exchange.enter`` counts a connection and then looks whether the gate is open;
    ``close_if_idle`` closes it and then looks whether anything is counted: one of the two
    sees the other, so no request starts unseen once the claim has ended. (Here a lock makes
    each step atomic; the C twin uses sequentially consistent atomics.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0
        self.is_open = True

    def close_if_idle(self) -> bool:
        with self._lock:
            if self.in_flight:
                return False
            self.is_open = False
            return True

    def close(self) -> None:
        with self._lock:
            self.is_open = False

    def open(self) -> None:
        with self._lock:
            self.is_open = True

    def _enter(self) -> bool:
        with self._lock:
            if not self.is_open:
                return False
            self.in_flight += 1
            return True

    def _add(self, n: int) -> None:
        with self._lock:
            self.in_flight += n


class _Direction:
    """One direction's messages: where each head, body and chunk ends."""

    def __init__(self) -> None:
        self.state = _State.HEAD
        self.buffer = bytearray()  # the head (or line) so far
        self.left = 0  # LENGTH, CHUNK_DATA: bytes left; CHUNK_END: CRLF bytes left

    @property
    def between(self) -> bool:
        """Between messages, with no byte of the next one yet."""
        return self.state is _State.HEAD and not self.buffer

    def budget(self) -> int:
        """How many bytes may pass unseen: _UNLIMITED, 0, or a count."""
        if self.state in (_State.LENGTH, _State.CHUNK_DATA):
            return self.left
        return _UNLIMITED if self.state is _State.UNTIL_CLOSE else 0

    def line(self, data: memoryview, at: int, terminator: bytes) -> tuple[bytes | None, int]:
        """Gathers bytes up to terminator: (those before it, or None while it has not
        come, and where reading goes on in data)."""
        before = len(self.buffer)
        self.buffer += data[at:]
        found = self.buffer.find(terminator, max(0, before - len(terminator) + 1))
        if found < 0:
            if len(self.buffer) > HEAD_LIMIT:
                raise FramingError("a head or line longer than 64 KiB")
            return None, len(data)
        text = bytes(self.buffer[:found])
        self.buffer.clear()
        return text, at + found + len(terminator) - before


class Exchange:
    """Whether a connection has a request in flight, from the bytes it carries."""

    def __init__(self, gate: Gate | None = None) -> None:
        self.up = _Direction()  # client to backend: requests
        self.down = _Direction()  # backend to client: responses
        self.opaque = False
        self.methods: deque[bytes] = deque()  # requests whose response has not ended
        self._connect = False  # the last request was CONNECT
        self.gate = gate
        self.counted = False  # holds one of the gate's in_flight

    @property
    def in_flight(self) -> bool:
        """A request has begun and its response has not ended (or the framing is lost)."""
        return self.opaque or bool(self.methods) or not self.up.between or not self.down.between

    # --- the gate ---------------------------------------------------------------------

    def enter(self) -> bool:
        """Counts the connection in its gate before its client is read: False if the gate
        is closed (nothing counted; the client must not be read)."""
        if self.gate is None or self.counted:
            return True
        self.counted = self.gate._enter()
        return self.counted

    def settle(self) -> None:
        """Counted exactly while in flight (also after a read that brought nothing)."""
        if self.gate is None:
            return
        busy = self.in_flight
        if self.counted != busy:
            # Counted without enter(): bytes nobody asked for made the connection opaque.
            self.counted = busy
            self.gate._add(1 if busy else -1)

    def release(self) -> None:
        """The connection is closed: no longer counted."""
        if self.gate is not None and self.counted:
            self.counted = False
            self.gate._add(-1)

    # --- what the relay tells ---------------------------------------------------------

    def budget(self, upstream: bool, /) -> int | None:
        """How many bytes of that direction may be moved without being shown to
        `client`/`backend` (None: any number; 0: the next one must be shown)."""
        if self.opaque:
            return None
        left = (self.up if upstream else self.down).budget()
        return None if left == _UNLIMITED else left

    def client(self, data: memoryview | bytes) -> None:
        """Bytes the client sent (a request, or part of one)."""
        self._follow(self.up, memoryview(data))
        self.settle()

    def backend(self, data: memoryview | bytes) -> None:
        """Bytes the backend sent (a response, or part of one)."""
        self._follow(self.down, memoryview(data))
        self.settle()

    def unseen(self, upstream: bool, n: int) -> None:
        """n bytes moved without being shown, within budget(upstream)."""
        self._unseen(upstream, n)
        self.settle()

    def _unseen(self, upstream: bool, n: int) -> None:
        if self.opaque or n <= 0:
            return
        direction = self.up if upstream else self.down
        if direction.state is _State.UNTIL_CLOSE:
            return
        if direction.state not in (_State.LENGTH, _State.CHUNK_DATA) or n > direction.left:
            self.opaque = True  # the relay moved bytes the framing needed to see
            return
        direction.left -= n
        self._advance(direction)

    # --- following the bytes ----------------------------------------------------------

    def _follow(self, direction: _Direction, data: memoryview) -> None:
        if self.opaque:
            return
        try:
            at = 0
            while at < len(data):
                if direction.state is not _State.HEAD:
                    at = self._body(direction, data, at)
                    continue
                head, at = direction.line(data, at, b"\r\n\r\n")
                if head is None:
                    return
                if direction is self.up:
                    self._request_head(head)
                else:
                    self._response_head(head)
        except FramingError:
            self.opaque = True

    def _request_head(self, head: bytes) -> None:
        lines = head.lstrip(b"\r\n").split(b"\r\n")  # empty lines before a request are allowed
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise FramingError("not an HTTP/1.x request line")
        method = parts[0]
        length, chunked = _framing(lines[1:], request=True)
        if len(self.methods) >= MAX_PENDING:
            raise FramingError("too many requests in flight")
        self.methods.append(method)
        self._connect = method == b"CONNECT"
        _begin_body(self.up, length, chunked, until_close=False)

    def _response_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status_line = lines[0]
        if not status_line.startswith(b"HTTP/1.") or len(status_line) < 12:
            raise FramingError("not an HTTP/1.x status line")
        if not status_line[9:12].isdigit():
            raise FramingError("no status code")
        status = int(status_line[9:12])
        if not self.methods:
            raise FramingError("a response to no request")
        if status == 101 or (self._connect and 200 <= status < 300):
            raise FramingError("the connection was upgraded")
        if 100 <= status < 200:
            return  # interim (100 Continue, 103 Early Hints): the final response follows
        length, chunked = _framing(lines[1:], request=False)
        if self.methods[0] == b"HEAD" or status in (204, 304):
            length, chunked = 0, False
        _begin_body(self.down, length, chunked, until_close=True)
        if self.down.state is _State.HEAD:
            self.methods.popleft()  # no body: the response has ended

    def _body(self, direction: _Direction, data: memoryview, at: int) -> int:
        """Follows one step of a body from at; where reading goes on."""
        match direction.state:
            case _State.UNTIL_CLOSE:
                return len(data)
            case _State.LENGTH | _State.CHUNK_DATA:
                taken = min(direction.left, len(data) - at)
                direction.left -= taken
                at += taken
            case _State.CHUNK_END:
                expected = b"\r\n"[2 - direction.left]
                if data[at] != expected:
                    raise FramingError("a chunk not followed by CRLF")
                direction.left -= 1
                at += 1
            case _State.CHUNK_SIZE:
                line, at = direction.line(data, at, b"\r\n")
                if line is not None:
                    size = _chunk_size(line)
                    direction.state, direction.left = (
                        (_State.TRAILERS, 0) if size == 0 else (_State.CHUNK_DATA, size)
                    )
                return at
            case _State.TRAILERS:
                line, at = direction.line(data, at, b"\r\n")
                if line == b"":
                    self._ended(direction)
                return at
        self._advance(direction)
        return at

    def _advance(self, direction: _Direction) -> None:
        """What follows a part of a body that is all there."""
        if direction.left:
            return
        if direction.state is _State.LENGTH:
            self._ended(direction)
        elif direction.state is _State.CHUNK_DATA:
            direction.state, direction.left = _State.CHUNK_END, 2
        elif direction.state is _State.CHUNK_END:
            direction.state = _State.CHUNK_SIZE

    def _ended(self, direction: _Direction) -> None:
        """A message's last byte came: a response ends its request's exchange."""
        direction.state = _State.HEAD
        if direction is self.down:
            self.methods.popleft()


def _framing(header_lines: list[bytes], *, request: bool) -> tuple[int | None, bool]:
    """A message's body: (its Content-Length or None, whether it is chunked)."""
    length: int | None = None
    codings: list[bytes] = []
    for raw in header_lines:
        name, colon, value = raw.partition(b":")
        if not colon or name != name.strip() or not name:
            raise FramingError("a malformed header line")
        key = name.lower()
        if key == b"content-length":
            text = value.strip()
            if (
                not text.isdigit()
                or len(text) > MAX_LENGTH_DIGITS
                or (length is not None and int(text) != length)
            ):
                raise FramingError("a bad or conflicting Content-Length")
            length = int(text)
        elif key == b"transfer-encoding":
            codings += [c.strip().lower() for c in value.split(b",") if c.strip()]
    if codings:
        if codings[-1] != b"chunked":
            if request:
                raise FramingError("a request body of unknown length")
            return None, False  # a response read until close
        return None, True  # Transfer-Encoding overrides Content-Length (RFC 9112 6.3)
    return length, False


def _begin_body(
    direction: _Direction, length: int | None, chunked: bool, *, until_close: bool
) -> None:
    if chunked:
        direction.state = _State.CHUNK_SIZE
    elif length:
        direction.state, direction.left = _State.LENGTH, length
    elif length is None and until_close:
        direction.state = _State.UNTIL_CLOSE
    else:
        direction.state = _State.HEAD  # no body


def _chunk_size(line: bytes) -> int:
    digits = line.split(b";", 1)[0].strip()
    if not digits or len(digits) > 16 or not _HEX_DIGITS.issuperset(digits):
        raise FramingError("a bad chunk size")
    return int(digits, 16)
