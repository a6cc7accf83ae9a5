"""What a socket-activated lmproxy process gets from systemd, and tells it back."""

from __future__ import annotations

import os
import socket


def notify(*lines: str) -> None:
    """Tells systemd (Type=notify) about readiness and status, when under systemd."""
    if "NOTIFY_SOCKET" in os.environ:
        from systemd import daemon

        daemon.notify("\n".join(lines))


def inherited_listener(what: str = "lmproxy shim") -> socket.socket:
    """The listening socket systemd passed (LISTEN_FDS)."""
    from systemd import daemon

    fds = daemon.listen_fds()
    if len(fds) != 1:
        raise SystemExit(
            f"{what} expects exactly one socket from systemd, got {len(fds)}: "
            "it is meant to be started by its .socket unit"
        )
    return socket.socket(fileno=fds[0])
