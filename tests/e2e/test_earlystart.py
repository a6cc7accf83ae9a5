"""The shim's first stage (lmproxy.earlystart) against the real systemd: it starts a cold
model that fits before the rest of lmproxy is imported, and leaves every other start to
the shim, which then does all of it as before (issue 16)."""

from __future__ import annotations

import json
from pathlib import Path

from lmproxy.paths import Scope, paths_for
from lmproxy.sandbox import Sandbox
from tests.e2e.helpers import (
    fake_model,
    free_port,
    http_get,
    install,
    journal,
    service_state,
    service_status,
    turned_away,
    wait_for,
    write_config,
)


def started_lines(sandbox: Sandbox, name: str) -> list[str]:
    """The journal's `started` lines of name's shim, oldest first, with their stage."""
    output = journal(
        sandbox, "-o", "json", f"LMPROXY_SERVICE={name}", "LMPROXY_EVENT=started"
    ).splitlines()
    return [json.loads(line).get("LMPROXY_STAGE", "shim") for line in output if line]


def no_first_stage_failure(sandbox: Sandbox) -> None:
    assert journal(sandbox, "LMPROXY_EVENT=early-failed") == ""


def test_a_cold_model_that_fits_is_started_by_the_first_stage(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "cold.json",
        [fake_model("cold", port, needs={"VRAM": 1000}, ShutDownAfterInactivitySeconds=1)],
    )
    install(systemd_sandbox, config)
    # The first start of all: no ledger yet, the first stage writes it.
    assert http_get(port)["model"] == "cold"
    wait_for(lambda: service_state(systemd_sandbox, "cold") == "cold", what="idle stop")
    # Again, now that the ledger holds what the idle stop left.
    assert http_get(port)["model"] == "cold"
    assert started_lines(systemd_sandbox, "cold") == ["first", "first"]
    reserved = journal(systemd_sandbox, "LMPROXY_SERVICE=cold", "LMPROXY_EVENT=reserved")
    assert reserved.splitlines() == ["reserved 1000 VRAM", "reserved 1000 VRAM"]
    ready = journal(systemd_sandbox, "LMPROXY_SERVICE=cold", "LMPROXY_EVENT=ready")
    assert len(ready.splitlines()) == 2
    no_first_stage_failure(systemd_sandbox)


def test_a_start_that_must_evict_is_left_to_the_shim(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    first, second = free_port(), free_port()
    config = write_config(
        tmp_path / "evict.json",
        [
            fake_model("first", first, needs={"VRAM": 16000}),
            fake_model("second", second, needs={"VRAM": 16000}),
        ],
    )
    install(systemd_sandbox, config)
    assert http_get(first)["model"] == "first"
    assert http_get(second)["model"] == "second"
    assert service_state(systemd_sandbox, "first") == "cold"  # evicted
    assert started_lines(systemd_sandbox, "first") == ["first"]
    assert started_lines(systemd_sandbox, "second") == ["shim"]
    evicted = journal(systemd_sandbox, "LMPROXY_SERVICE=second", "LMPROXY_EVENT=evict")
    assert "evicting first" in evicted
    no_first_stage_failure(systemd_sandbox)


def test_a_config_changed_since_install_is_not_planned_from_the_old_one(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """Someone edits the installed config by hand: the plan install wrote no longer
    matches its bytes, so the shim reads the config and decides, as before."""
    port = free_port()
    config = write_config(tmp_path / "edited.json", [fake_model("edited", port)])
    install(systemd_sandbox, config)
    installed = paths_for(Scope.USER, systemd_sandbox.env()).installed_config
    document = json.loads(installed.read_text())
    document["Services"][0]["ResourceRequirements"] = {"VRAM": 2000}
    installed.write_text(json.dumps(document))
    assert http_get(port)["model"] == "edited"
    assert started_lines(systemd_sandbox, "edited") == ["shim"]
    reserved = journal(systemd_sandbox, "LMPROXY_SERVICE=edited", "LMPROXY_EVENT=reserved")
    assert reserved.strip() == "reserved 2000 VRAM"
    no_first_stage_failure(systemd_sandbox)


def test_a_failed_first_stage_start_is_clean(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    """StartUnit sent by the first stage fails (no such command): the shim turns the client
    away, and the reservation is gone, as for any failed start."""
    port, other = free_port(), free_port()
    config = write_config(
        tmp_path / "missing.json",
        [
            fake_model("missing", port, needs={"VRAM": 20000}, Command="/opt/not-yet/server"),
            fake_model("other", other, needs={"VRAM": 20000}),
        ],
    )
    install(systemd_sandbox, config)
    assert turned_away(port)
    assert started_lines(systemd_sandbox, "missing") == ["first"]
    failed = journal(systemd_sandbox, "LMPROXY_SERVICE=missing", "LMPROXY_EVENT=failed")
    assert "cannot serve missing" in failed, failed
    # One attempt: the shim does not start it a second time after the first stage.
    assert "the start job the first stage queued failed" in failed, failed
    wait_for(lambda: service_status(systemd_sandbox, "missing")["reserved"] == {}, what="release")
    # The room it reserved is free again: the other model starts without evicting.
    assert http_get(other)["model"] == "other"
    assert started_lines(systemd_sandbox, "other") == ["first"]
    no_first_stage_failure(systemd_sandbox)
