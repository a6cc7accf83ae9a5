"""Faults, each a test: killed shims, crashing backends, a lost ledger, no D-Bus,
and the bugs large-model-proxy users reported, as named regression tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

from lmproxy.paths import Scope, paths_for
from lmproxy.sandbox import Sandbox
from tests.e2e.helpers import (
    fake_model,
    free_port,
    http_get,
    install,
    install_busy_and_newcomer,
    journal,
    lmproxy,
    main_pid,
    open_connection,
    request_on,
    status_json,
    turned_away,
    unit_state,
    wait_for,
    write_config,
)


def ledger_entries() -> dict[str, dict[str, object]]:
    path = paths_for(Scope.USER).ledger
    if not path.exists():
        return {}
    services: dict[str, dict[str, object]] = json.loads(path.read_text())["services"]
    return services


def assert_no_reservation_without_running_backend(sandbox: Sandbox) -> None:
    for name, entry in ledger_entries().items():
        if entry["reserved"]:
            assert unit_state(sandbox, f"lmproxy-backend@{name}.service") in (
                "active",
                "activating",
                "deactivating",
            ), (name, entry)


def test_shim_killed_while_starting_its_backend(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    port = free_port()
    install(
        systemd_sandbox,
        write_config(tmp_path / "c.json", [fake_model("m", port, needs={"VRAM": 1}, delay=2)]),
    )
    client = socket.create_connection(("127.0.0.1", port), timeout=60)
    wait_for(
        lambda: "started" in journal(systemd_sandbox, "LMPROXY_EVENT=started"), 20, "the start"
    )
    os.kill(main_pid(systemd_sandbox, "lmproxy-m.service"), signal.SIGKILL)
    # The waiting client is still in the socket's backlog: systemd starts a new
    # shim for it, which adopts the backend already starting.
    client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert b'"model": "m"' in client.recv(65536) + client.recv(65536)
    client.close()
    assert_no_reservation_without_running_backend(systemd_sandbox)
    assert journal(systemd_sandbox, "LMPROXY_EVENT=started").count("started") == 1


def test_shim_killed_while_relaying(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    port = free_port()
    install(
        systemd_sandbox,
        write_config(tmp_path / "c.json", [fake_model("m", port, needs={"VRAM": 1})]),
    )
    held = open_connection(port)
    backend_pid = main_pid(systemd_sandbox, "lmproxy-backend@m.service")
    os.kill(main_pid(systemd_sandbox, "lmproxy-m.service"), signal.SIGKILL)
    assert held.recv(100) == b""  # the relay died with its shim: EOF, no hang
    held.close()
    assert http_get(port)["pid"] == backend_pid  # the next client is served by the same model
    assert_no_reservation_without_running_backend(systemd_sandbox)
    assert ledger_entries()["m"]["reserved"] == {"VRAM": 1}


def test_backend_crash_mid_stream(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    port = free_port()
    crashy = fake_model(
        "crashy", port, needs={"VRAM": 1}, extra_args="--exit-after 1 --tokens 1000 "
        "--token-interval 0.01",
    )  # fmt: skip
    install(systemd_sandbox, write_config(tmp_path / "c.json", [crashy]))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as stream:
        stream.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
        received = b""
        while chunk := stream.recv(65536):  # EOF when the model dies, not a hang
            received += chunk
    assert b"tok1" in received and b"[DONE]" not in received
    wait_for(lambda: "crashy" not in ledger_entries(), 10, "the reservation to be released")
    wait_for(
        lambda: unit_state(systemd_sandbox, "lmproxy-crashy.service") == "inactive", 10, "shim exit"
    )
    assert http_get(port)["model"] == "crashy"  # started again


def test_ledger_deleted_or_corrupted_is_rebuilt(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    one, two = free_port(), free_port()
    config = write_config(
        tmp_path / "c.json",
        [
            fake_model("one", one, needs={"VRAM": 10000}),
            fake_model("two", two, needs={"VRAM": 10000}),
        ],
    )
    install(systemd_sandbox, config)
    http_get(one)

    # Between transactions: once one's shim has marked it running (just after its first
    # client was relayed) and published that the client left.
    def settled() -> bool:
        entry = ledger_entries()["one"]
        return (entry["state"], entry["in_use"]) == ("running", 0)

    wait_for(settled, 10, "the count to settle")
    ledger = paths_for(Scope.USER).ledger
    ledger.unlink()
    http_get(two)  # its transactions find one's backend running outside the ledger
    assert ledger_entries()["one"]["reserved"] == {"VRAM": 10000}
    assert "was missing" in journal(systemd_sandbox, "LMPROXY_EVENT=reconcile")
    assert "adopted one" in journal(systemd_sandbox, "LMPROXY_EVENT=reconcile")
    ledger.write_text("garbage")
    status = status_json(systemd_sandbox)  # status reads, never breaks
    assert {s["name"]: s["state"] for s in status["services"]} == {
        "one": "running",
        "two": "running",
    }
    lmproxy(systemd_sandbox, "uninstall", "--user")


def test_unreachable_dbus_is_a_clear_error_and_leaves_nothing(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    port = free_port()
    install(
        systemd_sandbox,
        write_config(tmp_path / "c.json", [fake_model("m", port, needs={"VRAM": 1})]),
    )
    dropin = systemd_sandbox.config_home / "systemd/user/lmproxy-m.service.d"
    dropin.mkdir(parents=True)
    (dropin / "nobus.conf").write_text(
        "[Service]\nEnvironment=DBUS_SESSION_BUS_ADDRESS=unix:path=/nonexistent/bus\n"
    )
    systemd_sandbox.systemctl("daemon-reload")
    assert turned_away(port)
    failure = journal(systemd_sandbox, "LMPROXY_EVENT=failed")
    assert "cannot serve m:" in failure and "/nonexistent/bus" in failure
    assert ledger_entries() == {}
    assert unit_state(systemd_sandbox, "lmproxy-backend@m.service") == "inactive"


# --- Bugs large-model-proxy users reported ----------------------------------


def test_regression_process_exiting_early_is_cleaned_up(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """A model server that exits on its own after starting is no longer counted
    as running: its reservation goes, its shim exits, the next client restarts it."""
    port = free_port()
    early = fake_model("early", port, needs={"VRAM": 24000}, extra_args="--exit-after 0.5")
    install(systemd_sandbox, write_config(tmp_path / "c.json", [early]))
    first = http_get(port)["pid"]
    wait_for(lambda: "early" not in ledger_entries(), 10, "the reservation to go")
    assert status_json(systemd_sandbox)["services"][0]["state"] in ("cold", "failed")
    assert http_get(port)["pid"] != first


def test_regression_no_endless_sigterm_loop(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    """A model server that ignores SIGTERM is killed once the stop timeout ends:
    one stop, not a loop of signals."""
    port = free_port()
    deaf = fake_model("deaf", port, needs={"VRAM": 1}, extra_args="--ignore-sigterm")
    install(systemd_sandbox, write_config(tmp_path / "c.json", [deaf]))
    dropin = systemd_sandbox.config_home / "systemd/user/lmproxy-backend@deaf.service.d"
    dropin.mkdir(parents=True)
    (dropin / "quick.conf").write_text("[Service]\nTimeoutStopSec=1\n")
    systemd_sandbox.systemctl("daemon-reload")
    pid = http_get(port)["pid"]
    started = time.monotonic()
    systemd_sandbox.systemctl("stop", "lmproxy-backend@deaf.service")
    assert time.monotonic() - started < 10
    assert not os.path.exists(f"/proc/{pid}")
    wait_for(lambda: ledger_entries() == {} or "deaf" not in ledger_entries(), 10, "release")


def test_regression_no_leftover_zombie_service_entry(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """A model server killed behind lmproxy's back leaves no entry that claims it runs."""
    port = free_port()
    install(
        systemd_sandbox,
        write_config(tmp_path / "c.json", [fake_model("z", port, needs={"VRAM": 1})]),
    )
    os.kill(http_get(port)["pid"], signal.SIGKILL)
    wait_for(lambda: "z" not in ledger_entries(), 10, "the entry to go")
    assert status_json(systemd_sandbox)["services"][0]["state"] in ("cold", "failed")
    assert http_get(port)["model"] == "z"


def test_regression_client_disconnect_while_waiting_for_resources(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """A client that gives up while its service waits for room leaves nothing
    waiting behind: the start completes for nobody, or is rolled back."""
    busy, newcomer = install_busy_and_newcomer(systemd_sandbox, tmp_path, 3)
    held = open_connection(busy)
    quitter = socket.create_connection(("127.0.0.1", newcomer), timeout=10)
    wait_for(lambda: "newcomer" in ledger_entries(), 10, "the newcomer to wait")
    quitter.close()
    held.close()
    wait_for(
        lambda: (
            unit_state(systemd_sandbox, "lmproxy-newcomer.service") in ("inactive", "failed")
            or ledger_entries().get("newcomer", {}).get("state") == "running"
        ),
        30,
        "the newcomer's start to complete or be rolled back",
    )
    for entry in ledger_entries().values():
        assert entry["state"] in ("running", "stopping"), entry
    assert_no_reservation_without_running_backend(systemd_sandbox)
    assert http_get(newcomer)["model"] == "newcomer"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_garbage_clients_block_nobody_and_spin_nothing(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    port = free_port()
    install(systemd_sandbox, write_config(tmp_path / "c.json", [fake_model("m", port)]))
    http_get(port)
    shim = main_pid(systemd_sandbox, "lmproxy-m.service")
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    noisy = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    for conn in noisy:
        conn.sendall(os.urandom(4096))
    half_open = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    for conn in half_open:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")  # an unfinished request, then FIN
        conn.shutdown(socket.SHUT_WR)
    try:
        for _ in range(10):
            assert http_get(port, timeout=10)["model"] == "m"
        time.sleep(0.5)
        before = _cpu_seconds(shim)
        time.sleep(1.0)
        assert _cpu_seconds(shim) - before < 0.05  # waiting on epoll, not spinning
    finally:
        for conn in silent + noisy + half_open:
            conn.close()


def test_hundreds_of_open_connections_through_one_shim(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """More connections than systemd's default descriptor limit (1024, six per
    connection) would allow: the shim raises its soft limit and serves them all."""
    port = free_port()
    install(systemd_sandbox, write_config(tmp_path / "c.json", [fake_model("many", port)]))
    held = [open_connection(port) for _ in range(300)]
    try:
        for conn in held[::50]:
            assert b'"model": "many"' in request_on(conn)
        assert unit_state(systemd_sandbox, "lmproxy-many.service") == "active"
    finally:
        for conn in held:
            conn.close()
