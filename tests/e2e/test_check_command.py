"""Resources measured by large-model-proxy's CheckCommand (issue 12, point 4): the command
prints what is free; it runs before a start that needs the resource, and again every
CheckWhenNotEnoughIntervalMilliseconds and whenever a model stops, while it is short.
lmproxy's own idle models that are why it is short are evicted; what other programs hold
is waited for, within the wait bound.

The "GPU" here is a script: 24000 less what the running fake models say they use (their
GET /memory) and less what the test says other programs hold (a file it changes)."""

from __future__ import annotations

import concurrent.futures
import sys
import time
from pathlib import Path

from lmproxy.sandbox import Sandbox
from tests.e2e.helpers import (
    fake_model,
    free_port,
    http_get,
    install,
    journal,
    service_state,
    status_json,
    turned_away,
    write_config,
)

GPU_SCRIPT = """
import sys, urllib.request
used = int(open(sys.argv[1]).read())
for port in sys.argv[2:]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/memory", timeout=2) as answer:
            used += int(__import__("json").load(answer)["memory_mib"])
    except OSError:
        pass  # not running: it uses nothing
print(24000 - used)
"""


def gpu(tmp_path: Path, held_outside: int, *backend_ports: int) -> tuple[str, Path]:
    """The CheckCommand, and the file that says what other programs hold."""
    script, outside = tmp_path / "gpu.py", tmp_path / "outside"
    script.write_text(GPU_SCRIPT)
    outside.write_text(str(held_outside))
    ports = " ".join(str(port) for port in backend_ports)
    return f"{sys.executable} {script} {outside} {ports}", outside


def model(name: str, port: int) -> dict[str, object]:
    """A model that needs 16000 of the GPU, and uses as much while running."""
    return fake_model(name, port, needs={"VRAM": 16000}, extra_args="--memory 16000")


def install_measured(
    sandbox: Sandbox, tmp_path: Path, held_outside: int, *names: str, **top: object
) -> tuple[list[int], Path]:
    ports = [free_port() for _ in names]
    command, outside = gpu(tmp_path, held_outside, *(port + 10000 for port in ports))
    resources = {"VRAM": {"CheckCommand": command, "CheckWhenNotEnoughIntervalMilliseconds": 200}}
    services = [model(name, port) for name, port in zip(names, ports, strict=True)]
    config = write_config(tmp_path / "config.json", services, ResourcesAvailable=resources, **top)
    install(sandbox, config)
    return ports, outside


def test_a_start_waits_while_other_programs_hold_the_room_and_goes_once_it_is_back(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    [port], outside = install_measured(systemd_sandbox, tmp_path, 20000, "a")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        answer = pool.submit(http_get, port)
        time.sleep(1.5)
        assert not answer.done()  # 4000 free, 16000 needed: it waits, nobody is evicted
        assert service_state(systemd_sandbox, "a") == "starting"
        outside.write_text("0")  # the other program is done
        assert answer.result(timeout=30)["model"] == "a"
        assert time.monotonic() - started < 10
    said = journal(systemd_sandbox, "LMPROXY_SERVICE=a")
    assert "measured 4000 VRAM free (needs 16000)" in said
    assert "programs outside lmproxy" in said
    assert "measured 24000 VRAM free (needs 16000)" in said
    resources = {r["name"]: r for r in status_json(systemd_sandbox)["resources"]}
    assert resources["VRAM"]["available"] is None  # measured only: no declared total
    assert resources["VRAM"]["measured"]["free"] == 24000


def test_an_idle_model_that_is_why_the_room_is_short_is_evicted(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """The check says 8000 free while a runs (it uses 16000): b needs 16000, and a, idle,
    is evicted for it; b starts once the check shows a's memory back."""
    (a, b), _ = install_measured(systemd_sandbox, tmp_path, 0, "a", "b")
    assert http_get(a)["model"] == "a"
    assert http_get(b)["model"] == "b"
    assert service_state(systemd_sandbox, "a") == "cold"
    said = journal(systemd_sandbox, "LMPROXY_SERVICE=b")
    assert "measured 8000 VRAM free (needs 16000)" in said
    assert "evicting a" in said


def test_a_start_that_never_gets_the_room_is_turned_away_naming_who_holds_it(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    [port], _ = install_measured(
        systemd_sandbox,
        tmp_path,
        20000,
        "a",
        MaxTimeToWaitForServiceToCloseConnectionBeforeGivingUpSeconds=3,
        SwapAfterWaitingSeconds=1,
    )
    started = time.monotonic()
    assert turned_away(port)
    assert 2.5 < time.monotonic() - started < 15
    said = journal(systemd_sandbox, "LMPROXY_SERVICE=a")
    assert "gave up after 3 s" in said and "programs outside lmproxy" in said


def test_a_failing_check_counts_as_nothing_free(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    port = free_port()
    resources = {"VRAM": {"CheckCommand": "echo 'no GPU here'; exit 3"}}
    config = write_config(
        tmp_path / "config.json",
        [model("a", port)],
        ResourcesAvailable=resources,
        MaxTimeToWaitForServiceToCloseConnectionBeforeGivingUpSeconds=2,
        SwapAfterWaitingSeconds=1,
    )
    install(systemd_sandbox, config)
    assert turned_away(port)
    said = journal(systemd_sandbox, "LMPROXY_SERVICE=a")
    assert "the CheckCommand of VRAM failed (it exited with status 3: no GPU here)" in said
