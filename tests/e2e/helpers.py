"""Helpers for end-to-end tests: configs of fake models, the CLI, clients."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmproxy.render import current_interpreter
from lmproxy.sandbox import Sandbox


def free_port() -> int:
    """A port nobody listens on, with its +10000 twin (for the backend) free too."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as twin:
            try:
                twin.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def fake_model(
    name: str,
    port: int,
    *,
    needs: dict[str, int] | None = None,
    delay: float = 0.2,
    extra_args: str = "",
    **fields: Any,
) -> dict[str, Any]:
    service: dict[str, Any] = {
        "Name": name,
        "ListenPort": str(port),
        "ProxyTargetHost": "127.0.0.1",
        "ProxyTargetPort": str(port + 10000),
        "Command": sys.executable,
        "Args": f"-m lmproxy.fakemodel --name {name} --port {port + 10000} --delay {delay} "
        + extra_args,
        "ResourceRequirements": needs or {},
        # A source checkout is not on the interpreter's path; an installed lmproxy is.
        "Environment": dict(current_interpreter().environment),
    }
    service.update(fields)
    return service


def write_config(path: Path, services: list[dict[str, Any]], **top: Any) -> Path:
    document: dict[str, Any] = {"ResourcesAvailable": {"VRAM": 24000}, "Services": services}
    document.update(top)
    path.write_text(json.dumps(document, indent=2))
    return path


def lmproxy_command() -> list[str]:
    """The lmproxy under test: this checkout, or LMPROXY_COMMAND (CI sets it to the
    installed /usr/bin/lmproxy, so that a file missing from the package fails)."""
    installed = os.environ.get("LMPROXY_COMMAND")
    return shlex.split(installed) if installed else [sys.executable, "-m", "lmproxy"]


def lmproxy(
    sandbox: Sandbox,
    *args: str,
    timeout: float = 120,
    cwd: Path | None = None,
    environment: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Runs the lmproxy CLI inside the sandbox (so journalctl sees its journal);
    environment: in place of what a checkout needs (current_interpreter's)."""
    # A checkout is found from anywhere, as an installed lmproxy is.
    return subprocess.run(
        sandbox.command([*lmproxy_command(), *args], cwd),
        env=sandbox.env(environment or dict(current_interpreter().environment)),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def install(sandbox: Sandbox, config: Path) -> None:
    """`lmproxy install --user --now`, which must succeed."""
    result = lmproxy(sandbox, "install", "--user", "--config", str(config), "--now")
    assert result.returncode == 0, result.stdout + result.stderr


def install_busy_and_newcomer(
    sandbox: Sandbox, folder: Path, wait_s: int, **top: Any
) -> tuple[int, int]:
    """Two services that cannot both fit: busy (16000 of 24000 VRAM) and newcomer
    (20000), the newcomer waiting at most wait_s for busy's connections to close;
    top: more top-level fields. Returns their ports."""
    busy, newcomer = free_port(), free_port()
    config = write_config(
        folder / "busy-and-newcomer.json",
        [
            fake_model("busy", busy, needs={"VRAM": 16000}),
            fake_model("newcomer", newcomer, needs={"VRAM": 20000}),
        ],
        MaxTimeToWaitForServiceToCloseConnectionBeforeGivingUpSeconds=wait_s,
        **top,
    )
    install(sandbox, config)
    return busy, newcomer


def http_get(port: int, path: str = "/", timeout: float = 60) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data
    result: dict[str, Any] = json.loads(body)
    return result


# The head of a request whose last line has not been sent: the request is in flight (the
# model "reads the prompt") until request_on finishes it.
UNFINISHED_HEAD = b"GET / HTTP/1.1\r\nHost: t\r\n"


def open_connection(port: int, timeout: float = 60) -> socket.socket:
    """A client in use: a keep-alive connection served once, with its next request in
    flight. (One that has been answered and sits idle does not keep its model loaded:
    see idle_connection.)"""
    conn = idle_connection(port, timeout)
    conn.sendall(UNFINISHED_HEAD)
    return conn


def idle_connection(port: int, timeout: float = 60) -> socket.socket:
    """A keep-alive connection served once and left open, as a client's pool keeps it."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    ask(conn)
    return conn


def ask(conn: socket.socket) -> bytes:
    """One keep-alive request on a connection with none in flight: the whole answer."""
    conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    return read_answer(conn)


def request_on(conn: socket.socket) -> bytes:
    """Finishes the request in flight on a connection from open_connection: its whole
    response. The next one is left in flight."""
    conn.sendall(b"\r\n")
    data = read_answer(conn)
    conn.sendall(UNFINISHED_HEAD)
    return data


def read_answer(conn: socket.socket) -> bytes:
    """The fake model's answer to a GET (a small JSON object)."""
    data = b""
    while b"}" not in data:
        chunk = conn.recv(65536)
        assert chunk, "closed before answering"
        data += chunk
    return data


def wait_for(predicate: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def unit_state(sandbox: Sandbox, unit: str) -> str:
    result = sandbox.systemctl("show", "--property=ActiveState", "--value", unit)
    return result.stdout.strip()


def main_pid(sandbox: Sandbox, unit: str) -> int:
    result = sandbox.systemctl("show", "--property=MainPID", "--value", unit)
    return int(result.stdout.strip() or 0)


def status_json(sandbox: Sandbox) -> dict[str, Any]:
    result = lmproxy(sandbox, "status", "--user", "--json")
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def service_status(sandbox: Sandbox, name: str) -> dict[str, Any]:
    """One service's entry in `lmproxy status --json`."""
    services = {s["name"]: s for s in status_json(sandbox)["services"]}
    status: dict[str, Any] = services[name]
    return status


def service_state(sandbox: Sandbox, name: str) -> str:
    """One service's state, as `lmproxy status` says it (cold, running, sleeping...)."""
    return str(service_status(sandbox, name)["state"])


def journal(sandbox: Sandbox, *matches: str) -> str:
    """The journal's messages matching matches, including every one sent before
    this call (journald stores messages asynchronously: --sync waits for it)."""
    sandbox.run(["journalctl", "--sync"], check=True)
    result = sandbox.run(["journalctl", "--no-pager", "-o", "cat", *matches])
    return result.stdout


def turned_away(port: int, timeout: float = 60) -> bool:
    """True when the service closes the connection without answering (EOF, or a
    reset since the request was never read)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        try:
            return client.recv(100) == b""
        except ConnectionResetError:
            return True
