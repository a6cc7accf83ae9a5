"""The ledger file: transactions, reconciliation against (fake) unit states, safety."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from lmproxy import eviction, lifecycle
from lmproxy.config import parse_config
from lmproxy.ledger import (
    MAX_LEDGER_BYTES,
    Generation,
    Ledger,
    LedgerError,
    Transaction,
    profiles,
)
from lmproxy.lifecycle import Entry, Phase, Profile

NEEDS = {"a": {"VRAM": 10}, "b": {"VRAM": 14}, "c": {"VRAM": 20}}
PROFILES = {name: Profile(needs) for name, needs in NEEDS.items()}
AVAILABLE = {"VRAM": 24}


class FakeSystemd:
    def __init__(self) -> None:
        self.running: set[str] = set()

    def probe(self, units: Sequence[str]) -> Mapping[str, bool]:
        return {unit: unit in self.running for unit in units}


def make(tmp_path: Path, systemd: FakeSystemd, log: list[str] | None = None) -> Ledger:
    messages = [] if log is None else log
    return Ledger(
        tmp_path / "run",
        AVAILABLE,
        PROFILES,
        systemd.probe,
        lambda line: messages.append(line.message),
        time=lambda: 100.0,
    )


def put(txn: Transaction, name: str, entry: Entry | None = None, **changes: object) -> None:
    """Sets up an entry as a test needs it (the shims change entries only by events)."""
    entries = dict(txn.entries)
    if entry is None:
        entry = dataclasses.replace(entries[name], **changes)  # type: ignore[arg-type]
    entries[name] = entry
    txn.world = txn.world.with_entries(entries)


def test_reservation_survives_while_backend_runs(tmp_path: Path) -> None:
    systemd = FakeSystemd()
    systemd.running = {"lmproxy-a.service"}
    ledger = make(tmp_path, systemd)
    with ledger.transaction() as txn:
        assert lifecycle.Start() in txn.tell(lifecycle.Want("a", 1.0, 1.0))
    systemd.running.add("lmproxy-backend@a.service")
    with ledger.transaction() as txn:
        assert txn.entries["a"].phase is Phase.STARTING
        txn.tell(lifecycle.Ready("a", 2.0, 1))
    assert ledger.snapshot()["a"] == Entry(Phase.RUNNING, {"VRAM": 10}, 1, 2.0, 2.0)


def test_a_starting_entry_whose_shim_died_is_running_and_idle(tmp_path: Path) -> None:
    systemd = FakeSystemd()
    ledger = make(tmp_path, systemd)
    with ledger.transaction() as txn:
        put(txn, "a", Entry(Phase.STARTING, {"VRAM": 10}, 0, 1.0))
    systemd.running = {"lmproxy-backend@a.service"}
    with ledger.transaction() as txn:
        assert txn.entries["a"] == Entry(Phase.RUNNING, {"VRAM": 10}, 0, 1.0)


def test_starting_entry_kept_while_its_shim_lives(tmp_path: Path) -> None:
    systemd = FakeSystemd()
    systemd.running = {"lmproxy-a.service"}
    ledger = make(tmp_path, systemd)
    with ledger.transaction() as txn:
        put(txn, "a", Entry(Phase.STARTING, {"VRAM": 10}, 0, 1.0))
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
        put(txn, "a", Entry(Phase.STARTING, {"VRAM": 10}, 0, 1.0))
    systemd.running = set()
    with ledger.transaction() as txn:
        assert txn.entries == {}
    assert any("released the reservation of a" in line for line in log)


@pytest.mark.parametrize("state", [Phase.RUNNING, Phase.STOPPING])
def test_stopped_backend_releases_even_with_live_shim(tmp_path: Path, state: Phase) -> None:
    systemd = FakeSystemd()
    systemd.running = {"lmproxy-a.service"}
    ledger = make(tmp_path, systemd)
    with ledger.transaction() as txn:
        put(txn, "a", Entry(state, {"VRAM": 10}, 2, 1.0))
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
        put(txn, "a", Entry(Phase.STOPPING, {"VRAM": 10}, 2, 5.0))
    with ledger.transaction() as txn:
        assert txn.entries["a"].phase is Phase.STOPPING  # its shim is on it
    systemd.running = {"lmproxy-backend@a.service"}
    with ledger.transaction() as txn:
        assert txn.entries["a"] == Entry(Phase.RUNNING, {"VRAM": 10}, 0, 5.0)
        assert lifecycle.Stop("a") in txn.tell(lifecycle.Want("c", 100.0, 100.0))
    assert any("a was left stopping" in line for line in log)


def test_running_backend_outside_the_ledger_is_adopted(tmp_path: Path) -> None:
    log: list[str] = []
    systemd = FakeSystemd()
    systemd.running = {"lmproxy-backend@b.service"}
    ledger = make(tmp_path, systemd, log)
    with ledger.transaction() as txn:
        assert txn.entries["b"] == Entry(Phase.RUNNING, {"VRAM": 14}, 0, 0.0, 100.0)
    assert any("adopted b" in line for line in log)


def test_deleted_or_corrupt_ledger_is_rebuilt_from_systemd(tmp_path: Path) -> None:
    log: list[str] = []
    systemd = FakeSystemd()
    ledger = make(tmp_path, systemd, log)
    with ledger.transaction() as txn:
        put(txn, "a", Entry(Phase.RUNNING, {"VRAM": 10}, 1, 5.0))
    systemd.running = {"lmproxy-backend@a.service"}
    ledger.path.write_text("{not json")
    with ledger.transaction() as txn:
        assert txn.entries["a"].reserved == {"VRAM": 10}
    assert any("unreadable" in line for line in log)
    ledger.path.unlink()
    with ledger.transaction() as txn:
        assert txn.entries["a"].phase is Phase.RUNNING


def test_unconfigured_entries_are_dropped(tmp_path: Path) -> None:
    systemd = FakeSystemd()
    ledger = make(tmp_path, systemd)
    ledger.runtime_dir.mkdir(parents=True)
    ledger.path.write_text(
        json.dumps(
            {
                "version": 2,
                "services": {
                    "gone": {
                        "state": "running",
                        "reserved": {},
                        "in_use": 0,
                        "last_used": 0,
                        "loaded_at": 0,
                        "waiting_since": None,
                    }
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
        put(txn, "a", Entry(Phase.STARTING, {"VRAM": 10}, 0, 1.0))
    os.chown(ledger.runtime_dir, 65534, 65534)  # the shims' user's, as /run/lmproxy is
    with pytest.raises(LedgerError, match="owned by uid 0, not 65534"):
        ledger.snapshot()
    os.chown(ledger.path, 65534, 65534)
    assert set(ledger.snapshot()) == {"a"}


def test_files_have_narrow_permissions(tmp_path: Path) -> None:
    ledger = make(tmp_path, FakeSystemd())
    with ledger.transaction() as txn:
        put(txn, "a", Entry(Phase.WAITING, {}, 0, 0.0))
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
        put(txn, "a", in_use=9)
        raise RuntimeError("boom")
    assert ledger.path.read_text() == before


def _race(runtime: str, name: str, rounds: int, results: multiprocessing.Queue[int]) -> None:
    """Toggles its own reservation as fast as it can. Reports -1 if it ever found
    its own entry not as it left it (a lost update), else the peak sum it saw."""
    systemd = FakeSystemd()
    # Pretend every shim is alive so that STARTING entries are kept.
    systemd.running = {f"lmproxy-{n}.service" for n in NEEDS}
    ledger = Ledger(Path(runtime), AVAILABLE, PROFILES, systemd.probe, lambda _: None)
    peak, mine = 0, False
    for _ in range(rounds):
        with ledger.transaction() as txn:
            if (name in txn.entries) != mine:
                results.put(-1)
                return
            if mine:
                txn.world = txn.world.with_entries(
                    {n: e for n, e in txn.entries.items() if n != name}
                )
                mine = False
            elif lifecycle.Start() in txn.tell(lifecycle.Want(name, 1.0, 1.0)):
                mine = True
            else:  # waiting: back off, so that the others go on
                txn.world = txn.world.with_entries(
                    {n: e for n, e in txn.entries.items() if n != name}
                )
            peak = max(
                peak, eviction.total(e.reserved for e in txn.entries.values()).get("VRAM", 0)
            )
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


def test_the_starvation_bound_is_at_most_half_the_give_up_time() -> None:
    """A waiter must see the models in its way drain before it gives up."""
    text = json.dumps(
        {
            "MaxTimeToWaitForServiceToCloseConnectionBeforeGivingUpSeconds": 4,
            "SwapAfterWaitingSeconds": 5,
            "Services": [
                {"Name": "a", "ListenPort": 8081, "ProxyTargetPort": 18081, "Command": "x"},
                {
                    "Name": "b",
                    "ListenPort": 8082,
                    "ProxyTargetPort": 18082,
                    "Command": "x",
                    "SwapAfterWaitingSeconds": 1,
                },
            ],
        }
    )
    found = profiles(parse_config(text, Path("/etc/lmproxy")))
    assert (found["a"].starvation_bound_s, found["b"].starvation_bound_s) == (2, 1)
    assert found["a"].give_up_s == 4


# --- Config generations: every shim acts on the newest install ------------------------------


def test_a_shim_of_an_older_install_acts_on_the_new_one(tmp_path: Path) -> None:
    """A reinstall added d (busy) and more VRAM. A shim started from the old config
    would drop d (unconfigured for it: re-adopted later, idle and never used, the first
    LRU victim) and plan with 24 VRAM; it reads the installed config again instead."""
    systemd = FakeSystemd()
    systemd.running = {"lmproxy-d.service", "lmproxy-backend@d.service"}
    new_profiles = {**PROFILES, "d": Profile({"VRAM": 20})}
    new = Ledger(
        tmp_path / "run",
        {"VRAM": 48},
        new_profiles,
        systemd.probe,
        lambda _: None,
        time=lambda: 100.0,
        generation=2,
    )
    with new.transaction() as txn:
        put(txn, "d", Entry(Phase.RUNNING, {"VRAM": 20}, 3, 99.0, 50.0))
    assert json.loads((tmp_path / "run" / "ledger.json").read_text())["generation"] == 2

    refreshed: list[int] = []

    def refresh() -> Generation:
        refreshed.append(1)
        return Generation(2, {"VRAM": 48}, new_profiles)

    messages: list[str] = []
    old = Ledger(
        tmp_path / "run",
        AVAILABLE,
        PROFILES,
        systemd.probe,
        lambda line: messages.append(line.message),
        time=lambda: 100.0,
        generation=1,
        refresh=refresh,
    )
    with old.transaction() as txn:
        assert txn.entries["d"] == Entry(Phase.RUNNING, {"VRAM": 20}, 3, 99.0, 50.0)
        # b fits beside d in the new 48, not in the old 24.
        assert lifecycle.Start() in txn.tell(lifecycle.Want("b", 100.0, 100.0))
    assert refreshed == [1]
    assert old.generation == 2
    assert any("installed again (generation 2)" in m for m in messages)
    assert not any("dropped" in m for m in messages)
    assert old.snapshot()["d"].in_use == 3


def test_a_ledger_of_a_newer_install_that_cannot_be_read_again_is_refused(
    tmp_path: Path,
) -> None:
    systemd = FakeSystemd()
    newer = Ledger(
        tmp_path / "run", AVAILABLE, PROFILES, systemd.probe, lambda _: None, generation=5
    )
    with newer.transaction() as txn:
        txn.tell(lifecycle.Want("a", 1.0, 1.0))
    before = (tmp_path / "run" / "ledger.json").read_bytes()

    def broken() -> Generation:
        raise ValueError("the installed config is not valid")

    for refresh in (None, broken, lambda: Generation(4, AVAILABLE, PROFILES)):
        stale = Ledger(
            tmp_path / "run",
            AVAILABLE,
            {},
            systemd.probe,
            lambda _: None,
            generation=3,
            refresh=refresh,
        )
        refused = pytest.raises(LedgerError, match=r"newer install of the config \(generation 5\)")
        with refused, stale.transaction():
            pass
        assert (tmp_path / "run" / "ledger.json").read_bytes() == before


def test_a_newer_install_records_its_generation_and_a_ledger_without_one_is_read(
    tmp_path: Path,
) -> None:
    systemd = FakeSystemd()
    run = tmp_path / "run"
    run.mkdir()
    (run / "ledger.json").write_text(json.dumps({"version": 2, "services": {}}))
    ledger = Ledger(run, AVAILABLE, PROFILES, systemd.probe, lambda _: None, generation=9)
    with ledger.transaction():
        pass  # nothing changed but the generation: written, so older shims learn of it
    assert json.loads((run / "ledger.json").read_text())["generation"] == 9
