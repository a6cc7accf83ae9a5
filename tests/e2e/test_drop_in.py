"""large-model-proxy's configs, as its users and Go's encoder write them, installed unchanged
(issue 12): every unset optional field written as null, its current top-level fields, and a
healthcheck interval of 0 (its default)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmproxy.sandbox import Sandbox
from tests.e2e.helpers import (
    fake_model,
    free_port,
    http_get,
    install,
    journal,
    lmproxy,
    service_status,
    turned_away,
    wait_for,
    write_config,
)


def test_a_config_written_by_go_with_nulls_installs_and_serves(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    port = free_port()
    service = fake_model("go-written", port, needs={"VRAM": 1000})
    service.update(
        {
            "RestartOnConnectionFailure": None,
            "ConsiderStoppedOnProcessExit": None,
            "StartupTimeoutMilliseconds": None,
            "HealthcheckCommand": None,
            "HealthcheckIntervalMilliseconds": 0,
            "ShutDownAfterInactivitySeconds": None,
            "OpenAiApi": None,
            "OpenAiApiModels": None,
            "ServiceUrl": None,
            "LogFilePath": None,
            "WorkDir": None,
            "KillCommand": None,
        }
    )
    document = {
        # A resource in object form, as large-model-proxy writes it too.
        "ResourcesAvailable": {
            "VRAM": {
                "Amount": 24000,
                "CheckCommand": None,
                "CheckWhenNotEnoughIntervalMilliseconds": None,
            }
        },
        "Services": [service],
        "MaxTimeToWaitForServiceToCloseConnectionBeforeGivingUpSeconds": None,
        "OutputServiceLogs": None,
        "ShutDownAfterInactivitySeconds": None,
        "DefaultServiceUrl": None,
        "OpenAiApi": None,
        "ManagementApi": None,
        "LogLevel": "info",
        "ClientRequestBufferLimitBytes": 1048576,
    }
    config = tmp_path / "go.json"
    config.write_text(json.dumps(document, indent=2))
    install(systemd_sandbox, config)
    assert http_get(port)["model"] == "go-written"


def test_a_command_that_cannot_run_here_is_warned_of_and_its_start_fails_cleanly(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """A server installed later, or a shell builtin: large-model-proxy takes the config and
    the start fails when a client comes; so does lmproxy (--strict refuses it instead)."""
    later, builtin = free_port(), free_port()
    config = write_config(
        tmp_path / "missing.json",
        [
            fake_model("later", later, needs={"VRAM": 1000}, Command="/opt/not-yet/llama-server"),
            fake_model("builtin", builtin, Command="exit", Args="0"),
        ],
    )
    paths = ["$.Services[0].Command", "$.Services[1].Command"]
    for command in ("validate", "install"):
        strict = lmproxy(systemd_sandbox, command, "--user", "--config", str(config), "--strict")
        if command == "validate":  # validate takes no --user
            strict = lmproxy(systemd_sandbox, command, "--config", str(config), "--strict")
        assert strict.returncode == 2, strict.stderr
        assert all(path in strict.stderr for path in paths), strict.stderr
    nothing = lmproxy(systemd_sandbox, "status", "--user")
    assert "nothing installed" in nothing.stderr, nothing.stderr  # --strict changed nothing

    checked = lmproxy(systemd_sandbox, "validate", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    installed = lmproxy(systemd_sandbox, "install", "--user", "--config", str(config), "--now")
    assert installed.returncode == 0, installed.stderr
    for result in (checked, installed):
        assert all(f"warning: {path}" in result.stderr for path in paths), result.stderr

    for name, port in (("later", later), ("builtin", builtin)):
        assert turned_away(port)  # closed at once, not left hanging
        failed = journal(systemd_sandbox, f"LMPROXY_SERVICE={name}", "LMPROXY_EVENT=failed")
        assert f"cannot serve {name}" in failed, failed
        wait_for(lambda: service_status(systemd_sandbox, name)["reserved"] == {})  # noqa: B023


def test_relative_paths_resolve_where_install_ran_and_the_model_runs_there(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """large-model-proxy resolves relative paths where it was started, and runs a service
    without WorkDir there: lmproxy takes the directory `lmproxy install` ran in (not the
    config file's), records it, and the shim and backend run there."""
    models, configs, elsewhere = tmp_path / "models", tmp_path / "configs", tmp_path / "else"
    for folder in (models, configs, elsewhere):
        folder.mkdir()
    (models / "name.txt").write_text("from-the-install-dir")
    (models / "healthy").write_text("")
    (models / "logs").mkdir()
    script = models / "serve.sh"
    port = free_port()
    # The backend reads a relative path in its working directory, as a model file would be.
    script.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" -m lmproxy.fakemodel --port {port + 10000} '
        '--name "$(cat name.txt)"\n'
    )
    script.chmod(0o755)
    service = fake_model("relative", port, Command="./serve.sh", Args="")
    service["LogFilePath"] = "logs/relative.log"
    service["HealthcheckCommand"] = "test -f healthy"  # runs in the shim, in the same place
    config = write_config(configs / "config.json", [service])

    result = lmproxy(
        systemd_sandbox, "install", "--user", "--config", str(config), "--now", cwd=models
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert http_get(port)["model"] == "from-the-install-dir"
    assert (models / "logs" / "relative.log").is_file()
    # Commands that read the installed copy later do so from anywhere.
    status = lmproxy(systemd_sandbox, "status", "--user", "--json", cwd=elsewhere)
    assert status.returncode == 0, status.stderr
    assert "relative" in status.stdout

    # --base-dir names another directory; the install record follows it.
    other = tmp_path / "other"
    other.mkdir()
    (other / "name.txt").write_text("from-base-dir")
    (other / "healthy").write_text("")
    (other / "logs").mkdir()
    (other / "serve.sh").write_text(script.read_text())
    (other / "serve.sh").chmod(0o755)
    result = lmproxy(
        systemd_sandbox,
        "install",
        "--user",
        "--config",
        str(config),
        "--base-dir",
        str(other),
        cwd=elsewhere,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    stopped = lmproxy(systemd_sandbox, "stop", "--user", "relative")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    wait_for(lambda: service_status(systemd_sandbox, "relative")["state"] == "cold")
    assert http_get(port)["model"] == "from-base-dir"
    assert (other / "logs" / "relative.log").is_file()


def test_any_service_name_installs_serves_evicts_and_shows_as_written(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """Names large-model-proxy takes (its README's own, and others seen in configs): each
    gets units of its own; status, logs and the journal show the name as written."""
    names = [
        "Qwen/Qwen2.5-7B-Instruct",
        "Service TWO2\ufe0f\u20e3 \u0414\u0432\u0430",
        "{Service 3}",
        "$-_.+!*'(),\u043f\u0440\u043e\u0432\u0435\u0440\u043a\u0430-2/",
    ]
    ports = [free_port() for _ in names]
    # Each needs 16000 of 24000: every start evicts the one before.
    services = [
        fake_model(name, port, needs={"VRAM": 16000}, extra_args="")
        for name, port in zip(names, ports, strict=True)
    ]
    for service, port in zip(services, ports, strict=True):
        service["Args"] = f"-m lmproxy.fakemodel --name svc{port} --port {port + 10000} --delay 0.1"
    install(systemd_sandbox, write_config(tmp_path / "names.json", services))

    for name, port in zip(names, ports, strict=True):
        assert http_get(port)["model"] == f"svc{port}"
        # (its shim records it ready a moment after it relayed the first client)
        wait_for(lambda: service_status(systemd_sandbox, name)["state"] == "running")  # noqa: B023
    states = {name: service_status(systemd_sandbox, name)["state"] for name in names}
    assert all(states[name] == "cold" for name in names[:-1]), states

    table = lmproxy(systemd_sandbox, "status", "--user")
    assert table.returncode == 0, table.stderr
    for name in names:
        assert name in table.stdout
    logs = lmproxy(systemd_sandbox, "logs", names[0])
    assert logs.returncode == 0, logs.stderr
    assert f"svc{ports[0]}: model loaded" in logs.stdout  # the backend's own output
    assert "reserved 16000 VRAM" in logs.stdout  # the shim's decisions
    assert f"{names[0]} ready after" in logs.stdout
    assert f"evicting {names[0]} to free room" in journal(
        systemd_sandbox, f"LMPROXY_SERVICE={names[1]}"
    )


def test_two_names_with_one_unit_name_are_refused_and_nothing_changes(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    from lmproxy import unitnames

    first = "a/b"
    twin = unitnames.component(first)
    config = write_config(
        tmp_path / "twins.json",
        [fake_model(first, free_port()), fake_model(twin, free_port())],
    )
    result = lmproxy(systemd_sandbox, "install", "--user", "--config", str(config), "--now")
    assert result.returncode == 2
    assert f"'a/b' ($.Services[0]) and {twin!r} both give the unit name" in result.stderr
    assert "nothing was changed" in result.stderr
