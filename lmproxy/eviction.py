"""The eviction decision: a pure function from the ledger's state to what to do.

Nothing here touches systemd, files or clocks: `plan` takes plain data (what
is available, what every service holds, the request) and returns a decision.
The shim carries it out. This is what makes it testable exhaustively.

The rules, in order:

1. If the request fits in what nobody holds, reserve it.
2. If it would fit once the services already being stopped are gone, wait:
   stopping more would free memory that nobody needs.
3. Otherwise choose victims among the running services that have no open
   client connection, least recently used first, taking only services that
   hold some of a resource still short; then drop from that choice any victim
   (most recently used first) that turns out not to be needed. Evict them.
4. If even that is not enough but it would be once busy services (open
   connections, or starting for a client of theirs) are done, wait for them.
5. Otherwise the request can never fit: refuse it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass


class State(enum.Enum):
    """Where a service stands in the ledger. A service with no entry is cold."""

    WAITING = "waiting"  # its shim wants resources, holds none yet
    STARTING = "starting"  # holds its reservation; its backend is being started
    RUNNING = "running"  # holds its reservation; its backend answers
    STOPPING = "stopping"  # still holds its reservation until its backend is gone


@dataclass(frozen=True)
class Entry:
    state: State
    reserved: Mapping[str, int]
    connections: int
    last_used: float


@dataclass(frozen=True)
class Reserve:
    """The request fits now."""


@dataclass(frozen=True)
class Evict:
    """Stop these services (mark them stopping first); then ask again."""

    victims: tuple[str, ...]


class WaitReason(enum.Enum):
    STOPPING = "waiting for services that are stopping"
    BUSY = "waiting for services with open connections or starting"


@dataclass(frozen=True)
class Wait:
    """Nothing to do but wait for these services to change, then ask again."""

    reason: WaitReason
    services: tuple[str, ...]


@dataclass(frozen=True)
class Impossible:
    """The request cannot fit even with every other service stopped."""

    shortfall: Mapping[str, int]


Decision = Reserve | Evict | Wait | Impossible


def plan(
    available: Mapping[str, int],
    entries: Mapping[str, Entry],
    name: str,
    needs: Mapping[str, int],
) -> Decision:
    """Decides how the service `name`, needing `needs`, gets its resources."""
    others = {other: entry for other, entry in entries.items() if other != name}
    free = _free(available, others.values())
    if _fits(needs, free):
        return Reserve()

    stopping = _names(others, lambda e: e.state is State.STOPPING)
    after_stops = _plus(free, (others[n].reserved for n in stopping))
    if _fits(needs, after_stops):
        return Wait(WaitReason.STOPPING, stopping)

    idle = [n for n, e in others.items() if e.state is State.RUNNING and e.connections == 0]
    victims = _choose_victims(needs, after_stops, idle, others)
    if victims is not None:
        return Evict(victims)

    busy = _names(others, lambda e: e.state is not State.STOPPING and bool(e.reserved))
    everything = _plus(after_stops, (others[n].reserved for n in busy))
    if _fits(needs, everything):
        return Wait(WaitReason.BUSY, tuple(n for n in busy if n not in idle))
    return Impossible(_shortfall(needs, everything))


def _choose_victims(
    needs: Mapping[str, int],
    free: Mapping[str, int],
    candidates: list[str],
    entries: Mapping[str, Entry],
) -> tuple[str, ...] | None:
    """The least recently used candidates whose stop makes `needs` fit, or None."""
    by_age = sorted(candidates, key=lambda n: (entries[n].last_used, n))
    chosen: list[str] = []
    freed = dict(free)
    for candidate in by_age:
        short = _shortfall(needs, freed)
        if not short:
            break
        held = entries[candidate].reserved
        if any(held.get(resource, 0) > 0 for resource in short):
            chosen.append(candidate)
            freed = _plus(freed, [held])
    if _shortfall(needs, freed):
        return None
    # Greedy picks can overshoot: an old small victim may be made redundant by
    # a newer big one. Give back the most recently used ones that are not needed.
    for candidate in reversed(list(chosen)):
        without = _minus(freed, entries[candidate].reserved)
        if not _shortfall(needs, without):
            chosen.remove(candidate)
            freed = without
    return tuple(chosen)


def _names(entries: Mapping[str, Entry], keep: Callable[[Entry], bool]) -> tuple[str, ...]:
    return tuple(sorted(n for n, e in entries.items() if keep(e)))


def _free(available: Mapping[str, int], entries: Iterable[Entry]) -> dict[str, int]:
    free = dict(available)
    for entry in entries:
        for resource, amount in entry.reserved.items():
            free[resource] = free.get(resource, 0) - amount
    return free


def _plus(base: Mapping[str, int], extra: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total = dict(base)
    for amounts in extra:
        for resource, amount in amounts.items():
            total[resource] = total.get(resource, 0) + amount
    return total


def _minus(base: Mapping[str, int], amounts: Mapping[str, int]) -> dict[str, int]:
    return {resource: value - amounts.get(resource, 0) for resource, value in base.items()}


def _shortfall(needs: Mapping[str, int], free: Mapping[str, int]) -> dict[str, int]:
    return {
        resource: amount - free.get(resource, 0)
        for resource, amount in needs.items()
        if amount > free.get(resource, 0)
    }


def _fits(needs: Mapping[str, int], free: Mapping[str, int]) -> bool:
    return not _shortfall(needs, free)
