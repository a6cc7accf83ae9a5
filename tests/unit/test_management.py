"""The management API's document: large-model-proxy's GET /status, field for field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmproxy.config import parse_config
from lmproxy.management import status_document, status_page
from lmproxy.status import ResourceStatus, ServiceStatus

CONFIG = {
    "ManagementApi": {"ListenPort": "7070"},
    "DefaultServiceUrl": "http://localhost:{{.PORT}}/ui",
    "ResourcesAvailable": {"VRAM": 24000, "RAM": {"Amount": 1000}},
    "Services": [
        {"Name": "a", "ListenPort": "8080", "ProxyTargetPort": "18080", "Command": "/bin/true",
         "ResourceRequirements": {"VRAM": 1000, "RAM": 10}},
        {"Name": "b", "ListenPort": "8081", "ProxyTargetPort": "18081", "Command": "/bin/true",
         "ServiceUrl": None},
        {"Name": "<c & d>", "ListenPort": 8082, "ProxyTargetPort": 18082, "Command": "/bin/true",
         "ServiceUrl": "http://gpu-box:{{ .PORT }}/"},
        {"Name": "w", "ListenPort": 8083, "ProxyTargetPort": 18083, "Command": "/bin/true",
         "ResourceRequirements": {"VRAM": 24000}},
    ],
}  # fmt: skip


def status(name: str, state: str, **fields: Any) -> ServiceStatus:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:1",
        "backend_unit": f"lmproxy-backend@{name}.service",
        "reserved": {},
        "connections": 0,
        "last_used": None,
        "waiting_since": None,
    }
    values.update(fields)
    return ServiceStatus(name=name, state=state, **values)


def test_the_document_is_large_model_proxys_field_for_field() -> None:
    config = parse_config(json.dumps(CONFIG), Path("/srv"))
    services = [
        status("a", "starting", reserved={"VRAM": 1000, "RAM": 10}, last_used=1764616315.4353),
        status("b", "cold"),
        status("<c & d>", "running", connections=2, reserved={}),
        status("w", "starting", waiting_for_resources=True),
    ]
    resources = [ResourceStatus("RAM", 1000, 10), ResourceStatus("VRAM", 24000, 1000)]
    document = status_document(config, services, resources, {"a": 3})
    a, b, c, w = document["services"]
    assert {k: v for k, v in a.items() if k not in ("state", "listen")} == {
        "name": "a",
        "listen_port": "8080",
        "status": "starting",
        "waiting_connections": 3,
        "proxied_connections": 0,
        "last_used": "2025-12-01T19:11:55.435300Z",
        "service_url": "http://localhost:8080/ui",
        "resource_requirements": {"VRAM": 1000, "RAM": 10},
    }
    assert "service_url" not in b  # null hides it, as in large-model-proxy
    assert b["status"] == "stopped" and b["resource_requirements"] is None
    assert c["service_url"] == "http://gpu-box:8082/"
    assert c["proxied_connections"] == 2 and c["status"] == "running"
    assert w["status"] == "waiting_for_resources" and w["state"] == "starting"
    assert document["resources"] == {
        "RAM": {
            "total": 1000,
            "reserved_by_starting_services": 10,
            "in_use": 10,
            "free": 990,
            "usage_by_service": {"a": 10},
        },
        "VRAM": {
            "total": 24000,
            "reserved_by_starting_services": 1000,
            "in_use": 1000,
            "free": 23000,
            "usage_by_service": {"a": 1000},
        },
    }


def test_lmproxys_own_states_appear_as_they_are() -> None:
    config = parse_config(json.dumps(CONFIG), Path("/srv"))
    for state in ("draining", "falling-asleep", "sleeping", "waking", "stopping", "failed"):
        document = status_document(config, [status("a", state)], [], {})
        assert document["services"][0]["status"] == state


def test_the_page_shows_the_document_without_script_and_escapes_names() -> None:
    config = parse_config(json.dumps(CONFIG), Path("/srv"))
    services = [status("<c & d>", "running", connections=2), status("b", "cold")]
    page = status_page(status_document(config, services, [ResourceStatus("VRAM", 24, 0)], {}))
    assert '<tr class="running" data-name="&lt;c &amp; d&gt;">' in page
    assert '<a href="http://gpu-box:8082/">&lt;c &amp; d&gt;</a>' in page
    assert "<td>stopped</td>" in page
    assert "<tr><td>VRAM</td><td>24</td><td>0</td><td>24</td></tr>" in page
    assert "<c & d>" not in page
    assert 'fetch("/status"' in page and "innerHTML" not in page
