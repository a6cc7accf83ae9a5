"""A client that closes frees its model (issue 12, point 8), and one that only half-closes
after its request still gets the whole answer.

large-model-proxy ends a connection when its client closes. lmproxy passes the FIN on (so
HTTP/1.0-style tools that half-close, such as `nc -N`, are answered) but stops counting the
connection at once: a model whose client left can be evicted, or idle-stopped, within about
a second, instead of when its abandoned answer ends.
"""

from __future__ import annotations

import concurrent.futures
import socket
import time
from pathlib import Path

from lmproxy.sandbox import Sandbox
from tests.e2e.helpers import (
    fake_model,
    free_port,
    http_get,
    install,
    journal,
    service_state,
    wait_for,
    write_config,
)

BODY = b'{"prompt": "a long prompt"}'
REQUEST = b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)


def slow_model(name: str, port: int, needs: int, first_token_s: float) -> dict[str, object]:
    """A model that thinks first_token_s before it answers (a long prompt)."""
    return fake_model(
        name, port, needs={"VRAM": needs}, extra_args=f"--first-token-delay {first_token_s}"
    )


def send_and_leave(port: int, in_flight: float = 0.5) -> float:
    """Sends a request, lets the model work on it, then closes for good (a client that
    gave up); returns when it closed."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.sendall(REQUEST)
    time.sleep(in_flight)
    conn.close()
    return time.monotonic()


def test_a_client_that_closes_frees_its_model_for_eviction(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """Observed before: the newcomer was served after 10.8 s, when the abandoned answer
    ended; now the newcomer evicts the model at once."""
    busy, newcomer = free_port(), free_port()
    config = write_config(
        tmp_path / "close.json",
        [
            slow_model("busy", busy, 16000, first_token_s=10),
            fake_model("newcomer", newcomer, needs={"VRAM": 20000}),
        ],
        MaxTimeToWaitForServiceToCloseConnectionBeforeGivingUpSeconds=60,
        SwapAfterWaitingSeconds=30,  # no swap: only the client's leaving can free busy
    )
    install(systemd_sandbox, config)
    assert http_get(busy)["model"] == "busy"  # loaded
    left = send_and_leave(busy)
    assert http_get(newcomer)["model"] == "newcomer"
    assert time.monotonic() - left < 2.5
    assert "evicting busy" in journal(systemd_sandbox, "LMPROXY_SERVICE=newcomer")


def test_a_client_that_closes_lets_its_model_stop_when_idle(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """Observed before: with a 3 s idle timeout the backend still ran 5 s after the client
    left (until its answer ended, 10 s later)."""
    port = free_port()
    service = slow_model("thinker", port, 1000, first_token_s=20)
    service["ShutDownAfterInactivitySeconds"] = 3
    install(systemd_sandbox, write_config(tmp_path / "idle.json", [service]))
    assert http_get(port)["model"] == "thinker"
    left = send_and_leave(port)
    wait_for(lambda: service_state(systemd_sandbox, "thinker") == "cold", timeout=15)
    assert time.monotonic() - left < 5.5


def test_a_client_that_half_closes_after_its_request_gets_the_whole_answer(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """`nc -N` and HTTP/1.0-style tools send the request, shut their sending side, and
    read the answer: a FIN is not a client that left."""
    port = free_port()
    service = slow_model("answerer", port, 1000, first_token_s=1.5)
    install(systemd_sandbox, write_config(tmp_path / "half.json", [service]))

    def half_close() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(REQUEST)
            conn.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        return data

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: half_close(), range(4)))  # a cold start, too
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert answer.count(b'"token"') == 5
        assert answer.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert service_state(systemd_sandbox, "answerer") == "running"


def test_a_raw_service_frees_its_model_when_the_client_closes(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """ "Protocol": "raw" counts every open connection, but not one whose client left."""
    busy, newcomer = free_port(), free_port()
    busy_service = slow_model("busy", busy, 16000, first_token_s=10)
    busy_service["Protocol"] = "raw"
    config = write_config(
        tmp_path / "raw-close.json",
        [busy_service, fake_model("newcomer", newcomer, needs={"VRAM": 20000})],
        MaxTimeToWaitForServiceToCloseConnectionBeforeGivingUpSeconds=60,
        SwapAfterWaitingSeconds=30,
    )
    install(systemd_sandbox, config)
    assert http_get(busy)["model"] == "busy"
    left = send_and_leave(busy)
    assert http_get(newcomer)["model"] == "newcomer"
    assert time.monotonic() - left < 2.5
