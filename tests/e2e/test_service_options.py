"""Per-service options of large-model-proxy's format, as users rely on them."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

from lmproxy.render import current_interpreter
from lmproxy.sandbox import Sandbox
from tests.e2e.helpers import (
    ask,
    fake_model,
    free_port,
    http_get,
    install,
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


def test_log_file_path_gets_the_output_as_well_as_the_journal(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "logs" / "chatty.log"
    log.parent.mkdir()
    install(
        systemd_sandbox,
        write_config(tmp_path / "c.json", [fake_model("chatty", port, LogFilePath=str(log))]),
    )
    answer = http_get(port)
    wait_for(lambda: '"GET / HTTP/1.1" 200' in log.read_text(), 10, "the request in the log file")
    assert "model loaded" in log.read_text()
    assert "model loaded" in journal(systemd_sandbox, "SYSLOG_IDENTIFIER=lmproxy-chatty")
    # The tee forwards the stop to the model server itself.
    lmproxy(systemd_sandbox, "uninstall", "--user")
    assert not os.path.exists(f"/proc/{answer['pid']}")


SECRET_ENVIRONMENT = {
    "API_KEY": "s3cret-$HOME-${HOME}-%n-`id`-\\-\"-'",
    "SPACES": "  two  spaces  ",
    "EMPTY": "",
    "UNICODE": "é ☃ \u2028 \u0085",
}


def process_environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode()
    return dict(item.partition("=")[::2] for item in raw.split("\0") if item)


def test_the_environment_reaches_the_model_from_a_private_file(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """Environment may hold secrets: it goes to a file only its owner reads, which
    systemd reads, and not into the unit (readable by all, and shown over D-Bus)."""
    port = free_port()
    environment = {**current_interpreter().environment, **SECRET_ENVIRONMENT}
    install(
        systemd_sandbox,
        write_config(tmp_path / "c.json", [fake_model("keyed", port, Environment=environment)]),
    )
    pid = http_get(port)["pid"]

    got = process_environment(pid)
    assert {key: got.get(key) for key in environment} == environment
    unit_dir = systemd_sandbox.config_home / "systemd" / "user"
    for unit in unit_dir.glob("lmproxy-*"):
        assert "s3cret" not in unit.read_text(), unit
    shown = systemd_sandbox.systemctl("show", "-p", "Environment", "lmproxy-backend@keyed.service")
    assert "s3cret" not in shown.stdout
    env_file = systemd_sandbox.config_home / "lmproxy" / "environment" / "keyed.env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert env_file.parent.stat().st_mode & 0o777 == 0o700

    lmproxy(systemd_sandbox, "uninstall", "--user")
    assert not env_file.parent.exists()


def test_kill_command_stops_the_backend(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    first, second = free_port(), free_port()
    marker = tmp_path / "killed"
    config = write_config(
        tmp_path / "c.json",
        [
            fake_model(
                "stubborn", first, needs={"VRAM": 16000}, extra_args="--ignore-sigterm",
                KillCommand=f"echo $MAINPID > {marker}; kill -KILL $MAINPID",
            ),
            fake_model("next", second, needs={"VRAM": 16000}),
        ],
    )  # fmt: skip
    install(systemd_sandbox, config)
    pid = http_get(first)["pid"]
    assert http_get(second)["model"] == "next"  # evicts the stubborn one through KillCommand
    assert marker.read_text().strip() == str(pid)
    assert not os.path.exists(f"/proc/{pid}")


def test_backend_ignoring_sigterm_is_killed_by_systemd(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    first, second = free_port(), free_port()
    config = write_config(
        tmp_path / "c.json",
        [
            fake_model("deaf", first, needs={"VRAM": 16000}, extra_args="--ignore-sigterm"),
            fake_model("next", second, needs={"VRAM": 16000}),
        ],
    )
    install(systemd_sandbox, config)
    # A short stop timeout for the test; lmproxy's default is 30 s.
    unit_dir = systemd_sandbox.config_home / "systemd" / "user"
    dropin = unit_dir / "lmproxy-backend@deaf.service.d"
    dropin.mkdir()
    (dropin / "timeout.conf").write_text("[Service]\nTimeoutStopSec=1\n")
    systemd_sandbox.systemctl("daemon-reload")
    pid = http_get(first)["pid"]
    assert http_get(second)["model"] == "next"
    assert not os.path.exists(f"/proc/{pid}")


def test_restart_on_connection_failure(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    restarts, stays = free_port(), free_port()
    hung = "--stop-listening-after 1"
    config = write_config(
        tmp_path / "c.json",
        [
            fake_model("restarts", restarts, extra_args=hung, RestartOnConnectionFailure=True),
            fake_model("stays", stays, extra_args=hung, RestartOnConnectionFailure=False),
        ],
    )
    install(systemd_sandbox, config)
    restarted_pid = http_get(restarts)["pid"]
    stays_pid = http_get(stays)["pid"]
    wait_for(
        lambda: (
            "stopped listening" in journal(systemd_sandbox, "SYSLOG_IDENTIFIER=lmproxy-stays")
            and "stopped listening"
            in journal(systemd_sandbox, "SYSLOG_IDENTIFIER=lmproxy-restarts")
        ),
        10,
        "both backends to stop listening",
    )

    assert turned_away(stays)  # refused, and left alone
    assert main_pid(systemd_sandbox, "lmproxy-backend@stays.service") == stays_pid

    # Refused: the backend is restarted, and the client that found it hung is served.
    assert http_get(restarts)["pid"] != restarted_pid
    assert "refused a connection" in journal(systemd_sandbox, "LMPROXY_EVENT=restart")


def test_process_that_hands_off_counts_as_running(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    """ConsiderStoppedOnProcessExit=false: a command that starts the server in the
    background and exits (like `docker run -d`) leaves the model running."""
    port = free_port()
    service = fake_model("daemonized", port, ConsiderStoppedOnProcessExit=False)
    inner = f"setsid {service['Command']} {service['Args']} & exit 0"
    service["Command"] = "/bin/sh"
    service["Args"] = f"-c '{inner}'"
    install(systemd_sandbox, write_config(tmp_path / "c.json", [service]))
    assert http_get(port)["model"] == "daemonized"
    assert unit_state(systemd_sandbox, "lmproxy-backend@daemonized.service") == "active"


def test_max_connections_closes_clients_beyond_the_limit(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    port = free_port()
    install(
        systemd_sandbox,
        write_config(tmp_path / "c.json", [fake_model("capped", port, MaxConnections=2)]),
    )
    first, second = open_connection(port), open_connection(port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as third:
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                third.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert sees_closed(third)  # closed unanswered
        assert b'"capped"' in request_on(first)
        wait_for(
            lambda: (
                "MaxConnections (2) are open"
                in journal(systemd_sandbox, "LMPROXY_EVENT=over-limit")
            ),
            10,
            "the refusal in the journal",
        )
    finally:
        first.close()
        second.close()
    wait_for(lambda: status_json(systemd_sandbox)["services"][0]["connections"] == 0, 10)
    assert http_get(port)["model"] == "capped"


def test_an_idle_connection_is_closed_and_no_longer_blocks_eviction(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """Any local user can open a connection and leave it: with IdleConnectionTimeoutSeconds
    it no longer keeps the model loaded (and every newcomer waiting) for ever."""
    busy, newcomer = free_port(), free_port()
    config = write_config(
        tmp_path / "c.json",
        [
            fake_model("busy", busy, needs={"VRAM": 16000}, IdleConnectionTimeoutSeconds=2),
            fake_model("newcomer", newcomer, needs={"VRAM": 20000}),
        ],
        MaxTimeToWaitForServiceToCloseConnectionBeforeGivingUpSeconds=30,
    )
    install(systemd_sandbox, config)
    idle = open_connection(busy)
    try:
        started = time.monotonic()
        assert http_get(newcomer)["model"] == "newcomer"
        waited = time.monotonic() - started
        assert 1.5 <= waited < 10, waited
        assert sees_closed(idle)
    finally:
        idle.close()
    assert "idle for 2 s" in journal(systemd_sandbox, "LMPROXY_EVENT=idle-closed")


def sees_closed(conn: socket.socket) -> bool:
    conn.settimeout(5)
    try:
        return conn.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_a_model_on_a_unix_socket_only_those_allowed_reach(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """For machines with untrusted local users: no port, a socket file whose mode says who
    may connect."""
    port = free_port()
    folder = tmp_path / "sockets"
    folder.mkdir(mode=0o755)
    path = folder / "private.sock"
    model = fake_model("private", port, ListenPath=str(path), SocketMode="0600")
    del model["ListenPort"]
    install(systemd_sandbox, write_config(tmp_path / "c.json", [model]))
    assert path.is_socket()
    assert path.stat().st_mode & 0o777 == 0o600
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(60)
        client.connect(str(path))
        assert b'"private"' in ask(client)
    [entry] = status_json(systemd_sandbox)["services"]
    assert entry["listen"] == str(path)
    lmproxy(systemd_sandbox, "uninstall", "--user")
    assert not path.exists()
