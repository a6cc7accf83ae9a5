"""What the lifecycle (lmproxy.lifecycle) works on and speaks: the world (phases,
entries, what it knows of each service), the events told to it and the effects it
returns. Plain frozen data; the rules are lifecycle.py's."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass

from lmproxy.eviction import Amounts


class Phase(enum.Enum):
    WAITING = "waiting"
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    FALLING_ASLEEP = "falling-asleep"
    SLEEPING = "sleeping"
    WAKING = "waking"
    STOPPING = "stopping"


AWAKE = (Phase.RUNNING, Phase.DRAINING)
# Entries whose clients have their reservation already: they wait for no one.
BEING_SERVED = (Phase.STARTING, Phase.WAKING, Phase.RUNNING)


@dataclass(frozen=True)
class Entry:
    phase: Phase
    reserved: Amounts
    in_use: int = 0  # clients in use (the shim's claim counts as one)
    last_used: float = 0.0
    loaded_at: float = 0.0  # when it last became RUNNING
    waiting_since: float | None = None  # when its oldest waiting client came
    sleep_level: int = 0  # the level `lmproxy sleep --level` asked for; 0: its config's


@dataclass(frozen=True)
class SleepProfile:
    level: int
    holds: Amounts  # what it keeps while asleep


@dataclass(frozen=True)
class Profile:
    """What the lifecycle knows of a service's configuration."""

    needs: Amounts
    sleep: SleepProfile | None = None
    starvation_bound_s: float = 5.0  # how long its clients wait before others drain
    min_loaded_s: float = 0.0  # how long it stays loaded before it can be drained
    give_up_s: float = 1200.0  # how long its clients wait in all before being turned away


@dataclass(frozen=True)
class World:
    available: Amounts
    profiles: Mapping[str, Profile]
    entries: Mapping[str, Entry]
    # Services whose shim runs now (from systemd; not stored): only a live shim
    # can put its backend to sleep.
    shims: frozenset[str] = frozenset()
    # What programs other than lmproxy's models hold of measured resources (from a
    # CheckCommand, through the ledger): it is free for nobody, and waited for.
    outside: Amounts = dataclasses.field(default_factory=dict)

    def with_entries(self, entries: Mapping[str, Entry]) -> World:
        return dataclasses.replace(self, entries=dict(entries))


# --- events: what happened, told by whoever saw it ------------------------------------------


@dataclass(frozen=True)
class Told:
    """What every event carries: the service it is about (whose shim, or command,
    tells it) and the time it is told at (seconds since the epoch)."""

    name: str
    now: float


@dataclass(frozen=True)
class Want(Told):
    """Its shim has a client (`arrived`: when the oldest waiting one came) and asks
    what to do: relay it, start, wake, stop victims, or wait."""

    arrived: float


@dataclass(frozen=True)
class Ready(Told):
    """The backend answers, after a start or a wake; `in_use` clients are relayed."""

    in_use: int


@dataclass(frozen=True)
class StartFailed(Told):
    """Its backend did not start, or did not answer in time."""


@dataclass(frozen=True)
class WakeFailed(Told):
    """Its backend did not wake."""


@dataclass(frozen=True)
class SleepDone(Told):
    """Its backend is asleep."""


@dataclass(frozen=True)
class SleepFailed(Told):
    """Its backend did not go to sleep."""


@dataclass(frozen=True)
class Claim(Told):
    """Its shim has a new client while it serves: counted if the service still runs
    and admits clients (Serve); otherwise nothing changes and the shim asks with Want."""


@dataclass(frozen=True)
class InUse(Told):
    """How many clients its shim has in use now, and when one was last active."""

    count: int
    last_used: float


@dataclass(frozen=True)
class Restart(Told):
    """Its backend refused a client (RestartOnConnectionFailure): stop it and start it
    again for the clients that wait."""

    arrived: float


@dataclass(frozen=True)
class Idle(Told):
    """Its shim saw no client for ShutDownAfterInactivitySeconds (and admits none)."""


@dataclass(frozen=True)
class Observed(Told):
    """What systemd says of a service's units, at the start of every transaction."""

    backend_runs: bool
    shim_runs: bool


@dataclass(frozen=True)
class StopNow(Told):
    """`lmproxy stop`: unload it now; force: even with clients in use."""

    force: bool = False


@dataclass(frozen=True)
class SleepNow(Told):
    """`lmproxy sleep`: put it to sleep now (its shim does), at `level` (0: its config's)."""

    level: int = 0


Event = (
    Want
    | Claim
    | Ready
    | StartFailed
    | WakeFailed
    | SleepDone
    | SleepFailed
    | InUse
    | Idle
    | Restart
    | Observed
    | StopNow
    | SleepNow
)


# --- effects: what to do now, for whoever told the event ------------------------------------


@dataclass(frozen=True)
class Serve:
    """Relay clients: the backend is awake and the claim counted."""


@dataclass(frozen=True)
class Start:
    """Start the backend and wait until it answers. resume: a start begun before (by a
    shim that died, or this one): the backend may run already."""

    resume: bool = False


@dataclass(frozen=True)
class Wake:
    """Wake the sleeping backend (asleep at `level`) and wait until it answers."""

    level: int


@dataclass(frozen=True)
class Stop:
    """Stop this service's backend through systemd."""

    name: str


@dataclass(frozen=True)
class FallAsleep:
    """Put the backend to sleep (its own shim does, when it sees its phase)."""

    level: int


@dataclass(frozen=True)
class Wait:
    """Nothing to do until the ledger changes, or until `until` (seconds since the epoch).
    `stopping`: services whose backend's end is awaited (systemd says it first)."""

    reason: str
    until: float | None = None
    stopping: tuple[str, ...] = ()


@dataclass(frozen=True)
class TurnAway:
    """Close the waiting clients: they cannot be served."""

    reason: str


@dataclass(frozen=True)
class Refuse:
    """A command's request cannot be carried out now; the reason says why."""

    reason: str


@dataclass(frozen=True)
class Log:
    """A transition worth a line in the journal."""

    event: str
    message: str
    name: str  # the service whose shim (or command) tells it
    victim: str | None = None  # the service evicted, for an eviction


Effect = Serve | Start | Wake | Stop | FallAsleep | Wait | TurnAway | Refuse | Log


@dataclass(frozen=True)
class Step:
    world: World
    effects: tuple[Effect, ...] = ()
