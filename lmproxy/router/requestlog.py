"""The router's journal lines: one per request, with structured fields.

Written straight to journald's native socket (one datagram per line, the protocol of
systemd.journal-fields(7)), without a blocking call: a line costs a few microseconds on
the hot path, and a journal that cannot keep up loses lines rather than slowing requests
(they are counted, and said once it keeps up again). Outside systemd, lines go to stderr.

Each request line carries SYSLOG_IDENTIFIER=lmproxy-openai, LMPROXY_EVENT=request,
LMPROXY_SERVICE (the service's name, so `lmproxy logs NAME` shows it), LMPROXY_MODEL,
LMPROXY_PATH, LMPROXY_STATUS, LMPROXY_DURATION_MS, LMPROXY_TTFB_MS, LMPROXY_BYTES_IN and
LMPROXY_BYTES_OUT. Nothing from the request's headers: an API key never reaches it.
"""

from __future__ import annotations

import os
import socket
import struct
import sys

IDENTIFIER = "lmproxy-openai"  # as its unit's own output
JOURNAL_SOCKET = "/run/systemd/journal/socket"
_PRIORITIES = {"error": 3, "warning": 4, "info": 6}
_REQUEST_FIELDS = b"PRIORITY=6\nSYSLOG_IDENTIFIER=%b\nLMPROXY_EVENT=request\n" % IDENTIFIER.encode()


class RequestLog:
    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.dropped = 0
        self.socket: socket.socket | None = None
        if "JOURNAL_STREAM" not in os.environ and "INVOCATION_ID" not in os.environ:
            return  # not under systemd: stderr
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.connect(path)
            sock.setblocking(False)
        except OSError:
            return
        self.socket = sock

    def request(
        self,
        *,
        service: str,
        model: str,
        method: str,
        path: str,
        status: int,
        duration_ms: float,
        ttfb_ms: float | None,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        """One request's line: written as one %-format of bytes, for it runs per request."""
        ttfb = "-" if ttfb_ms is None else f"{ttfb_ms:.1f}"
        message = (
            f"{method} {path} {model} -> {status} in {duration_ms:.1f} ms "
            f"(first byte {ttfb} ms, {bytes_in} B in, {bytes_out} B out)"
        )
        if self.socket is None:
            print(f"{IDENTIFIER} info: {message}", file=sys.stderr, flush=True)
            return
        # The client's words (the model, the path) may hold a newline: the binary form.
        datagram = (
            _field("MESSAGE", message)
            + _REQUEST_FIELDS
            + _field("LMPROXY_SERVICE", service)
            + _field("LMPROXY_MODEL", model)
            + _field("LMPROXY_PATH", path)
            + (
                b"LMPROXY_STATUS=%d\nLMPROXY_DURATION_MS=%.3f\nLMPROXY_TTFB_MS=%b\n"
                b"LMPROXY_BYTES_IN=%d\nLMPROXY_BYTES_OUT=%d\n"
                % (
                    status,
                    duration_ms,
                    b"" if ttfb_ms is None else b"%.3f" % ttfb_ms,
                    bytes_in,
                    bytes_out,
                )
            )
        )
        self._send(datagram)

    def send(self, level: str, message: str, *, event: str, **fields: object) -> None:
        """Any other line of the router's (started, reloaded, a problem)."""
        if self.socket is None:
            print(f"{IDENTIFIER} {level}: {message}", file=sys.stderr, flush=True)
            return
        parts = [
            _field("MESSAGE", message),
            _field("PRIORITY", str(_PRIORITIES[level])),
            _field("SYSLOG_IDENTIFIER", IDENTIFIER),
            _field("LMPROXY_EVENT", event),
        ]
        parts += [_field(f"LMPROXY_{key.upper()}", str(value)) for key, value in fields.items()]
        self._send(b"".join(parts))

    def _send(self, datagram: bytes) -> None:
        assert self.socket is not None
        try:
            self.socket.send(datagram)
        except OSError:
            self.dropped += 1
            return
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            self.send("warning", f"{dropped} journal line(s) were lost", event="log-lost")


def _field(name: str, value: str) -> bytes:
    data = value.encode("utf-8", "surrogateescape")
    if b"\n" in data:  # the binary form: name, newline, 64-bit length, value
        return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return name.encode() + b"=" + data + b"\n"
