"""lmproxy start, stop, sleep and wake, end to end: each goes through the lifecycle,
exits 0 only once its state is reached, and says why not otherwise."""

from __future__ import annotations

from pathlib import Path

from lmproxy.sandbox import Sandbox
from tests.e2e.helpers import (
    http_get,
    lmproxy,
    main_pid,
    open_connection,
    request_on,
    service_state,
    unit_state,
)
from tests.e2e.test_sleep import (
    OTHER_BACKEND,
    SLEEPY_BACKEND,
    backend_memory,
    complete,
    install_sleepy_and_other,
)


def ok(sandbox: Sandbox, *args: str) -> str:
    result = lmproxy(sandbox, *args, "--user")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def refused(sandbox: Sandbox, *args: str) -> str:
    result = lmproxy(sandbox, *args, "--user")
    assert result.returncode == 1, result.stdout + result.stderr
    return result.stderr


def test_start_and_stop_load_and_unload_without_a_client(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    sleepy, _ = install_sleepy_and_other(systemd_sandbox, tmp_path)
    assert "sleepy is running" in ok(systemd_sandbox, "start", "sleepy")
    assert unit_state(systemd_sandbox, SLEEPY_BACKEND) == "active"
    assert service_state(systemd_sandbox, "sleepy") == "running"
    assert "running already" in ok(systemd_sandbox, "start", "sleepy")
    pid = http_get(sleepy)["pid"]
    assert pid == main_pid(systemd_sandbox, SLEEPY_BACKEND)  # the one start served it

    assert "sleepy stopped" in ok(systemd_sandbox, "stop", "sleepy")
    assert unit_state(systemd_sandbox, SLEEPY_BACKEND) == "inactive"
    assert service_state(systemd_sandbox, "sleepy") == "cold"
    assert "not loaded" in ok(systemd_sandbox, "stop", "sleepy")


def test_stop_is_refused_while_a_client_is_in_use_unless_forced(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    _, other = install_sleepy_and_other(systemd_sandbox, tmp_path)
    with open_connection(other) as connection:
        assert "1 client(s) in use (--force" in refused(systemd_sandbox, "stop", "other")
        assert unit_state(systemd_sandbox, OTHER_BACKEND) == "active"
        request_on(connection)  # still served
        ok(systemd_sandbox, "stop", "--force", "other")
        assert unit_state(systemd_sandbox, OTHER_BACKEND) == "inactive"


def test_sleep_and_wake_by_hand_keep_the_process(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    sleepy, other = install_sleepy_and_other(systemd_sandbox, tmp_path)
    pid = http_get(sleepy)["pid"]
    assert "sleepy is asleep" in ok(systemd_sandbox, "sleep", "sleepy")
    assert service_state(systemd_sandbox, "sleepy") == "sleeping"
    assert backend_memory(sleepy) == 1600
    assert "sleepy is running" in ok(systemd_sandbox, "wake", "sleepy")
    assert complete(sleepy) == 200

    # Level 2 (the weights dropped, then reloaded on waking), whatever the config says.
    ok(systemd_sandbox, "sleep", "--level", "2", "sleepy")
    assert backend_memory(sleepy) == 0
    ok(systemd_sandbox, "wake", "sleepy")
    assert complete(sleepy) == 200
    assert main_pid(systemd_sandbox, SLEEPY_BACKEND) == pid
    assert "awake already" in ok(systemd_sandbox, "wake", "sleepy")

    # Starting the other model puts the idle sleeper to sleep for room, as a client would.
    ok(systemd_sandbox, "start", "other")
    assert service_state(systemd_sandbox, "sleepy") == "sleeping"
    assert http_get(other)["model"] == "other"


def test_requests_that_cannot_be_carried_out_say_why(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    install_sleepy_and_other(systemd_sandbox, tmp_path)
    assert "other has no Sleep in the config" in refused(systemd_sandbox, "sleep", "other")
    assert "sleepy is cold, not running" in refused(systemd_sandbox, "sleep", "sleepy")
    assert "is cold, not asleep" in refused(systemd_sandbox, "wake", "sleepy")
    assert "no service named 'nope' (configured: sleepy, other)" in refused(
        systemd_sandbox, "start", "nope"
    )
    bad_level = lmproxy(systemd_sandbox, "sleep", "--level", "3", "sleepy", "--user")
    assert bad_level.returncode == 2 and "--level" in bad_level.stderr


def test_start_says_why_a_model_was_turned_away(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    install_sleepy_and_other(systemd_sandbox, tmp_path, fake_args="--delay -1")  # it crashes
    message = refused(systemd_sandbox, "start", "sleepy")
    assert "sleepy was not loaded: cannot serve sleepy" in message, message
