"""large-model-proxy's configs, as its users and Go's encoder write them, installed unchanged
(issue 12): every unset optional field written as null, its current top-level fields, and a
healthcheck interval of 0 (its default)."""

from __future__ import annotations

import json
from pathlib import Path

from lmproxy.sandbox import Sandbox
from tests.e2e.helpers import fake_model, free_port, http_get, install


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
