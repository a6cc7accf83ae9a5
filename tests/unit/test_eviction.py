"""The eviction planner, tested as a pure function: examples first, then every
small state there is, checked against brute force."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import pytest

from lmproxy.eviction import (
    Entry,
    Evict,
    Impossible,
    Reserve,
    State,
    Wait,
    WaitReason,
    plan,
)

GPU = {"VRAM": 24, "RAM": 32}


def running(vram: int, ram: int = 0, *, used: float, connections: int = 0) -> Entry:
    return Entry(State.RUNNING, {"VRAM": vram, "RAM": ram}, connections, used)


def test_fits_in_free_space_reserves() -> None:
    entries = {"a": running(10, used=1)}
    assert plan(GPU, entries, "b", {"VRAM": 14}) == Reserve()


def test_empty_ledger_reserves() -> None:
    assert plan(GPU, {}, "a", {"VRAM": 24, "RAM": 32}) == Reserve()


def test_no_requirements_always_reserve() -> None:
    entries = {"a": running(24, 32, used=1, connections=3)}
    assert plan(GPU, entries, "b", {}) == Reserve()


def test_evicts_least_recently_used() -> None:
    entries = {"old": running(12, used=1), "new": running(12, used=2)}
    assert plan(GPU, entries, "c", {"VRAM": 12}) == Evict(("old",))


def test_never_evicts_a_service_with_open_connections() -> None:
    entries = {"old": running(12, used=1, connections=1), "new": running(12, used=2)}
    assert plan(GPU, entries, "c", {"VRAM": 12}) == Evict(("new",))


def test_waits_when_only_busy_services_could_make_room() -> None:
    entries = {"a": running(24, used=1, connections=2)}
    assert plan(GPU, entries, "b", {"VRAM": 1}) == Wait(WaitReason.BUSY, ("a",))


def test_starting_service_is_not_a_victim() -> None:
    entries = {"a": Entry(State.STARTING, {"VRAM": 24}, 0, 1)}
    assert plan(GPU, entries, "b", {"VRAM": 1}) == Wait(WaitReason.BUSY, ("a",))


def test_waits_for_services_already_stopping_instead_of_stopping_more() -> None:
    entries = {
        "going": Entry(State.STOPPING, {"VRAM": 12}, 0, 1),
        "idle": running(12, used=0),
    }
    assert plan(GPU, entries, "c", {"VRAM": 12}) == Wait(WaitReason.STOPPING, ("going",))


def test_stopping_services_count_toward_room_for_more_victims() -> None:
    entries = {
        "going": Entry(State.STOPPING, {"VRAM": 8}, 0, 1),
        "a": running(8, used=2),
        "b": running(8, used=3),
    }
    assert plan(GPU, entries, "c", {"VRAM": 16}) == Evict(("a",))


def test_skips_services_that_hold_none_of_the_short_resource() -> None:
    entries = {
        "ram-only": running(0, 30, used=1),
        "gpu": running(24, 0, used=2),
    }
    assert plan(GPU, entries, "c", {"VRAM": 10}) == Evict(("gpu",))


def test_drops_victims_made_redundant_by_a_later_bigger_one() -> None:
    entries = {"small": running(4, used=1), "big": running(20, used=2)}
    assert plan(GPU, entries, "c", {"VRAM": 24}) == Evict(("small", "big"))
    assert plan(GPU, entries, "c", {"VRAM": 20}) == Evict(("big",))


def test_needs_several_victims_across_resources() -> None:
    entries = {"gpu": running(20, 0, used=1), "ram": running(0, 30, used=2)}
    assert plan(GPU, entries, "c", {"VRAM": 10, "RAM": 10}) == Evict(("gpu", "ram"))


def test_own_entry_is_ignored() -> None:
    entries = {"me": running(24, used=1), "other": running(0, used=2)}
    assert plan(GPU, entries, "me", {"VRAM": 24}) == Reserve()


def test_waiting_entries_hold_nothing() -> None:
    entries = {"w": Entry(State.WAITING, {}, 0, 1)}
    assert plan(GPU, entries, "me", {"VRAM": 24}) == Reserve()


def test_impossible_reports_shortfall() -> None:
    decision = plan(GPU, {}, "me", {"VRAM": 30})
    assert decision == Impossible({"VRAM": 6})


def test_unknown_resource_is_impossible() -> None:
    assert plan(GPU, {}, "me", {"TPU": 1}) == Impossible({"TPU": 1})


def test_lru_ties_break_by_name_for_determinism() -> None:
    entries = {"b": running(12, used=5), "a": running(12, used=5)}
    assert plan(GPU, entries, "c", {"VRAM": 12}) == Evict(("a",))


# --- Every small state, checked against brute force -------------------------

AVAILABLE = {"X": 3, "Y": 2}
AMOUNTS = [{}, {"X": 1}, {"X": 2}, {"Y": 1}, {"X": 1, "Y": 1}, {"X": 3, "Y": 2}]
SHAPES: list[tuple[State, int]] = [
    (State.RUNNING, 0),
    (State.RUNNING, 1),
    (State.STARTING, 0),
    (State.STOPPING, 0),
    (State.WAITING, 0),
]
NEEDS = [{"X": 1}, {"X": 2, "Y": 1}, {"X": 3}, {"Y": 2}, {"X": 3, "Y": 2}, {"X": 4}, {}]


def _sum(maps: Sequence[Mapping[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for amounts in maps:
        for resource, amount in amounts.items():
            total[resource] = total.get(resource, 0) + amount
    return total


def _fits(needs: Mapping[str, int], held: Mapping[str, int]) -> bool:
    return all(amount <= AVAILABLE.get(r, 0) - held.get(r, 0) for r, amount in needs.items())


def _states() -> list[dict[str, Entry]]:
    """Up to three other services, in every shape, holding every amount, with
    every order of last use (ledgers whose reservations overcommit are skipped:
    the ledger never holds them)."""
    states: list[dict[str, Entry]] = [{}]
    for count in (1, 2, 3):
        names = ["s1", "s2", "s3"][:count]
        for shapes in itertools.product(SHAPES, repeat=count):
            for amounts in itertools.product(AMOUNTS, repeat=count):
                reserved = [
                    {} if s is State.WAITING else a
                    for (s, _), a in zip(shapes, amounts, strict=True)
                ]
                held = _sum(reserved)
                if any(held.get(r, 0) > cap for r, cap in AVAILABLE.items()):
                    continue
                for order in itertools.permutations(range(count)):
                    states.append(
                        {
                            n: Entry(s, r, c, float(t))
                            for n, (s, c), r, t in zip(names, shapes, reserved, order, strict=True)
                        }
                    )
    return states


ALL_STATES = _states()


def _check(entries: dict[str, Entry], needs: dict[str, int]) -> None:
    decision = plan(AVAILABLE, entries, "me", needs)
    held_by = {n: e.reserved for n, e in entries.items()}
    held = _sum(list(held_by.values()))
    stopping = [n for n, e in entries.items() if e.state is State.STOPPING]
    idle = [n for n, e in entries.items() if e.state is State.RUNNING and e.connections == 0]
    without_stopping = _sum([held_by[n] for n in entries if n not in stopping])

    def fits_without(victims: tuple[str, ...]) -> bool:
        gone = set(stopping) | set(victims)
        return _fits(needs, _sum([held_by[n] for n in entries if n not in gone]))

    some_idle_set_works = any(
        fits_without(subset)
        for k in range(len(idle) + 1)
        for subset in itertools.combinations(idle, k)
    )
    fits_with_all_gone = _fits(needs, {})

    if _fits(needs, held):
        assert decision == Reserve()
    elif _fits(needs, without_stopping):
        assert decision == Wait(WaitReason.STOPPING, tuple(sorted(stopping)))
    elif some_idle_set_works:
        assert isinstance(decision, Evict), decision
        victims = decision.victims
        assert victims and set(victims) <= set(idle)
        assert len(set(victims)) == len(victims)
        assert fits_without(victims)
        for victim in victims:  # minimal: every victim is needed
            assert not fits_without(tuple(v for v in victims if v != victim))
    elif fits_with_all_gone:
        assert isinstance(decision, Wait) and decision.reason is WaitReason.BUSY
        assert decision.services
        for busy in decision.services:
            assert entries[busy].state in (State.RUNNING, State.STARTING)
            assert busy not in idle
    else:
        assert isinstance(decision, Impossible)
        assert decision.shortfall


def test_state_space_is_big_enough_to_mean_something() -> None:
    assert len(ALL_STATES) > 10_000


@pytest.mark.parametrize("needs", NEEDS, ids=lambda n: ",".join(f"{k}{v}" for k, v in n.items()))
def test_every_small_state(needs: dict[str, int]) -> None:
    for entries in ALL_STATES:
        _check(entries, needs)


def test_victims_are_least_recently_used_when_interchangeable() -> None:
    """Among services holding the same amounts, the oldest goes first."""
    for order in itertools.permutations(range(3)):
        entries = {
            n: running(8, used=float(t)) for n, t in zip(["a", "b", "c"], order, strict=True)
        }
        decision = plan(GPU, entries, "d", {"VRAM": 8})
        oldest = min(entries, key=lambda n: entries[n].last_used)
        assert decision == Evict((oldest,))
