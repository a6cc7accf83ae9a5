"""Clients waiting in a listening socket's backlog, counted as the kernel shows them."""

from __future__ import annotations

import socket

import pytest

from lmproxy.backlog import waiting_clients


@pytest.mark.parametrize(
    ("family", "address"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_clients_not_yet_accepted_are_counted(family: int, address: str) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((address, 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        assert waiting_clients(address, port) == 0
        clients = [socket.create_connection((address, port)) for _ in range(3)]
        try:
            assert waiting_clients(address, port) == 3
            accepted, _ = listener.accept()
            accepted.close()
            assert waiting_clients(address, port) == 2
            other = "::1" if address == "127.0.0.1" else "127.0.0.1"
            assert waiting_clients(other, port) == 0  # another address: another socket
        finally:
            for client in clients:
                client.close()


def test_nothing_listening_is_no_one_waiting() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert waiting_clients("127.0.0.1", port) == 0
