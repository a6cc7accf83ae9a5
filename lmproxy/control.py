"""`lmproxy start|stop|sleep|wake NAME`: a user's requests, through the lifecycle.

No second path: `start` and `wake` connect to the model's own socket, as a client
would, so its shim asks the lifecycle (waiting its turn, evicting, starting or
waking) and the command waits until the ledger says it runs; `stop` and `sleep`
tell the lifecycle an event (StopNow, SleepNow) in a ledger transaction, and the
command carries out a stop itself while a sleep is the model's shim's to do. Each
returns only once the state is reached, and raises ControlError saying why not.

In system mode the ledger and the units are the `lmproxy` user's: the work runs
in a child process that has become that user (see as_shim_user).
"""

from __future__ import annotations

import os
import pwd
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from lmproxy import lifecycle, unitnames
from lmproxy.backend import JOB_TIMEOUT_S
from lmproxy.config import SHIM_USER, Config
from lmproxy.journal import Logger
from lmproxy.ledger import Ledger, LedgerError, installed_generation, profiles
from lmproxy.lifecycle import Entry, Phase
from lmproxy.paths import Scope, paths_for
from lmproxy.systemd import Manager, SystemdError

POLL_S = 0.05
# How long a refusal for clients in use is retried: the shim's claim outlives its last
# client by shim.HOLD_S, and its publisher writes at most every PUBLISH_INTERVAL_S.
CLAIM_GRACE_S = 2.0

Say = Callable[[str], None]


class ControlError(Exception):
    """The request was not carried out; the message says why."""


class Control:
    def __init__(
        self,
        config: Config,
        scope: Scope,
        name: str,
        say: Say,
        *,
        generation: int = 0,
        installed_config: Path | None = None,
    ) -> None:
        try:
            self.service = config.service(name)
        except KeyError:
            known = ", ".join(s.name for s in config.services) or "none"
            raise ControlError(f"no service named {name!r} (configured: {known})") from None
        self.config = config
        self.scope = scope
        self.name = name
        self.say = say
        self.backend = unitnames.backend_unit(name)
        self.log = Logger(name)
        self.manager = Manager.connect(scope)
        self.ledger = Ledger(
            paths_for(scope).runtime_dir,
            config.resources_available,
            profiles(config),
            self.manager.running,
            self.log.note,
            generation=generation,
            refresh=None
            if installed_config is None
            else partial(installed_generation, installed_config),
        )

    def close(self) -> None:
        self.manager.close()

    def _tell(self, told: Callable[[], lifecycle.Event]) -> tuple[lifecycle.Effect, ...]:
        """Tells the event told() makes; refused while clients are in use, it tries again
        for CLAIM_GRACE_S (a shim holds its count a moment after the last client)."""
        deadline = time.monotonic() + CLAIM_GRACE_S
        while True:
            with self.ledger.transaction() as txn:
                effects = txn.tell(told())
                entry = txn.entries.get(self.name)
            for effect in effects:
                if isinstance(effect, lifecycle.Log):
                    self.log.note(effect)
            refusals = [e.reason for e in effects if isinstance(e, lifecycle.Refuse)]
            if not refusals:
                return effects
            if not (entry and entry.in_use) or time.monotonic() > deadline:
                raise ControlError(f"{self.name}: {refusals[0]}")
            time.sleep(POLL_S)

    def _entry(self) -> Entry | None:
        return self.ledger.snapshot().get(self.name)

    # --- the four requests ---------------------------------------------------------

    def stop(self, *, force: bool) -> None:
        effects = self._tell(lambda: lifecycle.StopNow(self.name, time.time(), force))
        if not any(isinstance(e, lifecycle.Stop) for e in effects):
            self.say(f"{self.name} is not loaded")
            return
        self.say(f"stopping {self.name}")
        self.manager.stop_unit(self.backend, JOB_TIMEOUT_S)
        self.ledger.reconcile()
        self.say(f"{self.name} stopped")

    def sleep(self, level: int) -> None:
        self._tell(lambda: lifecycle.SleepNow(self.name, time.time(), level))
        self.say(f"putting {self.name} to sleep")
        deadline = time.monotonic() + self.service.startup_timeout_ms / 1000 + 10
        while True:
            entry = self._entry()
            if entry is not None and entry.phase is Phase.SLEEPING:
                self.say(f"{self.name} is asleep")
                return
            if entry is None or entry.phase not in (Phase.FALLING_ASLEEP, Phase.SLEEPING):
                state = entry.phase.value if entry else "stopped"
                raise ControlError(
                    f"{self.name} did not go to sleep: it is {state} "
                    f"(see `lmproxy logs {self.name}`)"
                )
            if time.monotonic() > deadline:
                raise ControlError(f"{self.name} did not go to sleep in time")
            time.sleep(POLL_S)

    def start(self) -> None:
        entry = self._entry()
        if entry is not None and entry.phase in lifecycle.AWAKE:
            self.say(f"{self.name} is running already")
            return
        self._load("starting")

    def wake(self) -> None:
        entry = self._entry()
        if entry is not None and entry.phase in lifecycle.AWAKE:
            self.say(f"{self.name} is awake already")
            return
        if entry is None or entry.phase not in (Phase.SLEEPING, Phase.FALLING_ASLEEP):
            state = entry.phase.value if entry else "cold"
            raise ControlError(
                f"{self.name} is {state}, not asleep (`lmproxy start {self.name}` loads it)"
            )
        self._load("waking")

    def _load(self, verb: str) -> None:
        """As a client: connects to its socket and waits until the ledger says it runs.
        A connection closed first was turned away: the shim's journal says why."""
        since = time.time()
        profile = profiles(self.config)[self.name]
        deadline = time.monotonic() + profile.give_up_s + self.service.startup_timeout_ms / 1000
        self.say(f"{verb} {self.name}")
        with self._connect() as client:
            while True:
                entry = self._entry()
                if entry is not None and entry.phase in lifecycle.AWAKE:
                    self.say(f"{self.name} is running")
                    return
                if select.select([client], [], [], POLL_S)[0] and not _peek(client):
                    raise ControlError(f"{self.name} was not loaded: {self._why(since)}")
                if time.monotonic() > deadline:
                    raise ControlError(f"{self.name} was not loaded in time")

    def _connect(self) -> socket.socket:
        service = self.service
        try:
            path = paths_for(self.scope).socket_path(service)
            if path is not None:
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.connect(path)
                return client
            assert service.listen_port is not None
            return socket.create_connection((service.connect_host, service.listen_port), 10)
        except OSError as error:
            raise ControlError(f"cannot connect to {service.listen_stream}: {error}") from error

    def _why(self, since: float) -> str:
        """The shim's last `failed` message since `since`, from the journal (which
        stores it a moment after the shim sent it: asked a few times)."""
        argv = [
            "journalctl",
            "--no-pager",
            "--output=cat",
            f"--since=@{since - 1:.0f}",
            f"LMPROXY_SERVICE={self.name}",
            "LMPROXY_EVENT=failed",
        ]
        for _ in range(10):
            try:
                found = subprocess.run(
                    argv, capture_output=True, text=True, timeout=10, check=False
                )
            except (OSError, subprocess.TimeoutExpired):
                break
            lines = found.stdout.strip().splitlines()
            if lines:
                return lines[-1]
            time.sleep(0.1)
        return f"turned away (see `lmproxy logs {self.name}`)"


def _peek(client: socket.socket) -> bool:
    """Whether the connection is still open (readable with data, not at its end)."""
    try:
        return bool(client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return True
    except OSError:
        return False


def run(
    config: Config,
    scope: Scope,
    name: str,
    request: Callable[[Control], None],
    say: Say,
    *,
    generation: int = 0,
    installed_config: Path | None = None,
) -> int:
    """Carries out request; 0 once done, 1 with the reason on stderr otherwise. In
    system mode, as the shims' user (its ledger, its permission to manage the units).
    generation, installed_config: the install the config came from (lmproxy.ledger)."""

    def carry_out() -> int:
        try:
            control = Control(
                config, scope, name, say, generation=generation, installed_config=installed_config
            )
            try:
                request(control)
            finally:
                control.close()
        except (ControlError, SystemdError, LedgerError, OSError) as error:
            print(f"lmproxy: {error}", file=sys.stderr, flush=True)
            return 1
        return 0

    if scope is Scope.SYSTEM:
        return as_shim_user(carry_out)
    return carry_out()


def as_shim_user(work: Callable[[], int]) -> int:
    """Runs work in a child process that has become the shims' user, and returns its
    exit status: the ledger is that user's and must stay so."""
    try:
        account = pwd.getpwnam(SHIM_USER)
    except KeyError:
        print(f"lmproxy: no user {SHIM_USER!r}: is lmproxy installed?", file=sys.stderr)
        return 1
    if os.geteuid() != 0 and os.geteuid() != account.pw_uid:
        print(f"lmproxy: --system needs root (it acts as the {SHIM_USER} user)", file=sys.stderr)
        return 1
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        status = 1
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(account.pw_gid)
                os.setuid(account.pw_uid)
            status = work()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    _, waited = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(waited)
