"""Sleep instead of stop, end to end: a fake vLLM (lmproxy.fakemodel --sleep-mode)
with its sleep API, against a real systemd user manager (the sandbox).

sleepy (16000 VRAM awake; asleep it keeps 8000 RAM) and other (20000 VRAM) cannot
both be awake in 24000 VRAM, and there is RAM for sleepy's sleep."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from lmproxy import unitnames
from lmproxy.sandbox import Sandbox
from tests.e2e.helpers import (
    fake_model,
    free_port,
    http_get,
    install,
    journal,
    main_pid,
    service_state,
    service_status,
    unit_state,
    wait_for,
    write_config,
)

AVAILABLE = {"VRAM": 24000, "RAM": 16000}
ASLEEP_HOLDS = {"RAM": 8000}
SLEEPY_BACKEND = unitnames.backend_unit("sleepy")
OTHER_BACKEND = unitnames.backend_unit("other")


def install_sleepy_and_other(
    sandbox: Sandbox, folder: Path, *, fake_args: str = "", **sleep: Any
) -> tuple[int, int]:
    """Returns the ports of sleepy and other; sleep: more fields of sleepy's Sleep."""
    sleepy, other = free_port(), free_port()
    args = f"--sleep-mode --sleep-delay 0.3 --wake-delay 0.2 --memory 16000 {fake_args}"
    services = [
        fake_model(
            "sleepy",
            sleepy,
            needs={"VRAM": 16000},
            extra_args=args,
            Sleep={"Level": 1, "ResourceRequirements": ASLEEP_HOLDS, **sleep},
        ),
        fake_model("other", other, needs={"VRAM": 20000}),
    ]
    install(sandbox, write_config(folder / "sleep.json", services, ResourcesAvailable=AVAILABLE))
    return sleepy, other


def complete(port: int) -> int:
    """POST /v1/completions, read to the end; the HTTP status (the fake answers 503
    while asleep, as a model without its weights would fail)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"
            b"Connection: close\r\n\r\n{}"
        )
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def backend_memory(port: int) -> int:
    """What the fake reports in use, asked directly (not through lmproxy)."""
    answer = http_get(port + 10000, "/memory")
    return int(answer["memory_mib"])


@pytest.mark.parametrize("level", [1, 2])
def test_an_idle_victim_sleeps_instead_of_stopping_and_wakes_for_its_next_client(
    systemd_sandbox: Sandbox, tmp_path: Path, level: int
) -> None:
    sleepy, other = install_sleepy_and_other(systemd_sandbox, tmp_path, Level=level)
    first = http_get(sleepy)
    assert complete(sleepy) == 200
    assert backend_memory(sleepy) == 16000

    assert http_get(other)["model"] == "other"
    # Put to sleep, not stopped: the same process, its reservation shrunk to what it
    # keeps asleep, its memory given back.
    assert main_pid(systemd_sandbox, SLEEPY_BACKEND) == first["pid"]
    assert backend_memory(sleepy) == (1600 if level == 1 else 0)
    status = service_status(systemd_sandbox, "sleepy")
    assert status["state"] == "sleeping"
    assert status["reserved"] == ASLEEP_HOLDS

    # Its next client wakes it (other is stopped for the room) and is answered by the
    # same process, awake: a level-2 sleeper had its weights reloaded.
    assert complete(sleepy) == 200
    assert http_get(sleepy) == {**first, "asleep": False}
    assert unit_state(systemd_sandbox, OTHER_BACKEND) == "inactive"
    assert service_state(systemd_sandbox, "sleepy") == "running"
    asleep = journal(systemd_sandbox, "LMPROXY_EVENT=asleep")
    assert f"sleepy asleep (level {level}) after" in asleep
    assert "freed 16000 VRAM, still holds 8000 RAM" in asleep
    assert "sleepy awake after" in journal(systemd_sandbox, "LMPROXY_EVENT=awake")


def test_a_sleep_that_fails_falls_back_to_a_stop(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    sleepy, other = install_sleepy_and_other(systemd_sandbox, tmp_path, fake_args="--fail-sleep")
    http_get(sleepy)
    assert http_get(other)["model"] == "other"
    assert unit_state(systemd_sandbox, SLEEPY_BACKEND) == "inactive"
    assert service_state(systemd_sandbox, "sleepy") == "cold"
    failed = journal(systemd_sandbox, "LMPROXY_EVENT=sleep-failed")
    assert "HTTP 500" in failed and "stopping it" in failed


def test_a_wake_that_fails_falls_back_to_a_restart(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    sleepy, other = install_sleepy_and_other(systemd_sandbox, tmp_path, fake_args="--fail-wake")
    before = http_get(sleepy)["pid"]
    http_get(other)
    wait_for(lambda: service_state(systemd_sandbox, "sleepy") == "sleeping", 10)
    again = http_get(sleepy)
    assert again["pid"] != before and not again["asleep"]
    assert "could not wake" in journal(systemd_sandbox, "LMPROXY_EVENT=wake-failed")


def test_sleep_and_wake_commands_for_servers_without_the_api(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """SleepCommand and WakeCommand instead of vLLM's API; here they call the fake's
    API themselves, so the test can tell that they ran."""
    record = tmp_path / "commands"
    call = (
        "python3 -c 'import sys, urllib.request; urllib.request.urlopen(urllib.request.Request("
        'sys.argv[1], data=b"", method="POST"))\' '
        '"http://127.0.0.1:$LMPROXY_TARGET_PORT/{}"'
        f' && echo "{{}} $LMPROXY_SERVICE $LMPROXY_SLEEP_LEVEL" >> {record}'
    )
    sleepy, other = install_sleepy_and_other(
        systemd_sandbox,
        tmp_path,
        SleepCommand=call.format("sleep?level=1", "sleep"),
        WakeCommand=call.format("wake_up", "wake"),
    )
    pid = http_get(sleepy)["pid"]
    http_get(other)
    wait_for(lambda: service_state(systemd_sandbox, "sleepy") == "sleeping", 10)
    assert backend_memory(sleepy) == 1600
    assert complete(sleepy) == 200
    assert http_get(sleepy)["pid"] == pid
    assert record.read_text().splitlines() == ["sleep sleepy 1", "wake sleepy 1"]


def test_a_sleeper_idle_for_the_inactivity_time_is_stopped(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    sleepy, other = free_port(), free_port()
    services = [
        fake_model(
            "sleepy",
            sleepy,
            needs={"VRAM": 16000},
            extra_args="--sleep-mode",
            Sleep={"ResourceRequirements": ASLEEP_HOLDS},
            ShutDownAfterInactivitySeconds=3,
        ),
        fake_model("other", other, needs={"VRAM": 20000}),
    ]
    install(
        systemd_sandbox, write_config(tmp_path / "c.json", services, ResourcesAvailable=AVAILABLE)
    )
    http_get(sleepy)
    http_get(other)
    assert service_state(systemd_sandbox, "sleepy") == "sleeping"
    wait_for(lambda: unit_state(systemd_sandbox, SLEEPY_BACKEND) == "inactive", 10, "the stop")
    assert "asleep and idle for 3 s" in journal(systemd_sandbox, "LMPROXY_EVENT=idle-stop")
