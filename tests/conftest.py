"""Fixtures shared by every test folder: the real-systemd sandbox harness."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmproxy import sandbox as sandbox_module
from lmproxy.sandbox import Sandbox


@pytest.fixture
def systemd_sandbox(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Sandbox]:
    """A fresh systemd user manager (with journald) for one test.

    The test's environment points at it (XDG_RUNTIME_DIR, XDG_CONFIG_HOME,
    DBUS_SESSION_BUS_ADDRESS), so `systemctl --user`, D-Bus clients and
    lmproxy's `--user` mode all talk to this manager and nothing else.
    Skipped where it cannot run, unless LMPROXY_REQUIRE_SANDBOX=1 (CI sets it),
    which turns the skip into a failure.
    """
    reason = sandbox_module.unavailable_reason()
    if reason:
        if os.environ.get("LMPROXY_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"systemd sandbox required but unavailable: {reason}")
        pytest.skip(reason)
    root = tmp_path / "sandbox"
    root.mkdir()
    sb = sandbox_module.start(root)
    for key, value in sb.environ.items():
        monkeypatch.setenv(key, value)
    failed_before = request.session.testsfailed
    try:
        yield sb
        if request.session.testsfailed > failed_before:
            # What systemd and the shims said is the first thing to read on a failure.
            # The last 150 lines, without the fake models' request lines (thousands of
            # them in a test that keeps a model busy).
            journal = sb.run(["journalctl", "--no-pager", "-o", "short-precise", "-n", "20000"])
            lines = [line for line in journal.stdout.splitlines() if '" 200 -' not in line]
            print("--- the sandbox's journal ---\n" + "\n".join(lines[-150:]))
    finally:
        sb.stop()
