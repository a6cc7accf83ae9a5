"""The shim's first stage: a cold model's StartUnit within milliseconds of its client.

systemd runs `python3 -P -S -c "from lmproxy.earlystart import main; main()" --user|--system
--config PATH NAME` (lmproxy.render) when a client connects to a cold model.
Everything the shim needs (the config's validation, the lifecycle, jeepney, the
relay) takes far longer to import than a model server takes to be forked, and none
of it is needed to decide the common cold start: nothing else waits, nothing is
drained, the model fits in what is free.
This stage decides exactly that case, with built-in modules only, and then brings
in the shim (lmproxy.shim), which resumes the start the way it resumes one begun by
a shim that died: the model loads while the rest of lmproxy does.

It is an accelerator with no authority of its own: the lifecycle decides
everything, and `quick_start` only anticipates the one transition it can prove the
lifecycle would make (tests/unit/test_earlystart.py checks that against
lmproxy.lifecycle on generated worlds). Anything else (a world that reconciliation
would change, a waiter, a drain, no room, a ledger or a plan it cannot read, a
config changed since `lmproxy install`, any error) leaves the ledger as it was and
the shim does everything, as before.

The plan it reads is written by `lmproxy install` beside the config it was made from
(`start-plan.json`): the resources available, what each service needs, and the
checksum of the config's bytes, so that a config edited in place is never planned
from an old copy.
"""

from __future__ import annotations

import posix  # os without its imports: all of this runs before a cold model's StartUnit
import sys
import time

from lmproxy import minibus, unitnames

PLAN_NAME = "start-plan.json"
PLAN_VERSION = 4  # 2: with the generation; 3: the measured resources; 4: the split ones
LEDGER_VERSION = 2  # lmproxy.ledger.FORMAT_VERSION
MAX_LEDGER_BYTES = 4 * 1024 * 1024  # lmproxy.ledger.MAX_LEDGER_BYTES
RUNNING_STATES = ("active", "activating", "deactivating", "reloading")  # lmproxy.systemd
BUS_TIMEOUT_S = 5.0
DEFAULT_SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"
_PHASES = frozenset(  # lmproxy.world.Phase
    (
        "waiting",
        "starting",
        "running",
        "draining",
        "falling-asleep",
        "sleeping",
        "waking",
        "stopping",
    )
)
_LEDGER_KEYS = frozenset(("version", "generation", "services", "checks"))
_ENTRY_KEYS = frozenset(
    ("state", "reserved", "in_use", "last_used", "loaded_at", "waiting_since", "sleep_level")
)

Entries = dict[str, dict[str, object]]
if False:  # for the type checker only: typing costs a cold start 10 ms to import
    from typing import ClassVar


class Early:
    """What the first stage did, for the shim to carry on from: it reserved `needs`
    and sent StartUnit at `start_sent` (time.monotonic())."""

    def __init__(self, arrived: float, needs: dict[str, int], start_sent: float) -> None:
        self.arrived = arrived
        self.needs = needs
        self.start_sent = start_sent


class Declined(Exception):  # noqa: N818 (what the caller checks for)
    """The first stage leaves this start to the shim; the message says why."""


# --- the decision: pure, and checked against lmproxy.lifecycle -------------------------------


def reserve_if_free(
    stored: Entries,
    running: dict[str, bool],
    *,
    available: dict[str, int],
    needs: dict[str, dict[str, int]],
    name: str,
    now: float,
    arrived: float,
) -> Entries:
    """The ledger's services after name's client arrived, where the lifecycle's
    transaction (reconciliation with `running`, then Want) would only reserve name's
    needs and start it; Declined otherwise.

    stored: the ledger's services, already checked to be as lmproxy.ledger writes them;
    running: whether each configured service's units run, by unit name, from systemd
    (every one of them);
    needs: what each configured service needs."""
    if name not in needs or name in stored:
        raise Declined(f"{name} is not cold in the ledger")
    for other, entry in stored.items():
        if other not in needs:
            raise Declined(f"the ledger holds {other}, no longer configured")
        if entry["waiting_since"] is not None or entry["state"] == "draining":
            raise Declined(f"{other} waits or drains")
    for other in needs:
        backend = running[unitnames.backend_unit(other)]
        shim = running[unitnames.shim_unit(other)]
        if not _settled(stored.get(other), backend, shim):
            raise Declined(f"reconciliation would change {other}")
    free = dict(available)
    for entry in stored.values():
        reserved = entry["reserved"]
        assert isinstance(reserved, dict)
        for resource, amount in reserved.items():
            free[resource] = free.get(resource, 0) - amount
    if any(amount > free.get(resource, 0) for resource, amount in needs[name].items()):
        raise Declined(f"{name} does not fit in what is free")
    entries = dict(stored)
    entries[name] = {
        "state": "starting",
        "reserved": dict(needs[name]),
        "in_use": 0,
        "last_used": now,
        "loaded_at": 0.0,
        "waiting_since": arrived,
        "sleep_level": 0,
    }
    return entries


def _settled(entry: dict[str, object] | None, backend_runs: bool, shim_runs: bool) -> bool:
    """Whether reconciliation leaves a service's entry (nobody waits for it) as it is."""
    if entry is None:
        return not backend_runs
    state = entry["state"]
    if not backend_runs:
        return shim_runs and state == "starting"
    if state == "waiting":
        return False
    return shim_runs or state == "sleeping" or (state == "running" and entry["in_use"] == 0)


# --- the ledger, read and written as lmproxy.ledger does --------------------------------------


class _Context:
    """What the C JSON scanner asks of json.JSONDecoder, without importing json (and re)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = None
    memo: ClassVar[dict[str, str]] = {}


def _json_loads(data: bytes) -> object:
    import _json

    text = data.decode()
    scan = _json.make_scanner(_Context())  # type: ignore[arg-type]
    value, end = scan(text, 0)
    if text[end:].strip():
        raise ValueError("data after the JSON value")
    return value


def json_dumps(value: object) -> bytes:
    """As `json.dumps(value, sort_keys=True, separators=(",", ":"))` (lmproxy.ledger)."""
    import _json

    def unserializable(thing: object) -> object:
        raise TypeError(f"{thing!r} is not JSON")

    encode = _json.make_encoder(
        {}, unserializable, _json.encode_basestring_ascii, None, ":", ",", True, False, True
    )
    return "".join(encode(value, 0)).encode()


class Stored:
    """A ledger as read: its services, generation and measurements (lmproxy.checks),
    the last kept as they are, for writing back."""

    def __init__(self, entries: Entries, generation: int, checks: object) -> None:
        self.entries = entries
        self.generation = generation
        self.checks = checks


def _checked_ledger(data: object) -> Stored:
    """The ledger's services and generation, only if every value has exactly the type
    lmproxy.ledger writes: then writing them back unchanged is what the ledger would
    write. No generation: a ledger from before they were recorded (0)."""
    if not isinstance(data, dict) or not {"version", "services"} <= set(data) <= _LEDGER_KEYS:
        raise Declined("the ledger is not in the expected form")
    if data["version"] != LEDGER_VERSION or not isinstance(data["services"], dict):
        raise Declined("the ledger is of another version")
    generation = data.get("generation", 0)
    if type(generation) is not int or generation < 0:
        raise Declined("the ledger's generation is not in the expected form")
    for entry in data["services"].values():
        if not (
            isinstance(entry, dict)
            and set(entry) == _ENTRY_KEYS
            and entry["state"] in _PHASES
            and _is_amounts(entry["reserved"])
            and type(entry["in_use"]) is int
            and type(entry["last_used"]) is float
            and type(entry["loaded_at"]) is float
            and (entry["waiting_since"] is None or type(entry["waiting_since"]) is float)
            and type(entry["sleep_level"]) is int
        ):
            raise Declined("a ledger entry is not in the expected form")
    checks = data.get("checks")
    if checks is not None and not (isinstance(checks, dict) and checks):
        raise Declined("the ledger's measurements are not in the expected form")
    return Stored(data["services"], generation, checks)


def _is_amounts(value: object) -> bool:
    return isinstance(value, dict) and all(type(v) is int for v in value.values())


def _open_own(path: str, flags: int, mode: int = 0) -> int:
    """lmproxy.files.open_own_regular, with the euid as owner: no symlink, no FIFO,
    nothing but a regular file of ours."""
    fd = posix.open(path, flags | posix.O_NOFOLLOW | posix.O_CLOEXEC | posix.O_NONBLOCK, mode)
    info = posix.fstat(fd)
    if (info.st_mode & 0o170000) != 0o100000 or info.st_uid != posix.geteuid():
        posix.close(fd)
        raise Declined(f"{path} is not a regular file of ours")
    posix.set_blocking(fd, True)
    return fd


def _read_ledger(path: str) -> Stored:
    try:
        fd = _open_own(path, posix.O_RDONLY)
    except FileNotFoundError:
        return Stored({}, 0, None)
    try:
        data = posix.read(fd, MAX_LEDGER_BYTES + 1)
        if len(data) > MAX_LEDGER_BYTES or posix.fstat(fd).st_size != len(data):
            raise Declined("the ledger is too large")
    finally:
        posix.close(fd)
    try:
        return _checked_ledger(_json_loads(data))
    except (ValueError, UnicodeDecodeError):
        raise Declined("the ledger is unreadable") from None


def _write_ledger(folder: str, entries: Entries, generation: int, checks: object = None) -> None:
    """lmproxy.files.write_atomically (not durable: a tmpfs): a temporary file, renamed."""
    document = {"version": LEDGER_VERSION, "generation": generation, "services": entries}
    if checks is not None:
        document["checks"] = checks
    data = json_dumps(document)
    temp = f"{folder}/.ledger.json.{posix.getpid()}{posix.urandom(4).hex()}.tmp"
    flags = posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL | posix.O_NOFOLLOW | posix.O_CLOEXEC
    fd = posix.open(temp, flags, 0o600)
    try:
        try:
            posix.write(fd, data)
            posix.fchmod(fd, 0o644)
        finally:
            posix.close(fd)
        posix.rename(temp, f"{folder}/ledger.json")
    except BaseException:
        posix.unlink(temp)
        raise


# --- the first stage --------------------------------------------------------------------------


class Plan:
    """What `lmproxy install` wrote for the first stage (lmproxy.render.render_start_plan)."""

    def __init__(
        self,
        available: dict[str, int],
        needs: dict[str, dict[str, int]],
        generation: int,
        checked: list[str],
        split: list[str],
    ) -> None:
        self.available = available
        self.needs = needs
        self.generation = generation
        self.checked = checked  # resources a CheckCommand (or NVML) measures
        self.split = split  # services whose shim computes their TensorSplit first


def read_plan(config_path: str) -> Plan:
    """The plan beside config_path, if it was made from the config's bytes as they are
    now."""
    import binascii

    folder = config_path.rpartition("/")[0] or "."
    with open(config_path, "rb") as file:
        config = file.read()
    with open(f"{folder}/{PLAN_NAME}", "rb") as file:
        plan = _json_loads(file.read())
    if not (isinstance(plan, dict) and plan.get("version") == PLAN_VERSION):
        raise Declined("the start plan is of another version")
    made_from = (plan.get("config_size"), plan.get("config_crc32"))
    if made_from != (len(config), binascii.crc32(config)):
        raise Declined("the config changed since `lmproxy install` wrote the start plan")
    available, needs, generation = plan["available"], plan["needs"], plan.get("generation")
    checked, split = plan.get("checked"), plan.get("split")
    if not (_is_amounts(available) and isinstance(needs, dict) and type(generation) is int):
        raise Declined("the start plan is not in the expected form")
    if not all(_is_amounts(n) for n in needs.values()):
        raise Declined("the start plan is not in the expected form")
    if not (isinstance(checked, list) and isinstance(split, list)):
        raise Declined("the start plan is not in the expected form")
    return Plan(available, needs, generation, checked, split)


def _environ(name: str) -> str | None:
    """os.environ.get(name), from posix's bytes."""
    value = posix.environ.get(name.encode())
    return None if value is None else value.decode(errors="surrogateescape")


def _exists(path: str) -> bool:
    try:
        posix.stat(path)
    except FileNotFoundError:
        return False
    return True


def runtime_dir(system: bool) -> str:
    """lmproxy.paths.paths_for(scope).runtime_dir."""
    if system:
        return "/run/lmproxy"
    return (_environ("XDG_RUNTIME_DIR") or f"/run/user/{posix.getuid()}") + "/lmproxy"


def bus_address(system: bool) -> str:
    """lmproxy.systemd.bus_address."""
    if system:
        return _environ("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_SYSTEM_BUS
    address = _environ("DBUS_SESSION_BUS_ADDRESS")
    if address:
        return address
    runtime = _environ("XDG_RUNTIME_DIR")
    if not runtime:
        raise Declined("no session bus address")
    return f"unix:path={runtime}/bus"


def quick_start(system: bool, config_path: str, name: str, arrived: float) -> Early:
    """Reserves name's needs and sends its backend's StartUnit, if the lifecycle would
    do only that now; Declined (or any other exception) when it leaves this to the shim."""
    plan = read_plan(config_path)
    needs = plan.needs
    if name not in needs:
        raise Declined(f"{name} is not in the start plan")
    if any(needs[name].get(resource) for resource in plan.checked):
        raise Declined(f"{name} needs a resource that a CheckCommand measures")
    if name in plan.split:
        raise Declined(f"{name}'s TensorSplit is computed before its start, by the shim")
    units = [u for n in needs for u in (unitnames.backend_unit(n), unitnames.shim_unit(n))]
    folder = runtime_dir(system)
    _make_own_dir(folder)
    # The bus the shim uses (systemd's private socket, which systemctl prefers for a user
    # manager, measured no faster in bench/coldstart.py, and would be a second way in).
    bus = minibus.Bus(bus_address(system), BUS_TIMEOUT_S)
    try:
        lock = _open_own(f"{folder}/ledger.lock", posix.O_RDWR | posix.O_CREAT, 0o600)
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
            written_before = posix.fstat(lock).st_size > 0
            if written_before and not _exists(f"{folder}/ledger.json"):
                raise Declined("the ledger is missing (the shim rebuilds it, and says so)")
            stored = _read_ledger(f"{folder}/ledger.json")
            if stored.generation > plan.generation:
                raise Declined("a newer install wrote the ledger (the shim reads its config)")
            if isinstance(stored.checks, dict) and not set(stored.checks) <= set(plan.available):
                raise Declined("the ledger measured a resource no longer configured")
            (rows,) = bus.call("ListUnitsByPatterns", "asas", ([], units), "a(ssssssouso)")
            assert isinstance(rows, list)
            runs = {str(row[0]): row[3] in RUNNING_STATES for row in rows}
            running = {unit: runs.get(unit, False) for unit in units}
            now = time.time()
            entries = reserve_if_free(
                stored.entries,
                running,
                available=plan.available,
                needs=needs,
                name=name,
                now=now,
                arrived=arrived,
            )
            _write_ledger(folder, entries, plan.generation, stored.checks)
            if not written_before:
                posix.write(lock, b"1")  # lmproxy.ledger: marks that a ledger was written
        finally:
            posix.close(lock)  # releases the flock
        start_sent = time.monotonic()
        bus.call("StartUnit", "ss", (unitnames.backend_unit(name), "replace"), "o")
    finally:
        bus.close()
    return Early(arrived, needs[name], start_sent)


def _make_own_dir(path: str) -> None:
    """lmproxy.ledger's runtime folder: made if missing, and ours."""
    if not _exists(path):
        posix.mkdir(path, 0o755)  # a shim that loses this race falls back to the full path
    info = posix.lstat(path)
    if (info.st_mode & 0o170000) != 0o040000 or info.st_uid != posix.geteuid():
        raise Declined(f"{path} is not a folder of ours")


# --- the entry point --------------------------------------------------------------------------


def arguments(argv: list[str]) -> tuple[bool, str, str] | None:
    """(system, config, name) from `--user|--system --config PATH NAME` (lmproxy.render)."""
    if len(argv) == 4 and argv[0] in ("--user", "--system") and argv[1] == "--config":
        return argv[0] == "--system", argv[2], argv[3]
    return None


def main(argv: list[str] | None = None) -> None:
    """Runs the shim for `argv` (sys.argv's arguments by default), and exits with its status."""
    arrived = time.time()
    argv = sys.argv[1:] if argv is None else argv
    parsed = arguments(argv)
    early: Early | None = None
    failure: str | None = None
    if parsed is not None:
        try:
            early = quick_start(*parsed, arrived)
        except Declined:
            pass  # the common case for a warm model, or a start that needs more
        except Exception as error:  # the shim does it all instead, and says so
            failure = f"{type(error).__name__}: {error}"
    if sys.flags.no_site:
        import site

        site.main()  # the rest of lmproxy (jeepney, systemd-python) lives in site-packages
    if parsed is None:
        from lmproxy.cli import cli

        cli(["shim", *argv])  # says what is wrong with the arguments, and exits
        sys.exit(2)
    from pathlib import Path

    from lmproxy.paths import Scope
    from lmproxy.shim import main as run_shim

    system, config_path, name = parsed
    scope = Scope.SYSTEM if system else Scope.USER
    sys.exit(run_shim(name, scope, Path(config_path), early=early, early_failure=failure))
