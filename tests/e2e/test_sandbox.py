"""The tests' own harness: a sandboxed manager leaves nothing behind when it stops."""

from __future__ import annotations

from lmproxy.sandbox import Sandbox


def test_a_stopped_sandbox_leaves_no_cgroup(systemd_sandbox: Sandbox) -> None:
    """Its cgroups go too, also the one journald leaves a moment after its SIGKILL (over a
    hundred empty ones had piled up on a machine that ran the suite all day)."""
    cgroups = list(systemd_sandbox.cgroups)
    assert cgroups
    assert all(cgroup.is_dir() for cgroup in cgroups)
    systemd_sandbox.stop()
    assert [cgroup for cgroup in cgroups if cgroup.exists()] == []
