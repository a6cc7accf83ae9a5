"""The demo: two fake models that cannot share one fake GPU, end to end.

It installs them into a real systemd user manager (a private sandboxed one
when this machine was not booted with systemd), connects to each in turn, and
shows the lazy start (and how soon after the client's connect its model's
StartUnit went out), a model put to sleep for room although its client keeps
its answered connection open (in use means a request in flight), woken again, one
OpenAI endpoint for both (each request on one connection routed by its model), the
commands (sleep, start, stop), `lmproxy status` and the logs, then removes everything
it installed.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from lmproxy import sandbox
from lmproxy.render import current_interpreter

GPU = "VRAM-GPU-0"
# Any name, as large-model-proxy's README writes it: its units get a unit-safe form.
LARGE = "Qwen/Qwen2.5-7B-Instruct"


def demo_config(small_port: int, large_port: int) -> dict[str, object]:
    def model(name: str, port: int, vram: int, delay: float, args: str = "") -> dict[str, object]:
        return {
            "Name": name,
            "ListenPort": str(port),
            "ProxyTargetHost": "127.0.0.1",
            "ProxyTargetPort": str(port + 10000),
            "Command": sys.executable,
            "Args": f"-m lmproxy.fakemodel --name {name} --port {port + 10000} --delay {delay}"
            + args,
            "ResourceRequirements": {GPU: vram, "RAM": 4000},
            "OpenAiApi": True,  # reachable through the router too
            # lmproxy's own additions: found by a source checkout's interpreter too
            "Environment": dict(current_interpreter().environment),
        }

    # small-model is a fake vLLM with its sleep API: asleep, it keeps its weights in RAM.
    small = model("small-model", small_port, 16000, 1.0, " --sleep-mode --wake-delay 0.1")
    small["Sleep"] = {"Level": 1, "ResourceRequirements": {"RAM": 12000}}
    return {
        "ResourcesAvailable": {GPU: 24000, "RAM": 32000},
        "Services": [small, model(LARGE, large_port, 20000, 1.5)],
        # large-model-proxy's management API: GET /status and a status page
        "ManagementApi": {"ListenPort": str(large_port + 1)},
        # large-model-proxy's OpenAI API: one endpoint, every request routed by its model
        "OpenAiApi": {"ListenPort": str(large_port + 2)},
    }


def run(small_port: int, large_port: int, say: Callable[[str], None]) -> None:
    with _manager() as (environ, wrap), tempfile.TemporaryDirectory() as workdir:
        config = Path(workdir) / "config.json"
        config.write_text(json.dumps(demo_config(small_port, large_port), indent=2))
        say(f"# config: two fake models, 16000 and 20000 of {GPU} (24000 available);")
        say("# small-model can sleep instead of stopping (a fake vLLM)")
        say(config.read_text())

        def lmproxy(*args: str) -> None:
            argv = wrap([sys.executable, "-m", "lmproxy", *args])
            say(f"$ lmproxy {' '.join(args)}")
            result = subprocess.run(argv, env=environ, capture_output=True, text=True, check=False)
            say((result.stdout + result.stderr).rstrip())
            if result.returncode != 0:
                raise SystemExit(f"lmproxy {args[0]} failed with status {result.returncode}")

        def client(name: str, port: int, what: str) -> None:
            say(f"\n# a client connects to {name} on port {port}: {what}")
            started = time.monotonic()
            body = http_get(port)
            say(f"answered after {time.monotonic() - started:.2f} s: {body}")

        pooled: socket.socket | None = None
        try:
            lmproxy("install", "--user", "--config", str(config), "--now")
            lmproxy("status", "--user")
            say(f"\n# a client connects to small-model on port {small_port}: it starts on demand;")
            say("# the client keeps its answered connection open, as the OpenAI SDKs' pools do")
            started = time.monotonic()
            pooled, body = keep_alive_get(small_port)
            say(f"answered after {time.monotonic() - started:.2f} s: {body}")
            sent = start_sent(wrap, environ, "small-model")
            if sent is not None:
                say(
                    f"# its shim's first stage sent StartUnit {(sent - started) * 1000:.0f} ms"
                    " after the client connected; the model loaded for the rest"
                )
            client(
                LARGE,
                large_port,
                "small-model is put to sleep to make room (its open connection has no "
                "request in flight: it does not keep it loaded)",
            )
            lmproxy("status", "--user")
            api = large_port + 1
            say("\n# the management API (large-model-proxy's), started by its socket: GET /status")
            for entry in json.loads(http_get(api, "/status"))["services"]:
                say(
                    f"{entry['name']}: {entry['status']}, "
                    f"{entry['proxied_connections']} connection(s) in use"
                )
            say(f"# the same as a page, refreshed every second: http://127.0.0.1:{api}/")
            client("small-model", small_port, f"it wakes ({LARGE} is stopped for room)")
            routed(large_port + 2, say)
            say("\n# by hand, through the same lifecycle: sleep, start, stop")
            lmproxy("sleep", "--user", "small-model")
            lmproxy("start", "--user", LARGE)
            lmproxy("stop", "--user", LARGE)
            lmproxy("status", "--user")
            say("\n# what happened, from the journal")
            lmproxy("logs", "small-model")
            lmproxy("logs", LARGE)
        finally:
            if pooled is not None:
                pooled.close()
            lmproxy("uninstall", "--user")


def routed(port: int, say: Callable[[str], None]) -> None:
    """The router: the model list, then one keep-alive connection asking each model."""
    say(f"\n# one OpenAI endpoint for both (OpenAiApi): http://127.0.0.1:{port}/v1")
    listed = json.loads(http_get(port, "/v1/models"))["data"]
    say("GET /v1/models: " + ", ".join(f"{m['id']} ({m['lmproxy']['state']})" for m in listed))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for model in (LARGE, "small-model"):
            started = time.monotonic()
            body = json.dumps({"model": model, "messages": [], "stream": True})
            connection.request("POST", "/v1/chat/completions", body)
            answer = connection.getresponse()
            events = [line for line in answer.read().decode().splitlines() if "token" in line]
            said = json.loads(events[0].removeprefix("data: "))["model"] if events else "nobody"
            say(
                f"POST /v1/chat/completions model={model}: {answer.status}, "
                f"{len(events)} events from {said} after {time.monotonic() - started:.2f} s "
                "(the other made room; same connection)"
            )
    finally:
        connection.close()


def start_sent(wrap: Wrap, environ: dict[str, str], name: str) -> float | None:
    """When name's shim last sent StartUnit (CLOCK_MONOTONIC, s), from its journal line."""
    argv = ["journalctl", "-o", "json", "-n", "1", f"LMPROXY_SERVICE={name}"]
    argv.append("LMPROXY_EVENT=started")
    subprocess.run(wrap(["journalctl", "--sync"]), env=environ, capture_output=True, check=False)
    shown = subprocess.run(wrap(argv), env=environ, capture_output=True, text=True, check=False)
    try:
        return int(json.loads(shown.stdout)["LMPROXY_START_SENT_US"]) / 1e6
    except (ValueError, KeyError):
        return None


def http_get(port: int, path: str = "/", timeout: float = 60) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while data := conn.recv(65536):
            chunks.append(data)
    response = b"".join(chunks).decode(errors="replace")
    return response.split("\r\n\r\n", 1)[-1]


def keep_alive_get(port: int, timeout: float = 60) -> tuple[socket.socket, str]:
    """One request on a connection left open afterwards: the connection and the body."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn.sendall(b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n")
    data = b""
    while b"}" not in data and (chunk := conn.recv(65536)):
        data += chunk
    return conn, data.decode(errors="replace").split("\r\n\r\n", 1)[-1]


Wrap = Callable[[Sequence[str]], list[str]]


@contextlib.contextmanager
def _manager() -> Iterator[tuple[dict[str, str], Wrap]]:
    """The environment and command wrapper that reach a user manager."""
    if sandbox.host_has_systemd() and sandbox.unavailable_reason() is not None:
        import os

        yield dict(os.environ), list
        return
    with sandbox.running() as box:
        yield box.env(), box.command
