"""lmproxy end to end, against a real systemd user manager (the sandbox)."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import time
from pathlib import Path

from lmproxy.sandbox import Sandbox
from tests.e2e.helpers import (
    fake_model,
    free_port,
    http_get,
    install,
    install_busy_and_newcomer,
    journal,
    lmproxy,
    lmproxy_command,
    main_pid,
    open_connection,
    request_on,
    service_status,
    status_json,
    turned_away,
    unit_state,
    wait_for,
    write_config,
)


def test_cold_start_through_the_socket(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    port = free_port()
    install(
        systemd_sandbox, write_config(tmp_path / "c.json", [fake_model("alpha", port, delay=0.5)])
    )
    assert unit_state(systemd_sandbox, "lmproxy-alpha.socket") == "active"
    assert unit_state(systemd_sandbox, "lmproxy-backend@alpha.service") == "inactive"
    assert service_status(systemd_sandbox, "alpha")["state"] == "cold"

    answer = http_get(port)

    assert answer["model"] == "alpha"
    assert answer["pid"] == main_pid(systemd_sandbox, "lmproxy-backend@alpha.service")
    status = service_status(systemd_sandbox, "alpha")
    assert status["state"] == "running"
    assert status["last_used"] is not None
    logs = lmproxy(systemd_sandbox, "logs", "alpha")
    assert "model loaded" in logs.stdout  # the backend's own output
    assert "alpha ready after" in logs.stdout  # the shim's decision


def test_second_service_evicts_the_first(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    first, second = free_port(), free_port()
    config = write_config(
        tmp_path / "c.json",
        [
            fake_model("first", first, needs={"VRAM": 16000}),
            fake_model("second", second, needs={"VRAM": 20000}),
        ],
    )
    install(systemd_sandbox, config)
    first_pid = http_get(first)["pid"]
    assert os.path.exists(f"/proc/{first_pid}")

    assert http_get(second)["model"] == "second"

    wait_for(lambda: not os.path.exists(f"/proc/{first_pid}"), 10, "the evicted model to exit")
    assert unit_state(systemd_sandbox, "lmproxy-backend@first.service") == "inactive"
    document = status_json(systemd_sandbox)
    states = {s["name"]: s["state"] for s in document["services"]}
    assert states == {"first": "cold", "second": "running"}
    assert document["resources"] == [
        {"name": "VRAM", "available": 24000, "reserved": 20000, "free": 4000}
    ]
    assert "evicting first" in journal(systemd_sandbox, "LMPROXY_EVENT=evict")
    # and back: the first model starts again, evicting the second
    assert http_get(first)["model"] == "first"
    wait_for(
        lambda: unit_state(systemd_sandbox, "lmproxy-backend@second.service") == "inactive",
        10,
        "the second model to be evicted",
    )


def test_service_with_open_connection_is_not_evicted(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    busy, newcomer = install_busy_and_newcomer(systemd_sandbox, tmp_path, 2)
    held = open_connection(busy)
    try:
        started = time.monotonic()
        assert turned_away(newcomer)  # once the wait is over
        assert 2 <= time.monotonic() - started < 20
        assert unit_state(systemd_sandbox, "lmproxy-backend@busy.service") == "active"
        assert b"busy" in request_on(held)  # still served
        assert "gave up after 2 s" in journal(systemd_sandbox, "LMPROXY_SERVICE=newcomer")
    finally:
        held.close()
    # With the connection closed, the newcomer gets its turn.
    assert http_get(newcomer)["model"] == "newcomer"


def test_waiting_newcomer_proceeds_when_the_connection_closes(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    busy, newcomer = install_busy_and_newcomer(systemd_sandbox, tmp_path, 60)
    held = open_connection(busy)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(http_get, newcomer)
        time.sleep(1.0)
        assert not answer.done()
        held.close()
        assert answer.result(timeout=30)["model"] == "newcomer"


def test_idle_backend_is_stopped(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "c.json",
        [fake_model("sleepy", port, needs={"VRAM": 1000}, ShutDownAfterInactivitySeconds=1)],
    )
    install(systemd_sandbox, config)
    pid = http_get(port)["pid"]
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 15, "the idle model to stop")
    wait_for(
        lambda: unit_state(systemd_sandbox, "lmproxy-sleepy.service") == "inactive",
        10,
        "the shim to exit",
    )
    assert service_status(systemd_sandbox, "sleepy")["reserved"] == {}
    assert "idle for 1 s" in journal(systemd_sandbox, "LMPROXY_EVENT=idle-stop")
    assert http_get(port)["model"] == "sleepy"  # and it comes back on demand


def test_backend_that_cannot_start_releases_its_reservation(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    exits, never_listens, unhealthy = free_port(), free_port(), free_port()
    config = write_config(
        tmp_path / "c.json",
        [
            {
                **fake_model("exits", exits, needs={"VRAM": 8000}),
                "Command": "/bin/false",
                "Args": "",
            },
            fake_model(
                "never-listens",
                never_listens,
                needs={"VRAM": 8000},
                delay=3600,
                StartupTimeoutMilliseconds=1500,
            ),
            fake_model(
                "unhealthy",
                unhealthy,
                needs={"VRAM": 8000},
                HealthcheckCommand="exit 1",
                HealthcheckIntervalMilliseconds=100,
                StartupTimeoutMilliseconds=1500,
            ),
        ],
    )
    install(systemd_sandbox, config)
    for port in (exits, never_listens, unhealthy):
        assert turned_away(port)  # closed, not left hanging
    failures = journal(systemd_sandbox, "LMPROXY_EVENT=failed")
    # Whether systemd sees /bin/false exit before or after its start job ends is a race:
    # either way the reason is named.
    assert (
        "cannot serve exits: the backend stopped before it opened" in failures
        or "cannot serve exits: cannot start lmproxy-backend@exits.service" in failures
    )
    assert "cannot serve never-listens:" in failures and "startup timeout" in failures
    assert "cannot serve unhealthy: the health check did not pass" in failures
    document = status_json(systemd_sandbox)
    assert document["resources"][0]["reserved"] == 0
    for name in ("exits", "never-listens", "unhealthy"):
        assert unit_state(systemd_sandbox, f"lmproxy-backend@{name}.service") != "active"


def test_concurrent_first_connections_start_one_backend(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    port = free_port()
    install(
        systemd_sandbox, write_config(tmp_path / "c.json", [fake_model("crowd", port, delay=1)])
    )
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda _: http_get(port), range(32)))
    assert {a["model"] for a in answers} == {"crowd"}
    assert len({a["pid"] for a in answers}) == 1
    assert journal(systemd_sandbox, "LMPROXY_EVENT=started").count("started") == 1


def _unit_files(sandbox: Sandbox) -> set[str]:
    unit_dir = sandbox.config_home / "systemd" / "user"
    return {p.name for p in unit_dir.iterdir() if p.is_file()}


def test_install_reinstall_uninstall(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    keep, leave, new = free_port(), free_port(), free_port()
    first = write_config(
        tmp_path / "1.json", [fake_model("keep", keep), fake_model("leave", leave)]
    )
    install(systemd_sandbox, first)
    assert _unit_files(systemd_sandbox) == {
        "lmproxy.target", "lmproxy.slice",
        "lmproxy-keep.socket", "lmproxy-keep.service", "lmproxy-backend@keep.service",
        "lmproxy-leave.socket", "lmproxy-leave.service", "lmproxy-backend@leave.service",
    }  # fmt: skip
    keep_pid = http_get(keep)["pid"]
    http_get(leave)

    second = write_config(tmp_path / "2.json", [fake_model("keep", keep), fake_model("new", new)])
    install(systemd_sandbox, second)

    assert _unit_files(systemd_sandbox) == {
        "lmproxy.target", "lmproxy.slice",
        "lmproxy-keep.socket", "lmproxy-keep.service", "lmproxy-backend@keep.service",
        "lmproxy-new.socket", "lmproxy-new.service", "lmproxy-backend@new.service",
    }  # fmt: skip
    assert http_get(keep)["pid"] == keep_pid  # untouched, still running
    assert unit_state(systemd_sandbox, "lmproxy-backend@leave.service") == "inactive"
    assert unit_state(systemd_sandbox, "lmproxy-leave.socket") == "inactive"
    assert http_get(new)["model"] == "new"

    result = lmproxy(systemd_sandbox, "uninstall", "--user")
    assert result.returncode == 0, result.stderr
    assert _unit_files(systemd_sandbox) == set()
    assert not os.path.exists(f"/proc/{keep_pid}")
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", keep)) != 0  # nobody listens any more


def test_bad_config_changes_nothing(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    good = write_config(tmp_path / "good.json", [fake_model("good", free_port())])
    install(systemd_sandbox, good)
    unit_dir = systemd_sandbox.config_home / "systemd" / "user"
    before = {p.name: p.read_text() for p in unit_dir.iterdir() if p.is_file()}
    bad = write_config(
        tmp_path / "bad.json",
        [fake_model("good", free_port(), needs={"VRAM": 99999}), fake_model("", free_port())],
    )

    result = lmproxy(systemd_sandbox, "install", "--user", "--config", str(bad), "--now")

    assert result.returncode == 2
    assert "$.Services[0].ResourceRequirements.VRAM" in result.stderr
    assert "$.Services[1].Name" in result.stderr
    assert {p.name: p.read_text() for p in unit_dir.iterdir() if p.is_file()} == before
    validate = lmproxy(systemd_sandbox, "validate", "--config", str(bad))
    assert validate.returncode == 2


def test_port_taken_by_another_program_is_refused(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    with socket.socket() as squatter:
        taken = free_port()
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        config = write_config(
            tmp_path / "c.json", [fake_model("free", free_port()), fake_model("taken", taken)]
        )
        result = lmproxy(systemd_sandbox, "install", "--user", "--config", str(config), "--now")
    assert result.returncode == 2
    assert f"$.Services[1].ListenPort: 127.0.0.1:{taken} is already in use" in result.stderr
    unit_dir = systemd_sandbox.config_home / "systemd" / "user"
    assert not any(p.name.startswith("lmproxy") for p in unit_dir.iterdir())


def test_reinstall_keeps_its_own_listening_ports(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "c.json", [fake_model("same", port)])
    install(systemd_sandbox, config)
    install(systemd_sandbox, config)  # the port is held by our own socket: fine
    assert http_get(port)["model"] == "same"


def test_concurrent_installs_leave_one_whole_set(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    first = write_config(tmp_path / "1.json", [fake_model(f"a{i}", free_port()) for i in range(4)])
    second = write_config(tmp_path / "2.json", [fake_model(f"b{i}", free_port()) for i in range(3)])
    argv = [*lmproxy_command(), "install", "--user", "--now", "--config"]
    runs = [
        subprocess.Popen(
            systemd_sandbox.command([*argv, str(path)]),
            env=systemd_sandbox.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for path in (first, second, first, second)
    ]
    assert [run.wait(120) for run in runs] == [0, 0, 0, 0]
    names = _unit_files(systemd_sandbox) - {"lmproxy.target", "lmproxy.slice"}
    stems = {name.split(".")[0].removeprefix("lmproxy-").removeprefix("backend@") for name in names}
    assert stems in ({"a0", "a1", "a2", "a3"}, {"b0", "b1", "b2"})
    assert len(names) == 3 * len(stems)
