"""The shim: `lmproxy shim NAME`, started by systemd when a client connects.

It receives the listening socket (socket activation, Accept=no) and asks the
lifecycle (lmproxy.lifecycle, through a ledger transaction) what to do for its
client: relay it, start its backend, stop least recently used services first,
or wait. It carries out those effects, tells the lifecycle what came of them,
then accepts and relays every client until the backend stops (evicted, idle,
crashed, stopped by hand); then it exits and leaves the socket to systemd, which
starts it again on the next connection. While another model's client has waited
past the starvation bound for this one's room, it admits no new client (they
wait in the socket's backlog) and, once its clients are done, is swapped out.

Only its edges do I/O: the ledger file, the model server (lmproxy.backend:
systemd jobs, readiness, sleep and wake), the sockets (lmproxy.relay) and the
journal. Every decision is the lifecycle's.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from lmproxy import checks, eviction, lifecycle, turnaway
from lmproxy.activation import inherited_listener, notify, raise_descriptor_limit
from lmproxy.backend import JOB_TIMEOUT_S, Backend
from lmproxy.config import Config, Service
from lmproxy.journal import Logger
from lmproxy.ledger import Ledger, LedgerError, installed_generation, profiles
from lmproxy.lifecycle import Effect, Event, Phase
from lmproxy.origin import load_installed
from lmproxy.paths import Scope, paths_for
from lmproxy.readiness import ReadinessError
from lmproxy.relay import Relay
from lmproxy.systemd import SystemdError

if TYPE_CHECKING:
    from lmproxy.earlystart import Early
    from lmproxy.vramwatch import VramWatch
    from lmproxy.watch import DirectoryWatch, PollingWatch

# How often the ledger learns of relay activity (last used time, for LRU).
PUBLISH_INTERVAL_S = 1.0
# At most one publishing transaction per this long.
PUBLISH_GAP_S = 0.2
# How long a claim outlives the last connection: short connections one after
# another need no transaction each, and eviction of an idle service waits this long.
HOLD_S = 0.5
# A waiter wakes when the ledger changes; it also asks again this often, for changes
# that nobody writes down (a shim killed, a backend that died with it).
WAIT_AT_MOST_S = 1.0


# accept() errors that pass once connections close: wait, do not die (and drop them all).
OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
OUT_OF_RESOURCES_PAUSE_S = 0.05
OUT_OF_RESOURCES_LOG_EVERY_S = 10.0
REFUSED_LOG_EVERY_S = 10.0


class Outcome(enum.Enum):
    BACKEND_GONE = "backend stopped"
    IDLE = "idle"
    RESTART = "backend refused a connection"
    NOT_ADMITTING = "it admits no new client for now"


class Relayed(enum.Enum):
    OK = "relayed"
    GONE = "the backend is gone"
    REFUSED = "the backend refused"
    OVER_LIMIT = "closed at once: MaxConnections are open"


@dataclass(frozen=True)
class Opening:
    """How the backend was made ready for the clients that waited: started or woken,
    in how many milliseconds."""

    ms: float
    woke: bool


class StartError(Exception):
    """The backend could not be made to serve; the message says why."""


# What a service's CheckCommands found free, by resource, and the services loaded before.
Measured = tuple[dict[str, int], frozenset[str]]


class Shim:
    def __init__(
        self,
        config: Config,
        service: Service,
        scope: Scope,
        listener: socket.socket,
        *,
        generation: int = 0,
        installed_config: Path | None = None,
    ):
        self.config = config
        self.service = service
        self.name = service.name
        self.scope = scope
        self.listener = listener
        self.log = Logger(self.name)
        self.server = Backend(service, scope, self.log, self._wake)
        self.backend = self.server.unit  # its name, for messages
        self.ledger = Ledger(
            paths_for(scope).runtime_dir,
            config.resources_available,
            profiles(config),
            self.server.probe,
            self.log.note,
            generation=generation,
            refresh=None
            if installed_config is None
            else partial(installed_generation, installed_config),
        )
        # When the oldest client not relayed yet came: the shim starts for a client.
        self.arrived = time.time()
        self.watch: DirectoryWatch | PollingWatch | None = None
        self.relay = Relay(
            on_change=self._connections_changed,
            on_give_back=self._given_back,
            on_accept_stopped=lambda _: self._wake(),
            max_connections=service.max_connections,
            on_refused=self._refused,
            idle_timeout=service.idle_connection_timeout_s,
            on_idle_closed=self._idle_closed,
            # HTTP: a connection is in use while a request is in flight, so that one left
            # open in a client's pool does not keep the model loaded (LIFECYCLE.md).
            http=service.protocol == "http",
            on_knock=self._wake,
        )
        self._refused_since_log = 0
        # The measured resources it needs (a CheckCommand's), and what was last found.
        self._checks = config.checks_of(service)
        self._check_interval_s = min(
            (check.interval_ms / 1000 for check in self._checks.values()), default=1.0
        )
        self._last_measured: dict[str, int] | None = None
        self._waited_for: str | None = None
        self.vram = _vram_watch(config, service, self.log)
        self._over_limit_warning = Every(REFUSED_LOG_EVERY_S)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._published = threading.Event()
        # Accepted, not relayed yet (a relay loop's connect failed, or the backend went away).
        self._pending: deque[socket.socket] = deque()
        self._resources_warning = Every(OUT_OF_RESOURCES_LOG_EVERY_S)
        self._claimed = False
        self._held = False
        self._claim_lock = threading.Lock()
        self._claimed_since = False  # a claim was written since the publisher last wrote
        # When the first stage (lmproxy.earlystart) sent StartUnit (time.monotonic()).
        self._start_sent: float | None = None

    def carry_on_from(self, early: Early) -> None:
        """The first stage reserved and started the backend for the client that came at
        early.arrived: the lifecycle resumes that start, and the journal says what it did."""
        self.arrived = early.arrived
        self._start_sent = early.start_sent
        reserved = lifecycle.amounts_text(early.needs)
        self.log.note(lifecycle.Log("reserved", f"reserved {reserved}", self.name))
        sent_us = int(early.start_sent * 1_000_000)
        self.log.info(
            f"started {self.backend} (first stage)",
            event="started",
            start_sent_us=sent_us,
            stage="first",
        )

    # --- edges ------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _tell(self, event: Event, measured: Measured | None = None) -> tuple[Effect, ...]:
        """One transaction: tells the lifecycle, logs its lines, returns the rest.
        measured: what the service's CheckCommands found free (see _measure)."""
        found, loaded = measured if measured is not None else (None, frozenset[str]())
        with self.ledger.transaction(found, loaded) as txn:
            effects = txn.tell(event)
        if any(isinstance(e, lifecycle.Serve) for e in effects):
            # A claim wrote the count of clients in use: the publisher's idea of what
            # the ledger holds is stale until it tells the relay's own count again.
            self._claimed_since = True
        for effect in effects:
            if isinstance(effect, lifecycle.Log):
                self.log.note(effect)
        return tuple(e for e in effects if not isinstance(e, lifecycle.Log))

    def _entry(self) -> lifecycle.Entry | None:
        """Its entry as the ledger last said, without a transaction (a hint to act on
        through one)."""
        try:
            return self.ledger.snapshot().get(self.name)
        except (OSError, ValueError):
            return None

    def _phase(self) -> Phase | None:
        entry = self._entry()
        return entry.phase if entry is not None else None

    # --- the life of a shim ------------------------------------------------

    def run(self) -> int:
        self.listener.setblocking(False)
        self.relay.start()
        threading.Thread(target=self._publisher, name="publisher", daemon=True).start()
        notify("READY=1", f"STATUS=starting {self.backend}")
        while True:
            try:
                opening = self._acquire()
            except StartError as failure:
                self.log.error(f"cannot serve {self.name}: {failure}", event="failed")
                # Before its clients are closed: the router reads it when they are.
                turnaway.record(self.ledger.runtime_dir, self.name, str(failure))
                if self.vram is not None:
                    for line in self.vram.held_outside([s.name for s in self.config.services]):
                        self.log.info(f"held outside lmproxy: {line}", event="gpu-held")
                turned_away = self._close_pending() + self._turn_away_waiting_clients()
                self.log.info(f"closed {turned_away} waiting client(s)", event="turned-away")
                with contextlib.suppress(SystemdError, OSError):
                    self.ledger.reconcile()
                return 1
            if self.vram is not None:
                self.vram.start(lambda: not self.server.gone.is_set())
            outcome = (self._open(opening) if opening is not None else None) or self._serve()
            self.relay.stop_accepting()
            if outcome is Outcome.NOT_ADMITTING:
                # Draining (or being put to sleep): the clients in use go on, new ones
                # wait in the backlog from now, and the lifecycle says what comes next.
                with self._claim_lock:
                    self._held = False
                self._publish_now()
                ended = self._while_not_admitting()
                if ended is None:
                    self.arrived = time.time()
                    continue
                outcome = ended
            cut = self.relay.active
            self.relay.close_all()
            if cut:
                self.log.info(f"closed {cut} connection(s): {outcome.value}", event="closed")
            if outcome is Outcome.RESTART:
                self.log.warning(
                    f"restarting {self.backend}: it refused a connection", event="restart"
                )
                self.arrived = time.time()
                self._carry_out(self._tell(lifecycle.Restart(self.name, time.time(), self.arrived)))
                continue
            self.ledger.reconcile()
            if self._pending or self._backlog():
                # Clients came as the backend went away: start it again for them.
                self.log.info(
                    f"{self.backend} stopped ({outcome.value}) with client(s) waiting; "
                    "starting it again",
                    event="again",
                )
                self.arrived = time.time()
                continue
            self.log.info(
                f"{self.backend} is no longer running ({outcome.value}); exiting", event="exit"
            )
            return 0

    def _acquire(self) -> Opening | None:
        """Asks the lifecycle until its clients can be served, carrying out what it says
        (stopping victims, starting or waking the backend, putting it to sleep first,
        waiting for the ledger to change); returns how the backend was made ready, or
        None when it ran already."""
        while True:
            measured = self._measure()
            try:
                want = lifecycle.Want(self.name, time.time(), self.arrived)
                effects = self._tell(want, measured)
            except SystemdError as error:
                # Without systemd's word on what runs, nothing can be reserved safely;
                # the transaction that failed wrote nothing.
                raise StartError(str(error)) from error
            wait = self._carry_out(effects)
            if any(isinstance(e, lifecycle.Serve) for e in effects):
                self._ready_already()
                return None
            for effect in effects:
                match effect:
                    case lifecycle.Start(resume=resume):
                        return Opening(self._start(resume=resume), woke=False)
                    case lifecycle.Wake(level=level):
                        woke_ms = self._wake_backend(level)
                        if woke_ms is not None:
                            return Opening(woke_ms, woke=True)
                    case lifecycle.FallAsleep(level=level):
                        self._fall_asleep(level)
            if wait is not None:
                notify(f"STATUS={wait.reason}")
                if measured and wait.reason != self._waited_for:
                    # Measured room is short: say for what, once (it is checked again often).
                    self.log.info(wait.reason, event="waiting")
                    self._waited_for = wait.reason
                # Measured room that was short: measured again at least every interval.
                self._wait_for_change(wait, self._check_interval_s if measured else None)

    def _measure(self) -> Measured | None:
        """What this service's CheckCommands find free now (lmproxy.checks), run outside
        the ledger's lock, with the services that were loaded before they ran; None when
        it needs no measured resource. A failed check counts as nothing free."""
        if not self._checks:
            return None
        loaded = frozenset(
            name
            for name, entry in self.ledger.snapshot().items()
            if entry.phase.value in checks.LOADED_PHASES
        )
        found = {}
        for measured, check in self._checks.items():
            try:
                found[measured] = checks.measure(check)
            except checks.CheckError as error:
                self.log.warning(
                    f"the CheckCommand of {measured} failed ({error}): counting none of it free",
                    event="check-failed",
                )
                found[measured] = 0
        if found != self._last_measured:
            needs = self.service.resource_requirements
            said = ", ".join(f"{found[r]} {r} free (needs {needs[r]})" for r in sorted(found))
            self.log.info(f"measured {said}", event="checked")
            self._last_measured = found
        return found, loaded

    def _carry_out(self, effects: Sequence[Effect]) -> lifecycle.Wait | None:
        """Stops what is to be stopped; turning away raises StartError. Returns the
        Wait among the effects, if any (Serve and Start are the caller's)."""
        wait = None
        for effect in effects:
            match effect:
                case lifecycle.Stop(name=victim):
                    self.server.stop(victim)
                case lifecycle.Wait():
                    wait = effect
                case lifecycle.TurnAway(reason=reason):
                    raise StartError(reason)
        return wait

    def _ledger_watch(self) -> DirectoryWatch | PollingWatch:
        """The watch on the ledger's folder, made the first time it is needed: not on
        the way to a cold start's StartUnit, and ctypes is imported only then. Without
        inotify, the shim works on by looking every PollingWatch.poll_ms."""
        if self.watch is None:
            from lmproxy.watch import watch_directory

            self.watch, error = watch_directory(self.ledger.runtime_dir)
            if error is not None:
                self.log.warning(
                    f"cannot watch the ledger ({error}); looking at it every "
                    f"{self.watch.poll_ms} ms instead (raise fs.inotify.max_user_instances?)",
                    event="watch-failed",
                )
        return self.watch

    def _poll_ms(self, timeout_ms: int | None) -> int | None:
        """timeout_ms, shortened to how often the ledger must be looked at (no inotify)."""
        every = self.watch.poll_ms if self.watch is not None else None
        if every is None:
            return timeout_ms
        return every if timeout_ms is None else min(timeout_ms, every)

    def _drain_wake_pipe(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)

    def _wait_for_change(self, wait: lifecycle.Wait, at_most_s: float | None = None) -> None:
        """Until the ledger changes, a backend awaited stops, or the wait's time (or
        at_most_s) is up."""
        if self.watch is None:
            self._ledger_watch()
            return  # a change before the watch began would be missed: ask again now
        for name in wait.stopping:
            self.server.await_stop(name)
        left = WAIT_AT_MOST_S if wait.until is None else wait.until - time.time()
        if at_most_s is not None:
            left = min(left, at_most_s)
        poller = select.poll()
        poller.register(self.watch, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        timeout_ms = int(max(0.0, min(WAIT_AT_MOST_S, left)) * 1000) + 1
        for fd, _ in poller.poll(self._poll_ms(timeout_ms)):
            if fd == self._wake_r:
                self._drain_wake_pipe()
            else:
                self.watch.consume()

    def _start(self, *, resume: bool) -> float:
        """Starts the backend and waits until it answers; returns how long that took, in
        milliseconds. resume: a start begun before, which may have started it already."""
        first_stage = self._start_sent is not None
        started = self._start_sent or time.monotonic()
        self._start_sent = None
        try:
            # A new start: the transaction that said so found the backend not running (or
            # it would have been adopted), so no question to systemd before StartUnit.
            if not (resume and self.server.runs()):
                if first_stage and self.server.failed():
                    # The first stage's start failed already: not a second attempt.
                    raise SystemdError(
                        "start",
                        self.backend,
                        "the start job the first stage queued failed; see"
                        f" `systemctl {self.scope.systemctl_flag} status {self.backend}`"
                        " and the unit's journal",
                    )
                if self.service.split_model is not None:
                    from lmproxy import autosplit  # (only for TensorSplit)

                    autosplit.prepare(self.service, paths_for(self.scope).runtime_dir, self.log)
                self.server.start()
            self.server.watch()
            self.server.wait_until_ready(started)
        except (SystemdError, ReadinessError) as error:
            # Stopped, whatever may have started; its clients are turned away with the
            # reason itself rather than the lifecycle's summary of it.
            effects = self._tell(lifecycle.StartFailed(self.name, time.time()))
            self._carry_out([e for e in effects if not isinstance(e, lifecycle.TurnAway)])
            raise StartError(str(error)) from error
        return (time.monotonic() - started) * 1000

    def _fall_asleep(self, level: int) -> None:
        """Puts the backend to sleep (its entry is FALLING_ASLEEP, no client in use) and
        tells the lifecycle how that went: asleep, or to be stopped instead."""
        from lmproxy import sleepwake

        notify(f"STATUS=putting {self.backend} to sleep")
        try:
            took_ms = self.server.fall_asleep(level)
        except sleepwake.SleepWakeError as error:
            self.log.warning(
                f"could not put {self.backend} to sleep: {error}", event="sleep-failed"
            )
            self._carry_out(self._tell(lifecycle.SleepFailed(self.name, time.time())))
            return
        self._tell(lifecycle.SleepDone(self.name, time.time()))
        sleep = self.service.sleep
        assert sleep is not None
        freed = eviction.beyond(self.service.resource_requirements, sleep.holds)
        self.log.info(
            f"{self.name} asleep (level {level}) after {took_ms:.0f} ms: freed "
            f"{lifecycle.amounts_text(freed)}, still holds {lifecycle.amounts_text(sleep.holds)}",
            event="asleep",
            sleep_ms=took_ms,
        )
        notify(f"STATUS={self.backend} is asleep")

    def _wake_backend(self, level: int) -> float | None:
        """Wakes the backend (its entry is WAKING) and waits until it answers; returns how
        long that took in milliseconds, or None when it did not wake: the lifecycle then
        has it stopped, to be started again for the clients that wait."""
        from lmproxy import sleepwake

        notify(f"STATUS=waking {self.backend}")
        try:
            return self.server.wake_up(level)
        except (sleepwake.SleepWakeError, ReadinessError) as error:
            self.log.warning(f"could not wake {self.backend}: {error}", event="wake-failed")
            self._carry_out(self._tell(lifecycle.WakeFailed(self.name, time.time())))
            return None

    def _while_not_admitting(self) -> Outcome | None:
        """While the lifecycle admits no new client here (draining, being put to sleep,
        asleep, being stopped): puts the backend to sleep when told, and returns None
        once clients wait (the lifecycle orders them) or it admits clients again, or
        the Outcome that ends serving (the backend gone, or stopped asleep and idle)."""
        watch = self._ledger_watch()
        idle_after = self.service.shutdown_after_inactivity_s
        poller = select.poll()
        for fd in (self._wake_r, watch.fileno(), self.listener.fileno()):
            poller.register(fd, select.POLLIN)
        while True:
            if self.server.gone.is_set():
                return Outcome.BACKEND_GONE
            entry = self._entry()
            phase = entry.phase if entry is not None else None
            if entry is not None and phase is Phase.FALLING_ASLEEP and self.service.sleep:
                self._fall_asleep(entry.sleep_level or self.service.sleep.level)
                continue
            if phase is Phase.RUNNING or self._pending or self._clients_wait():
                return None
            timeout_ms = None
            if phase is Phase.SLEEPING and idle_after:
                timeout_ms = self._idle_left_ms(idle_after)
                if timeout_ms is None:
                    if self._stop_asleep_for_idleness():
                        return Outcome.IDLE
                    continue
            for fd, _ in poller.poll(self._poll_ms(timeout_ms)):
                if fd == self._wake_r:
                    self._drain_wake_pipe()
                elif fd == watch.fileno():
                    watch.consume()

    def _idle_left_ms(self, idle_after: int) -> int | None:
        """How long until the relay has been idle for idle_after seconds, in milliseconds
        (at least 1); None when it has."""
        idle_for = time.monotonic() - self.relay.last_activity
        if idle_for >= idle_after:
            return None
        return max(1, int((idle_after - idle_for) * 1000))

    def _stop_asleep_for_idleness(self) -> bool:
        effects = self._tell(lifecycle.Idle(self.name, time.time()))
        if not any(isinstance(e, lifecycle.Stop) for e in effects):
            return False
        self.log.info(
            f"stopping {self.backend}: asleep and idle for "
            f"{self.service.shutdown_after_inactivity_s} s",
            event="idle-stop",
        )
        self._carry_out(effects)
        return True

    def _ready_already(self) -> None:
        """Served by a backend that runs already (adopted, or this shim's own): makes sure
        that it answers, and that the shim watches it."""
        with self._claim_lock:
            self._held = True
        if self.server.target is None or not self.server.watched():
            self.server.watch()
            try:
                self.server.wait_until_ready(time.monotonic())
            except ReadinessError as error:
                raise StartError(str(error)) from error

    def _open(self, opening: Opening) -> Outcome | None:
        """Relays the clients that wait for the backend that just became ready, then tells
        the lifecycle it is ready, with a connection claimed, in one transaction; an
        Outcome if serving ends before that.

        The clients go first: a STARTING entry is never evicted, so they need no claim
        yet, and their first bytes then wait for no transaction (a flock, a D-Bus call
        and a write: 1 to 2 ms of a cold start), journal line or status update."""
        if outcome := self._accept_clients(starting=True):
            return outcome
        if self.server.gone.is_set():
            return Outcome.BACKEND_GONE
        effects = self._tell(lifecycle.Ready(self.name, time.time(), 1))
        if any(isinstance(e, lifecycle.Serve) for e in effects):
            with self._claim_lock:
                self._held = True
        if opening.woke:
            self.log.info(
                f"{self.name} awake after {opening.ms:.0f} ms", event="awake", wake_ms=opening.ms
            )
        else:
            self.log.info(
                f"{self.name} ready after {opening.ms:.0f} ms", event="ready", ready_ms=opening.ms
            )
        notify(f"STATUS=relaying to {self.backend}")
        return None

    def _clients_wait(self) -> bool:
        """Whether new clients wait in the backlog, or requests of open connections at the
        relay's closed gate."""
        return self.relay.knocking or self._backlog()

    def _backlog(self) -> bool:
        """Whether clients wait in the listening socket's backlog."""
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        return bool(poller.poll(0))

    # --- serving ----------------------------------------------------------

    def _serve(self) -> Outcome:
        idle_after = self.service.shutdown_after_inactivity_s
        watch = self._ledger_watch()
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        poller.register(watch, select.POLLIN)
        polled = False  # whether this thread watches the listener (the relay loops do not)
        if (self._pending or self.relay.knocking) and (outcome := self._accept_clients()):
            return outcome
        while True:
            if self.server.gone.is_set():
                return Outcome.BACKEND_GONE
            if polled == self.relay.accepting:
                polled = not polled
                if polled:
                    poller.register(self.listener, select.POLLIN)
                else:
                    poller.unregister(self.listener)
            timeout_ms: int | None = None
            if idle_after and self.relay.in_use == 0:
                timeout_ms = self._idle_left_ms(idle_after)
                if timeout_ms is None:
                    if self._stop_for_idleness():
                        return Outcome.IDLE
                    continue
            elif idle_after:
                # Look again after idle_after: if the last connection closed meanwhile, the
                # rest of the idle time is waited then, so the stop comes on time without a
                # wake-up of this thread each time the relay empties (a client that opens
                # one connection per request would cost one each).
                timeout_ms = max(1, int(idle_after * 1000))
            events = poller.poll(self._poll_ms(timeout_ms))
            if not events and watch.poll_ms is not None and self._not_admitting():
                return Outcome.NOT_ADMITTING
            for fd, _ in events:
                outcome = None
                if fd == self._wake_r:
                    self._drain_wake_pipe()
                    if self._pending or self.relay.knocking:
                        outcome = self._accept_clients()
                elif fd == watch.fileno():
                    watch.consume()
                    if self._not_admitting():
                        return Outcome.NOT_ADMITTING
                else:
                    outcome = self._accept_clients()
                if outcome is not None:
                    return outcome

    def _not_admitting(self) -> bool:
        return self._phase() in (Phase.DRAINING, Phase.FALLING_ASLEEP)

    def _accept_clients(self, *, starting: bool = False) -> Outcome | None:
        """Relays the clients left from a backend that went away or given back by the
        relay, then every waiting client, then lets the relay loops accept the next
        ones themselves. An Outcome ends serving: RESTART when the backend refused one
        and is to be restarted, NOT_ADMITTING when the lifecycle counts no new client.
        starting: the entry is still STARTING (see _open): no claim, and the loops are
        not let accept."""
        with self._claim_lock:
            held = self._held or starting
            self._claimed = held and not starting  # pinned: the publisher cannot write 0
        if not held and not self._claim_first_connection():
            # Draining, asleep or being stopped: the clients stay in the backlog, and
            # the lifecycle says what comes next.
            return Outcome.NOT_ADMITTING
        # Claimed (or starting, never evicted): the next requests of open connections may
        # start, and those held back at the gate go on.
        self.relay.open_gate()
        try:
            while True:
                if self._pending:
                    client = self._pending.popleft()
                elif self.relay.accepting:
                    return None
                else:
                    try:
                        client, _ = self.listener.accept()
                    except BlockingIOError:
                        if not starting:
                            self._delegate_accepting()
                        return None
                    except OSError as error:
                        if error.errno in (errno.ECONNABORTED, errno.EPROTO):
                            continue
                        if error.errno in OUT_OF_RESOURCES:
                            self._out_of_resources(error)
                            return None
                        raise
                match self._relay(client):
                    case Relayed.GONE:
                        return None  # _serve sees backend_gone
                    case Relayed.REFUSED:
                        if self.service.restart_on_connection_failure:
                            return Outcome.RESTART
                        return None
        finally:
            self._claimed = False

    def _relay(self, client: socket.socket) -> Relayed:
        """Connects client to the backend and hands both to the relay (closes it at once
        when MaxConnections are open)."""
        assert self.server.target is not None
        if self.relay.full:
            client.close()
            self._refused(1)
            return Relayed.OVER_LIMIT
        try:
            backend = self.server.target.connect_patiently(total=5.0)
        except OSError as error:
            if not self.server.runs():
                # It went away between accept and connect: keep the client for the next start.
                self._pending.append(client)
                self.server.gone.wait(JOB_TIMEOUT_S)
                return Relayed.GONE
            self.log.warning(f"{self.backend} refused a connection: {error}", event="refused")
            if self.service.restart_on_connection_failure:
                self._pending.append(client)
            else:
                client.close()
            return Relayed.REFUSED
        self.relay.add(client, backend)
        return Relayed.OK

    def _delegate_accepting(self) -> None:
        """While the claim is held, the relay loops accept and connect clients themselves
        (no hand-over between threads per client). The relay counts each client the
        moment it accepts it, and the claim ends only through stop_accepting_if_idle(),
        which stops the loops in the same step: no client is relayed uncounted."""
        assert self.server.target is not None
        with self._claim_lock:
            if self._held:
                self.relay.accept_from(
                    self.listener, self.server.target.family, self.server.target.address
                )

    def _given_back(self, client: socket.socket) -> None:
        """From a relay loop: a client whose backend refused or did not connect in time.
        This thread retries it patiently (and decides about a restart)."""
        self._pending.append(client)
        self._wake()

    def _claim_first_connection(self) -> bool:
        """Before a connection is relayed, the ledger must count one: a service with
        clients in use is never evicted, and this is the moment another shim could
        be choosing victims. The claim is `_held` until the publisher writes 0 (after
        HOLD_S without connections), so a stream of short connections costs one
        transaction, not one each; `_claimed` keeps the publisher from writing 0
        until the relay counts the connection."""
        effects = self._tell(lifecycle.Claim(self.name, time.time()))
        if not any(isinstance(e, lifecycle.Serve) for e in effects):
            return False
        with self._claim_lock:
            self._held = True
            self._claimed = True
        return True

    def _refused(self, count: int) -> None:
        """Clients closed at once because MaxConnections were open: logged at most once
        per REFUSED_LOG_EVERY_S, with how many, so a flood cannot flood the journal."""
        self._refused_since_log += count
        if self._over_limit_warning.due():
            self.log.warning(
                f"closed {self._refused_since_log} client(s) at once: "
                f"MaxConnections ({self.service.max_connections}) are open",
                event="over-limit",
            )
            self._refused_since_log = 0

    def _idle_closed(self, count: int) -> None:
        self.log.info(
            f"closed {count} connection(s) idle for "
            f"{self.service.idle_connection_timeout_s} s (IdleConnectionTimeoutSeconds)",
            event="idle-closed",
        )

    def _out_of_resources(self, error: OSError) -> None:
        """Out of descriptors or memory: clients stay in the backlog a moment (the
        listener stays readable, so a pause keeps this from spinning)."""
        if self._resources_warning.due():
            self.log.warning(
                f"cannot accept more clients for now ({error.strerror}); "
                f"{self.relay.active} connection(s) open",
                event="out-of-resources",
            )
        time.sleep(OUT_OF_RESOURCES_PAUSE_S)

    def _close_pending(self) -> int:
        closed = len(self._pending)
        for client in self._pending:
            client.close()
        self._pending.clear()
        return closed

    def _stop_for_idleness(self) -> bool:
        """Tells the lifecycle the service is idle, and stops the backend if it agrees;
        False if a client came first. The relay loops stop accepting in the same step
        as the check that no client is open, and only this thread accepts otherwise,
        so none can come in after."""
        with self.ledger.transaction() as txn:
            if not self.relay.stop_accepting_if_idle():
                return False
            with self._claim_lock:
                self._held = False
            txn.tell(self._in_use(0, self.relay.last_activity))
            effects = txn.tell(lifecycle.Idle(self.name, time.time()))
        if not any(isinstance(e, lifecycle.Stop) for e in effects):
            return self.name not in self.ledger.snapshot()  # already gone
        self.log.info(
            f"stopping {self.backend}: idle for {self.service.shutdown_after_inactivity_s} s",
            event="idle-stop",
        )
        self._carry_out(effects)
        return True

    def _connections_changed(self, active: int) -> None:
        self._published.set()

    def _publisher(self) -> None:
        """Keeps the ledger's connection count and last-used time current, at most
        one transaction per PUBLISH_GAP_S. The count is read under the ledger's
        lock, so it cannot overwrite a claim; 0 is written only once the relay has
        been empty for HOLD_S, which ends the claim."""
        published: tuple[int, float] = (-1, 0.0)  # the relay's count and activity then
        last = 0.0
        while True:
            # While the claim is held, look every HOLD_S: the last request's end (HTTP) is
            # not an event here, and the claim must end within about a second of it.
            self._published.wait(HOLD_S if self._held else PUBLISH_INTERVAL_S)
            self._published.clear()
            time.sleep(max(0.0, last + PUBLISH_GAP_S - time.monotonic()))
            in_use, activity = self.relay.in_use, self.relay.last_activity
            release = self._held and in_use == 0 and time.monotonic() - activity >= HOLD_S
            if (
                not release
                and not self._claimed_since
                and in_use == published[0]
                and (activity == published[1] or time.monotonic() - last < PUBLISH_INTERVAL_S)
            ):
                continue
            self._claimed_since = False
            try:
                with self.ledger.transaction() as txn:
                    count = self._count_to_publish()
                    activity = self.relay.last_activity
                    txn.tell(self._in_use(count, activity))
            except (OSError, SystemdError, LedgerError) as error:
                self.log.error(f"could not update the ledger: {error}", event="ledger-failed")
                continue
            last = time.monotonic()
            published = (self.relay.in_use, activity)

    def _in_use(self, count: int, activity: float) -> lifecycle.InUse:
        """count clients in use now, and the relay's last activity (its monotonic
        time), as the lifecycle hears them."""
        now = time.time()
        return lifecycle.InUse(self.name, now, count, now - (time.monotonic() - activity))

    def _publish_now(self) -> None:
        """The relay's own count, claim given up: a drained model's waiter may evict it as
        soon as its clients are done (the publisher tells later changes)."""
        with contextlib.suppress(OSError, SystemdError, LedgerError):
            self._tell(self._in_use(self.relay.in_use, self.relay.last_activity))
        self._published.set()

    def _count_to_publish(self) -> int:
        with self._claim_lock:
            count = self.relay.in_use + (1 if self._claimed else 0)
            if count == 0 and self._held:
                if time.monotonic() - self.relay.last_activity < HOLD_S:
                    return 1  # still held: the next client needs no transaction
                if not self.relay.stop_accepting_if_idle():
                    # A relay loop accepted a client, or a request began, just now.
                    return max(1, self.relay.in_use)
                self._held = False
                self._wake()  # the main thread watches the listener again
            return count

    def _turn_away_waiting_clients(self) -> int:
        closed = 0
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return closed
            client.close()
            closed += 1


def _vram_watch(config: Config, service: Service, log: Logger) -> VramWatch | None:
    """The GPU memory watch of a service that needs a GPU resource; imported only then."""
    if not config.gpus_of(service):
        return None
    from lmproxy.vramwatch import VramWatch

    return VramWatch(config, service, log)


class Every:
    """Says yes at most once per period: for a warning that a flood would repeat."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.last = -seconds

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True


def main(
    name: str,
    scope: Scope,
    config_path: Path,
    *,
    early: Early | None = None,
    early_failure: str | None = None,
) -> int:
    """early: what the first stage did (lmproxy.earlystart); early_failure: why it
    failed, when it did not merely leave the start to the shim."""
    raise_descriptor_limit()
    installed = load_installed(config_path)
    config = installed.config
    try:
        service = config.service(name)
    except KeyError:
        raise SystemExit(f"service {name!r} is not in {config_path}") from None
    shim = Shim(
        config,
        service,
        scope,
        inherited_listener(),
        generation=installed.generation,
        installed_config=config_path,
    )
    if early_failure is not None:
        shim.log.warning(
            f"the first stage could not start {shim.backend} ({early_failure}); "
            "the shim does it all instead",
            event="early-failed",
        )
    if early is not None:
        shim.carry_on_from(early)
    return shim.run()
