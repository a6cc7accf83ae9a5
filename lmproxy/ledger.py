"""The resource ledger: one JSON file shared by every shim, changed under flock.

The ledger stores the lifecycle's world (lmproxy.lifecycle) and locks it; it
decides nothing. Every transaction first tells the lifecycle what systemd says
of each service's units (an `Observed` event each), so that a shim killed at any
point never leaks a reservation and a backend that runs is never outside the
ledger; the rules for that are the lifecycle's.

Transactions hold an exclusive flock on a separate lock file, and replace the
data file by rename, so that readers without the lock (`lmproxy status`) and
a crash half-way through a write never see a torn file; waiters watch for that
rename (lmproxy.watch).

Every shim acts on the same config generation. `lmproxy install` gives each install
a generation (origin.json), and the ledger records the newest one that wrote it. A
shim started before a reinstall would otherwise reconcile with the services and
resources it knows: drop the entry of a service the new config added (to be adopted
again with no connections and never used: the first LRU victim, however busy) and
plan with the old ResourcesAvailable. Such a shim reads the installed config again
(`refresh`) before it touches a ledger of a newer generation.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time as _time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmproxy import lifecycle, unitnames
from lmproxy.checks import LOADED_PHASES, Measurement, held_outside
from lmproxy.config import Config
from lmproxy.files import UnsafeFile, open_own_regular, write_atomically
from lmproxy.lifecycle import Effect, Entry, Event, Log, Phase, Profile, SleepProfile, World

FORMAT_VERSION = 2
# A ledger of thousands of services is far smaller; a bigger file is not ours.
MAX_LEDGER_BYTES = 4 * 1024 * 1024

# Which of these units run now; one D-Bus call for all of them.
Probe = Callable[[Sequence[str]], Mapping[str, bool]]
Logger = Callable[[Log], None]


@dataclass(frozen=True)
class Generation:
    """What a ledger's users know of the config: its install's generation, what is
    available and what each service needs."""

    number: int
    available: Mapping[str, int]
    profiles: Mapping[str, Profile]


# The installed config as it is now (read again from disk).
Refresh = Callable[[], Generation]


class LedgerError(RuntimeError):
    """The ledger cannot be used safely (for example: a symlink or a foreign owner)."""


@dataclass
class Transaction:
    """The world a transaction sees; `tell` moves it on. Written back when it ends."""

    world: World

    @property
    def entries(self) -> Mapping[str, Entry]:
        return self.world.entries

    def tell(self, event: Event) -> tuple[Effect, ...]:
        """Steps the lifecycle; returns the effects for the caller to carry out."""
        result = lifecycle.step(self.world, event)
        self.world = result.world
        return result.effects


class Ledger:
    def __init__(
        self,
        runtime_dir: Path,
        available: Mapping[str, int],
        profiles: Mapping[str, Profile],
        probe: Probe,
        log: Logger,
        *,
        time: Callable[[], float] = _time.time,
        generation: int = 0,
        refresh: Refresh | None = None,
    ) -> None:
        """profiles: what the lifecycle knows of every configured service, by name;
        log: told each line reconciliation has for the journal; generation: the config's
        install generation; refresh: reads the installed config again, for a ledger
        that a newer generation wrote."""
        self.runtime_dir = runtime_dir
        self.path = runtime_dir / "ledger.json"
        self.lock_path = runtime_dir / "ledger.lock"
        self.available = dict(available)
        self.profiles = dict(profiles)
        self.probe = probe
        self.log = log
        self.time = time
        self.generation = generation
        self.refresh = refresh

    @contextlib.contextmanager
    def transaction(
        self, measured: Mapping[str, int] | None = None, loaded_before: Iterable[str] = ()
    ) -> Iterator[Transaction]:
        """Locks, reads, reconciles with systemd, yields, writes back if changed.
        measured: what resources' CheckCommands found free just now, with the services
        that were loaded before they ran (lmproxy.checks), kept for every transaction."""
        _make_private_dir(self.runtime_dir)
        lock_fd = _open_owned(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            present = self.path.exists()
            if not present and os.fstat(lock_fd).st_size > 0:
                self._note(f"ledger {self.path} was missing; rebuilt it from systemd's unit states")
            stored, generation, measurements = self._load()
            if generation > self.generation:
                self._catch_up(generation)
            kept = {r: m for r, m in measurements.items() if r in self.available}
            if measured:
                kept.update(self._measurements(measured, loaded_before, stored))
            txn = Transaction(self._reconciled(stored, kept))
            yield txn
            changed = kept != measurements or generation != self.generation
            if txn.entries != stored or not present or changed:
                self._store(txn.entries, kept)
                if os.fstat(lock_fd).st_size == 0:
                    os.write(lock_fd, b"1")  # marks that a ledger was written before
        finally:
            os.close(lock_fd)  # closing releases the flock

    def reconcile(self) -> None:
        """A transaction with nothing to tell: reconciliation releases what no longer
        runs now, rather than at the next transaction (a backend whose stop failed
        keeps its reservation)."""
        with self.transaction():
            pass

    def _catch_up(self, generation: int) -> None:
        """A newer install wrote the ledger: act on its config, never on this one's."""
        fresh = None
        if self.refresh is not None:
            try:
                fresh = self.refresh()
            except Exception as error:  # a config broken since: say so below
                self._note(f"could not read the installed config again: {error}")
        if fresh is None or fresh.number < generation:
            raise LedgerError(
                f"{self.path} was written for a newer install of the config (generation "
                f"{generation}) than this shim's ({self.generation}), which it cannot read"
            )
        self._note(
            f"the config was installed again (generation {fresh.number}): "
            "acting on the new one's services and resources"
        )
        self.generation = fresh.number
        self.available = dict(fresh.available)
        self.profiles = dict(fresh.profiles)

    def _measurements(
        self, measured: Mapping[str, int], loaded_before: Iterable[str], stored: Mapping[str, Entry]
    ) -> dict[str, Measurement]:
        loaded = set(loaded_before) & {
            name for name, entry in stored.items() if entry.phase.value in LOADED_PHASES
        }
        now = self.time()
        return {
            resource: Measurement(free, now, tuple(sorted(loaded)))
            for resource, free in measured.items()
            if resource in self.available
        }

    def snapshot(self) -> dict[str, Entry]:
        """The ledger as last written, without locking or reconciling (for status)."""
        return self._load(quiet=True)[0]

    def snapshot_and_measurements(self) -> tuple[dict[str, Entry], dict[str, Measurement]]:
        """The entries and the last measurement of each measured resource, from one read
        of the ledger as last written (for status)."""
        entries, _, measurements = self._load(quiet=True)
        return entries, measurements

    def _load(self, *, quiet: bool = False) -> tuple[dict[str, Entry], int, dict[str, Measurement]]:
        """The entries, the generation that wrote them (0: none yet) and the last
        measurements. quiet: a read-only look (status): another user's ledger may be
        read (root reads the system shims'), never written."""
        try:
            # Read-only, it belongs to whoever owns the runtime directory (the
            # shims' user, when root looks at the system manager's ledger).
            owner = self.runtime_dir.stat().st_uid if quiet else os.geteuid()
            fd = _open_owned(self.path, os.O_RDONLY, 0, owner=owner)
        except FileNotFoundError:
            return {}, 0, {}
        with os.fdopen(fd, "rb") as file:
            if os.fstat(file.fileno()).st_size > MAX_LEDGER_BYTES:
                raise LedgerError(f"{self.path} is larger than {MAX_LEDGER_BYTES} bytes")
            data = file.read(MAX_LEDGER_BYTES + 1)
        try:
            return _decode(json.loads(data))
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            if not quiet:
                self._note(
                    f"ledger {self.path} was unreadable ({error}); "
                    "rebuilt it from systemd's unit states"
                )
            return {}, 0, {}

    def _store(
        self, entries: Mapping[str, Entry], measurements: Mapping[str, Measurement] | None = None
    ) -> None:
        # Compact, as lmproxy.earlystart writes it (json's C encoder: no indent).
        document = _encode(entries, self.generation, measurements or {})
        data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        # Status is readable by all; only the owner writes. The runtime dir is a tmpfs.
        write_atomically(self.path, data, 0o644, durable=False)

    def _note(self, message: str) -> None:
        self.log(Log("reconcile", message, ""))

    def _reconciled(
        self, stored: Mapping[str, Entry], measurements: Mapping[str, Measurement]
    ) -> World:
        """The stored world, told what systemd says of every service's units."""
        names = sorted(set(self.profiles) | set(stored))
        units = [
            unit
            for name in names
            for unit in (unitnames.backend_unit(name), unitnames.shim_unit(name))
        ]
        running = self.probe(units)
        shims = frozenset(n for n in names if running.get(unitnames.shim_unit(n), False))
        reserved = {name: entry.reserved for name, entry in stored.items()}
        outside = held_outside(self.available, measurements, reserved)
        world = World(self.available, self.profiles, dict(stored), shims, outside)
        now = self.time()
        for name in names:
            backend_runs = running.get(unitnames.backend_unit(name), False)
            observed = lifecycle.Observed(name, now, backend_runs, name in shims)
            result = lifecycle.step(world, observed)
            world = result.world
            for effect in result.effects:
                if isinstance(effect, Log):
                    self.log(effect)
        return world


def _encode(
    entries: Mapping[str, Entry],
    generation: int = 0,
    measurements: Mapping[str, Measurement] | None = None,
) -> dict[str, Any]:
    document = {
        "version": FORMAT_VERSION,
        "generation": generation,
        "services": {
            name: {
                "state": entry.phase.value,
                "reserved": dict(entry.reserved),
                "in_use": entry.in_use,
                "last_used": entry.last_used,
                "loaded_at": entry.loaded_at,
                "waiting_since": entry.waiting_since,
                "sleep_level": entry.sleep_level,
            }
            for name, entry in entries.items()
        },
    }
    if measurements:  # only where a CheckCommand measured something
        document["checks"] = {r: m.as_json() for r, m in measurements.items()}
    return document


def _decode(data: Any) -> tuple[dict[str, Entry], int, dict[str, Measurement]]:
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"unknown ledger version {data.get('version')!r}")
    generation = data.get("generation", 0)  # none before generations were recorded
    if type(generation) is not int or generation < 0:
        raise ValueError(f"bad generation {generation!r}")
    entries = {}
    for name, raw in data["services"].items():
        reserved = {str(k): int(v) for k, v in raw["reserved"].items()}
        since = raw["waiting_since"]
        entries[str(name)] = Entry(
            Phase(raw["state"]),
            reserved,
            int(raw["in_use"]),
            float(raw["last_used"]),
            float(raw["loaded_at"]),
            None if since is None else float(since),
            int(raw.get("sleep_level", 0)),
        )
    checks = data.get("checks", {})
    measurements = {str(r): Measurement.from_json(m) for r, m in checks.items()}
    return entries, generation, measurements


def _make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise LedgerError(f"{path} is not a directory owned by uid {os.geteuid()}")


def _open_owned(path: Path, flags: int, mode: int, *, owner: int | None = None) -> int:
    """Opens a regular file of owner's (ours by default), never through a symlink:
    another user must not be able to swap the ledger for something else, and a FIFO
    put in its place must not hang a reader (root's `lmproxy status` included)."""
    expected = os.geteuid() if owner is None else owner
    try:
        return open_own_regular(path, flags, mode, owner=expected)
    except UnsafeFile as problem:
        raise LedgerError(f"{path} {problem}; refusing to use it") from None


def profiles(config: Config) -> dict[str, Profile]:
    """What the lifecycle knows of each configured service. The starvation bound is at
    most half the time a client waits before it is turned away: a waiter that gives up
    before the models in its way drain would never be served while they are busy."""
    give_up = config.max_wait_for_connection_close_s
    return {
        s.name: Profile(
            needs=dict(s.resource_requirements),
            sleep=None if s.sleep is None else SleepProfile(s.sleep.level, dict(s.sleep.holds)),
            starvation_bound_s=min(s.swap_after_waiting_s, give_up / 2),
            min_loaded_s=s.min_loaded_s,
            give_up_s=give_up,
        )
        for s in config.services
    }


def installed_generation(installed_config: Path) -> Generation:
    """The installed config as it is now: a Ledger's `refresh`."""
    from lmproxy.origin import load_installed

    installed = load_installed(installed_config)
    config = installed.config
    return Generation(installed.generation, config.resources_available, profiles(config))
