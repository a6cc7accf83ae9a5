"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.e2e import system_manager
from tests.e2e.system_manager import SystemManager


@pytest.fixture(scope="module")
def manager(request: pytest.FixtureRequest) -> Iterator[SystemManager]:
    """One system manager for this module's tests (booting one takes a second or two).
    It runs the checkout's lmproxy, or the installed one where LMPROXY_COMMAND is set."""
    reason = system_manager.unavailable_reason()
    if reason:
        if os.environ.get("LMPROXY_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"system manager sandbox required but unavailable: {reason}")
        pytest.skip(reason)
    installed = bool(os.environ.get("LMPROXY_COMMAND"))
    with system_manager.running(source=None if installed else system_manager.CHECKOUT) as m:
        failed_before = request.session.testsfailed
        yield m
        if request.session.testsfailed > failed_before:
            journal = m.run(["journalctl", "--no-pager", "-o", "short-precise", "-n", "150"])
            print("--- the system sandbox's journal ---\n" + journal.stdout + m.log())
