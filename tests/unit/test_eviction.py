"""The room planner, tested as a pure function: examples first, then every small state
there is, checked against brute force."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import pytest

from lmproxy.eviction import (
    Evict,
    Holder,
    Impossible,
    Kind,
    Reserve,
    Victim,
    Wait,
    WaitReason,
    drain,
    plan,
)

GPU = {"VRAM": 24, "RAM": 32}


def running(vram: int, ram: int = 0, *, used: float, connections: int = 0) -> Holder:
    kind = Kind.IN_USE if connections else Kind.IDLE
    return Holder({"VRAM": vram, "RAM": ram}, kind, used)


def stopping(vram: int, *, used: float = 1) -> Holder:
    return Holder({"VRAM": vram}, Kind.FREEING, used, frees={"VRAM": vram})


def stop(*names: str) -> Evict:
    return Evict(tuple(Victim(n, sleep=False) for n in names))


def test_fits_in_free_space_reserves() -> None:
    entries = {"a": running(10, used=1)}
    assert plan(GPU, entries, {"VRAM": 14}) == Reserve()


def test_empty_ledger_reserves() -> None:
    assert plan(GPU, {}, {"VRAM": 24, "RAM": 32}) == Reserve()


def test_no_requirements_always_reserve() -> None:
    entries = {"a": running(24, 32, used=1, connections=3)}
    assert plan(GPU, entries, {}) == Reserve()


def test_evicts_least_recently_used() -> None:
    entries = {"old": running(12, used=1), "new": running(12, used=2)}
    assert plan(GPU, entries, {"VRAM": 12}) == stop("old")


def test_never_evicts_a_service_with_open_connections() -> None:
    entries = {"old": running(12, used=1, connections=1), "new": running(12, used=2)}
    assert plan(GPU, entries, {"VRAM": 12}) == stop("new")


def test_waits_when_only_busy_services_could_make_room() -> None:
    entries = {"a": running(24, used=1, connections=2)}
    assert plan(GPU, entries, {"VRAM": 1}) == Wait(WaitReason.BUSY, ("a",))


def test_starting_service_is_not_a_victim() -> None:
    entries = {"a": Holder({"VRAM": 24}, Kind.CHANGING, 1)}
    assert plan(GPU, entries, {"VRAM": 1}) == Wait(WaitReason.BUSY, ("a",))


def test_waits_for_services_already_stopping_instead_of_stopping_more() -> None:
    entries = {
        "going": stopping(12),
        "idle": running(12, used=0),
    }
    assert plan(GPU, entries, {"VRAM": 12}) == Wait(WaitReason.FREEING, ("going",))


def test_stopping_services_count_toward_room_for_more_victims() -> None:
    entries = {
        "going": stopping(8),
        "a": running(8, used=2),
        "b": running(8, used=3),
    }
    assert plan(GPU, entries, {"VRAM": 16}) == stop("a")


def test_skips_services_that_hold_none_of_the_short_resource() -> None:
    entries = {
        "ram-only": running(0, 30, used=1),
        "gpu": running(24, 0, used=2),
    }
    assert plan(GPU, entries, {"VRAM": 10}) == stop("gpu")


def test_drops_victims_made_redundant_by_a_later_bigger_one() -> None:
    entries = {"small": running(4, used=1), "big": running(20, used=2)}
    assert plan(GPU, entries, {"VRAM": 24}) == stop("small", "big")
    assert plan(GPU, entries, {"VRAM": 20}) == stop("big")


def test_needs_several_victims_across_resources() -> None:
    entries = {"gpu": running(20, 0, used=1), "ram": running(0, 30, used=2)}
    assert plan(GPU, entries, {"VRAM": 10, "RAM": 10}) == stop("gpu", "ram")


def test_waiting_entries_hold_nothing() -> None:
    entries = {"w": Holder({}, Kind.CHANGING, 1)}
    assert plan(GPU, entries, {"VRAM": 24}) == Reserve()


def test_an_idle_service_that_can_sleep_is_put_to_sleep() -> None:
    sleepy = Holder({"VRAM": 20}, Kind.IDLE, 1, asleep_holds={"RAM": 16})
    assert plan(GPU, {"a": sleepy}, {"VRAM": 20}) == Evict((Victim("a", sleep=True),))


def test_a_sleeper_that_would_keep_too_much_is_stopped() -> None:
    sleepy = Holder({"VRAM": 20}, Kind.IDLE, 1, asleep_holds={"VRAM": 8})
    assert plan(GPU, {"a": sleepy}, {"VRAM": 20}) == stop("a")


def test_a_sleep_that_needs_ram_not_free_now_is_a_stop() -> None:
    """Falling asleep holds the larger of both: that RAM must be free at once, not
    once what is stopping is gone."""
    sleepy = Holder({"VRAM": 20}, Kind.IDLE, 1, asleep_holds={"RAM": 16})
    going = Holder({"RAM": 30}, Kind.FREEING, 0, frees={"RAM": 30})
    assert plan(GPU, {"a": sleepy, "g": going}, {"VRAM": 20}) == stop("a")


def test_an_asleep_service_is_stopped_for_what_it_keeps() -> None:
    asleep = Holder({"RAM": 30}, Kind.ASLEEP, 1)
    assert plan(GPU, {"a": asleep}, {"RAM": 10}) == stop("a")


def test_a_service_falling_asleep_is_waited_for_what_it_gives_back() -> None:
    falling = Holder({"VRAM": 20, "RAM": 16}, Kind.FREEING, 1, frees={"VRAM": 20})
    assert plan(GPU, {"a": falling}, {"VRAM": 20}) == Wait(WaitReason.FREEING, ("a",))


def test_drain_names_the_services_in_use_that_must_go() -> None:
    holders = {
        "old": running(10, used=1, connections=1),
        "new": running(10, used=2, connections=1),
        "idle": running(4, used=3),
    }
    assert drain(GPU, holders, {"VRAM": 14}) == ("old",)
    assert drain(GPU, holders, {"VRAM": 30}) == ()


def test_impossible_reports_shortfall() -> None:
    decision = plan(GPU, {}, {"VRAM": 30})
    assert decision == Impossible({"VRAM": 6})


def test_unknown_resource_is_impossible() -> None:
    assert plan(GPU, {}, {"TPU": 1}) == Impossible({"TPU": 1})


def test_lru_ties_break_by_name_for_determinism() -> None:
    entries = {"b": running(12, used=5), "a": running(12, used=5)}
    assert plan(GPU, entries, {"VRAM": 12}) == stop("a")


# --- Every small state, checked against brute force -------------------------

AVAILABLE = {"X": 3, "Y": 2}
AMOUNTS = [{}, {"X": 1}, {"X": 2}, {"Y": 1}, {"X": 1, "Y": 1}, {"X": 3, "Y": 2}]
KINDS = [Kind.IDLE, Kind.IN_USE, Kind.CHANGING, Kind.FREEING, Kind.ASLEEP]
NEEDS = [{"X": 1}, {"X": 2, "Y": 1}, {"X": 3}, {"Y": 2}, {"X": 3, "Y": 2}, {"X": 4}, {}]


def _sum(maps: Sequence[Mapping[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for amounts in maps:
        for resource, amount in amounts.items():
            total[resource] = total.get(resource, 0) + amount
    return total


def _fits(needs: Mapping[str, int], held: Mapping[str, int]) -> bool:
    return all(amount <= AVAILABLE.get(r, 0) - held.get(r, 0) for r, amount in needs.items())


def _holder(kind: Kind, reserved: Mapping[str, int], used: float) -> Holder:
    frees = dict(reserved) if kind is Kind.FREEING else {}
    return Holder(dict(reserved), kind, used, frees=frees)


def _states() -> list[dict[str, Holder]]:
    """Up to three other services, of every kind, holding every amount, with every
    order of last use (holders whose reservations overcommit are skipped: the ledger
    never holds them)."""
    states: list[dict[str, Holder]] = [{}]
    for count in (1, 2, 3):
        names = ["s1", "s2", "s3"][:count]
        for kinds in itertools.product(KINDS, repeat=count):
            for amounts in itertools.product(AMOUNTS, repeat=count):
                held = _sum(amounts)
                if any(held.get(r, 0) > cap for r, cap in AVAILABLE.items()):
                    continue
                for order in itertools.permutations(range(count)):
                    states.append(
                        {
                            n: _holder(k, a, float(t))
                            for n, k, a, t in zip(names, kinds, amounts, order, strict=True)
                        }
                    )
    return states


ALL_STATES = _states()


def _check(holders: dict[str, Holder], needs: dict[str, int]) -> None:
    decision = plan(AVAILABLE, holders, needs)
    held_by = {n: h.reserved for n, h in holders.items()}
    held = _sum(list(held_by.values()))
    freeing = [n for n, h in holders.items() if h.kind is Kind.FREEING]
    evictable = [n for n, h in holders.items() if h.kind in (Kind.IDLE, Kind.ASLEEP)]
    without_freeing = _sum([held_by[n] for n in holders if n not in freeing])

    def fits_without(victims: tuple[str, ...]) -> bool:
        gone = set(freeing) | set(victims)
        return _fits(needs, _sum([held_by[n] for n in holders if n not in gone]))

    some_set_works = any(
        fits_without(subset)
        for k in range(len(evictable) + 1)
        for subset in itertools.combinations(evictable, k)
    )

    if _fits(needs, held):
        assert decision == Reserve()
    elif _fits(needs, without_freeing):
        assert decision == Wait(WaitReason.FREEING, tuple(sorted(freeing)))
    elif some_set_works:
        assert isinstance(decision, Evict), decision
        victims = tuple(v.name for v in decision.victims)
        assert not any(v.sleep for v in decision.victims)  # none of these can sleep
        assert victims and set(victims) <= set(evictable)
        assert len(set(victims)) == len(victims)
        assert fits_without(victims)
        for victim in victims:  # minimal: every victim is needed
            assert not fits_without(tuple(v for v in victims if v != victim))
    elif _fits(needs, {}):
        assert isinstance(decision, Wait) and decision.reason is WaitReason.BUSY
        assert decision.services
        for busy in decision.services:
            assert holders[busy].kind in (Kind.IN_USE, Kind.CHANGING, Kind.FREEING)
    else:
        assert isinstance(decision, Impossible)
        assert decision.shortfall


def test_state_space_is_big_enough_to_mean_something() -> None:
    assert len(ALL_STATES) > 10_000


@pytest.mark.parametrize("needs", NEEDS, ids=lambda n: ",".join(f"{k}{v}" for k, v in n.items()))
def test_every_small_state(needs: dict[str, int]) -> None:
    for holders in ALL_STATES:
        _check(holders, needs)


def test_victims_are_least_recently_used_when_interchangeable() -> None:
    """Among services holding the same amounts, the oldest goes first."""
    for order in itertools.permutations(range(3)):
        holders = {
            n: running(8, used=float(t)) for n, t in zip(["a", "b", "c"], order, strict=True)
        }
        decision = plan(GPU, holders, {"VRAM": 8})
        oldest = min(holders, key=lambda n: holders[n].last_used)
        assert decision == stop(oldest)
