"""A shim's edge to its model server: systemd jobs over D-Bus, watching the unit,
readiness, and the calls that put it to sleep and wake it.

It decides nothing: the shim (lmproxy.shim) asks the lifecycle what to do, calls
these, and tells the lifecycle what came of them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from lmproxy import unitnames
from lmproxy.config import Service
from lmproxy.journal import Logger
from lmproxy.paths import Scope
from lmproxy.readiness import Target, wait_until_ready
from lmproxy.systemd import Manager, SystemdError

# How long to wait for a D-Bus start or stop job beyond the unit's own timeouts.
JOB_TIMEOUT_S = 120.0
# After an unexpected error in the thread that watches the backend, before it looks again.
WATCH_RETRY_S = 0.5


class Backend:
    """The model server of one service, as its shim sees it. `changed` is called (from
    a watching thread) when the unit, or a victim's unit awaited, stops."""

    def __init__(
        self, service: Service, scope: Scope, log: Logger, changed: Callable[[], None]
    ) -> None:
        self.service = service
        self.scope = scope
        self.log = log
        self.unit = unitnames.backend_unit(service.name)
        self._changed = changed
        self._managers = threading.local()
        self.target: Target | None = None  # where it answers, once ready
        self.gone = threading.Event()  # set when systemd says the unit stopped
        self._watcher: threading.Thread | None = None
        self._stop_watchers: dict[str, threading.Thread] = {}

    def manager(self) -> Manager:
        """A D-Bus connection for the calling thread (connections are not thread-safe)."""
        manager: Manager | None = getattr(self._managers, "manager", None)
        if manager is None:
            manager = Manager.connect(self.scope, warn=self._ignored_signal)
            self._managers.manager = manager
        return manager

    def _ignored_signal(self, message: str) -> None:
        """A signal that claimed to come from systemd and did not (see lmproxy.systemd)."""
        self.log.warning(message, event="signal-ignored")

    def probe(self, units: Sequence[str]) -> Mapping[str, bool]:
        """Which of units run, as systemd says now."""
        return self.manager().running(units)

    def runs(self) -> bool:
        return self.probe([self.unit]).get(self.unit, False)

    def failed(self) -> bool:
        """Whether systemd holds the unit failed: its last start (or run) failed."""
        return self.manager().unit_state(self.unit).active_state == "failed"

    # --- systemd jobs -----------------------------------------------------------------

    def start(self) -> None:
        asked = time.monotonic_ns() // 1000
        self.manager().start_unit(self.unit, JOB_TIMEOUT_S)
        # When StartUnit went out (CLOCK_MONOTONIC, µs): bench/swap.py times by it.
        self.log.info(f"started {self.unit}", event="started", start_sent_us=asked)

    def stop(self, name: str) -> None:
        """Stops a backend (a victim's, or this one) and waits for the job; a failure is
        logged, and the ledger keeps the reservation for as long as systemd says the
        unit still runs."""
        unit = unitnames.backend_unit(name)
        try:
            self.manager().stop_unit(unit, JOB_TIMEOUT_S)
        except SystemdError as error:
            event = "stop-failed" if name == self.service.name else "evict-failed"
            self.log.error(f"could not stop {unit}: {error}", event=event)

    def watch(self) -> None:
        """Sets `gone` (and calls `changed`) when systemd says the unit stopped."""
        self.gone.clear()

        def watch() -> None:
            while True:
                try:
                    with Manager.connect(self.scope, warn=self._ignored_signal) as manager:
                        manager.wait_until_inactive(self.unit)
                except SystemdError as error:
                    self.log.error(f"lost track of {self.unit}: {error}", event="watch-failed")
                except Exception as error:
                    # Nothing a signal says is acted on unchecked; whatever went wrong here,
                    # ask systemd again rather than leave the shim blind to its backend.
                    self.log.error(f"watching {self.unit}: {error!r}", event="watch-failed")
                    time.sleep(WATCH_RETRY_S)
                    continue
                break
            self.gone.set()
            self._changed()

        self._watcher = threading.Thread(target=watch, name="watch-backend", daemon=True)
        self._watcher.start()

    def watched(self) -> bool:
        return self._watcher is not None and self._watcher.is_alive()

    def await_stop(self, name: str) -> None:
        """Calls `changed` the moment systemd says that name's backend is gone: its own
        shim writes the ledger only after, and a waiter's start need not wait for that."""
        watcher = self._stop_watchers.get(name)
        if watcher is not None and watcher.is_alive():
            return

        def watch() -> None:
            with (
                contextlib.suppress(SystemdError, OSError),
                Manager.connect(self.scope, warn=self._ignored_signal) as manager,
            ):
                manager.wait_until_inactive(unitnames.backend_unit(name), JOB_TIMEOUT_S)
            self._changed()

        watcher = threading.Thread(target=watch, name=f"await-{name}", daemon=True)
        self._stop_watchers[name] = watcher
        watcher.start()

    # --- the model itself --------------------------------------------------------------

    def wait_until_ready(self, started: float) -> None:
        """Until it answers (and HealthcheckCommand passes), within the startup timeout
        counted from started (time.monotonic()); raises ReadinessError otherwise."""
        service = self.service
        self.target = wait_until_ready(
            service.proxy_target_host,
            service.proxy_target_port,
            deadline=started + service.startup_timeout_ms / 1000,
            healthcheck=service.healthcheck_command,
            healthcheck_interval_s=service.healthcheck_interval_ms / 1000,
            gone=self.gone.is_set,
        )

    def fall_asleep(self, level: int) -> float:
        """Puts it to sleep at level; the milliseconds that took. Raises SleepWakeError."""
        from lmproxy import sleepwake

        started = time.monotonic()
        sleepwake.fall_asleep(self.service, level, started + self._timeout_s())
        return (time.monotonic() - started) * 1000

    def wake_up(self, level: int) -> float:
        """Wakes it from level and waits until it answers; the milliseconds that took.
        Raises SleepWakeError or ReadinessError."""
        from lmproxy import sleepwake

        started = time.monotonic()
        sleepwake.wake_up(self.service, level, started + self._timeout_s())
        self.wait_until_ready(started)
        return (time.monotonic() - started) * 1000

    def _timeout_s(self) -> float:
        return self.service.startup_timeout_ms / 1000
