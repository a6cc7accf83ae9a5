"""`lmproxy run`: a config tried in the foreground, as `large-model-proxy -c config.json`
runs (issue 12, point 10): it installs into the user manager, prints every model's log,
and on Ctrl-C or SIGTERM removes exactly what it installed, closing every port."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from lmproxy.render import current_interpreter
from lmproxy.sandbox import Sandbox
from tests.e2e.helpers import (
    fake_model,
    free_port,
    http_get,
    install,
    lmproxy,
    lmproxy_command,
    wait_for,
    write_config,
)


class Running:
    """`lmproxy run` in the background, its output read line by line."""

    def __init__(self, sandbox: Sandbox, config: Path) -> None:
        self.process = subprocess.Popen(
            sandbox.command([*lmproxy_command(), "run", "--config", str(config)]),
            env=sandbox.env(dict(current_interpreter().environment)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for_line(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} in {self.seen}")

    def signal(self, signum: int) -> int:
        """Sends signum to lmproxy (nsenter passes it on) and waits for its exit."""
        os.kill(self.process.pid, signum)
        return self.process.wait(timeout=60)


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def units(sandbox: Sandbox) -> set[str]:
    folder = sandbox.config_home / "systemd" / "user"
    return {p.name for p in folder.iterdir() if p.name.startswith("lmproxy")}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_run_serves_shows_the_logs_and_removes_everything_on_a_signal(
    systemd_sandbox: Sandbox, tmp_path: Path, signum: int
) -> None:
    first, second = free_port(), free_port()
    config = write_config(
        tmp_path / "config.json", [fake_model("first", first), fake_model("second", second)]
    )
    running = Running(systemd_sandbox, config)
    running.wait_for_line("installed 2 service(s) for the user manager; sockets listening")
    assert listening(first) and listening(second)
    assert http_get(first)["model"] == "first"
    running.wait_for_line("first: model loaded")  # the model's own output
    running.wait_for_line("first ready after")  # the shim's decision
    assert running.signal(signum) == 0
    assert not listening(first) and not listening(second)
    assert units(systemd_sandbox) == set()
    assert not (systemd_sandbox.config_home / "lmproxy" / "config.json").exists()


def test_run_is_refused_where_a_config_is_installed_and_changes_nothing(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    port = free_port()
    install(systemd_sandbox, write_config(tmp_path / "installed.json", [fake_model("kept", port)]))
    before = units(systemd_sandbox)
    other = write_config(tmp_path / "tried.json", [fake_model("tried", free_port())])
    result = lmproxy(systemd_sandbox, "run", "--config", str(other))
    assert result.returncode == 1
    assert "a config is installed in your user manager" in result.stderr
    assert units(systemd_sandbox) == before
    assert http_get(port)["model"] == "kept"


def test_a_run_killed_outright_is_replaced_by_the_next_run(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    port = free_port()
    config = write_config(tmp_path / "config.json", [fake_model("m", port)])
    killed = Running(systemd_sandbox, config)
    killed.wait_for_line("sockets listening")
    killed.signal(signal.SIGKILL)  # no clean-up: its units stay behind
    wait_for(lambda: listening(port))
    again = Running(systemd_sandbox, config)
    again.wait_for_line("sockets listening")
    assert http_get(port)["model"] == "m"
    assert again.signal(signal.SIGINT) == 0
    assert units(systemd_sandbox) == set()
