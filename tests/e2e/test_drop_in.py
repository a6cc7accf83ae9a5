"""large-model-proxy's configs, as its users and Go's encoder write them, installed unchanged
(issue 12): every unset optional field written as null, its current top-level fields, and a
healthcheck interval of 0 (its default)."""

from __future__ import annotations

import json
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
        "ResourcesAvailable": {"VRAM": 24000},
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
