"""System mode end to end: `lmproxy install --system` under a real system manager.

The manager (tests/e2e/system_manager.py) runs in PID and mount namespaces of
its own, with the system bus and polkit. What is checked is what system mode
promises: the units load, the shims run as the unprivileged `lmproxy` user and
polkit lets them start and stop lmproxy's backend units (their own, and a
sibling's to make room), backends run as `lmproxy-model` with the GPU groups,
the ledger belongs to lmproxy, and the shims' user may touch no other unit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import helpers, system_manager
from tests.e2e.helpers import free_port, http_get, wait_for
from tests.e2e.system_manager import SystemManager

pytestmark = pytest.mark.systemd

CONFIG = "/run/lmproxy-sandbox/config.json"


def lmproxy(m: SystemManager, *args: str) -> subprocess.CompletedProcess[str]:
    """The lmproxy under test (helpers.lmproxy_command), inside the namespaces."""
    return m.run([*helpers.lmproxy_command(), *args], timeout=120)


def fake_model(m: SystemManager, name: str, port: int, **fields: Any) -> dict[str, Any]:
    """helpers.fake_model, importing lmproxy from the namespace's copy of the checkout."""
    environment = {"PYTHONPATH": m.python_path} if m.python_path else {}
    return helpers.fake_model(name, port, Environment=environment, **fields)


def install(m: SystemManager, services: list[dict[str, Any]], **top: Any) -> None:
    document = {"ResourcesAvailable": {"VRAM": 24000}, "Services": services, **top}
    m.path(CONFIG).write_text(json.dumps(document))
    result = lmproxy(m, "install", "--system", "--config", CONFIG, "--now")
    assert result.returncode == 0, result.stdout + result.stderr


def ids(m: SystemManager, unit: str) -> tuple[set[int], set[int]]:
    """The (real, effective, saved, file-system) uids and the groups of unit's main process."""
    pid = m.show(unit, "MainPID")
    assert pid not in ("", "0"), f"{unit} has no main process"
    status = m.run(["cat", f"/proc/{pid}/status"]).stdout
    fields = dict(line.split(":", 1) for line in status.splitlines())
    return {int(u) for u in fields["Uid"].split()}, {int(g) for g in fields["Groups"].split()}


def uid(m: SystemManager, user: str) -> int:
    return int(m.run(["id", "-u", user]).stdout)


def gid(m: SystemManager, group: str) -> int:
    return int(m.run(["getent", "group", group]).stdout.split(":")[2])


@pytest.fixture
def installed(manager: SystemManager) -> Iterator[tuple[int, int]]:
    """alpha and beta, which cannot both fit in VRAM; alpha stops after 3 idle seconds."""
    alpha, beta = free_port(), free_port()
    install(
        manager,
        [
            fake_model(
                manager,
                "alpha",
                alpha,
                ResourceRequirements={"VRAM": 16000},
                ShutDownAfterInactivitySeconds=3,
            ),
            fake_model(manager, "beta", beta, ResourceRequirements={"VRAM": 16000}),
        ],
    )
    yield alpha, beta
    result = lmproxy(manager, "uninstall", "--system")
    assert result.returncode == 0, result.stdout + result.stderr
    left = sorted(p.name for p in manager.path("/etc/systemd/system").iterdir())
    assert left == [], left


def test_system_units_load_and_are_listening(
    manager: SystemManager, installed: tuple[int, int]
) -> None:
    for name in ("alpha", "beta"):
        for unit in (
            f"lmproxy-{name}.socket",
            f"lmproxy-{name}.service",
            f"lmproxy-backend@{name}.service",
        ):
            assert manager.show(unit, "LoadState") == "loaded", unit
        assert manager.show(f"lmproxy-{name}.socket", "ActiveState") == "active"
        assert manager.show(f"lmproxy-backend@{name}.service", "ActiveState") == "inactive"
    assert manager.show("lmproxy.target", "ActiveState") == "active"


def test_shim_runs_unprivileged_and_starts_its_backend(
    manager: SystemManager, installed: tuple[int, int]
) -> None:
    alpha, _ = installed
    answer = http_get(alpha)
    assert answer["model"] == "alpha"

    shim_uids, shim_groups = ids(manager, "lmproxy-alpha.service")
    assert shim_uids == {uid(manager, "lmproxy")}
    assert shim_groups <= {gid(manager, "lmproxy")}  # no GPU, no other group
    backend_uids, backend_groups = ids(manager, "lmproxy-backend@alpha.service")
    assert backend_uids == {uid(manager, "lmproxy-model")}
    assert {gid(manager, "video"), gid(manager, "render")} <= backend_groups
    assert int(manager.show("lmproxy-backend@alpha.service", "MainPID")) == answer["pid"]

    ledger = manager.run(["stat", "-c", "%U %a", "/run/lmproxy", "/run/lmproxy/ledger.json"])
    owners = ledger.stdout.split("\n")
    assert owners[0].split()[0] == "lmproxy", ledger.stdout + ledger.stderr
    assert owners[1].split()[0] == "lmproxy", ledger.stdout + ledger.stderr


def test_shim_stops_its_idle_backend(manager: SystemManager, installed: tuple[int, int]) -> None:
    alpha, _ = installed
    http_get(alpha)
    wait_for(
        lambda: manager.show("lmproxy-backend@alpha.service", "ActiveState") == "inactive",
        15,
        "the idle backend to be stopped by its unprivileged shim",
    )
    assert manager.show("lmproxy-backend@alpha.service", "Result") == "success"


def test_shim_stops_a_sibling_to_make_room(
    manager: SystemManager, installed: tuple[int, int]
) -> None:
    alpha, beta = installed
    assert http_get(alpha)["model"] == "alpha"
    assert http_get(beta)["model"] == "beta"  # 16000 + 16000 > 24000: alpha must go
    assert manager.show("lmproxy-backend@alpha.service", "ActiveState") == "inactive"
    assert manager.show("lmproxy-backend@beta.service", "ActiveState") == "active"


def test_shims_user_may_touch_no_other_unit(
    manager: SystemManager, installed: tuple[int, int]
) -> None:
    as_lmproxy = ["setpriv", "--reuid=lmproxy", "--regid=lmproxy", "--clear-groups", "--"]
    refused = manager.run([*as_lmproxy, "systemctl", "--no-ask-password", "stop", "dbus.socket"])
    assert refused.returncode != 0
    assert "Access denied" in refused.stderr or "authentication required" in refused.stderr
    assert manager.show("dbus.socket", "ActiveState") == "active"
    # nor lmproxy's own socket and shim units: only the backends are theirs to start and stop
    refused = manager.run(
        [*as_lmproxy, "systemctl", "--no-ask-password", "stop", "lmproxy-beta.socket"]
    )
    assert refused.returncode != 0
    assert manager.show("lmproxy-beta.socket", "ActiveState") == "active"
    allowed = manager.run(
        [*as_lmproxy, "systemctl", "--no-ask-password", "start", "lmproxy-backend@beta.service"]
    )
    assert allowed.returncode == 0, allowed.stderr


def test_backend_runs_as_the_user_the_config_names(manager: SystemManager) -> None:
    port = free_port()
    install(manager, [fake_model(manager, "delta", port, User="nobody")])
    try:
        assert http_get(port)["model"] == "delta"
        backend_uids, backend_groups = ids(manager, "lmproxy-backend@delta.service")
        assert backend_uids == {uid(manager, "nobody")}
        assert gid(manager, "video") not in backend_groups  # only the default user has them
    finally:
        result = lmproxy(manager, "uninstall", "--system")
        assert result.returncode == 0, result.stdout + result.stderr


def test_no_other_user_reads_the_environment(manager: SystemManager) -> None:
    port = free_port()
    model = fake_model(manager, "keyed", port)
    model["Environment"]["API_KEY"] = "s3cret"
    install(manager, [model])
    try:
        pid = http_get(port)["pid"]
        environ = manager.run(["cat", f"/proc/{pid}/environ"]).stdout
        assert "API_KEY=s3cret" in environ.split("\0")
        as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
        grep = manager.run(
            [*as_nobody, "grep", "-rs", "s3cret", "/etc/systemd/system", "/etc/lmproxy"]
        )
        assert grep.stdout == "", grep.stdout
        shown = manager.run(
            [*as_nobody, "systemctl", "show", "-p", "Environment", "lmproxy-backend@keyed.service"]
        )
        assert shown.returncode == 0 and "s3cret" not in shown.stdout, shown.stdout
        owner = manager.run(["stat", "-c", "%U %a", "/etc/lmproxy/environment/keyed.env"])
        assert owner.stdout.split() == ["root", "600"], owner.stdout
    finally:
        result = lmproxy(manager, "uninstall", "--system")
        assert result.returncode == 0, result.stdout + result.stderr


def test_install_refuses_code_other_users_can_change(manager: SystemManager) -> None:
    """Root installing from a copy that another user may write would let that user run
    code as lmproxy (with its polkit rights) and as every backend's user."""
    unsafe = "/run/lmproxy-sandbox/unsafe"
    if manager.python_path:
        copied = manager.run(["cp", "-r", manager.python_path, unsafe])
    else:
        manager.run(["mkdir", unsafe])
        copied = manager.run(["cp", "-r", "/usr/lib/python3/dist-packages/lmproxy", unsafe])
    assert copied.returncode == 0, copied.stderr
    made_writable = manager.run(["chmod", "o+w", f"{unsafe}/lmproxy/shim.py"])
    assert made_writable.returncode == 0, made_writable.stderr
    manager.path(CONFIG).write_text(
        json.dumps({"Services": [fake_model(manager, "unsafe", free_port())]})
    )
    result = manager.run(
        ["/usr/bin/python3", "-m", "lmproxy", "install", "--system", "--config", CONFIG],
        env={"PYTHONPATH": unsafe},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{unsafe}/lmproxy/shim.py: writable by others" in result.stderr
    assert list(manager.path("/etc/systemd/system").iterdir()) == []
    manager.run(["rm", "-rf", unsafe])


def remove_script(m: SystemManager, kind: str) -> list[str]:
    """The command that removing the package runs before its files go: Debian's prerm
    (the installed one where the installed package is under test), or pacman's
    pre_remove."""
    installed_prerm = Path("/var/lib/dpkg/info/lmproxy.prerm")
    if kind == "debian" and os.environ.get("LMPROXY_COMMAND") and installed_prerm.exists():
        return [str(installed_prerm), "remove"]
    in_checkout = "debian/lmproxy.prerm" if kind == "debian" else "lmproxy.install"
    source = system_manager.CHECKOUT / in_checkout
    inside = f"/run/lmproxy-sandbox/{source.name}"
    m.path(inside).write_text(source.read_text())
    if kind == "debian":
        return ["sh", inside, "remove"]
    return ["sh", "-c", f". {inside} && pre_remove"]


@pytest.mark.parametrize("kind", ["debian", "arch"])
def test_removing_the_package_removes_the_units_it_installed(
    manager: SystemManager, kind: str
) -> None:
    port = free_port()
    install(manager, [fake_model(manager, "gamma", port)])
    assert http_get(port)["model"] == "gamma"
    env = {}
    if manager.python_path:  # the checkout: `lmproxy` on PATH runs it
        wrapper = manager.path("/run/lmproxy-sandbox/bin/lmproxy")
        wrapper.parent.mkdir(exist_ok=True)
        wrapper.write_text('#!/bin/sh\nexec /usr/bin/python3 -m lmproxy "$@"\n')
        wrapper.chmod(0o755)
        env["PATH"] = "/run/lmproxy-sandbox/bin:/usr/sbin:/usr/bin:/sbin:/bin"

    result = manager.run(remove_script(manager, kind), env=env)

    assert result.returncode == 0, result.stdout + result.stderr
    assert list(manager.path("/etc/systemd/system").iterdir()) == []
    assert not manager.path("/etc/lmproxy/installed-units.json").exists()
    for unit in ("lmproxy-gamma.socket", "lmproxy-backend@gamma.service"):
        assert manager.show(unit, "ActiveState") == "inactive", unit
    with pytest.raises(ConnectionRefusedError):
        http_get(port, timeout=5)


# Run as nobody inside the sandbox: finds the shims' connections on the system bus the
# way any local user can, and sends each of them signals claiming to be systemd's.
FORGER = """
import sys
from jeepney import DBusAddress, HeaderFields, new_signal
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

unit_path, shims_uid = sys.argv[1], int(sys.argv[2])
with open_dbus_connection(bus="SYSTEM") as bus:
    (names,) = bus.send_and_get_reply(message_bus.ListNames()).body
    targets = [
        name for name in names if name.startswith(":")
        and bus.send_and_get_reply(message_bus.GetConnectionUnixUser(name)).body[0] == shims_uid
    ]
    changes = DBusAddress(unit_path, interface="org.freedesktop.DBus.Properties")
    unit = "org.freedesktop.systemd1.Unit"
    inactive = {"ActiveState": ("s", "inactive"), "SubState": ("s", "dead")}
    for target in targets:
        for signature, body in [("sa{sv}as", (unit, inactive, []))] * 3 + [("ss", (unit, "x"))]:
            signal = new_signal(changes, "PropertiesChanged", signature, body)
            signal.header.fields[HeaderFields.destination] = target
            bus.send(signal)
    print(len(targets))
"""


def test_signals_forged_by_another_user_change_nothing(
    manager: SystemManager, installed: tuple[int, int]
) -> None:
    """Once, three forged PropertiesChanged made alpha's shim close its clients and exit
    while its backend ran on, and a malformed one killed the thread that watches it."""
    alpha, _ = installed
    backend = "lmproxy-backend@alpha.service"
    client = helpers.open_connection(alpha)
    try:
        assert b'"alpha"' in helpers.request_on(client)
        shim_pid = manager.show("lmproxy-alpha.service", "MainPID")
        unit_path = "/org/freedesktop/systemd1/unit/lmproxy_2dbackend_40alpha_2eservice"
        as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
        forger = ["/usr/bin/python3", "-c", FORGER, unit_path, str(uid(manager, "lmproxy"))]
        forged = manager.run([*as_nobody, *forger])
        assert forged.returncode == 0, forged.stderr
        assert int(forged.stdout) >= 2, forged.stdout  # the shim's connections
        wait_for(
            lambda: "not systemd" in journal_of(manager, "lmproxy-alpha.service"),
            10,
            "the shim to log the signals it ignored",
        )
        # The client that was open is still served, and so is a new one.
        assert b'"alpha"' in helpers.request_on(client)
        assert http_get(alpha)["model"] == "alpha"
        assert manager.show("lmproxy-alpha.service", "MainPID") == shim_pid
        assert manager.show(backend, "ActiveState") == "active"
    finally:
        client.close()
    # The watcher still hears the real stop: the shim exits after it.
    stopped = manager.run(["systemctl", "stop", backend])
    assert stopped.returncode == 0, stopped.stderr
    wait_for(
        lambda: manager.show("lmproxy-alpha.service", "ActiveState") == "inactive",
        15,
        "the shim to notice its backend's real stop and exit",
    )


def journal_of(m: SystemManager, unit: str) -> str:
    return m.run(["journalctl", "--no-pager", "-o", "cat", "-u", unit]).stdout


LEAVE_STOPPING = """
import json, os, sys
path, name, uid = "/run/lmproxy/ledger.json", sys.argv[1], int(sys.argv[2])
ledger = json.load(open(path))
ledger["services"][name]["state"] = "stopping"
with open(path + ".new", "w") as new:
    json.dump(ledger, new)
os.chown(path + ".new", uid, uid)
os.rename(path + ".new", path)
"""


def test_an_entry_left_stopping_with_a_live_backend_is_repaired(manager: SystemManager) -> None:
    """alpha's shim is gone and its entry says stopping, while its backend runs: nobody
    will finish that stop. beta needs alpha's room: it must not wait for ever."""
    alpha, beta = free_port(), free_port()
    install(
        manager,
        [
            fake_model(manager, "alpha", alpha, ResourceRequirements={"VRAM": 16000}),
            fake_model(manager, "beta", beta, ResourceRequirements={"VRAM": 16000}),
        ],
        MaxTimeToWaitForServiceToCloseConnectionBeforeGivingUpSeconds=8,
    )
    try:
        assert http_get(alpha)["model"] == "alpha"
        killed = manager.run(["systemctl", "kill", "-s", "KILL", "lmproxy-alpha.service"])
        assert killed.returncode == 0, killed.stderr
        wait_for(lambda: manager.show("lmproxy-alpha.service", "ActiveState") != "active", 10)
        assert manager.show("lmproxy-backend@alpha.service", "ActiveState") == "active"
        left = manager.run(
            ["/usr/bin/python3", "-c", LEAVE_STOPPING, "alpha", str(uid(manager, "lmproxy"))]
        )
        assert left.returncode == 0, left.stderr

        assert http_get(beta, timeout=30)["model"] == "beta"

        assert manager.show("lmproxy-backend@alpha.service", "ActiveState") == "inactive"
        assert "alpha was left stopping" in journal_of(manager, "lmproxy-beta.service")
    finally:
        result = lmproxy(manager, "uninstall", "--system")
        assert result.returncode == 0, result.stdout + result.stderr


def test_commands_act_as_the_shims_user_and_keep_the_ledger_theirs(
    manager: SystemManager, installed: tuple[int, int]
) -> None:
    """`lmproxy start/stop --system` (as root) transact as `lmproxy`: the ledger stays
    the shims' (a root-owned one would lock them out) and polkit lets the stop through."""
    started = lmproxy(manager, "start", "--system", "beta")
    assert started.returncode == 0, started.stdout + started.stderr
    assert manager.show("lmproxy-backend@beta.service", "ActiveState") == "active"
    stopped = lmproxy(manager, "stop", "--system", "beta")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert manager.show("lmproxy-backend@beta.service", "ActiveState") == "inactive"
    owner = manager.run(["stat", "-c", "%U", "/run/lmproxy/ledger.json"]).stdout.strip()
    assert owner == "lmproxy"
    _, beta = installed
    assert http_get(beta)["model"] == "beta"  # the shims still use the ledger


def test_the_management_api_runs_unprivileged_and_reads_the_shims_ledger(
    manager: SystemManager,
) -> None:
    api, alpha = free_port(), free_port()
    install(
        manager,
        [fake_model(manager, "alpha", alpha, ResourceRequirements={"VRAM": 16000})],
        ManagementApi={"ListenPort": api},
    )
    try:
        assert manager.show("lmproxy-api@management.service", "ActiveState") == "inactive"
        assert http_get(alpha)["model"] == "alpha"

        def status() -> dict[str, Any]:
            with socket.create_connection(("127.0.0.1", api), timeout=30) as conn:
                conn.sendall(b"GET /status HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
            assert data.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), data
            document: dict[str, Any] = json.loads(data.partition(b"\r\n\r\n")[2])
            return document

        # The shim relays its first client before it records the model ready.
        wait_for(lambda: status()["services"][0]["status"] == "running")
        document = status()
        [service] = document["services"]
        assert service["name"] == "alpha"
        assert document["resources"]["VRAM"]["usage_by_service"] == {"alpha": 16000}
        api_uids, api_groups = ids(manager, "lmproxy-api@management.service")
        assert api_uids == {uid(manager, "lmproxy")}
        assert api_groups <= {gid(manager, "lmproxy")}
    finally:
        result = lmproxy(manager, "uninstall", "--system")
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_router_runs_unprivileged_and_alone_reaches_the_private_sockets(
    manager: SystemManager,
) -> None:
    router, alpha = free_port(), free_port()
    private = fake_model(manager, "Qwen/Qwen2.5", free_port(), OpenAiApi=True)
    del private["ListenPort"]
    install(
        manager,
        [fake_model(manager, "alpha", alpha, OpenAiApi=True), private],
        OpenAiApi={"ListenPort": router},
    )
    try:
        assert manager.show("lmproxy-api@openai.service", "ActiveState") == "inactive"

        def ask(model: str) -> dict[str, Any]:
            body = json.dumps({"model": model}).encode()
            with socket.create_connection(("127.0.0.1", router), timeout=60) as conn:
                conn.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
                )
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 200"), data
            event = data.split(b"data: ", 1)[1].split(b"\n", 1)[0]
            answer: dict[str, Any] = json.loads(event)
            return answer

        assert ask("Qwen/Qwen2.5")["model"] == "Qwen/Qwen2.5"
        assert ask("alpha")["model"] == "alpha"
        router_uids, router_groups = ids(manager, "lmproxy-api@openai.service")
        assert router_uids == {uid(manager, "lmproxy")}
        assert router_groups <= {gid(manager, "lmproxy")}
        [sock] = manager.path("/run/lmproxy-private").iterdir()
        info = sock.stat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (
            uid(manager, "lmproxy"),
            gid(manager, "lmproxy"),
            0o600,
        )
    finally:
        result = lmproxy(manager, "uninstall", "--system")
        assert result.returncode == 0, result.stdout + result.stderr
