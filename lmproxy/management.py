"""The management API: large-model-proxy's `GET /status`, field for field, and a status page.

`ManagementApi.ListenPort` gets a socket unit and this small service, socket-activated
like the shims: nothing runs until the first request, and it exits once nobody has asked
for a while (the socket starts it again). It only reads: the installed config, the
ledger (without its lock, as `lmproxy status` does), systemd's unit states and the
kernel's count of clients waiting in each model's backlog.

Run by its unit as `python3 -P -m lmproxy.management --user|--system --config PATH`.
"""

from __future__ import annotations

import datetime
import html
import json
import re
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from lmproxy import resources
from lmproxy.config import Config, Service
from lmproxy.status import ResourceStatus, ServiceStatus

# Exits after this long without a request; the status page asks every second.
IDLE_EXIT_S = 60.0

# lmproxy's states, as large-model-proxy names its own; the others appear as they are
# (draining, falling-asleep, sleeping, waking, stopping, failed: README).
_STATUS_NAMES = {"cold": "stopped", "starting": "starting", "running": "running"}
_PORT_TEMPLATE = re.compile(r"\{\{\s*\.PORT\s*\}\}")


# --- The document ------------------------------------------------------------------------------


def status_document(
    config: Config,
    services: Sequence[ServiceStatus],
    resource_rows: Sequence[ResourceStatus],
    waiting: Mapping[str, int],
) -> dict[str, Any]:
    """GET /status: large-model-proxy's document (lmproxy may add fields, never change
    these). waiting: clients in each service's backlog, by name."""
    by_name = {service.name: service for service in config.services}
    starting = {s.name for s in services if s.state == "starting"}
    return {
        "services": [_service_entry(by_name[s.name], s, waiting.get(s.name, 0)) for s in services],
        "resources": {
            r.name: {
                # No total for a resource a CheckCommand measures, as in large-model-proxy.
                **({} if r.name in config.resource_checks else {"total": r.available}),
                "reserved_by_starting_services": sum(
                    s.reserved.get(r.name, 0) for s in services if s.name in starting
                ),
                "in_use": r.reserved,
                "free": r.free,
                "usage_by_service": {
                    s.name: s.reserved[r.name] for s in services if s.reserved.get(r.name)
                },
            }
            for r in resource_rows
        },
    }


def _service_entry(service: Service, status: ServiceStatus, waiting: int) -> dict[str, Any]:
    state = _STATUS_NAMES.get(status.state, status.state)
    if status.waiting_for_resources:
        state = "waiting_for_resources"
    entry: dict[str, Any] = {
        "name": service.name,
        # A string, as large-model-proxy writes it; null for a service on a unix socket.
        "listen_port": None if service.listen_port is None else str(service.listen_port),
        "status": state,
        "waiting_connections": waiting,
        "proxied_connections": status.connections,
        "last_used": _rfc3339(status.last_used),
        "resource_requirements": dict(service.resource_requirements) or None,
        # lmproxy's: its own word for the state, and where it listens.
        "state": status.state,
        "listen": status.listen,
    }
    url = service_url(service)
    if url is not None:
        entry["service_url"] = url  # large-model-proxy leaves it out when there is none
    return entry


def service_url(service: Service) -> str | None:
    """ServiceUrl (or DefaultServiceUrl) with {{.PORT}} made the listen port."""
    if service.service_url is None:
        return None
    port = "" if service.listen_port is None else str(service.listen_port)
    return _PORT_TEMPLATE.sub(port, service.service_url)


def _rfc3339(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


# --- The page ----------------------------------------------------------------------------------


def status_page(document: Mapping[str, Any]) -> str:
    """GET /: the page, with the document's tables already in it (it reads without
    JavaScript); its script asks /status every second and redraws them."""
    template = (resources.data_dir("templates") / "management.html").read_text()
    return template.replace("<!--SERVICES-->", _service_rows(document)).replace(
        "<!--RESOURCES-->", _resource_rows(document)
    )


def _service_rows(document: Mapping[str, Any]) -> str:
    rows = []
    for s in document["services"]:
        name = html.escape(s["name"])
        url = s.get("service_url")
        link = f'<a href="{html.escape(url)}">{name}</a>' if url else name
        cells = [
            link,
            html.escape(s["status"]),
            str(s["proxied_connections"]),
            str(s["waiting_connections"]),
            html.escape(s["last_used"] or "never"),
        ]
        state = html.escape(s["state"])
        rows.append(
            f'<tr class="{state}" data-name="{name}">'
            + "".join(f"<td>{cell}</td>" for cell in cells)
            + "</tr>"
        )
    return "\n".join(rows)


def _resource_rows(document: Mapping[str, Any]) -> str:
    return "\n".join(
        f"<tr><td>{html.escape(name)}</td><td>{r.get('total', '-')}</td><td>{r['in_use']}</td>"
        f"<td>{r['free']}</td></tr>"
        for name, r in document["resources"].items()
    )


# --- The service -------------------------------------------------------------------------------


class _Installed:
    """The installed config, read again whenever the file changes (a reinstall)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int] | None = None
        self._config: Config | None = None

    def config(self) -> Config:
        from lmproxy.origin import load_installed_config

        info = self.path.stat()
        seen = (info.st_mtime_ns, info.st_size)
        if self._config is None or seen != self._seen:
            self._config, self._seen = load_installed_config(self.path), seen
        return self._config


def current_document(installed: _Installed, scope: Any) -> dict[str, Any]:
    from lmproxy import status
    from lmproxy.backlog import waiting_clients

    config = installed.config()
    services, resource_rows = status.collect(config, scope)
    waiting = {
        s.name: waiting_clients(s.listen_address, s.listen_port)
        for s in config.services
        if s.listen_port is not None
    }
    return status_document(config, services, resource_rows, waiting)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, listener: Any, installed: _Installed, scope: Any) -> None:
        super().__init__(listener.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = listener
        self.installed = installed
        self.scope = scope
        self.last_request = time.monotonic()
        self.lock = threading.Lock()  # one document at a time: each asks D-Bus


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "lmproxy"

    def do_GET(self) -> None:
        self.server.last_request = time.monotonic()
        path = self.path.partition("?")[0]
        if path not in ("/", "/status"):
            self._send(404, "application/json", {"error": f"no such page: {path}"})
            return
        try:
            with self.server.lock:
                document = current_document(self.server.installed, self.server.scope)
        except Exception as error:  # said, never a traceback on the wire
            print(f"lmproxy management: cannot make the status: {error}", file=sys.stderr)
            self._send(503, "application/json", {"error": str(error)})
            return
        if path == "/status":
            self._send(200, "application/json", document)
        else:
            self._send(200, "text/html; charset=utf-8", status_page(document))

    def _send(self, status: int, kind: str, body: object) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged: the page asks every second."""


def serve(config_path: Path, scope: Any) -> None:
    from lmproxy.activation import inherited_listener, notify

    server = _Server(inherited_listener("lmproxy's management API"), _Installed(config_path), scope)
    server.timeout = 1.0
    notify("READY=1")
    while time.monotonic() - server.last_request < IDLE_EXIT_S:
        server.handle_request()
    notify("STOPPING=1")
    server.server_close()


def main(argv: list[str] | None = None) -> None:
    from lmproxy.paths import Scope

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] not in ("--user", "--system") or args[1] != "--config":
        raise SystemExit("usage: python3 -m lmproxy.management --user|--system --config PATH")
    serve(Path(args[2]), Scope.SYSTEM if args[0] == "--system" else Scope.USER)


if __name__ == "__main__":
    main()
