"""The lifecycle as a state machine: examples first, then every small system explored
with fake effects (tests/unit/lifecycle_model.py), then rules broken on purpose to show
that the exploration notices."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest

from lmproxy import eviction, lifecycle
from lmproxy.lifecycle import (
    Entry,
    Phase,
    Profile,
    Serve,
    SleepProfile,
    Start,
    Stop,
    TurnAway,
    Wait,
    Wake,
    Want,
    World,
)
from tests.unit.lifecycle_model import InvariantError, Model, explore

SLEEPY = SleepProfile(level=1, holds={"RAM": 1})


def small_model(clients: int = 2, **options: bool) -> Model:
    return Model(
        {"VRAM": 3, "RAM": 1},
        {
            "a": Profile({"VRAM": 2}, sleep=SLEEPY, starvation_bound_s=2, give_up_s=6),
            "b": Profile({"VRAM": 2}, starvation_bound_s=2, give_up_s=6),
            "c": Profile({"VRAM": 1, "RAM": 1}, starvation_bound_s=2, give_up_s=6, min_loaded_s=1),
        },
        clients=clients,
        **options,
    )


def world(entries: Mapping[str, Entry], **profiles: Profile) -> World:
    return World({"VRAM": 24, "RAM": 64}, profiles, dict(entries), frozenset(entries))


def running(vram: int, *, used: float = 1.0, in_use: int = 0, loaded: float = 0.0) -> Entry:
    return Entry(Phase.RUNNING, {"VRAM": vram}, in_use, used, loaded)


def effects(step: lifecycle.Step, kind: type) -> list[object]:
    return [e for e in step.effects if isinstance(e, kind)]


BIG = Profile({"VRAM": 20}, starvation_bound_s=5, give_up_s=60)


# --- examples -------------------------------------------------------------------------------


def test_a_client_of_a_running_service_is_served_and_counted() -> None:
    step = lifecycle.step(world({"a": running(20)}, a=BIG), Want("a", 10, 10))
    assert effects(step, Serve) == [Serve()]
    assert step.world.entries["a"].in_use == 1


def test_a_cold_service_that_fits_reserves_and_starts() -> None:
    step = lifecycle.step(world({}, a=BIG), Want("a", 10, 10))
    assert effects(step, Start) == [Start()]
    assert step.world.entries["a"].phase is Phase.STARTING
    assert step.world.entries["a"].reserved == {"VRAM": 20}


# --- what programs outside lmproxy hold (a measured resource: World.outside) ---------------


def outside(entries: Mapping[str, Entry], held: int, **profiles: Profile) -> World:
    """A world where programs other than lmproxy's models hold `held` VRAM."""
    base = world(entries, **profiles)
    return World(base.available, base.profiles, base.entries, base.shims, {"VRAM": held})


def test_memory_held_outside_lmproxy_is_waited_for_not_refused() -> None:
    step = lifecycle.step(outside({}, 10, a=BIG), Want("a", 10, 10))
    [wait] = effects(step, Wait)
    assert isinstance(wait, Wait) and "programs outside lmproxy" in wait.reason
    assert step.world.entries["a"].phase is Phase.WAITING
    assert not effects(step, TurnAway)


def test_an_idle_model_is_evicted_when_it_is_why_the_measured_room_is_short() -> None:
    a, b = Profile({"VRAM": 10}, give_up_s=60), Profile({"VRAM": 8}, give_up_s=60)
    step = lifecycle.step(outside({"b": running(8)}, 8, a=a, b=b), Want("a", 10, 10))
    assert effects(step, Stop) == [Stop("b")]  # 24 - 8 outside - 8 b: 16 free once b goes


def test_a_waiter_gives_up_naming_what_holds_the_room_outside() -> None:
    step = lifecycle.step(outside({}, 10, a=BIG), Want("a", 100, 10))
    [turn_away] = effects(step, TurnAway)
    assert isinstance(turn_away, TurnAway)
    assert "gave up after 60 s" in turn_away.reason
    assert "programs outside lmproxy" in turn_away.reason


def test_a_need_beyond_the_total_is_still_refused_at_once() -> None:
    huge = Profile({"VRAM": 30}, give_up_s=60)
    step = lifecycle.step(outside({}, 1, a=huge), Want("a", 10, 10))
    assert [e.reason for e in effects(step, TurnAway)] == ["needs 6 VRAM more than exists"]  # type: ignore[attr-defined]


def test_an_idle_victim_is_stopped_and_the_waiter_waits_for_it() -> None:
    step = lifecycle.step(world({"a": running(20)}, a=BIG, b=BIG), Want("b", 10, 10))
    assert effects(step, Stop) == [Stop("a")]
    assert step.world.entries["a"].phase is Phase.STOPPING
    assert step.world.entries["b"].phase is Phase.WAITING


def test_an_idle_victim_that_can_sleep_is_put_to_sleep_instead() -> None:
    sleepy = Profile({"VRAM": 20}, sleep=SleepProfile(1, {"RAM": 30}))
    step = lifecycle.step(world({"a": running(20)}, a=sleepy, b=BIG), Want("b", 10, 10))
    assert effects(step, Stop) == []
    assert step.world.entries["a"].phase is Phase.FALLING_ASLEEP
    assert step.world.entries["a"].reserved == {"VRAM": 20, "RAM": 30}
    done = lifecycle.step(step.world, lifecycle.SleepDone("a", 11))
    assert done.world.entries["a"] == Entry(Phase.SLEEPING, {"RAM": 30}, 0, 1.0, 0.0)
    assert effects(lifecycle.step(done.world, Want("b", 11, 10)), Start) == [Start()]


def test_a_sleeper_is_stopped_when_what_it_keeps_asleep_leaves_too_little() -> None:
    greedy = Profile({"VRAM": 20}, sleep=SleepProfile(1, {"VRAM": 10}))
    step = lifecycle.step(world({"a": running(20)}, a=greedy, b=BIG), Want("b", 10, 10))
    assert effects(step, Stop) == [Stop("a")]


def test_a_failed_sleep_falls_back_to_a_stop() -> None:
    sleepy = Profile({"VRAM": 20}, sleep=SleepProfile(1, {"RAM": 30}))
    asleep = lifecycle.step(world({"a": running(20)}, a=sleepy, b=BIG), Want("b", 10, 10)).world
    failed = lifecycle.step(asleep, lifecycle.SleepFailed("a", 11))
    assert effects(failed, Stop) == [Stop("a")]
    assert failed.world.entries["a"].phase is Phase.STOPPING


def test_a_sleeping_service_with_a_client_wakes_and_a_failed_wake_restarts() -> None:
    sleepy = Profile({"VRAM": 20}, sleep=SleepProfile(1, {"RAM": 30}))
    asleep = world({"a": Entry(Phase.SLEEPING, {"RAM": 30})}, a=sleepy)
    waking = lifecycle.step(asleep, Want("a", 10, 10))
    assert effects(waking, Wake) == [Wake(1)]
    assert waking.world.entries["a"].reserved == {"VRAM": 20, "RAM": 30}
    failed = lifecycle.step(waking.world, lifecycle.WakeFailed("a", 11))
    assert effects(failed, Stop) == [Stop("a")]
    gone = lifecycle.step(failed.world, lifecycle.Observed("a", 12, False, True))
    assert gone.world.entries["a"] == Entry(Phase.WAITING, {}, waiting_since=10)
    assert effects(lifecycle.step(gone.world, Want("a", 12, 10)), Start) == [Start()]


def test_a_client_of_a_service_being_put_to_sleep_has_its_shim_finish_the_sleep() -> None:
    sleepy = Profile({"VRAM": 20}, sleep=SleepProfile(2, {"RAM": 30}))
    falling = lifecycle.step(world({"a": running(20)}, a=sleepy, b=BIG), Want("b", 10, 10)).world
    asked = lifecycle.step(falling, Want("a", 11, 11))
    assert asked.effects == (lifecycle.FallAsleep(2),)
    assert asked.world.entries["a"].waiting_since == 11
    done = lifecycle.step(asked.world, lifecycle.SleepDone("a", 12)).world
    assert done.entries["a"].phase is Phase.SLEEPING


def test_an_idle_sleeper_is_stopped_but_not_one_whose_client_waits() -> None:
    sleepy = Profile({"VRAM": 20}, sleep=SleepProfile(1, {"RAM": 30}))
    asleep = world({"a": Entry(Phase.SLEEPING, {"RAM": 30})}, a=sleepy)
    stopped = lifecycle.step(asleep, lifecycle.Idle("a", 100))
    assert effects(stopped, Stop) == [Stop("a")]
    assert stopped.world.entries["a"].phase is Phase.STOPPING
    waited = world({"a": Entry(Phase.SLEEPING, {"RAM": 30}, waiting_since=99)}, a=sleepy)
    assert lifecycle.step(waited, lifecycle.Idle("a", 100)).effects == ()


def test_a_service_in_use_is_never_a_victim_until_the_bound() -> None:
    busy = world({"a": running(20, in_use=2)}, a=BIG, b=BIG)
    step = lifecycle.step(busy, Want("b", 10, 10))
    assert effects(step, Stop) == []
    assert step.effects[-1] == Wait(
        "waiting for services in use, starting or waking: a", until=15
    )  # the bound: 5 s after b's client came
    assert step.world.entries["a"].phase is Phase.RUNNING


def test_past_the_bound_the_service_in_use_drains_then_is_swapped_out() -> None:
    busy = world({"a": running(20, in_use=2)}, a=BIG, b=BIG)
    waited = lifecycle.step(busy, Want("b", 10, 10)).world
    bound = lifecycle.step(waited, Want("b", 15, 10))
    assert bound.world.entries["a"].phase is Phase.DRAINING
    assert effects(bound, Stop) == []
    # A's new clients wait (in its socket's backlog) while its clients in use finish.
    assert isinstance(lifecycle.step(bound.world, Want("a", 16, 16)).effects[-1], Wait)
    idle = lifecycle.step(bound.world, lifecycle.InUse("a", 17, 0, 17)).world
    assert effects(lifecycle.step(idle, Want("b", 17, 10)), Stop) == [Stop("a")]


def test_a_drained_model_that_turned_idle_admits_no_one_before_its_waiter() -> None:
    """Its clients done, the drained model must not take new ones back before the
    waiter that drained it evicts it (both shims wake on the same ledger change)."""
    busy = world({"a": running(20, in_use=2)}, a=BIG, b=BIG)
    waited = lifecycle.step(busy, Want("b", 10, 10)).world
    drained = lifecycle.step(waited, Want("b", 15, 10)).world
    idle = lifecycle.step(drained, lifecycle.InUse("a", 16, 0, 16)).world
    assert idle.entries["a"].phase is Phase.DRAINING
    again = lifecycle.step(idle, Want("a", 16, 16))
    assert effects(again, Serve) == []
    assert again.world.entries["a"].phase is Phase.DRAINING


def test_a_drain_ends_when_its_waiter_is_gone() -> None:
    busy = world({"a": running(20, in_use=2)}, a=BIG, b=BIG)
    waited = lifecycle.step(busy, Want("b", 10, 10)).world
    drained = lifecycle.step(waited, Want("b", 15, 10)).world
    gone = lifecycle.step(drained, lifecycle.Observed("b", 16, False, False)).world
    assert "b" not in gone.entries
    assert gone.entries["a"].phase is Phase.RUNNING


def test_a_model_loaded_less_than_its_minimum_is_not_drained_yet() -> None:
    sticky = Profile({"VRAM": 20}, min_loaded_s=30)
    busy = world({"a": running(20, in_use=1, loaded=0)}, a=sticky, b=BIG)
    waited = lifecycle.step(busy, Want("b", 10, 10))
    past_bound = lifecycle.step(waited.world, Want("b", 15, 10))
    assert past_bound.world.entries["a"].phase is Phase.RUNNING
    assert past_bound.effects[-1] == Wait(
        "waiting for services in use, starting or waking: a", until=30
    )
    assert lifecycle.step(past_bound.world, Want("b", 30, 10)).world.entries["a"].phase is (
        Phase.DRAINING
    )


def test_waiters_are_served_in_arrival_order() -> None:
    busy = world({"a": running(20, in_use=1)}, a=BIG, b=BIG, c=BIG)
    first = lifecycle.step(busy, Want("c", 10, 10)).world
    second = lifecycle.step(first, Want("b", 11, 11)).world
    freed = lifecycle.step(second, lifecycle.InUse("a", 12, 0, 12)).world
    # b asks first once a is idle, but c came first: b waits behind it.
    behind = lifecycle.step(freed, Want("b", 12, 11))
    assert behind.effects == (Wait("waiting behind c", until=71),)
    assert effects(lifecycle.step(freed, Want("c", 12, 10)), Stop) == [Stop("a")]


def test_a_waiter_that_needs_other_resources_is_not_held_up() -> None:
    small = Profile({"RAM": 8})
    busy = world({"a": running(20, in_use=1)}, a=BIG, b=BIG, c=small)
    first = lifecycle.step(busy, Want("b", 10, 10)).world
    assert effects(lifecycle.step(first, Want("c", 11, 11)), Start) == [Start()]


def test_a_waiter_gives_up_after_its_time_with_a_reason() -> None:
    busy = world({"a": running(20, in_use=1)}, a=BIG, b=BIG)
    waited = lifecycle.step(busy, Want("b", 10, 10)).world
    given_up = lifecycle.step(waited, Want("b", 70, 10))
    assert given_up.effects == (
        TurnAway("gave up after 60 s waiting for services in use, starting or waking: a"),
    )
    assert "b" not in given_up.world.entries


def test_a_request_larger_than_everything_is_turned_away_at_once() -> None:
    huge = Profile({"VRAM": 25})
    step = lifecycle.step(world({}, a=huge), Want("a", 10, 10))
    assert step.effects == (TurnAway("needs 1 VRAM more than exists"),)
    assert step.world.entries == {}


def test_a_failed_start_is_stopped_and_its_clients_turned_away() -> None:
    starting = lifecycle.step(world({}, a=BIG), Want("a", 10, 10)).world
    failed = lifecycle.step(starting, lifecycle.StartFailed("a", 11))
    assert failed.effects == (Stop("a"), TurnAway("its backend did not start"))


@pytest.mark.parametrize("phase", [Phase.STOPPING, Phase.STARTING, Phase.FALLING_ASLEEP])
def test_an_entry_left_half_way_by_a_dead_shim_is_running_and_idle(phase: Phase) -> None:
    left = world({"a": Entry(phase, {"VRAM": 20}, 3, 5.0)}, a=BIG)
    step = lifecycle.step(left, lifecycle.Observed("a", 10, True, False))
    assert step.world.entries["a"] == Entry(Phase.RUNNING, {"VRAM": 20}, 0, 5.0)


def test_a_backend_outside_the_ledger_is_adopted() -> None:
    step = lifecycle.step(world({}, a=BIG), lifecycle.Observed("a", 10, True, False))
    assert step.world.entries["a"].phase is Phase.RUNNING


def test_an_unconfigured_entry_is_dropped() -> None:
    step = lifecycle.step(world({"gone": running(3)}), lifecycle.Observed("gone", 10, False, False))
    assert step.world.entries == {}


# --- exploration ----------------------------------------------------------------------------


def test_every_small_system_keeps_the_invariants() -> None:
    """3 services over 2 resources, one of them able to sleep: every interleaving of
    clients, jobs that end well or fail, publishing, asking again, idleness and time,
    to the depth given; in each state reached the invariants hold, and left alone the
    system serves or turns away every client."""
    assert explore(small_model(clients=2), depth=9) > 10_000


def test_every_small_system_with_a_sleeper_woken_keeps_the_invariants() -> None:
    """One client more, so that a sleeper is woken; jobs do not fail, to stay quick."""
    assert explore(small_model(clients=3, fail=False), depth=8) > 10_000


# --- the exploration notices a broken rule ---------------------------------------------------


def _broken(
    monkeypatch: pytest.MonkeyPatch, target: object, name: str, rule: Callable[..., object]
) -> str:
    monkeypatch.setattr(target, name, rule)
    with pytest.raises(InvariantError) as caught:
        explore(small_model(clients=2), depth=9)
    return str(caught.value)


def test_evicting_a_service_in_use_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    original = lifecycle._holder

    def in_use_is_idle(world: World, name: str, entry: Entry) -> eviction.Holder:
        holder = original(world, name, entry)
        if holder.kind is eviction.Kind.IN_USE:
            return eviction.Holder(holder.reserved, eviction.Kind.IDLE, holder.last_used)
        return holder

    assert "client(s) in use" in _broken(monkeypatch, lifecycle, "_holder", in_use_is_idle)


def test_not_waiting_for_what_is_being_freed_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def freed_already(available: eviction.Amounts, holders: object) -> dict[str, int]:
        return dict(available)

    assert "reserved of" in _broken(monkeypatch, eviction, "free_room", freed_already)


def test_forgetting_a_stopped_backend_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def keep_everything(entries: object, name: str, entry: object, shim_runs: bool) -> list[object]:
        return []

    message = _broken(monkeypatch, lifecycle, "_backend_gone", keep_everything)
    assert "with nothing running" in message or "wait for ever" in message


# --- commands ---------------------------------------------------------------------------------

SLEEPY_MODEL = Profile({"VRAM": 20}, sleep=SleepProfile(1, {"RAM": 30}))


def test_stop_now_stops_an_idle_model_and_refuses_one_in_use_unless_forced() -> None:
    idle = lifecycle.step(world({"a": running(20)}, a=BIG), lifecycle.StopNow("a", 10))
    assert effects(idle, Stop) == [Stop("a")]
    assert idle.world.entries["a"].phase is Phase.STOPPING
    busy = world({"a": running(20, in_use=2)}, a=BIG)
    refused = lifecycle.step(busy, lifecycle.StopNow("a", 10))
    assert refused.effects == (lifecycle.Refuse("2 client(s) in use (--force stops it anyway)"),)
    assert refused.world.entries["a"] == busy.entries["a"]
    forced = lifecycle.step(busy, lifecycle.StopNow("a", 10, force=True))
    assert effects(forced, Stop) == [Stop("a")]
    assert lifecycle.step(world({}, a=BIG), lifecycle.StopNow("a", 10)).effects == ()


def test_stop_now_stops_a_sleeper_but_not_a_start_unless_forced() -> None:
    asleep = world({"a": Entry(Phase.SLEEPING, {"RAM": 30})}, a=SLEEPY_MODEL)
    assert effects(lifecycle.step(asleep, lifecycle.StopNow("a", 10)), Stop) == [Stop("a")]
    starting = world({"a": Entry(Phase.STARTING, {"VRAM": 20})}, a=BIG)
    assert effects(lifecycle.step(starting, lifecycle.StopNow("a", 10)), lifecycle.Refuse)
    forced = lifecycle.step(starting, lifecycle.StopNow("a", 10, force=True))
    assert effects(forced, Stop) == [Stop("a")]


def test_sleep_now_marks_an_idle_model_for_its_shim_at_the_level_asked() -> None:
    step = lifecycle.step(world({"a": running(20)}, a=SLEEPY_MODEL), lifecycle.SleepNow("a", 10, 2))
    entry = step.world.entries["a"]
    assert (entry.phase, entry.reserved, entry.sleep_level) == (
        Phase.FALLING_ASLEEP,
        {"VRAM": 20, "RAM": 30},
        2,
    )
    asleep = lifecycle.step(step.world, lifecycle.SleepDone("a", 11)).world
    # Its next client wakes it from the level it sleeps at.
    assert effects(lifecycle.step(asleep, Want("a", 12, 12)), Wake) == [Wake(2)]


def test_sleep_now_says_why_it_cannot() -> None:
    def reason(entries: Mapping[str, Entry], profile: Profile, **options: object) -> str:
        the_world = world(entries, a=profile)
        if options.get("no_shim"):
            the_world = World(the_world.available, the_world.profiles, the_world.entries)
        step = lifecycle.step(the_world, lifecycle.SleepNow("a", 10))
        (refusal,) = effects(step, lifecycle.Refuse)
        assert isinstance(refusal, lifecycle.Refuse)
        assert step.world.entries == the_world.entries
        return refusal.reason

    assert reason({"a": running(20)}, BIG) == "a has no Sleep in the config"
    assert reason({}, SLEEPY_MODEL) == "a is cold, not running"
    assert reason({"a": running(20, in_use=1)}, SLEEPY_MODEL) == "1 client(s) in use"
    assert "shim is not running" in reason({"a": running(20)}, SLEEPY_MODEL, no_shim=True)
    greedy = Profile({"VRAM": 20}, sleep=SleepProfile(1, {"RAM": 100}))
    assert reason({"a": running(20)}, greedy) == "what it keeps asleep does not fit: 36 RAM short"
