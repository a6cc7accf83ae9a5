"""The resource ledger: one JSON file shared by every shim, changed under flock.

The ledger is the single truth about reservations; systemd is the single truth
about what runs. Every transaction first reconciles the two, so that a shim
killed at any point never leaks a reservation and a backend that runs is never
outside the ledger:

- an entry whose backend is not running is dropped, unless its shim is alive
  and still on its way to start it (waiting or starting);
- a running backend without an entry is adopted, with its configured needs;
- an entry left stopping while its backend runs on with no shim of its own (a
  stop that failed, a shim that exited on a false alarm) is running again, idle:
  nobody was left to finish the stop, and as stopping it would hold its
  reservation with no end, turning away everyone who needs the same resources;
  as running it can be evicted, or served by the next shim of its own.

Transactions hold an exclusive flock on a separate lock file, and replace the
data file by rename, so that readers without the lock (`lmproxy status`) and
a crash half-way through a write never see a torn file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmproxy import unitnames
from lmproxy.eviction import Entry, State
from lmproxy.files import UnsafeFile, open_own_regular, write_atomically

FORMAT_VERSION = 1
# A ledger of thousands of services is far smaller; a bigger file is not ours.
MAX_LEDGER_BYTES = 4 * 1024 * 1024

# Which of these units run now; one D-Bus call for all of them.
Probe = Callable[[Sequence[str]], Mapping[str, bool]]
Log = Callable[[str], None]


class LedgerError(RuntimeError):
    """The ledger cannot be used safely (for example: a symlink or a foreign owner)."""


@dataclass
class Transaction:
    """What a transaction sees and may change; written back when it ends."""

    available: Mapping[str, int]
    entries: dict[str, Entry]

    def set(self, name: str, **changes: Any) -> Entry:
        """Replaces fields of name's entry (which must exist)."""
        entry = dataclasses.replace(self.entries[name], **changes)
        self.entries[name] = entry
        return entry

    def reserved(self) -> dict[str, int]:
        total = dict.fromkeys(self.available, 0)
        for entry in self.entries.values():
            for resource, amount in entry.reserved.items():
                total[resource] = total.get(resource, 0) + amount
        return total


class Ledger:
    def __init__(
        self,
        runtime_dir: Path,
        available: Mapping[str, int],
        needs: Mapping[str, Mapping[str, int]],
        probe: Probe,
        log: Log,
    ) -> None:
        """needs: every configured service's ResourceRequirements, by service name."""
        self.runtime_dir = runtime_dir
        self.path = runtime_dir / "ledger.json"
        self.lock_path = runtime_dir / "ledger.lock"
        self.available = dict(available)
        self.needs = {name: dict(amounts) for name, amounts in needs.items()}
        self.probe = probe
        self.log = log

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """Locks, reads, reconciles with systemd, yields, writes back if changed."""
        _make_private_dir(self.runtime_dir)
        lock_fd = _open_owned(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            present = self.path.exists()
            if not present and os.fstat(lock_fd).st_size > 0:
                self.log(f"ledger {self.path} was missing; rebuilt it from systemd's unit states")
            stored = self._load()
            txn = Transaction(self.available, dict(stored))
            self._reconcile(txn)
            yield txn
            if txn.entries != stored or not present:
                self._store(txn.entries)
                if os.fstat(lock_fd).st_size == 0:
                    os.write(lock_fd, b"1")  # marks that a ledger was written before
        finally:
            os.close(lock_fd)  # closing releases the flock

    def snapshot(self) -> dict[str, Entry]:
        """The ledger as last written, without locking or reconciling (for status)."""
        return self._load(quiet=True)

    def _load(self, *, quiet: bool = False) -> dict[str, Entry]:
        """quiet: a read-only look (status): another user's ledger may be read
        (root reads the system shims'), never written."""
        try:
            # Read-only, it belongs to whoever owns the runtime directory (the
            # shims' user, when root looks at the system manager's ledger).
            owner = self.runtime_dir.stat().st_uid if quiet else os.geteuid()
            fd = _open_owned(self.path, os.O_RDONLY, 0, owner=owner)
        except FileNotFoundError:
            return {}
        with os.fdopen(fd, "rb") as file:
            if os.fstat(file.fileno()).st_size > MAX_LEDGER_BYTES:
                raise LedgerError(f"{self.path} is larger than {MAX_LEDGER_BYTES} bytes")
            data = file.read(MAX_LEDGER_BYTES + 1)
        try:
            return _decode(json.loads(data))
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            if not quiet:
                self.log(
                    f"ledger {self.path} was unreadable ({error}); "
                    "rebuilt it from systemd's unit states"
                )
            return {}

    def _store(self, entries: Mapping[str, Entry]) -> None:
        data = json.dumps(_encode(entries), indent=1, sort_keys=True).encode()
        # Status is readable by all; only the owner writes. The runtime dir is a tmpfs.
        write_atomically(self.path, data, 0o644, durable=False)

    def _reconcile(self, txn: Transaction) -> None:
        names = sorted(set(self.needs) | set(txn.entries))
        units = [
            unit
            for name in names
            for unit in (unitnames.backend_unit(name), unitnames.shim_unit(name))
        ]
        running = self.probe(units)
        for name in names:
            backend_runs = running.get(unitnames.backend_unit(name), False)
            shim_runs = running.get(unitnames.shim_unit(name), False)
            entry = txn.entries.get(name)
            if name not in self.needs:
                if entry is not None:
                    del txn.entries[name]
                    self.log(f"dropped ledger entry of {name}: no longer configured")
                continue
            if backend_runs:
                if entry is None or entry.state is State.WAITING:
                    txn.entries[name] = Entry(State.RUNNING, self.needs[name], 0, 0.0)
                    self.log(f"adopted {name}: its backend runs outside the ledger")
                elif entry.state is State.STOPPING and not shim_runs:
                    txn.entries[name] = Entry(State.RUNNING, entry.reserved, 0, entry.last_used)
                    self.log(
                        f"{name} was left stopping while its backend runs with no shim: "
                        "counted as running and idle again"
                    )
            elif entry is not None and not (
                entry.state in (State.WAITING, State.STARTING) and shim_runs
            ):
                del txn.entries[name]
                if entry.reserved:
                    self.log(
                        f"released the reservation of {name} ({entry.state.value}): "
                        "its backend is not running"
                    )


def _encode(entries: Mapping[str, Entry]) -> dict[str, Any]:
    return {
        "version": FORMAT_VERSION,
        "services": {
            name: {
                "state": entry.state.value,
                "reserved": dict(entry.reserved),
                "connections": entry.connections,
                "last_used": entry.last_used,
            }
            for name, entry in entries.items()
        },
    }


def _decode(data: Any) -> dict[str, Entry]:
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"unknown ledger version {data.get('version')!r}")
    entries = {}
    for name, raw in data["services"].items():
        reserved = {str(k): int(v) for k, v in raw["reserved"].items()}
        entries[str(name)] = Entry(
            State(raw["state"]), reserved, int(raw["connections"]), float(raw["last_used"])
        )
    return entries


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
