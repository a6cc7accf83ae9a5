"""The lifecycle end to end: loaded models first, a bound on every other model's wait,
and waiters woken by events, against a real systemd user manager (the sandbox)."""

from __future__ import annotations

import threading
import time
import urllib.error
from pathlib import Path

from lmproxy.sandbox import Sandbox
from tests.e2e.helpers import (
    http_get,
    install_busy_and_newcomer,
    journal,
    service_state,
    wait_for,
)

BOUND_S = 2
GIVE_UP_S = 1200  # the default: the bound, not the give-up, ends each wait here


class Loop(threading.Thread):
    """A client that keeps a model busy without a pause: one request after another,
    each on a new connection, noting how long each took and any that failed."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.done = threading.Event()
        self.served = 0
        self.slowest = 0.0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.done.is_set():
            started = time.monotonic()
            try:
                http_get(self.port, timeout=60)
            except (OSError, urllib.error.URLError, ValueError) as error:
                self.failures.append(repr(error))
                continue
            self.served += 1
            self.slowest = max(self.slowest, time.monotonic() - started)


def test_a_busy_model_drains_for_a_waiter_past_the_bound_and_its_queue_is_served_after(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    busy, newcomer = install_busy_and_newcomer(
        systemd_sandbox, tmp_path, GIVE_UP_S, SwapAfterWaitingSeconds=BOUND_S
    )
    http_get(busy)
    loop = Loop(busy)
    loop.start()
    try:
        for _ in range(3):
            wait_for(
                lambda: service_state(systemd_sandbox, "newcomer") == "cold", 30, "newcomer to go"
            )
            wait_for(lambda: loop.served > 0, 30, "the busy model to serve its loop")
            started = time.monotonic()
            answer = http_get(newcomer)
            waited = time.monotonic() - started
            assert answer["model"] == "newcomer"
            # Not before the bound (the loaded model went first), and within the bound,
            # the drain and the newcomer's start (0.2 s): generous for a slow CI machine.
            assert BOUND_S - 0.3 <= waited <= BOUND_S + 4, waited
            # The busy model's clients that queued meanwhile are served after.
            after = loop.served
            wait_for(lambda: loop.served > after, 30, "busy's queue to be served")  # noqa: B023
    finally:
        loop.done.set()
        loop.join(60)
    assert loop.failures == []
    # Each of busy's clients waited at most for a drain, the newcomer's start and client,
    # and busy's start again.
    assert loop.slowest <= BOUND_S + 6, loop.slowest
    drains = journal(systemd_sandbox, "LMPROXY_EVENT=evict")
    assert drains.count("evicting busy") >= 3, drains


def test_a_loaded_model_keeps_serving_while_the_bound_runs(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """While the newcomer's client waits, busy's new clients are served without a swap."""
    busy, newcomer = install_busy_and_newcomer(
        systemd_sandbox, tmp_path, GIVE_UP_S, SwapAfterWaitingSeconds=4
    )
    http_get(busy)
    loop = Loop(busy)
    loop.start()
    waiter = threading.Thread(target=http_get, args=(newcomer,), daemon=True)
    try:
        wait_for(lambda: loop.served > 0, 30, "the busy model to serve its loop")
        waiter.start()
        wait_for(
            lambda: service_state(systemd_sandbox, "newcomer") == "starting", 10, "newcomer to wait"
        )
        during = loop.served
        time.sleep(2)
        assert loop.served > during + 5  # served all along, no swap
        assert service_state(systemd_sandbox, "busy") == "running"
        waiter.join(30)
        assert not waiter.is_alive()
    finally:
        loop.done.set()
        loop.join(60)
    assert loop.failures == []
