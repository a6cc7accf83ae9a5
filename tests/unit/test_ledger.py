"""The ledger file: transactions, reconciliation against (fake) unit states, safety."""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from lmproxy.eviction import Entry, Evict, Reserve, State, plan
from lmproxy.ledger import MAX_LEDGER_BYTES, Ledger, LedgerError

NEEDS = {"a": {"VRAM": 10}, "b": {"VRAM": 14}, "c": {"VRAM": 20}}
AVAILABLE = {"VRAM": 24}


class FakeSystemd:
    def __init__(self) -> None:
        self.running: set[str] = set()

    def probe(self, units: Sequence[str]) -> Mapping[str, bool]:
        return {unit: unit in self.running for unit in units}


def make(tmp_path: Path, systemd: FakeSystemd, log: list[str] | None = None) -> Ledger:
    messages = [] if log is None else log
    return Ledger(tmp_path / "run", AVAILABLE, NEEDS, systemd.probe, messages.append)


def test_reservation_survives_while_backend_runs(tmp_path: Path) -> None:
    systemd = FakeSystemd()
    ledger = make(tmp_path, systemd)
    with ledger.transaction() as txn:
        txn.entries["a"] = Entry(State.STARTING, {"VRAM": 10}, 0, 1.0)
    systemd.running = {"lmproxy-backend@a.service"}
    with ledger.transaction() as txn:
        assert txn.entries["a"].state is State.STARTING
        txn.set("a", state=State.RUNNING)
    assert ledger.snapshot()["a"] == Entry(State.RUNNING, {"VRAM": 10}, 0, 1.0)


def test_starting_entry_kept_while_its_shim_lives(tmp_path: Path) -> None:
    systemd = FakeSystemd()
    systemd.running = {"lmproxy-a.service"}
    ledger = make(tmp_path, systemd)
    with ledger.transaction() as txn:
        txn.entries["a"] = Entry(State.STARTING, {"VRAM": 10}, 0, 1.0)
    with ledger.transaction() as txn:
        assert "a" in txn.entries


def test_dead_shim_leaks_nothing(tmp_path: Path) -> None:
    """kill -9 of a shim between reserving and starting: the next transaction
    releases its reservation because neither its shim nor its backend runs."""
    log: list[str] = []
    systemd = FakeSystemd()
    systemd.running = {"lmproxy-a.service"}
    ledger = make(tmp_path, systemd, log)
    with ledger.transaction() as txn:
        txn.entries["a"] = Entry(State.STARTING, {"VRAM": 10}, 0, 1.0)
    systemd.running = set()
    with ledger.transaction() as txn:
        assert txn.entries == {}
    assert any("released the reservation of a" in line for line in log)


@pytest.mark.parametrize("state", [State.RUNNING, State.STOPPING])
def test_stopped_backend_releases_even_with_live_shim(tmp_path: Path, state: State) -> None:
    systemd = FakeSystemd()
    systemd.running = {"lmproxy-a.service"}
    ledger = make(tmp_path, systemd)
    with ledger.transaction() as txn:
        txn.entries["a"] = Entry(state, {"VRAM": 10}, 2, 1.0)
    with ledger.transaction() as txn:
        assert txn.entries == {}


def test_an_abandoned_stopping_entry_is_running_and_idle_again(tmp_path: Path) -> None:
    """Its backend runs, no shim is left to stop it: as stopping it would hold its
    reservation for ever and every newcomer would wait for it; as running and idle
    it can be evicted (or served again)."""
    log: list[str] = []
    systemd = FakeSystemd()
    systemd.running = {"lmproxy-backend@a.service", "lmproxy-a.service"}
    ledger = make(tmp_path, systemd, log)
    with ledger.transaction() as txn:
        txn.entries["a"] = Entry(State.STOPPING, {"VRAM": 10}, 2, 5.0)
    with ledger.transaction() as txn:
        assert txn.entries["a"].state is State.STOPPING  # its shim is on it
    systemd.running = {"lmproxy-backend@a.service"}
    with ledger.transaction() as txn:
        assert txn.entries["a"] == Entry(State.RUNNING, {"VRAM": 10}, 0, 5.0)
        assert plan(txn.available, txn.entries, "c", NEEDS["c"]) == Evict(("a",))
    assert any("a was left stopping" in line for line in log)


def test_running_backend_outside_the_ledger_is_adopted(tmp_path: Path) -> None:
    log: list[str] = []
    systemd = FakeSystemd()
    systemd.running = {"lmproxy-backend@b.service"}
    ledger = make(tmp_path, systemd, log)
    with ledger.transaction() as txn:
        assert txn.entries["b"] == Entry(State.RUNNING, {"VRAM": 14}, 0, 0.0)
    assert any("adopted b" in line for line in log)


def test_deleted_or_corrupt_ledger_is_rebuilt_from_systemd(tmp_path: Path) -> None:
    log: list[str] = []
    systemd = FakeSystemd()
    ledger = make(tmp_path, systemd, log)
    with ledger.transaction() as txn:
        txn.entries["a"] = Entry(State.RUNNING, {"VRAM": 10}, 1, 5.0)
    systemd.running = {"lmproxy-backend@a.service"}
    ledger.path.write_text("{not json")
    with ledger.transaction() as txn:
        assert txn.entries["a"].reserved == {"VRAM": 10}
    assert any("unreadable" in line for line in log)
    ledger.path.unlink()
    with ledger.transaction() as txn:
        assert txn.entries["a"].state is State.RUNNING


def test_unconfigured_entries_are_dropped(tmp_path: Path) -> None:
    systemd = FakeSystemd()
    ledger = make(tmp_path, systemd)
    ledger.runtime_dir.mkdir(parents=True)
    ledger.path.write_text(
        json.dumps(
            {
                "version": 1,
                "services": {
                    "gone": {"state": "running", "reserved": {}, "connections": 0, "last_used": 0}
                },
            }
        )
    )
    with ledger.transaction() as txn:
        assert "gone" not in txn.entries


def test_ledger_symlink_is_refused(tmp_path: Path) -> None:
    ledger = make(tmp_path, FakeSystemd())
    ledger.runtime_dir.mkdir(parents=True)
    target = tmp_path / "elsewhere"
    target.write_text("{}")
    ledger.lock_path.symlink_to(target)
    with pytest.raises(OSError), ledger.transaction():
        pass


def test_foreign_owned_ledger_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown a file to another user")
    ledger = make(tmp_path, FakeSystemd())
    ledger.runtime_dir.mkdir(parents=True)
    ledger.lock_path.touch()
    os.chown(ledger.lock_path, 65534, 65534)
    with pytest.raises(LedgerError), ledger.transaction():
        pass


def test_a_fifo_in_place_of_the_ledger_is_refused_at_once(tmp_path: Path) -> None:
    """Put there by a compromised shims' user, it hung root's `lmproxy status`."""
    ledger = make(tmp_path, FakeSystemd())
    ledger.runtime_dir.mkdir(parents=True)
    os.mkfifo(ledger.path)
    with pytest.raises(LedgerError, match="not a regular file"):
        ledger.snapshot()
    with pytest.raises(LedgerError, match="not a regular file"), ledger.transaction():
        pass
    ledger.path.unlink()
    ledger.lock_path.unlink()
    os.mkfifo(ledger.lock_path)
    with pytest.raises(LedgerError, match="not a regular file"), ledger.transaction():
        pass


def test_a_huge_ledger_is_refused(tmp_path: Path) -> None:
    ledger = make(tmp_path, FakeSystemd())
    ledger.runtime_dir.mkdir(parents=True)
    with ledger.path.open("wb") as file:
        file.truncate(MAX_LEDGER_BYTES + 1)
    with pytest.raises(LedgerError, match="larger than"):
        ledger.snapshot()


def test_a_read_only_look_wants_the_runtime_dirs_owner(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown a file to another user")
    systemd = FakeSystemd()
    systemd.running = {"lmproxy-a.service"}
    ledger = make(tmp_path, systemd)
    with ledger.transaction() as txn:
        txn.entries["a"] = Entry(State.STARTING, {"VRAM": 10}, 0, 1.0)
    os.chown(ledger.runtime_dir, 65534, 65534)  # the shims' user's, as /run/lmproxy is
    with pytest.raises(LedgerError, match="owned by uid 0, not 65534"):
        ledger.snapshot()
    os.chown(ledger.path, 65534, 65534)
    assert set(ledger.snapshot()) == {"a"}


def test_files_have_narrow_permissions(tmp_path: Path) -> None:
    ledger = make(tmp_path, FakeSystemd())
    with ledger.transaction() as txn:
        txn.entries["a"] = Entry(State.WAITING, {}, 0, 0.0)
    assert ledger.lock_path.stat().st_mode & 0o777 == 0o600
    assert ledger.path.stat().st_mode & 0o777 == 0o644


def test_an_exception_in_a_transaction_writes_nothing(tmp_path: Path) -> None:
    systemd = FakeSystemd()
    systemd.running = {"lmproxy-backend@a.service"}
    ledger = make(tmp_path, systemd)
    with ledger.transaction():
        pass
    before = ledger.path.read_text()
    with pytest.raises(RuntimeError), ledger.transaction() as txn:
        txn.set("a", connections=9)
        raise RuntimeError("boom")
    assert ledger.path.read_text() == before


def _race(runtime: str, name: str, rounds: int, results: multiprocessing.Queue[int]) -> None:
    """Toggles its own reservation as fast as it can. Reports -1 if it ever found
    its own entry not as it left it (a lost update), else the peak sum it saw."""
    systemd = FakeSystemd()
    # Pretend every shim is alive so that STARTING entries are kept.
    systemd.running = {f"lmproxy-{n}.service" for n in NEEDS}
    ledger = Ledger(Path(runtime), AVAILABLE, NEEDS, systemd.probe, lambda _: None)
    peak, mine = 0, False
    for _ in range(rounds):
        with ledger.transaction() as txn:
            if (name in txn.entries) != mine:
                results.put(-1)
                return
            if mine:
                del txn.entries[name]
                mine = False
            elif plan(AVAILABLE, txn.entries, name, NEEDS[name]) == Reserve():
                txn.entries[name] = Entry(State.STARTING, NEEDS[name], 0, 0.0)
                mine = True
            peak = max(peak, txn.reserved()["VRAM"])
    results.put(peak)


def test_concurrent_processes_never_overcommit_or_lose_updates(tmp_path: Path) -> None:
    results: multiprocessing.Queue[int] = multiprocessing.Queue()
    workers = [
        multiprocessing.Process(target=_race, args=(str(tmp_path), name, 400, results))
        for name in NEEDS
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    peaks = [results.get(timeout=5) for _ in workers]
    assert min(peaks) >= 0, "a transaction saw another's lost update"
    assert 0 < max(peaks) <= AVAILABLE["VRAM"]


def test_missing_ledger_after_one_was_written_is_logged(tmp_path: Path) -> None:
    log: list[str] = []
    systemd = FakeSystemd()
    ledger = make(tmp_path, systemd, log)
    with ledger.transaction():
        pass
    assert ledger.path.exists()  # the first transaction writes one
    assert log == []
    ledger.path.unlink()
    with ledger.transaction():
        pass
    assert any("was missing" in line for line in log)
