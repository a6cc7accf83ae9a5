"""The hardened system-mode backend unit, end to end, with a real model server.

Under a real system manager (tests/e2e/system_manager.py), `lmproxy install --system`
installs a backend that runs llama.cpp's llama-server on a tiny model (both built and
cached by tools/real-backends). Checked: systemd rates the installed backend unit 5.0 or
below, the server really runs under the sandbox the unit asks for (no capabilities, a
seccomp filter, no new privileges, as lmproxy-model), and a chat completion comes back
through lmproxy's port.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e import helpers
from tests.e2e.helpers import free_port
from tests.e2e.real_backends import LlamaServer, llama_server
from tests.e2e.system_manager import SystemManager

pytestmark = pytest.mark.systemd

CONFIG = "/run/lmproxy-sandbox/config.json"
# Inside the namespace, where lmproxy-model can read them: the binary and the model.
LLAMA_DIR = "/run/lmproxy-sandbox/llama"
NAME = "tiny"
BACKEND = f"lmproxy-backend@{NAME}.service"
MAX_EXPOSURE = 5.0


def lmproxy(m: SystemManager, *args: str) -> subprocess.CompletedProcess[str]:
    """The lmproxy under test (helpers.lmproxy_command), inside the namespaces."""
    return m.run([*helpers.lmproxy_command(), *args], timeout=120)


def place_llama_server(m: SystemManager, llama: LlamaServer) -> tuple[str, str]:
    """Copies the binary and the model into the namespace's /run (its own tmpfs), readable
    by every user; returns their paths there."""
    folder = m.path(LLAMA_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    for source, mode in ((llama.binary, 0o755), (llama.model, 0o644)):
        shutil.copyfile(source, folder / source.name)
        (folder / source.name).chmod(mode)
    return f"{LLAMA_DIR}/{llama.binary.name}", f"{LLAMA_DIR}/{llama.model.name}"


@pytest.fixture(scope="module")
def llama(manager: SystemManager) -> Iterator[tuple[LlamaServer, int]]:
    """A service whose backend is llama-server, installed with --system: the server and
    lmproxy's port."""
    found = llama_server()
    binary, model = place_llama_server(manager, found)
    port = free_port()
    target = port + 10000
    health = (
        "/usr/bin/python3 -c 'import urllib.request as u; "
        f'u.urlopen("http://127.0.0.1:{target}/health", timeout=2)\''
    )
    service: dict[str, Any] = {
        "Name": NAME,
        "ListenPort": str(port),
        "ProxyTargetHost": "127.0.0.1",
        "ProxyTargetPort": str(target),
        "Command": binary,
        # mlock and NUMA placement: system calls of @memlock and @resources, which the
        # unit's filter must let through.
        "Args": f"-m {model} --host 127.0.0.1 --port {target} --alias {NAME} -c 512 -t 2 "
        "--load-mode mmap+mlock --numa distribute",
        "HealthcheckCommand": health,
        "HealthcheckIntervalMilliseconds": 100,
        "StartupTimeoutMilliseconds": 60000,
    }
    document = {"ResourcesAvailable": {"VRAM": 24000}, "Services": [service]}
    manager.path(CONFIG).write_text(json.dumps(document))
    result = lmproxy(manager, "install", "--system", "--config", CONFIG, "--now")
    assert result.returncode == 0, result.stdout + result.stderr
    yield found, port
    result = lmproxy(manager, "uninstall", "--system")
    assert result.returncode == 0, result.stdout + result.stderr


def post_json(port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        answer: dict[str, Any] = json.load(response)
        return answer


def exposure(security_output: str) -> float:
    """The overall exposure level in `systemd-analyze security`'s last line."""
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security_output)
    assert found, security_output
    return float(found.group(1))


def test_installed_backend_is_rated_5_or_below(
    manager: SystemManager, llama: tuple[LlamaServer, int]
) -> None:
    # The unit as the running system manager loaded it, and the installed file offline.
    online = manager.run(["systemd-analyze", "security", "--no-pager", BACKEND])
    assert online.returncode == 0, online.stdout + online.stderr
    assert exposure(online.stdout) <= MAX_EXPOSURE, online.stdout
    unit_file = f"/etc/systemd/system/{BACKEND}"
    offline = manager.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", unit_file]
    )
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert exposure(offline.stdout) <= MAX_EXPOSURE, offline.stdout


def test_llama_server_answers_through_lmproxy_under_the_hardened_unit(
    manager: SystemManager, llama: tuple[LlamaServer, int]
) -> None:
    found, port = llama
    answer = post_json(
        port,
        "/v1/chat/completions",
        {
            "model": NAME,
            "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": 8,
        },
    )
    assert answer["model"] == NAME, answer
    text = answer["choices"][0]["message"]["content"]
    assert text.split(), answer
    assert set(text.split()) <= found.words, answer
    assert answer["usage"]["completion_tokens"] >= 1, answer

    # It was llama-server, started by lmproxy, in the sandbox the unit asks for.
    assert manager.show(BACKEND, "ActiveState") == "active"
    pid = manager.show(BACKEND, "MainPID")
    assert pid not in ("", "0")
    exe = manager.run(["readlink", f"/proc/{pid}/exe"]).stdout.strip()
    assert exe == f"{LLAMA_DIR}/{found.binary.name}"
    status = manager.run(["cat", f"/proc/{pid}/status"]).stdout
    fields = {k: v.strip() for k, v in (line.split(":", 1) for line in status.splitlines())}
    model_uid = manager.run(["id", "-u", "lmproxy-model"]).stdout.strip()
    assert set(fields["Uid"].split()) == {model_uid}
    assert int(fields["CapBnd"], 16) == 0  # CapabilityBoundingSet=
    assert int(fields["CapAmb"], 16) == 0
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"  # SystemCallFilter= and friends: a filter is on
    # ProtectProc=invisible: its /proc shows no process of another user.
    mounts = manager.run(["cat", f"/proc/{pid}/mountinfo"]).stdout
    assert re.search(r" /proc .*hidepid=(invisible|2)", mounts), mounts
    # The model (0.5 MB, under the default 8 MB RLIMIT_MEMLOCK) was locked in memory.
    log = manager.run(["journalctl", "--no-pager", "-o", "cat", "-t", f"lmproxy-{NAME}"]).stdout
    assert "model loaded" in log, log
    assert "failed to mlock" not in log, log
