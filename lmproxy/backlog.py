"""How many clients wait in a listening TCP socket's backlog, from /proc/net/tcp{,6}.

A model's clients wait there while it starts (its shim accepts them once it can serve
them), so the accept queue's length is the number of clients waiting for it: what
large-model-proxy's management API calls `waiting_connections`. For a socket in the
LISTEN state the kernel shows that length as its receive queue. No privilege is
needed: every socket of the network namespace is listed, only without its owner's
details for other users.
"""

from __future__ import annotations

import ipaddress
import struct

_LISTEN = "0A"
_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


def waiting_clients(address: str, port: int) -> int:
    """Clients accepted by the kernel but not yet by the program on address:port (an
    IP literal; a wildcard address counts as itself). 0 when nothing listens there."""
    wanted = ipaddress.ip_address(address)
    total = 0
    for table in _TABLES:
        try:
            with open(table, encoding="ascii") as file:
                next(file, None)  # the header
                for line in file:
                    total += _queued(line.split(), wanted, port)
        except FileNotFoundError:
            continue  # no IPv6 in this kernel
    return total


def _queued(
    fields: list[str], wanted: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> int:
    if len(fields) < 5 or fields[3] != _LISTEN:
        return 0
    local_hex, _, port_hex = fields[1].partition(":")
    if int(port_hex, 16) != port or _address(local_hex) != wanted:
        return 0
    return int(fields[4].partition(":")[2], 16)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The kernel prints an address's 32-bit words each as the number they are in memory
    (host byte order): written back to memory, they are the address's bytes again."""
    words = (int(text[i : i + 8], 16) for i in range(0, len(text), 8))
    return ipaddress.ip_address(b"".join(struct.pack("=I", word) for word in words))
