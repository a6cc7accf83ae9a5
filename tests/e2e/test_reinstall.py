"""A reinstall under load endangers no busy model (issue 12, point 9).

Shims started from the previous config keep running across `lmproxy install`. Before
config generations, such a shim reconciled the ledger with the services it knew: it
dropped the entry of a service the new config added, which the next shim re-adopted with
no connections and never used, the first LRU victim however busy.
"""

from __future__ import annotations

import concurrent.futures
import json
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
    service_status,
    wait_for,
    write_config,
)

BODY = b'{"prompt": "p"}'
REQUEST = b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)


def complete(port: int) -> bytes:
    """One streamed completion, read to its end."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(REQUEST)
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            chunk = conn.recv(65536)
            assert chunk, data
            data += chunk
    return data


def test_a_shim_of_the_old_config_keeps_the_new_services_entries(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    old, added, newcomer = free_port(), free_port(), free_port()
    old_model = fake_model("old", old, needs={"VRAM": 8000}, extra_args="--first-token-delay 4")
    install(systemd_sandbox, write_config(tmp_path / "v1.json", [old_model]))
    assert http_get(old)["model"] == "old"

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        old_request = pool.submit(complete, old)  # its shim, of the old config, stays busy
        time.sleep(0.5)
        added_model = fake_model(
            "added", added, needs={"VRAM": 8000}, extra_args="--first-token-delay 10"
        )
        newcomer_model = fake_model("newcomer", newcomer, needs={"VRAM": 10000})
        config = write_config(
            tmp_path / "v2.json",
            [old_model, added_model, newcomer_model],
            ResourcesAvailable={"VRAM": 24000},
        )
        install(systemd_sandbox, config)
        added_request = pool.submit(complete, added)
        wait_for(lambda: service_status(systemd_sandbox, "added")["connections"] == 1)
        old_request.result(timeout=30)  # its end: the old config's shim writes the ledger
        time.sleep(1.5)  # its claim ends, and it writes again
        assert service_status(systemd_sandbox, "added")["connections"] == 1
        shim_says = journal(systemd_sandbox, "LMPROXY_SERVICE=old")
        assert "the config was installed again" in shim_says
        assert "dropped added" not in journal(systemd_sandbox, "SYSLOG_IDENTIFIER=lmproxy-shim")

        # The newcomer needs room: old (idle now) is the one to go, not busy `added`.
        assert http_get(newcomer)["model"] == "newcomer"
        assert service_status(systemd_sandbox, "added")["state"] == "running"
        assert service_status(systemd_sandbox, "old")["state"] == "cold"
        assert "evicting old" in journal(systemd_sandbox, "LMPROXY_SERVICE=newcomer")
        added_request.cancel()
    ledger = json.loads(
        (Path(systemd_sandbox.env()["XDG_RUNTIME_DIR"]) / "lmproxy" / "ledger.json").read_text()
    )
    assert ledger["generation"] > 0
