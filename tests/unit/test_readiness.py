"""The health check: what it runs with, and that a hung one is ended with its children."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from lmproxy import readiness


def test_the_status_and_the_end_of_the_output() -> None:
    assert readiness.run_shell("echo ok; exit 0", 5) == (0, "ok")
    status, output = readiness.run_shell("printf '%0300d' 0; echo; exit 3", 5)
    assert status == 3
    assert output == "0" * 200


def test_it_inherits_no_secret_and_no_descriptor_of_the_shims(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/x")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        os.set_inheritable(listener.fileno(), True)
        status, output = readiness.run_shell(
            f"env; if test -e /proc/self/fd/{listener.fileno()}; then echo LEAKED; fi",
            5,
        )
    assert status == 0
    assert "NOTIFY_SOCKET" not in output and "DBUS_SESSION" not in output
    assert "LC_ALL=C.UTF-8" in output and "LEAKED" not in output


def test_a_hung_check_is_killed_with_what_it_started(tmp_path: Path) -> None:
    pidfile = tmp_path / "child"
    started = time.monotonic()
    status, _ = readiness.run_shell(f"sleep 60 & echo $! > {pidfile}; wait", 0.5)
    assert status is None
    assert time.monotonic() - started < 5
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (
        not os.path.exists(f"/proc/{child}")
        or "State:\tZ" in Path(f"/proc/{child}/status").read_text()
    )
