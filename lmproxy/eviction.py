"""The room decision: a pure function from who holds what to how a request gets room.

Nothing here touches systemd, files or clocks: `plan` takes plain data (what is
available, what every other service holds and whether it could give it up, the
request) and returns a decision. The lifecycle (lmproxy.lifecycle) turns the
ledger into that data and the decision into transitions.

The rules, in order:

1. If the request fits in what nobody holds, reserve it.
2. If it would fit once the services already stopping or falling asleep have
   done so, wait: freeing more would free memory that nobody needs.
3. Otherwise choose victims among the services nobody uses (awake and idle, or
   asleep), least recently used first, taking only services that hold some of a
   resource still short. An awake victim that can sleep is put to sleep when
   what it keeps asleep leaves enough room, and stopped otherwise; an asleep one
   is stopped. Then drop from that choice any victim (most recently used first)
   that turns out not to be needed.
4. If even that is not enough but the request fits in what exists, wait for the
   services in use, starting or waking, and for what is held outside lmproxy.
5. Otherwise the request can never fit: refuse it.

`drain` answers the question the starvation bound asks: which services in use
would have to go, were they idle, for the request to fit.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

Amounts = Mapping[str, int]


class Kind(enum.Enum):
    """What another service's reservation can become, as the planner sees it."""

    FREEING = "freeing"  # stopping or falling asleep: gives back `frees` by itself
    IDLE = "idle"  # awake, nobody uses it: may be stopped, or put to sleep
    ASLEEP = "asleep"  # asleep and nobody waits for it: may be stopped
    IN_USE = "in use"  # awake with clients: only their end (or a drain) frees it
    CHANGING = "changing"  # starting or waking for clients of its own
    # What programs other than lmproxy's models hold of a measured resource (a
    # CheckCommand's): never evicted nor drained, only waited for.
    OUTSIDE = "outside"


@dataclass(frozen=True)
class Holder:
    reserved: Amounts
    kind: Kind
    last_used: float
    frees: Amounts = field(default_factory=dict)  # FREEING: what it gives back when done
    asleep_holds: Amounts | None = None  # IDLE: what it would keep asleep, if it can sleep


@dataclass(frozen=True)
class Victim:
    name: str
    sleep: bool  # put it to sleep; otherwise stop it


@dataclass(frozen=True)
class Reserve:
    """The request fits now."""


@dataclass(frozen=True)
class Evict:
    """Stop or put to sleep these services; then ask again."""

    victims: tuple[Victim, ...]


class WaitReason(enum.Enum):
    FREEING = "waiting for services that are stopping or falling asleep"
    BUSY = "waiting for services in use, starting or waking"


@dataclass(frozen=True)
class Wait:
    """Nothing to do but wait for these services to change, then ask again."""

    reason: WaitReason
    services: tuple[str, ...]


@dataclass(frozen=True)
class Impossible:
    """The request cannot fit even with every other service stopped."""

    shortfall: Amounts


Decision = Reserve | Evict | Wait | Impossible

EVICTABLE = (Kind.IDLE, Kind.ASLEEP)


def plan(available: Amounts, holders: Mapping[str, Holder], needs: Amounts) -> Decision:
    """Decides how a request for `needs` gets room among `holders` (everyone else)."""
    free = free_room(available, holders.values())
    if fits(needs, free):
        return Reserve()

    after_freeing = _after_freeing(free, holders)
    if fits(needs, after_freeing):
        return Wait(WaitReason.FREEING, _names(holders, (Kind.FREEING,)))

    candidates = [n for n in _by_age(holders) if holders[n].kind in EVICTABLE]
    victims = choose_victims(needs, after_freeing, candidates, holders, free)
    if victims is not None:
        return Evict(victims)

    if fits(needs, available):
        busy = _names(holders, (Kind.IN_USE, Kind.CHANGING, Kind.FREEING, Kind.OUTSIDE))
        return Wait(WaitReason.BUSY, busy)
    return Impossible(shortfall(needs, available))


def drain(available: Amounts, holders: Mapping[str, Holder], needs: Amounts) -> tuple[str, ...]:
    """The services in use that would have to go, were they idle, for `needs` to fit
    (idle ones are taken first, so only as many are drained as must be): empty when
    draining would not help."""
    free = _after_freeing(free_room(available, holders.values()), holders)
    by_age = _by_age(holders)
    order = [n for n in by_age if holders[n].kind in EVICTABLE]
    order += [n for n in by_age if holders[n].kind is Kind.IN_USE]
    as_if_idle = {
        name: Holder(h.reserved, Kind.IDLE, h.last_used) if h.kind is Kind.IN_USE else h
        for name, h in holders.items()
    }
    victims = choose_victims(needs, free, order, as_if_idle)
    if victims is None:
        return ()
    return tuple(v.name for v in victims if holders[v.name].kind is Kind.IN_USE)


def choose_victims(
    needs: Amounts,
    free: Amounts,
    candidates: Sequence[str],
    holders: Mapping[str, Holder],
    free_now: Amounts | None = None,
) -> tuple[Victim, ...] | None:
    """Victims from `candidates` (in the order given) whose stop or sleep makes `needs`
    fit, or None: first putting to sleep every one that can (given `free_now`, the room
    free at this moment), then stopping all. `free` counts what is being freed already."""
    for spare in (free_now, None) if free_now is not None else (None,):
        chosen = _greedy(needs, free, candidates, holders, spare)
        if chosen is not None:
            return _without_spare(needs, free, chosen, holders)
    return None


def _greedy(
    needs: Amounts,
    free: Amounts,
    candidates: Sequence[str],
    holders: Mapping[str, Holder],
    spare: Amounts | None,
) -> list[Victim] | None:
    """spare: room free right now, for what sleepers take more of as they fall asleep
    (None: stop every victim)."""
    chosen: list[Victim] = []
    room = dict(free)
    for name in candidates:
        short = shortfall(needs, room)
        if not short:
            break
        holder = holders[name]
        options = [Victim(name, sleep=False)]
        if spare is not None and _can_sleep_in(holder, spare):
            options.insert(0, Victim(name, sleep=True))
        for victim in options:
            gain = gained(holder, victim)
            if any(gain.get(resource, 0) > 0 for resource in short):
                chosen.append(victim)
                room = plus(room, [gain])
                if victim.sleep:
                    spare = minus(spare or {}, _extra_asleep(holder))
                break
    return chosen if fits(needs, room) else None


def _without_spare(
    needs: Amounts, free: Amounts, chosen: list[Victim], holders: Mapping[str, Holder]
) -> tuple[Victim, ...]:
    """Greedy picks can overshoot: an old small victim may be made redundant by a
    newer big one. Gives back the most recently used ones that are not needed."""
    kept = list(chosen)
    for victim in reversed(chosen):
        rest = [v for v in kept if v != victim]
        room = plus(free, (gained(holders[v.name], v) for v in rest))
        if fits(needs, room) and all(amount >= 0 for amount in room.values()):
            kept = rest
    return tuple(kept)


def gained(holder: Holder, victim: Victim) -> dict[str, int]:
    """What stopping the holder, or putting it to sleep, gives back (a sleep may take
    more of a resource than it gives: vLLM's level 1 moves the weights to RAM)."""
    if not victim.sleep:
        return dict(holder.reserved)
    assert holder.asleep_holds is not None
    return minus(holder.reserved, holder.asleep_holds)


def _can_sleep_in(holder: Holder, spare: Amounts) -> bool:
    """Whether the holder can sleep, and what it takes more of asleep (while it falls
    asleep it holds the larger of both) is free right now."""
    if holder.kind is not Kind.IDLE or holder.asleep_holds is None:
        return False
    return fits(_extra_asleep(holder), spare)


def _extra_asleep(holder: Holder) -> dict[str, int]:
    assert holder.asleep_holds is not None
    return beyond(holder.asleep_holds, holder.reserved)


def _after_freeing(free: Amounts, holders: Mapping[str, Holder]) -> dict[str, int]:
    """The room free once the services stopping or falling asleep have done so."""
    return plus(free, (h.frees for h in holders.values() if h.kind is Kind.FREEING))


def _by_age(holders: Mapping[str, Holder]) -> list[str]:
    return sorted(holders, key=lambda n: (holders[n].last_used, n))


def _names(holders: Mapping[str, Holder], kinds: Iterable[Kind]) -> tuple[str, ...]:
    wanted = tuple(kinds)
    return tuple(sorted(n for n, h in holders.items() if h.kind in wanted))


def free_room(available: Amounts, holders: Iterable[Holder]) -> dict[str, int]:
    return minus(available, total(h.reserved for h in holders))


def total(amounts: Iterable[Amounts]) -> dict[str, int]:
    return plus({}, amounts)


def plus(base: Amounts, extra: Iterable[Amounts]) -> dict[str, int]:
    result = dict(base)
    for amounts in extra:
        for resource, amount in amounts.items():
            result[resource] = result.get(resource, 0) + amount
    return result


def minus(base: Amounts, amounts: Amounts) -> dict[str, int]:
    result = dict(base)
    for resource, amount in amounts.items():
        result[resource] = result.get(resource, 0) - amount
    return result


def beyond(base: Amounts, amounts: Amounts) -> dict[str, int]:
    """What base has more of than amounts, resource by resource (what going from base
    to amounts gives back)."""
    return {r: a - amounts.get(r, 0) for r, a in base.items() if a > amounts.get(r, 0)}


def most(a: Amounts, b: Amounts) -> dict[str, int]:
    """Per resource, the larger of the two (what a service holds while between them)."""
    return {r: max(a.get(r, 0), b.get(r, 0)) for r in sorted(set(a) | set(b))}


def shortfall(needs: Amounts, free: Amounts) -> dict[str, int]:
    return {
        resource: amount - free.get(resource, 0)
        for resource, amount in needs.items()
        if amount > free.get(resource, 0)
    }


def fits(needs: Amounts, free: Amounts) -> bool:
    return not shortfall(needs, free)
