"""lmproxy.systemd against a real systemd user manager (the sandbox harness)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jeepney import DBusAddress, HeaderFields, Message, new_signal
from jeepney.io.blocking import open_dbus_connection

from lmproxy.paths import Scope
from lmproxy.sandbox import Sandbox
from lmproxy.systemd import (
    MANAGER_INTERFACE,
    MANAGER_PATH,
    PROPERTIES_INTERFACE,
    UNIT_INTERFACE,
    BusUnavailable,
    Manager,
    SystemdError,
    bus_address,
)

TIMEOUT = 10.0


def wait_for_bus(sandbox: Sandbox, timeout: float = 5.0) -> None:
    """The sandbox is ready when the manager's private socket is; its dbus.socket listens a
    moment later, and a connection before that finds no socket, or one that refuses."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(sandbox.runtime_dir / "bus"))
                return
            except (FileNotFoundError, ConnectionRefusedError):
                assert time.monotonic() < deadline, "the sandbox's session bus never came up"
        time.sleep(0.01)


@pytest.fixture
def manager(systemd_sandbox: Sandbox) -> Iterator[Manager]:
    wait_for_bus(systemd_sandbox)
    with Manager.connect(Scope.USER) as connected:
        yield connected


def install_unit(sandbox: Sandbox, name: str, text: str, *, reload: bool = True) -> Path:
    path = sandbox.config_home / "systemd" / "user" / name
    path.write_text(text)
    if reload:
        result = sandbox.systemctl("daemon-reload")
        assert result.returncode == 0, result.stderr
    return path


def service(exec_start: str, *, kind: str = "simple") -> str:
    return f"[Service]\nType={kind}\nExecStart={exec_start}\n"


def process_alive(pid: int) -> bool:
    """False once the process has exited, even if its zombie awaits reaping: systemd may
    finish a stop job on the cgroup's empty event just before it reaps the main process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.systemd
def test_start_then_stop_a_service(systemd_sandbox: Sandbox, manager: Manager) -> None:
    # Type=exec: the start job ends after the exec, so the main PID is already sleep's.
    install_unit(systemd_sandbox, "sleeper.service", service("/bin/sleep 300", kind="exec"))

    manager.start_unit("sleeper.service", TIMEOUT)

    state = manager.unit_state("sleeper.service")
    assert (state.load_state, state.active_state, state.sub_state) == (
        "loaded",
        "active",
        "running",
    )
    assert state.running
    pid = manager.main_pid("sleeper.service")
    assert pid > 0
    assert process_alive(pid)
    assert b"sleep" in Path(f"/proc/{pid}/cmdline").read_bytes()

    manager.stop_unit("sleeper.service", TIMEOUT)

    assert not process_alive(pid)
    state = manager.unit_state("sleeper.service")
    assert state.active_state == "inactive"
    assert not state.running
    assert manager.main_pid("sleeper.service") == 0


@pytest.mark.systemd
@pytest.mark.parametrize(
    "unit_text",
    [
        service("/bin/sh -c 'exit 3'", kind="oneshot"),
        service("/nonexistent/model-server", kind="exec"),
    ],
    ids=["oneshot-exits-3", "exec-missing-binary"],
)
def test_a_failing_start_raises(systemd_sandbox: Sandbox, manager: Manager, unit_text: str) -> None:
    install_unit(systemd_sandbox, "broken.service", unit_text)

    with pytest.raises(SystemdError) as caught:
        manager.start_unit("broken.service", TIMEOUT)

    assert caught.value.unit == "broken.service"
    assert "start broken.service" in str(caught.value)
    assert "'failed'" in str(caught.value)
    assert manager.unit_state("broken.service").active_state == "failed"


@pytest.mark.systemd
def test_starting_an_unknown_unit_raises_with_the_dbus_error(manager: Manager) -> None:
    with pytest.raises(SystemdError) as caught:
        manager.start_unit("no-such-model.service", TIMEOUT)

    assert caught.value.dbus_error == "org.freedesktop.systemd1.NoSuchUnit"
    assert "no-such-model.service" in str(caught.value)
    assert "org.freedesktop.systemd1.NoSuchUnit" in str(caught.value)


@pytest.mark.systemd
def test_stopping_what_is_not_running_succeeds(systemd_sandbox: Sandbox, manager: Manager) -> None:
    install_unit(systemd_sandbox, "idle.service", service("/bin/sleep 300"))

    manager.stop_unit("never-loaded.service", TIMEOUT)
    manager.stop_unit("idle.service", TIMEOUT)

    assert manager.unit_state("idle.service").active_state == "inactive"
    assert manager.main_pid("never-loaded.service") == 0


@pytest.mark.systemd
def test_unit_states_of_several_units_in_one_call(
    systemd_sandbox: Sandbox, manager: Manager
) -> None:
    install_unit(systemd_sandbox, "up.service", service("/bin/sleep 300"))
    install_unit(systemd_sandbox, "down.service", service("/bin/sleep 300"))
    manager.start_unit("up.service", TIMEOUT)

    states = manager.unit_states(["up.service", "down.service", "unknown.service"])

    assert list(states) == ["up.service", "down.service", "unknown.service"]
    assert states["up.service"].running
    assert (states["down.service"].load_state, states["down.service"].active_state) == (
        "loaded",
        "inactive",
    )
    unknown = states["unknown.service"]
    assert (unknown.name, unknown.load_state, unknown.active_state) == (
        "unknown.service",
        "not-found",
        "inactive",
    )
    assert manager.unit_states([]) == {}


@pytest.mark.systemd
def test_unit_states_refuses_invalid_names(manager: Manager) -> None:
    with pytest.raises(SystemdError, match="not valid unit names: not a unit"):
        manager.unit_states(["up.service", "not a unit"])


@pytest.mark.systemd
def test_list_units_by_patterns(systemd_sandbox: Sandbox, manager: Manager) -> None:
    for name in ("lmp-a.service", "lmp-b.service", "other.service"):
        install_unit(systemd_sandbox, name, service("/bin/sleep 300"), reload=False)
    manager.reload()
    for name in ("lmp-a.service", "lmp-b.service", "other.service"):
        manager.start_unit(name, TIMEOUT)

    found = manager.list_units_by_patterns(["lmp-*.service"])

    assert sorted(state.name for state in found) == ["lmp-a.service", "lmp-b.service"]
    assert all(state.running for state in found)


@pytest.mark.systemd
def test_running_of_several_units_in_one_call(systemd_sandbox: Sandbox, manager: Manager) -> None:
    install_unit(systemd_sandbox, "up.service", service("/bin/sleep 300"))
    install_unit(systemd_sandbox, "down.service", service("/bin/true", kind="oneshot"))
    manager.start_unit("up.service", TIMEOUT)
    manager.start_unit("down.service", TIMEOUT)  # ran, is loaded and inactive now

    runs = manager.running(["down.service", "up.service", "never-loaded.service"])

    assert list(runs.items()) == [
        ("down.service", False),
        ("up.service", True),
        ("never-loaded.service", False),
    ]
    manager.stop_unit("up.service", TIMEOUT)
    assert manager.running(["up.service"]) == {"up.service": False}
    assert manager.running([]) == {}


@pytest.mark.systemd
def test_running_refuses_patterns(manager: Manager) -> None:
    with pytest.raises(ValueError, match=r"not unit names: 'lmproxy-\*\.service'"):
        manager.running(["up.service", "lmproxy-*.service"])


@pytest.mark.systemd
def test_reload_picks_up_a_new_unit_file(systemd_sandbox: Sandbox, manager: Manager) -> None:
    assert manager.unit_state("late.service").load_state == "not-found"
    install_unit(systemd_sandbox, "late.service", service("/bin/sleep 300"), reload=False)

    manager.reload()

    assert manager.unit_state("late.service").load_state == "loaded"
    manager.start_unit("late.service", TIMEOUT)
    assert manager.unit_state("late.service").running


@pytest.mark.systemd
def test_enable_and_disable_unit_files(systemd_sandbox: Sandbox, manager: Manager) -> None:
    install_unit(
        systemd_sandbox,
        "boot.service",
        service("/bin/sleep 300") + "\n[Install]\nWantedBy=default.target\n",
    )
    wants = systemd_sandbox.config_home / "systemd/user/default.target.wants/boot.service"

    manager.enable_unit_files(["boot.service"])
    assert wants.is_symlink()
    assert wants.resolve() == (systemd_sandbox.config_home / "systemd/user/boot.service").resolve()
    manager.enable_unit_files(["boot.service"])  # again: force=True replaces, no error
    assert wants.is_symlink()

    manager.disable_unit_files(["boot.service"])
    assert not wants.exists()
    assert not wants.is_symlink()


@pytest.mark.systemd
def test_enabling_a_missing_unit_file_names_it(manager: Manager) -> None:
    with pytest.raises(SystemdError, match=r"cannot enable ghost\.service: \[org\.freedesktop\."):
        manager.enable_unit_files(["ghost.service"])


@pytest.mark.systemd
def test_wait_until_inactive_follows_the_process(
    systemd_sandbox: Sandbox, manager: Manager, tmp_path: Path
) -> None:
    fifo = tmp_path / "release"
    os.mkfifo(fifo)
    install_unit(
        systemd_sandbox, "waiter.service", service(f"/bin/sh -c 'read x < {fifo}'", kind="exec")
    )
    manager.start_unit("waiter.service", TIMEOUT)

    started = time.monotonic()
    assert manager.wait_until_inactive("waiter.service", timeout=0.5) is None
    assert time.monotonic() - started >= 0.5
    assert manager.unit_state("waiter.service").running

    released: list[float] = []

    def release() -> None:
        # Non-blocking: fails (rather than hangs the test) if the service is not reading.
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b"go\n")
        os.close(fd)
        released.append(time.monotonic())

    timer = threading.Timer(0.3, release)
    timer.start()
    try:
        state = manager.wait_until_inactive("waiter.service", timeout=TIMEOUT)
        returned = time.monotonic()
    finally:
        timer.join()

    assert released, "the writer could not open the fifo"
    assert state is not None
    assert (state.name, state.active_state, state.sub_state) == (
        "waiter.service",
        "inactive",
        "dead",
    )
    assert returned - released[0] < 2.0
    # Already inactive: answers from the current state, without waiting for a change.
    assert manager.wait_until_inactive("waiter.service", timeout=0) == state


@pytest.mark.systemd
def test_wait_until_inactive_reports_a_failure(systemd_sandbox: Sandbox, manager: Manager) -> None:
    install_unit(systemd_sandbox, "crasher.service", service("/bin/sh -c 'sleep 0.3; exit 7'"))
    manager.start_unit("crasher.service", TIMEOUT)

    state = manager.wait_until_inactive("crasher.service", timeout=TIMEOUT)

    assert state is not None
    assert state.active_state == "failed"


@pytest.mark.systemd
def test_a_lost_connection_is_a_systemd_error(systemd_sandbox: Sandbox, manager: Manager) -> None:
    systemd_sandbox.stop()  # the manager stops its bus with it

    with pytest.raises(
        SystemdError, match=r"query the state of gone\.service: lost the connection"
    ):
        manager.unit_state("gone.service")
    with pytest.raises(SystemdError, match=r"start gone\.service: the connection .* is closed"):
        manager.start_unit("gone.service", TIMEOUT)


def test_connecting_to_no_bus_says_what_to_check(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    address = f"unix:path={tmp_path}/nowhere/bus"
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", address)

    with pytest.raises(BusUnavailable) as caught:
        Manager.connect(Scope.USER)

    message = str(caught.value)
    assert message.startswith("cannot connect to the session bus: FileNotFoundError")
    assert address in message
    assert "DBUS_SESSION_BUS_ADDRESS" in message
    assert "systemctl --user status dbus.socket" in message
    assert isinstance(caught.value, SystemdError)


def test_connecting_without_any_bus_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)

    with pytest.raises(
        BusUnavailable, match="neither DBUS_SESSION_BUS_ADDRESS nor XDG_RUNTIME_DIR"
    ):
        Manager.connect(Scope.USER)


@pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon")
def test_connecting_to_a_bus_without_systemd(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    address = f"unix:path={tmp_path}/bus"
    daemon = subprocess.Popen(
        ["dbus-daemon", "--session", f"--address={address}", "--nofork", "--print-address"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert daemon.stdout is not None
        daemon.stdout.readline()  # printed once it listens
        monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", address)

        with pytest.raises(BusUnavailable, match="systemd is not on it"):
            Manager.connect(Scope.USER)
    finally:
        daemon.kill()
        daemon.wait()


@pytest.mark.systemd
def test_connecting_falls_back_to_the_runtime_dir(
    systemd_sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS")
    wait_for_bus(systemd_sandbox)

    with Manager.connect(Scope.USER) as manager:
        assert manager.unit_state("default.target").load_state == "loaded"


def signal(path: str, interface: str, member: str, signature: str, *body: object) -> Message:
    return new_signal(DBusAddress(path, interface=interface), member, signature, body)


def forge(destination: str, message: Message) -> None:
    """Sends a signal that claims to be systemd's, from another connection to the bus,
    addressed to destination alone (a unicast signal: match rules do not stop it)."""
    with open_dbus_connection(bus=bus_address(Scope.USER)) as forger:
        message.header.fields[HeaderFields.destination] = destination
        forger.send(message)


def forge_inactive(destination: str, unit_path: str) -> None:
    """What a local user sent to make a shim believe its backend had stopped, and a body
    that no longer fits PropertiesChanged (it once killed the shim's watcher thread)."""
    changed = {"ActiveState": ("s", "inactive"), "SubState": ("s", "dead")}
    changes = (unit_path, PROPERTIES_INTERFACE, "PropertiesChanged")
    forge(destination, signal(*changes, "sa{sv}as", UNIT_INTERFACE, changed, []))
    forge(destination, signal(*changes, "ss", UNIT_INTERFACE, "x"))


@pytest.mark.systemd
def test_forged_signals_do_not_end_a_wait(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    fifo = tmp_path / "release"
    os.mkfifo(fifo)
    install_unit(
        systemd_sandbox, "forged.service", service(f"/bin/sh -c 'read x < {fifo}'", kind="exec")
    )
    warnings: list[str] = []
    with Manager.connect(Scope.USER, warn=warnings.append) as manager:
        manager.start_unit("forged.service", TIMEOUT)
        ended: list[object] = []
        waiter = threading.Thread(
            target=lambda: ended.append(manager.wait_until_inactive("forged.service", TIMEOUT))
        )
        waiter.start()
        time.sleep(0.2)  # the match is in place
        forge_inactive(manager.unique_name, "/org/freedesktop/systemd1/unit/forged_2eservice")
        time.sleep(0.5)
        assert ended == [], "a forged signal ended the wait"
        assert len(warnings) == 2, warnings
        assert all("PropertiesChanged" in w and "not systemd" in w for w in warnings), warnings

        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b"go\n")
        os.close(fd)
        waiter.join(TIMEOUT)
        [state] = ended
        assert state is not None and state.active_state == "inactive"  # type: ignore[attr-defined]


@pytest.mark.systemd
def test_a_forged_job_removed_does_not_fail_a_start(systemd_sandbox: Sandbox) -> None:
    """The forger guesses the job's path from the last job's number."""
    install_unit(
        systemd_sandbox,
        "slowstart.service",
        "[Service]\nType=exec\nExecStartPre=/bin/sleep 1\nExecStart=/bin/sleep 60\n",
    )
    install_unit(systemd_sandbox, "probe.service", service("/bin/true", kind="oneshot"))
    warnings: list[str] = []
    with Manager.connect(Scope.USER, warn=warnings.append) as manager:
        call = manager._manager_call("StartUnit", "ss", ("probe.service", "replace"))
        (job,) = manager._call(call, "start", "probe.service", TIMEOUT)
        number = int(str(job).rsplit("/", 1)[1])
        errors: list[BaseException] = []

        def start() -> None:
            try:
                manager.start_unit("slowstart.service", TIMEOUT)
            except BaseException as error:
                errors.append(error)

        starter = threading.Thread(target=start)
        starter.start()
        time.sleep(0.3)
        job_removed = (MANAGER_PATH, MANAGER_INTERFACE, "JobRemoved")
        for guess in range(number + 1, number + 20):
            job_path = f"/org/freedesktop/systemd1/job/{guess}"
            removed = (guess, job_path, "slowstart.service", "failed")
            forge(manager.unique_name, signal(*job_removed, "uoss", *removed))
        starter.join(TIMEOUT)
        assert errors == []
        assert manager.unit_state("slowstart.service").active_state == "active"
        assert warnings and all("JobRemoved" in w for w in warnings), warnings
        manager.stop_unit("slowstart.service", TIMEOUT)
