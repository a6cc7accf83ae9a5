"""A model of the whole system around lmproxy.lifecycle, for exhaustive exploration.

Each service has a shim (waiting clients, clients in use, whether it waits for the
ledger), a backend as systemd sees it (off, on, asleep) and at most one job in
flight (start, wake, sleep, stop). Every action a real system can take is a move:
a client arrives or finishes, a shim publishes its count or asks again, a job
completes or fails, the shim notices its phase, time passes. Every transaction
reconciles first, as the ledger does. After each move the invariants are checked;
`settle` then shows that from the state reached, every waiting client is served or
turned away once the system is left alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from lmproxy import lifecycle
from lmproxy.eviction import most, plus
from lmproxy.lifecycle import Entry, Phase, Profile, World

OFF, ON, ASLEEP = "off", "on", "asleep"
START, WAKE, SLEEP, STOP = "start", "wake", "sleep", "stop"


class InvariantError(AssertionError):
    """An invariant broke; the message names it and the moves that led there."""


@dataclass(frozen=True)
class Service:
    backend: str = OFF
    job: str | None = None  # in flight, by systemd or by the shim
    job_ok: bool = True  # how the job in flight will end (both are explored)
    waiting: int = 0  # clients accepted (or in the backlog) and not relayed yet
    using: int = 0  # clients relayed
    arrived: int = 0  # when the oldest waiting client came
    asks: bool = False  # the shim waits for the ledger (or a deadline) to ask again


@dataclass(frozen=True)
class System:
    now: int
    entries: tuple[tuple[str, Entry], ...]
    services: tuple[tuple[str, Service], ...]
    turned_away: int = 0
    served: int = 0

    def entry_map(self) -> dict[str, Entry]:
        return dict(self.entries)

    def service(self, name: str) -> Service:
        return dict(self.services)[name]

    def key(self) -> tuple[object, ...]:
        entries = tuple(
            (
                n,
                e.phase,
                tuple(sorted(e.reserved.items())),
                e.in_use,
                e.last_used,
                e.loaded_at,
                e.waiting_since,
            )
            for n, e in self.entries
        )
        return (self.now, entries, self.services)


class Model:
    def __init__(
        self,
        available: Mapping[str, int],
        profiles: Mapping[str, Profile],
        *,
        clients: int = 2,
        horizon: int = 12,
        fail: bool = True,
    ) -> None:
        self.available = dict(available)
        self.profiles = dict(profiles)
        self.clients = clients  # most clients arriving in one run
        self.horizon = horizon
        self.fail = fail  # explore failing jobs too

    def initial(self) -> System:
        return System(0, (), tuple((n, Service()) for n in sorted(self.profiles)))

    # --- moves ------------------------------------------------------------------

    def moves(self, system: System) -> Iterator[tuple[str, System]]:
        arrivals = sum(s.waiting + s.using for _, s in system.services) + system.turned_away
        for name, service in system.services:
            if arrivals + system.served < self.clients:
                yield f"client of {name} arrives", self._arrive(system, name)
            if service.using:
                yield (
                    f"client of {name} finishes",
                    self._update(system, name, using=service.using - 1, served=1),
                )
            entry = system.entry_map().get(name)
            if (
                entry is not None
                and entry.phase in lifecycle.AWAKE
                and entry.in_use != service.using
            ):
                yield (
                    f"{name} publishes",
                    self._transact(
                        system, name, lifecycle.InUse(name, system.now, service.using, system.now)
                    ),
                )
            if service.asks:
                yield f"{name} asks again", self._ask(system, name)
            if service.job is not None:
                yield f"{name}'s {service.job} ends", self._job_ends(system, name, True)
                if self.fail and service.job != STOP:
                    yield f"{name}'s {service.job} fails", self._job_ends(system, name, False)
            if entry is not None and entry.phase is Phase.FALLING_ASLEEP and service.job is None:
                yield f"{name}'s shim puts it to sleep", self._update(system, name, job=SLEEP)
            if (
                entry is not None
                and entry.phase in (Phase.RUNNING, Phase.SLEEPING)
                and not service.using
                and not service.waiting
                and service.job is None
            ):
                yield (
                    f"{name} is idle",
                    self._transact(system, name, lifecycle.Idle(name, system.now)),
                )
        if system.now < self.horizon:
            yield "time passes", dataclasses.replace(system, now=system.now + 1)

    def _arrive(self, system: System, name: str) -> System:
        service = system.service(name)
        arrived = service.arrived if service.waiting else system.now
        system = self._update(system, name, waiting=service.waiting + 1, arrived=arrived)
        if service.asks:
            return system  # the shim waits already; the client joins the backlog
        entry = system.entry_map().get(name)
        if entry is not None and entry.phase is Phase.DRAINING:
            return self._update(system, name, asks=True)  # left in the backlog
        return self._ask(system, name)

    def _ask(self, system: System, name: str) -> System:
        service = system.service(name)
        event = lifecycle.Want(name, system.now, service.arrived)
        return self._transact(dataclasses.replace(system), name, event)

    def _job_ends(self, system: System, name: str, ok: bool) -> System:
        job = system.service(name).job
        if job == STOP:
            system = self._update(system, name, job=None, backend=OFF)
            # The shim sees its backend go: it exits unless clients wait.
            service = system.service(name)
            system = self._transact(system, name, None)
            if service.waiting:
                return self._ask(system, name)
            return system
        if job == START:
            if not ok:
                system = self._update(system, name, job=None, backend=ON)
                return self._transact(system, name, lifecycle.StartFailed(name, system.now))
            system = self._update(system, name, job=None, backend=ON)
            return self._transact(
                system, name, lifecycle.Ready(name, system.now, system.service(name).waiting)
            )
        if job == WAKE:
            if not ok:
                system = self._update(system, name, job=None)
                return self._transact(system, name, lifecycle.WakeFailed(name, system.now))
            system = self._update(system, name, job=None, backend=ON)
            return self._transact(
                system, name, lifecycle.Ready(name, system.now, system.service(name).waiting)
            )
        assert job == SLEEP
        if not ok:
            system = self._update(system, name, job=None)
            return self._transact(system, name, lifecycle.SleepFailed(name, system.now))
        system = self._update(system, name, job=None, backend=ASLEEP)
        return self._transact(system, name, lifecycle.SleepDone(name, system.now))

    # --- transactions -------------------------------------------------------------

    def _transact(self, system: System, actor: str, event: lifecycle.Event | None) -> System:
        """One ledger transaction: reconcile every service, then the event; then the
        actor carries out the effects."""
        world = self._world(system)
        effects: list[lifecycle.Effect] = []
        for name, service in system.services:
            runs = service.backend != OFF or service.job == STOP
            shim = self._shim_runs(service)
            world = self._step(world, lifecycle.Observed(name, system.now, runs, shim), effects)
        self._check_holders(system, world)
        if event is not None:
            effects = []
            world = self._step(world, event, effects)
            admits = isinstance(event, lifecycle.Want | lifecycle.Claim)
            if admits and any(isinstance(e, lifecycle.Serve) for e in effects):
                self._check_no_starving(world, actor, system.now)
        system = dataclasses.replace(system, entries=tuple(sorted(world.entries.items())))
        for effect in effects:
            system = self._carry_out(system, actor, effect)
        self.check(system)
        return system

    def _step(self, world: World, event: lifecycle.Event, effects: list[lifecycle.Effect]) -> World:
        result = lifecycle.step(world, event)
        effects.extend(result.effects)
        return result.world

    def _world(self, system: System) -> World:
        shims = frozenset(n for n, s in system.services if self._shim_runs(s))
        return World(self.available, self.profiles, system.entry_map(), shims)

    @staticmethod
    def _shim_runs(service: Service) -> bool:
        return service.backend != OFF or service.waiting > 0 or service.job is not None

    def _carry_out(self, system: System, actor: str, effect: lifecycle.Effect) -> System:
        service = system.service(actor)
        match effect:
            case lifecycle.Serve():
                return self._update(
                    system, actor, waiting=0, using=service.using + service.waiting, asks=False
                )
            case lifecycle.Start():
                if service.backend == ON:
                    return self._transact(
                        system, actor, lifecycle.Ready(actor, system.now, service.waiting)
                    )
                return self._update(system, actor, job=START, asks=False)
            case lifecycle.Wake():
                return self._update(system, actor, job=WAKE, asks=False)
            case lifecycle.Stop(name=victim):
                target = system.service(victim)
                if target.using:
                    raise InvariantError(f"stopped {victim} with {target.using} client(s) in use")
                if target.backend == OFF and target.job is None:
                    return system
                system = self._update(system, victim, job=STOP)
                if victim == actor and not service.waiting:
                    return self._update(system, actor, asks=False)
                return self._update(system, actor, asks=bool(system.service(actor).waiting))
            case lifecycle.Wait():
                return self._update(system, actor, asks=True)
            case lifecycle.TurnAway():
                turned = dataclasses.replace(
                    system, turned_away=system.turned_away + service.waiting
                )
                return self._update(turned, actor, waiting=0, asks=False)
            case lifecycle.FallAsleep():
                # Told to a shim whose clients wait: it puts its backend to sleep (unless
                # it does already), then asks again.
                job = service.job or SLEEP
                return self._update(system, actor, job=job, asks=True)
            case lifecycle.Log():
                return system
        raise AssertionError(effect)

    @staticmethod
    def _update(system: System, name: str, served: int = 0, **changes: object) -> System:
        services = tuple(
            (n, dataclasses.replace(s, **changes) if n == name else s)  # type: ignore[arg-type]
            for n, s in system.services
        )
        return dataclasses.replace(system, services=services, served=system.served + served)

    # --- invariants -----------------------------------------------------------------

    def check(self, system: System) -> None:
        entries = system.entry_map()
        reserved = plus({}, (e.reserved for e in entries.values()))
        for resource, amount in reserved.items():
            if amount > self.available.get(resource, 0):
                raise InvariantError(
                    f"{amount} {resource} reserved of {self.available.get(resource, 0)}"
                )
        for name, service in system.services:
            entry = entries.get(name)
            if service.using and (entry is None or entry.phase not in lifecycle.AWAKE):
                raise InvariantError(
                    f"{name} has {service.using} client(s) in use while {entry and entry.phase}"
                )
            if service.using and service.job in (STOP, SLEEP):
                raise InvariantError(f"{name} has clients in use during a {service.job}")
            used = self._uses(name, service)
            held = entry.reserved if entry is not None else {}
            short = {r: a for r, a in used.items() if a > held.get(r, 0)}
            if short:
                raise InvariantError(f"{name} uses {used} but holds {held}")

    def _check_no_starving(self, world: World, admitting: str, now: int) -> None:
        """A model admits no new client while a waiter first in line has waited past its
        bound and cannot be served without that model's room: otherwise a busy model
        could keep it waiting for ever."""
        waiters = {
            n: e.waiting_since
            for n, e in world.entries.items()
            if e.waiting_since is not None and e.phase is Phase.WAITING
        }
        for name, since in waiters.items():
            assert since is not None
            profile = self.profiles[name]
            if now - since < profile.starvation_bound_s:
                continue
            ahead = [
                w
                for w, s in waiters.items()
                if s is not None and (s, w) < (since, name) and self._overlap(w, name)
            ]
            others = [e.reserved for n, e in world.entries.items() if n not in (name, admitting)]
            room = {r: a - plus({}, others).get(r, 0) for r, a in self.available.items()}
            needs_its_room = any(a > room.get(r, 0) for r, a in profile.needs.items())
            if not ahead and needs_its_room:
                raise InvariantError(f"{admitting} admitted a client while {name} starves")

    def _overlap(self, a: str, b: str) -> bool:
        needs_a, needs_b = self.profiles[a].needs, self.profiles[b].needs
        return any(needs_a.get(r, 0) > 0 and needs_b.get(r, 0) > 0 for r in needs_a)

    def _uses(self, name: str, service: Service) -> dict[str, int]:
        profile = self.profiles[name]
        holds = profile.sleep.holds if profile.sleep else {}
        if service.job in (SLEEP, WAKE):
            return most(profile.needs, holds)
        if service.backend == ON or service.job == START:
            return dict(profile.needs)
        if service.backend == ASLEEP:
            return dict(holds)
        return {}

    def _check_holders(self, system: System, world: World) -> None:
        """After reconciliation, every reservation has a live holder: a backend that
        runs, or a shim on its way to start it."""
        for name, entry in world.entries.items():
            service = system.service(name)
            live = (
                service.backend != OFF
                or service.job is not None
                or (entry.phase is Phase.STARTING and self._shim_runs(service))
            )
            if entry.reserved and any(entry.reserved.values()) and not live:
                raise InvariantError(f"{name} holds {dict(entry.reserved)} with nothing running")

    # --- progress -------------------------------------------------------------------

    def settle(self, system: System) -> System:
        """Leaves the system alone: jobs end well, clients finish, counts are published,
        shims ask again, time runs to the horizon and beyond. Every client must end
        served or turned away, and no job may be left hanging."""
        for _ in range(400):
            moved = self._settle_move(system)
            if moved is None:
                break
            system = moved
        else:
            raise InvariantError("the system never settles")
        for name, service in system.services:
            if service.waiting:
                raise InvariantError(
                    f"{service.waiting} client(s) of {name} wait for ever: {system.entries}"
                )
        return system

    def _settle_move(self, system: System) -> System | None:
        for name, service in system.services:
            if service.job is not None:
                return self._job_ends(system, name, True)
            if service.using:
                return self._update(system, name, using=service.using - 1, served=1)
        for name, service in system.services:
            entry = system.entry_map().get(name)
            if (
                entry is not None
                and entry.phase in lifecycle.AWAKE
                and entry.in_use != service.using
            ):
                return self._transact(
                    system, name, lifecycle.InUse(name, system.now, service.using, system.now)
                )
            if entry is not None and entry.phase is Phase.FALLING_ASLEEP:
                return self._update(system, name, job=SLEEP)
        for name, service in system.services:
            if service.asks:
                before = system
                system = self._ask(system, name)
                if system.key() != before.key() or system.service(name) != before.service(name):
                    return system
        if any(s.asks for _, s in system.services):
            return dataclasses.replace(system, now=system.now + 1)
        return None


def explore(model: Model, depth: int) -> int:
    """Every state reachable in `depth` moves, each checked and settled; returns how many."""
    start = model.initial()
    seen = {start.key()}
    frontier: list[tuple[System, tuple[str, ...]]] = [(start, ())]
    for _ in range(depth):
        following: list[tuple[System, tuple[str, ...]]] = []
        for system, path in frontier:
            for move, after in _moves(model, system, path):
                if after.key() in seen:
                    continue
                seen.add(after.key())
                trail = (*path, move)
                try:
                    model.settle(after)
                except InvariantError as violation:
                    raise InvariantError(f"{violation}\n  after: {' / '.join(trail)}") from None
                following.append((after, trail))
        frontier = following
    return len(seen)


def _moves(model: Model, system: System, path: tuple[str, ...]) -> Iterator[tuple[str, System]]:
    try:
        yield from model.moves(system)
    except InvariantError as violation:
        raise InvariantError(f"{violation}\n  after: {' / '.join(path)}") from None
