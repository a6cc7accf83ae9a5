"""Every transition of every service, decided in one place: `step(world, event)`.

A pure function: no clock (the time comes in each event), no I/O, no threads.
The ledger stores the world and locks it; shims, reconciliation with systemd
and the CLI turn what happened into events, and carry out the effects that
`step` returns. LIFECYCLE.md beside this file states the invariants and who
may change what; the README draws the phases.

A service with no entry is cold. Its entry's phase:

    WAITING         a client waits for it; it holds nothing yet
    STARTING        it holds its needs; its shim starts the backend
    RUNNING         it holds its needs; its shim relays clients
    DRAINING        running, but admits no new client: a waiter for its room has
                    waited past the starvation bound; when its clients in use are
                    done it is swapped out
    FALLING_ASLEEP  its shim puts the backend to sleep; it holds the larger of its
                    awake and asleep needs until that is done
    SLEEPING        the backend sleeps; it holds what it keeps asleep
    WAKING          its shim wakes the backend; it holds the larger of both again
    STOPPING        the backend is being stopped; it holds its reservation until
                    systemd says it is gone

An entry's `waiting_since` is when the oldest client still waiting for it came:
waiters are served in that order, the starvation bound and the give-up time are
counted from it.

Who carries out what: the service's own shim starts, wakes and puts its backend
to sleep, and admits clients by its entry's phase; anyone (a waiter's shim, the
CLI) may stop a backend, through systemd.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lmproxy import eviction
from lmproxy.eviction import Amounts, Holder, Kind, most
from lmproxy.world import (
    AWAKE,
    BEING_SERVED,
    Claim,
    Effect,
    Entry,
    Event,
    FallAsleep,
    Idle,
    InUse,
    Log,
    Observed,
    Phase,
    Profile,
    Ready,
    Refuse,
    Restart,
    Serve,
    SleepDone,
    SleepFailed,
    SleepNow,
    SleepProfile,
    Start,
    StartFailed,
    Step,
    Stop,
    StopNow,
    TurnAway,
    Wait,
    Wake,
    WakeFailed,
    Want,
    World,
)

# The vocabulary lives in lmproxy.world; lifecycle.X names it too, for callers.
__all__ = [
    "AWAKE",
    "BEING_SERVED",
    "Claim",
    "Effect",
    "Entry",
    "Event",
    "FallAsleep",
    "Idle",
    "InUse",
    "Log",
    "Observed",
    "Phase",
    "Profile",
    "Ready",
    "Refuse",
    "Restart",
    "Serve",
    "SleepDone",
    "SleepFailed",
    "SleepNow",
    "SleepProfile",
    "Start",
    "StartFailed",
    "Step",
    "Stop",
    "StopNow",
    "TurnAway",
    "Wait",
    "Wake",
    "WakeFailed",
    "Want",
    "World",
    "amounts_text",
    "step",
]


# --- the transitions --------------------------------------------------------------------------


def step(world: World, event: Event) -> Step:
    """The new world and the effects for whoever told the event."""
    if event.name not in world.profiles:
        entries = dict(world.entries)
        dropped = entries.pop(event.name, None)
        note = (Log("dropped", f"dropped {event.name}: no longer configured", event.name),)
        return Step(world.with_entries(entries), note if dropped else ())
    entries = dict(world.entries)
    effects = _TRANSITIONS[type(event)](world, entries, event)
    settled = _settle_drains(world.with_entries(entries), event.now)
    return Step(settled, tuple(effects))


Entries = dict[str, Entry]

# The room planner's name for what is held outside lmproxy (World.outside): "" is no
# service's name.
OUTSIDE = ""


def _want(world: World, entries: Entries, event: Event) -> list[Effect]:
    assert isinstance(event, Want)
    name, now = event.name, event.now
    entry = entries.get(name)
    phase = entry.phase if entry else None
    if entry is not None and phase is Phase.RUNNING:
        entries[name] = _replace(entry, waiting_since=None)
        return _claim(world, entries, event)
    since = event.arrived if entry is None else _earliest(entry.waiting_since, event.arrived)
    if entry is not None and phase is Phase.STARTING:
        return [Start(resume=True)]
    if entry is not None and phase is Phase.WAKING:
        return [Wake(_sleep_level(world, name, entry))]
    if entry is not None and phase is Phase.FALLING_ASLEEP:
        # Put to sleep while its clients waited: its shim does that first, then asks again.
        entries[name] = _replace(entry, waiting_since=since)
        sleep = world.profiles[name].sleep
        return [FallAsleep(_sleep_level(world, name, entry))] if sleep else [Stop(name)]
    if entry is not None and phase in (Phase.DRAINING, Phase.STOPPING):
        entries[name] = _replace(entry, waiting_since=since)
        until = since + world.profiles[name].give_up_s
        stopping = (name,) if phase is Phase.STOPPING else ()
        return [Wait(f"{name} is {phase.value}", until, stopping)]
    return _make_room(world, entries, name, since, now)


@dataclass(frozen=True)
class _Ask:
    """A waiter's request for room, as one transaction sees it."""

    name: str
    now: float
    since: float
    target: Amounts  # what it must hold to be served
    held: Amounts  # what it holds already (asleep)

    def give_up(self, world: World) -> float:
        return self.since + world.profiles[self.name].give_up_s


def _make_room(world: World, entries: Entries, name: str, since: float, now: float) -> list[Effect]:
    """A waiter (cold, or asleep) asks for room: reserve, evict, drain or wait, in turn."""
    entry = entries.get(name)
    asleep = entry is not None and _asleep(entry)
    target = _target(world.profiles[name], entry)
    entries[name] = _replace(entry or Entry(Phase.WAITING, {}), waiting_since=since)
    ask = _Ask(name, now, since, target, entry.reserved if entry and asleep else {})

    ahead = _waiters_ahead(world, entries, name)
    if ahead:
        return _wait_or_give_up(world, entries, ask, f"waiting behind {_list(ahead)}")

    decision = eviction.plan(world.available, _holders(world, entries, name), target)
    match decision:
        case eviction.Reserve():
            entries[name] = Entry(
                Phase.WAKING if asleep else Phase.STARTING,
                dict(target),
                last_used=now,
                waiting_since=since,
            )
            verb = "waking" if asleep else "reserved"
            log = Log(verb, f"{'waking: ' if asleep else ''}reserved {amounts_text(target)}", name)
            return [log, Wake(_sleep_level(world, name, entry)) if asleep else Start()]
        case eviction.Evict(victims=victims):
            return _evict(world, entries, ask, victims)
        case eviction.Wait(reason=reason, services=services):
            until = _drain_deadline(world, entries, ask)
            why = f"{reason.value}: {_list(services)}"
            stopping = tuple(
                n for n in services if n in entries and entries[n].phase is Phase.STOPPING
            )
            return _wait_or_give_up(world, entries, ask, why, until=until, stopping=stopping)
        case eviction.Impossible(shortfall=short):
            _forget_waiting(entries, name)
            return [TurnAway(f"needs {amounts_text(short)} more than exists")]
    raise AssertionError(decision)


def _evict(
    world: World, entries: Entries, ask: _Ask, victims: tuple[eviction.Victim, ...]
) -> list[Effect]:
    effects: list[Effect] = []
    freed = amounts_text(eviction.beyond(ask.target, ask.held))
    for victim in victims:
        old = entries[victim.name]
        if victim.sleep:
            sleep = world.profiles[victim.name].sleep
            assert sleep is not None
            entries[victim.name] = _replace(
                old, phase=Phase.FALLING_ASLEEP, reserved=most(old.reserved, sleep.holds)
            )
            message = f"putting {victim.name} to sleep to free room for {freed}"
            effects.append(Log("evict", message, ask.name, victim.name))
        else:
            entries[victim.name] = _replace(old, phase=Phase.STOPPING)
            message = f"evicting {victim.name} to free room for {freed}"
            effects += [Log("evict", message, ask.name, victim.name), Stop(victim.name)]
    if not any(isinstance(e, Stop) for e in effects):
        sleepers = _list(v.name for v in victims)
        effects.append(Wait(f"waiting for {sleepers} to fall asleep", ask.give_up(world)))
    return effects


def _wait_or_give_up(
    world: World,
    entries: Entries,
    ask: _Ask,
    why: str,
    *,
    until: float | None = None,
    stopping: tuple[str, ...] = (),
) -> list[Effect]:
    give_up = ask.give_up(world)
    if ask.now >= give_up:
        _forget_waiting(entries, ask.name)
        return [TurnAway(f"gave up after {world.profiles[ask.name].give_up_s:g} s {why}")]
    return [Wait(why, give_up if until is None else min(until, give_up), stopping)]


def _forget_waiting(entries: Entries, name: str) -> None:
    entry = entries[name]
    if entry.phase is Phase.WAITING:
        del entries[name]
    else:
        entries[name] = _replace(entry, waiting_since=None)


def _ready(world: World, entries: Entries, event: Event) -> list[Effect]:
    assert isinstance(event, Ready)
    entry = entries.get(event.name)
    if entry is None or entry.phase not in (Phase.STARTING, Phase.WAKING):
        return [Wait(f"{event.name} is no longer starting")]
    entries[event.name] = _replace(
        entry,
        phase=Phase.RUNNING,
        reserved=dict(world.profiles[event.name].needs),
        in_use=event.in_use,
        last_used=event.now,
        loaded_at=event.now,
        waiting_since=None,
        sleep_level=0,
    )
    return [Serve()]


def _start_failed(world: World, entries: Entries, event: Event) -> list[Effect]:
    """A failed start: stop what may run, and turn its clients away (it would fail again)."""
    entry = entries.get(event.name)
    if entry is not None:
        entries[event.name] = _replace(entry, phase=Phase.STOPPING, waiting_since=None)
    return [Stop(event.name), TurnAway("its backend did not start")]


def _wake_failed(world: World, entries: Entries, event: Event) -> list[Effect]:
    """A failed wake falls back to a restart: stop it, and its clients keep waiting."""
    entry = entries.get(event.name)
    if entry is None:
        return [Stop(event.name)]
    entries[event.name] = _replace(entry, phase=Phase.STOPPING)
    message = f"could not wake {event.name}: restarting it"
    return [Log("wake-failed", message, event.name), Stop(event.name)]


def _sleep_done(world: World, entries: Entries, event: Event) -> list[Effect]:
    entry = entries.get(event.name)
    sleep = world.profiles[event.name].sleep
    if entry is None or entry.phase is not Phase.FALLING_ASLEEP or sleep is None:
        return []
    entries[event.name] = _replace(entry, phase=Phase.SLEEPING, reserved=dict(sleep.holds))
    return []


def _sleep_failed(world: World, entries: Entries, event: Event) -> list[Effect]:
    """A failed sleep falls back to a stop."""
    entry = entries.get(event.name)
    if entry is None or entry.phase is not Phase.FALLING_ASLEEP:
        return []
    entries[event.name] = _replace(entry, phase=Phase.STOPPING)
    message = f"could not put {event.name} to sleep: stopping it"
    return [Log("sleep-failed", message, event.name), Stop(event.name)]


def _claim(world: World, entries: Entries, event: Event) -> list[Effect]:
    entry = entries.get(event.name)
    if entry is None or entry.phase is not Phase.RUNNING:
        return []
    entries[event.name] = _replace(entry, in_use=max(1, entry.in_use), last_used=event.now)
    return [Serve()]


def _in_use(world: World, entries: Entries, event: Event) -> list[Effect]:
    assert isinstance(event, InUse)
    entry = entries.get(event.name)
    if entry is not None and entry.phase in AWAKE:
        entries[event.name] = _replace(
            entry, in_use=event.count, last_used=max(entry.last_used, event.last_used)
        )
    return []


def _restart(world: World, entries: Entries, event: Event) -> list[Effect]:
    assert isinstance(event, Restart)
    entry = entries.get(event.name)
    if entry is None:
        return []
    since = _earliest(entry.waiting_since, event.arrived)
    entries[event.name] = _replace(entry, phase=Phase.STOPPING, in_use=0, waiting_since=since)
    return [Stop(event.name)]


def _idle(world: World, entries: Entries, event: Event) -> list[Effect]:
    """Unused for ShutDownAfterInactivitySeconds: stopped, awake or asleep (a sleeper
    still holds memory)."""
    entry = entries.get(event.name)
    if entry is None or entry.in_use or entry.waiting_since is not None:
        return []
    if entry.phase not in (Phase.RUNNING, Phase.SLEEPING):
        return []
    entries[event.name] = _replace(entry, phase=Phase.STOPPING)
    return [Stop(event.name)]


def _stop_now(world: World, entries: Entries, event: Event) -> list[Effect]:
    """A command unloads it: refused while clients use it or it is on its way up,
    unless forced. Clients that wait for it keep waiting (and start it again)."""
    assert isinstance(event, StopNow)
    name = event.name
    entry = entries.get(name)
    if entry is None or entry.phase is Phase.WAITING:
        return []  # nothing loaded
    if entry.phase is Phase.STOPPING:
        return [Stop(name)]
    if not event.force:
        if entry.in_use:
            return [Refuse(f"{entry.in_use} client(s) in use (--force stops it anyway)")]
        if entry.phase in (Phase.STARTING, Phase.WAKING, Phase.FALLING_ASLEEP):
            return [Refuse(f"it is {entry.phase.value} (--force stops it anyway)")]
    entries[name] = _replace(entry, phase=Phase.STOPPING, in_use=0)
    forced = " (forced)" if event.force and entry.in_use else ""
    return [Log("stop", f"stopping {name}: asked by a command{forced}", name), Stop(name)]


def _sleep_now(world: World, entries: Entries, event: Event) -> list[Effect]:
    """A command puts it to sleep: only an awake, idle service whose shim lives (the
    shim does it), and only if what it keeps asleep fits beside everyone else."""
    assert isinstance(event, SleepNow)
    name = event.name
    entry = entries.get(name)
    sleep = world.profiles[name].sleep
    if sleep is None:
        return [Refuse(f"{name} has no Sleep in the config")]
    if entry is not None and entry.phase in (Phase.SLEEPING, Phase.FALLING_ASLEEP):
        return []
    if entry is None or entry.phase not in AWAKE:
        return [Refuse(f"{name} is {entry.phase.value if entry else 'cold'}, not running")]
    if entry.in_use:
        return [Refuse(f"{entry.in_use} client(s) in use")]
    if name not in world.shims:
        return [Refuse("its shim is not running, and only its shim puts it to sleep")]
    free = eviction.free_room(world.available, _holders(world, entries, name).values())
    asleep = most(entry.reserved, sleep.holds)
    short = eviction.shortfall(asleep, free)
    if short:
        return [Refuse(f"what it keeps asleep does not fit: {amounts_text(short)} short")]
    entries[name] = _replace(
        entry, phase=Phase.FALLING_ASLEEP, reserved=asleep, sleep_level=event.level
    )
    level = event.level or sleep.level
    return [Log("sleep", f"putting {name} to sleep (level {level}): asked by a command", name)]


def _observed(world: World, entries: Entries, event: Event) -> list[Effect]:
    """Reconciliation: systemd is the truth about what runs; the entry follows it."""
    assert isinstance(event, Observed)
    name = event.name
    entry = entries.get(name)
    if not event.backend_runs:
        return _backend_gone(entries, name, entry, event.shim_runs)
    if entry is None or entry.phase is Phase.WAITING:
        entries[name] = Entry(Phase.RUNNING, dict(world.profiles[name].needs), loaded_at=event.now)
        return [Log("reconcile", f"adopted {name}: its backend runs outside the ledger", name)]
    if event.shim_runs:
        return []
    return _without_shim(world, entries, name, entry)


def _backend_gone(
    entries: Entries, name: str, entry: Entry | None, shim_runs: bool
) -> list[Effect]:
    if entry is None:
        return []
    if shim_runs and entry.phase is Phase.STARTING:
        return []  # its shim is on its way to start it
    if shim_runs and entry.waiting_since is not None:
        entries[name] = Entry(Phase.WAITING, {}, waiting_since=entry.waiting_since)
        return []
    del entries[name]
    if not entry.reserved:
        return []
    message = (
        f"released the reservation of {name} ({entry.phase.value}): its backend is not running"
    )
    return [Log("reconcile", message, name)]


def _without_shim(world: World, entries: Entries, name: str, entry: Entry) -> list[Effect]:
    """Its backend runs and its shim does not: nobody relays or changes it any more.
    Whatever it was doing is over; counted as running and idle, it can be evicted
    (or served by the next shim of its own) instead of holding its room for ever."""
    if entry.phase is Phase.SLEEPING:
        if entry.waiting_since is not None:
            entries[name] = _replace(entry, waiting_since=None)
        return []
    if entry.phase is Phase.RUNNING and not entry.in_use and entry.waiting_since is None:
        return []
    reserved = most(entry.reserved, world.profiles[name].needs)
    entries[name] = Entry(Phase.RUNNING, reserved, 0, entry.last_used, entry.loaded_at)
    if entry.phase is Phase.RUNNING:
        return []
    message = f"{name} was left {entry.phase.value} with no shim: counted as running and idle"
    return [Log("reconcile", message, name)]


_TRANSITIONS = {
    Want: _want,
    Claim: _claim,
    Ready: _ready,
    StartFailed: _start_failed,
    WakeFailed: _wake_failed,
    SleepDone: _sleep_done,
    SleepFailed: _sleep_failed,
    InUse: _in_use,
    Idle: _idle,
    Restart: _restart,
    Observed: _observed,
    StopNow: _stop_now,
    SleepNow: _sleep_now,
}


# --- the starvation bound -------------------------------------------------------------------


def _settle_drains(world: World, now: float) -> World:
    """DRAINING follows from the world and the time: a service drains while a waiter
    first in line for its room has waited past its bound; otherwise it runs."""
    should = _to_drain(world, now)
    changes = {
        name: _replace(entry, phase=Phase.DRAINING if name in should else Phase.RUNNING)
        for name, entry in world.entries.items()
        if entry.phase in AWAKE and (entry.phase is Phase.DRAINING) != (name in should)
    }
    return world.with_entries({**world.entries, **changes}) if changes else world


def _to_drain(world: World, now: float) -> set[str]:
    drained: set[str] = set()
    for name, entry in world.entries.items():
        # Only a waiter that needs room may drain others (not one stopping or draining).
        if entry.waiting_since is None or entry.phase not in (Phase.WAITING, Phase.SLEEPING):
            continue
        profile = world.profiles[name]
        if now - entry.waiting_since < profile.starvation_bound_s:
            continue
        if _waiters_ahead(world, world.entries, name):
            continue
        holders = _holders(world, world.entries, name, keep_draining=True)
        chosen = eviction.drain(world.available, holders, _target(profile, entry))
        if all(_loaded_long_enough(world, world.entries, n, now) for n in chosen):
            drained.update(chosen)
    return drained


def _drain_deadline(world: World, entries: Entries, ask: _Ask) -> float:
    """When the waiter should look again without any ledger change: at its bound, or
    when the services it would drain have been loaded long enough."""
    bound = ask.since + world.profiles[ask.name].starvation_bound_s
    if ask.now < bound:
        return bound
    chosen = eviction.drain(world.available, _holders(world, entries, ask.name), ask.target)
    later = [
        entries[n].loaded_at + world.profiles[n].min_loaded_s
        for n in chosen
        if not _loaded_long_enough(world, entries, n, ask.now)
    ]
    return max(later) if later else float("inf")


def _loaded_long_enough(world: World, entries: Mapping[str, Entry], name: str, now: float) -> bool:
    return now - entries[name].loaded_at >= world.profiles[name].min_loaded_s


# --- views ------------------------------------------------------------------------------------


def _holders(
    world: World, entries: Mapping[str, Entry], name: str, *, keep_draining: bool = False
) -> dict[str, Holder]:
    """Everyone but `name`, as the room planner sees them. keep_draining: a draining
    service counts as in use even once its clients are done, so that it stays drained
    (admitting no one) until the waiter evicts it; both wake on the same change."""
    holders = {}
    for other, entry in entries.items():
        if other == name or other not in world.profiles:
            continue
        holder = _holder(world, other, entry)
        if keep_draining and entry.phase is Phase.DRAINING and holder.kind is Kind.IDLE:
            holder = Holder(holder.reserved, Kind.IN_USE, holder.last_used)
        holders[other] = holder
    if any(world.outside.values()):
        holders[OUTSIDE] = Holder(dict(world.outside), Kind.OUTSIDE, 0.0)
    return holders


def _holder(world: World, name: str, entry: Entry) -> Holder:
    profile = world.profiles[name]
    match entry.phase:
        case Phase.STOPPING:
            return Holder(entry.reserved, Kind.FREEING, entry.last_used, frees=entry.reserved)
        case Phase.FALLING_ASLEEP:
            keeps = profile.sleep.holds if profile.sleep else {}
            frees = eviction.minus(entry.reserved, keeps)
            return Holder(entry.reserved, Kind.FREEING, entry.last_used, frees=frees)
        case Phase.SLEEPING:
            kind = Kind.CHANGING if entry.waiting_since is not None else Kind.ASLEEP
            return Holder(entry.reserved, kind, entry.last_used)
        case Phase.RUNNING | Phase.DRAINING:
            if entry.in_use:
                return Holder(entry.reserved, Kind.IN_USE, entry.last_used)
            holds: Amounts | None = None
            if profile.sleep is not None and name in world.shims:
                holds = profile.sleep.holds
            return Holder(entry.reserved, Kind.IDLE, entry.last_used, asleep_holds=holds)
        case _:
            return Holder(entry.reserved, Kind.CHANGING, entry.last_used)


def _target(profile: Profile, entry: Entry | None) -> Amounts:
    """What a service must hold to be served: its needs (while waking from sleep, also
    what it keeps asleep)."""
    if entry is not None and _asleep(entry) and profile.sleep is not None:
        return most(profile.needs, profile.sleep.holds)
    return profile.needs


def _sleep_level(world: World, name: str, entry: Entry | None) -> int:
    """The level it sleeps at: what a command asked for, or its config's."""
    sleep = world.profiles[name].sleep
    configured = sleep.level if sleep is not None else 1
    return (entry.sleep_level if entry is not None else 0) or configured


def _is_waiter(entry: Entry) -> bool:
    return entry.waiting_since is not None and entry.phase not in BEING_SERVED


def _asleep(entry: Entry) -> bool:
    return entry.phase is Phase.SLEEPING


def _waiters_ahead(world: World, entries: Mapping[str, Entry], name: str) -> list[str]:
    """Waiters that came before `name` and need some of the same resources: they go first."""
    mine = entries[name]
    assert mine.waiting_since is not None
    key = (mine.waiting_since, name)
    wanted = {r for r, amount in world.profiles[name].needs.items() if amount > 0}
    return sorted(
        other
        for other, entry in entries.items()
        if other != name
        and other in world.profiles
        and _is_waiter(entry)
        and (entry.waiting_since or 0.0, other) < key
        and any(world.profiles[other].needs.get(r, 0) > 0 for r in wanted)
    )


def _replace(entry: Entry, **changes: object) -> Entry:
    return dataclasses.replace(entry, **changes)  # type: ignore[arg-type]


def _earliest(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)


def _list(names: Iterable[str]) -> str:
    return ", ".join("programs outside lmproxy" if name == OUTSIDE else name for name in names)


def amounts_text(amounts: Amounts) -> str:
    return (
        ", ".join(f"{amount} {resource}" for resource, amount in sorted(amounts.items()) if amount)
        or "nothing"
    )
