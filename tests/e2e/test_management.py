"""The management API (issue 12): large-model-proxy's GET /status and a status page, served by
a socket-activated service that runs nothing until the first request; the page tested in
a real headless browser (Debian's chromium, through chromium-driver and python3-selenium)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmproxy.sandbox import Sandbox
from tests.e2e.helpers import (
    fake_model,
    free_port,
    http_get,
    install,
    lmproxy,
    unit_state,
    wait_for,
    write_config,
)

MANAGEMENT = "lmproxy-api@management.service"


def get(port: int, path: str) -> tuple[int, str, bytes]:
    """One request: status, content type and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers.get("Content-Type", ""), body


def status(port: int) -> dict[str, Any]:
    code, kind, body = get(port, "/status")
    assert code == 200 and kind == "application/json", body
    document: dict[str, Any] = json.loads(body)
    return document


def by_name(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in document["services"]}


@pytest.fixture
def installed(systemd_sandbox: Sandbox, tmp_path: Path) -> Iterator[tuple[int, int, int]]:
    """Two models that cannot run together, and the management API; their ports."""
    api, small, large = free_port(), free_port(), free_port()
    config = write_config(
        tmp_path / "config.json",
        [
            fake_model("small/model", small, needs={"VRAM": 16000}),
            fake_model("large", large, needs={"VRAM": 20000}, ServiceUrl=None),
        ],
        ManagementApi={"ListenPort": api},
        DefaultServiceUrl="http://localhost:{{.PORT}}/",
    )
    install(systemd_sandbox, config)
    yield api, small, large


def test_status_is_large_model_proxys_and_nothing_runs_before_it_is_asked(
    systemd_sandbox: Sandbox, installed: tuple[int, int, int]
) -> None:
    api, small, _large = installed
    assert unit_state(systemd_sandbox, MANAGEMENT) == "inactive"  # socket-activated
    document = status(api)
    assert unit_state(systemd_sandbox, MANAGEMENT) == "active"
    services = by_name(document)
    assert services["small/model"] == {
        "name": "small/model",
        "listen_port": str(small),
        "status": "stopped",
        "waiting_connections": 0,
        "proxied_connections": 0,
        "last_used": None,
        "service_url": f"http://localhost:{small}/",
        "resource_requirements": {"VRAM": 16000},
        "state": "cold",
        "listen": f"127.0.0.1:{small}",
    }
    assert "service_url" not in services["large"]
    assert document["resources"]["VRAM"] == {
        "total": 24000,
        "reserved_by_starting_services": 0,
        "in_use": 0,
        "free": 24000,
        "usage_by_service": {},
    }

    assert http_get(small)["model"] == "small/model"
    # The shim relays its first clients before it records the model ready: a moment later.
    wait_for(lambda: by_name(status(api))["small/model"]["status"] == "running")
    services = by_name(status(api))
    assert services["small/model"]["last_used"].endswith("Z")
    assert status(api)["resources"]["VRAM"]["usage_by_service"] == {"small/model": 16000}

    code, kind, page = get(api, "/")
    assert code == 200 and kind.startswith("text/html")
    assert b"small/model" in page
    assert get(api, "/nothing")[0] == 404


def test_a_client_waiting_for_a_starting_model_is_counted(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    api, slow = free_port(), free_port()
    config = write_config(
        tmp_path / "slow.json",
        [fake_model("slow", slow, delay=3)],
        ManagementApi={"ListenPort": api},
    )
    install(systemd_sandbox, config)
    waiting = [socket.create_connection(("127.0.0.1", slow)) for _ in range(3)]
    try:
        for client in waiting:
            client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_for(lambda: by_name(status(api))["slow"]["waiting_connections"] >= 2, timeout=3)
        assert by_name(status(api))["slow"]["status"] == "starting"
    finally:
        for client in waiting:
            client.close()


def test_the_management_port_is_checked_like_a_service_port(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "clash.json", [fake_model("m", port)], ManagementApi={"ListenPort": port}
    )
    result = lmproxy(systemd_sandbox, "install", "--user", "--config", str(config))
    assert result.returncode == 2
    assert "$.ManagementApi.ListenPort: ListenPort" in result.stderr
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        config = write_config(
            tmp_path / "taken.json", [fake_model("m", port)], ManagementApi={"ListenPort": taken}
        )
        result = lmproxy(systemd_sandbox, "install", "--user", "--config", str(config))
    assert result.returncode == 2
    assert f"$.ManagementApi.ListenPort: 127.0.0.1:{taken} is already in use" in result.stderr


# --- The page, in a real browser -------------------------------------------------------------


def browser() -> Any:
    """Headless chromium through chromium-driver; skipped where it is not installed
    unless LMPROXY_REQUIRE_BROWSER is set (CI sets it: tools/setup installs it)."""
    required = os.environ.get("LMPROXY_REQUIRE_BROWSER") == "1"
    driver_path = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        driver_path = None
    if driver_path is None:
        if required:
            pytest.fail("chromium-driver and python3-selenium are required (tools/setup)")
        pytest.skip("no chromium-driver and python3-selenium (tools/setup installs them)")
    options: Any = Options()  # (selenium's types are partial)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver_path), options=options)


# Read in one script: the page redraws its rows every second, and an element found in
# one call may be gone by the next.
ROW_TEXT = """
for (const row of document.querySelectorAll("#services tbody tr"))
  if (row.dataset.name === arguments[0]) return row.innerText;
return "";
"""
LINK = """
for (const row of document.querySelectorAll("#services tbody tr"))
  if (row.dataset.name === arguments[0]) return row.querySelector("a")?.href ?? null;
return null;
"""
RESOURCES = 'return document.querySelector("#resources tbody").innerText;'


def row_text(driver: Any, name: str) -> str:
    return str(driver.execute_script(ROW_TEXT, name))


def resources_text(driver: Any) -> str:
    return " ".join(str(driver.execute_script(RESOURCES)).split())


def test_the_status_page_shows_the_services_and_follows_a_model_starting(
    installed: tuple[int, int, int],
) -> None:
    api, small, _large = installed
    driver = browser()
    try:
        driver.get(f"http://127.0.0.1:{api}/")
        assert driver.title == "lmproxy"
        assert "stopped" in row_text(driver, "small/model")
        assert "stopped" in row_text(driver, "large")
        assert driver.execute_script(LINK, "small/model") == f"http://localhost:{small}/"
        assert "VRAM 24000 0 24000" in resources_text(driver)

        assert http_get(small)["model"] == "small/model"  # no reload: the page follows
        deadline = time.monotonic() + 10
        while "running" not in row_text(driver, "small/model"):
            assert time.monotonic() < deadline, row_text(driver, "small/model")
            time.sleep(0.2)
        wait = time.monotonic() + 5  # (recorded as it became ready, a moment later)
        while "VRAM 24000 16000 8000" not in resources_text(driver):
            assert time.monotonic() < wait, resources_text(driver)
            time.sleep(0.2)
        assert "updated" in driver.find_element("id", "updated").text
    finally:
        driver.quit()
