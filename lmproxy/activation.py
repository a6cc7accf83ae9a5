"""What a socket-activated lmproxy process gets from systemd, and tells it back."""

from __future__ import annotations

import os
import resource
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


def raise_descriptor_limit() -> None:
    """Each connection a shim relays holds two descriptors (its sockets), and two more
    for each direction that is moving bytes (a pipe): up to six; each request the router
    carries holds two (client and upstream). systemd's default soft limit of 1024 would
    stop a shim near 170 connections and the router near 500. The hard limit (524288 by
    default) is ours to take."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
