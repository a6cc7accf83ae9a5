"""The first stage's decision is the lifecycle's: wherever lmproxy.earlystart reserves and
starts, a shim's ledger transaction (lmproxy.ledger reconciling, then lifecycle.Want)
writes the same ledger, byte for byte, and says only "reserved" and Start. Checked on
generated ledgers, probes and configs; plus the plan, the ledger's form and the JSON."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lmproxy import earlystart, lifecycle, unitnames
from lmproxy.checks import Measurement
from lmproxy.config import parse_config
from lmproxy.earlystart import Declined
from lmproxy.ledger import Ledger, _encode
from lmproxy.lifecycle import Entry, Phase, Profile, SleepProfile
from lmproxy.render import render_start_plan

NAMES = ("a", "Qwen/Qwen2.5-7B", "Service TWO2\ufe0f\u20e3 \u0414\u0432\u0430")  # any name
RESOURCES = ("VRAM", "RAM")
NOW, ARRIVED = 1000.5, 1000.25

amounts = st.dictionaries(st.sampled_from(RESOURCES), st.integers(0, 30), max_size=2)
times = st.floats(0, 2000, allow_nan=False, allow_infinity=False)
entries = st.builds(
    Entry,
    phase=st.sampled_from(list(Phase)),
    reserved=amounts,
    in_use=st.integers(0, 2),
    last_used=times,
    loaded_at=times,
    # Mostly nobody waits: that is where the first stage acts, and where it must be right.
    waiting_since=st.one_of(st.none(), st.none(), st.none(), times),
    sleep_level=st.integers(0, 2),
)
profiles = st.builds(
    Profile,
    needs=amounts,
    sleep=st.one_of(st.none(), st.builds(SleepProfile, level=st.just(1), holds=amounts)),
)


class Probe:
    def __init__(self, running: set[str]) -> None:
        self.running = running

    def __call__(self, units: Sequence[str]) -> Mapping[str, bool]:
        return {unit: unit in self.running for unit in units}


def units_of(names: Sequence[str]) -> list[str]:
    return [u for n in names for u in (unitnames.backend_unit(n), unitnames.shim_unit(n))]


def write_ledger(
    folder: Path,
    stored: dict[str, Entry],
    available: dict[str, int],
    generation: int = 0,
    measurements: dict[str, Measurement] | None = None,
) -> None:
    """A ledger as a shim's transaction leaves it."""
    folder.mkdir()
    ledger = Ledger(folder, available, {}, Probe(set()), lambda _line: None, generation=generation)
    ledger._store(stored, measurements)
    (folder / "ledger.lock").write_bytes(b"1")


@st.composite
def worlds(draw: st.DrawFn) -> tuple[dict[str, Profile], dict[str, Entry], set[str]]:
    """Configured services, the ledger's entries, and the units systemd says run: mostly
    as they would be (a backend runs where the ledger has an entry, and only there), so
    that the worlds where the first stage acts come up often."""
    configured = draw(st.dictionaries(st.sampled_from(NAMES), profiles, min_size=1))
    stored = draw(st.dictionaries(st.sampled_from((*NAMES, "gone")), entries, max_size=3))
    running = set()
    for name in (*NAMES, "gone"):
        likely = name in stored
        backend = draw(st.sampled_from([likely, likely, likely, not likely]))
        shim = draw(st.sampled_from([True, True, False]))
        running |= {unitnames.backend_unit(name)} if backend else set()
        running |= {unitnames.shim_unit(name)} if shim else set()
    return configured, stored, running


DRAINING_WITH_NOBODY_WAITING = (
    {"a": Profile({"VRAM": 1}), "b": Profile({"VRAM": 1})},
    {"b": Entry(Phase.DRAINING, {"VRAM": 1})},
    {"lmproxy-backend@b.service", "lmproxy-b.service"},
)


IN_USE_WITHOUT_SHIM = (
    {"a": Profile({"VRAM": 1}), "b": Profile({"VRAM": 1})},
    {"b": Entry(Phase.RUNNING, {"VRAM": 1}, in_use=1)},
    {"lmproxy-backend@b.service"},
)
STARTING_WITHOUT_SHIM: tuple[dict[str, Profile], dict[str, Entry], set[str]] = (
    {"a": Profile({"VRAM": 1}), "b": Profile({"VRAM": 1})},
    {"b": Entry(Phase.STARTING, {"VRAM": 1})},
    set(),
)


# The ledger's generation and the plan's (lmproxy.ledger: every shim acts on the newest).
generations = st.tuples(st.integers(0, 2), st.integers(0, 2))
# What CheckCommands measured, kept in the ledger: the first stage writes it back as it is.
measurements = st.dictionaries(
    st.sampled_from(RESOURCES),
    st.builds(Measurement, st.integers(0, 30), times, st.lists(st.sampled_from(NAMES)).map(tuple)),
    max_size=2,
)


@settings(max_examples=1000, deadline=None)
@given(world=worlds(), available=amounts, generation=generations, measured=measurements)
@example(world=DRAINING_WITH_NOBODY_WAITING, available={"VRAM": 24}, generation=(0, 0), measured={})
@example(world=IN_USE_WITHOUT_SHIM, available={"VRAM": 24}, generation=(0, 0), measured={})
@example(world=STARTING_WITHOUT_SHIM, available={"VRAM": 24}, generation=(0, 0), measured={})
def test_where_the_first_stage_starts_the_shim_would_write_the_same_ledger(
    world: tuple[dict[str, Profile], dict[str, Entry], set[str]],
    available: dict[str, int],
    generation: tuple[int, int],
    measured: dict[str, Measurement],
) -> None:
    configured, stored, running = world
    written_by, planned = generation
    name = sorted(configured)[0]
    with tempfile.TemporaryDirectory() as tmp:
        shim_dir, early_dir = Path(tmp, "shim"), Path(tmp, "early")
        write_ledger(shim_dir, stored, available, written_by, measured)
        write_ledger(early_dir, stored, available, written_by, measured)
        needs = {n: dict(p.needs) for n, p in configured.items()}
        probe = {u: u in running for u in units_of(list(configured))}
        read = earlystart._read_ledger(str(early_dir / "ledger.json"))
        assert read.generation == written_by
        if written_by > planned:
            return  # a newer install wrote it: quick_start declines (the shim reads again)
        if measured and not set(measured) <= set(available):
            return  # quick_start declines: the shim drops measurements of what is gone
        checked = set(measured or {})
        if any(needs[name].get(resource) for resource in checked):
            return  # quick_start declines: a measured resource is the shim's to decide
        try:
            early = earlystart.reserve_if_free(
                read.entries,
                probe,
                available=available,
                needs=needs,
                name=name,
                now=NOW,
                arrived=ARRIVED,
            )
        except Declined:
            return
        earlystart._write_ledger(str(early_dir), early, planned, read.checks)

        said: list[lifecycle.Log] = []
        ledger = Ledger(
            shim_dir,
            available,
            configured,
            Probe(running),
            said.append,
            time=lambda: NOW,
            generation=planned,
        )
        with ledger.transaction() as txn:
            effects = txn.tell(lifecycle.Want(name, NOW, ARRIVED))
        reserved = f"reserved {lifecycle.amounts_text(configured[name].needs)}"
        assert said == []  # reconciliation changed nothing
        assert effects == (lifecycle.Log("reserved", reserved, name), lifecycle.Start())
        assert (early_dir / "ledger.json").read_bytes() == (shim_dir / "ledger.json").read_bytes()
        assert oct((early_dir / "ledger.json").stat().st_mode & 0o777) == oct(0o644)


def test_the_first_stage_acts_in_the_common_cold_start() -> None:
    """Not only declining: a cold model that fits beside an idle and a starting one."""
    stored = _encode(
        {
            "b": Entry(Phase.RUNNING, {"VRAM": 8}, last_used=5.0, loaded_at=4.0),
            "c": Entry(Phase.SLEEPING, {"VRAM": 2}, last_used=3.0, loaded_at=1.0),
        }
    )["services"]
    running = {u: not u.startswith("lmproxy-backend@a") for u in units_of(("a", "b", "c"))}
    needs = {"a": {"VRAM": 14}, "b": {"VRAM": 8}, "c": {"VRAM": 8}}
    after = earlystart.reserve_if_free(
        stored, running, available={"VRAM": 24}, needs=needs, name="a", now=NOW, arrived=ARRIVED
    )
    assert after["a"] == {
        "state": "starting",
        "reserved": {"VRAM": 14},
        "in_use": 0,
        "last_used": NOW,
        "loaded_at": 0.0,
        "waiting_since": ARRIVED,
        "sleep_level": 0,
    }
    with pytest.raises(Declined, match="does not fit"):
        earlystart.reserve_if_free(
            stored, running, available={"VRAM": 23}, needs=needs, name="a", now=NOW, arrived=ARRIVED
        )


RUNNING_ENTRY = _encode({"a": Entry(Phase.RUNNING, {})})["services"]["a"]


@pytest.mark.parametrize(
    "ledger",
    [
        {"version": 1, "services": {}},
        {"version": 2, "services": {}, "extra": 1},
        {"version": 2, "services": {}, "generation": 1.0},
        {"version": 2, "services": {}, "generation": -1},
        {"version": 2, "services": {"a": {"state": "running"}}},
        {"version": 2, "services": {"a": {**RUNNING_ENTRY, "in_use": 1.0}}},
        {"version": 2, "services": {"a": {**RUNNING_ENTRY, "state": "odd"}}},
        {"version": 2, "services": {"a": {**RUNNING_ENTRY, "more": 1}}},
        [],
    ],
)
def test_a_ledger_not_as_lmproxy_writes_it_is_left_to_the_shim(
    tmp_path: Path, ledger: object
) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps(ledger))
    with pytest.raises(Declined):
        earlystart._read_ledger(str(path))


def test_a_ledger_that_is_not_ours_is_left_to_the_shim(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(_encode({})))
    (tmp_path / "ledger.json").symlink_to(target)
    with pytest.raises(OSError):
        earlystart._read_ledger(str(tmp_path / "ledger.json"))
    missing = earlystart._read_ledger(str(tmp_path / "missing.json"))
    assert (missing.entries, missing.generation, missing.checks) == ({}, 0, None)


ledger_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), times, st.text()),
    lambda inner: st.one_of(st.lists(inner), st.dictionaries(st.text(), inner)),
    max_leaves=20,
)


@given(ledger_values)
def test_json_is_read_and_written_as_the_json_module_does(value: object) -> None:
    written = earlystart.json_dumps(value)
    assert written == json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    assert earlystart._json_loads(written) == json.loads(written)


def test_json_after_the_value_is_refused() -> None:
    with pytest.raises(ValueError):
        earlystart._json_loads(b'{"a": 1} x')


CONFIG = """{"ResourcesAvailable": {"VRAM": 24000, "RAM": 64},
  "Services": [
    {"Name": "a", "ListenPort": 8080, "ProxyTargetPort": 18080, "Command": "/bin/true",
     "ResourceRequirements": {"VRAM": 20000}},
    {"Name": "b", "ListenPort": 8081, "ProxyTargetPort": 18081, "Command": "/bin/true"}]}"""


def test_the_plan_is_read_only_for_the_config_it_was_made_from(tmp_path: Path) -> None:
    config_path = tmp_path / "config.json"
    config_path.write_text(CONFIG)
    plan = render_start_plan(parse_config(CONFIG, tmp_path), CONFIG.encode(), 7)
    (tmp_path / earlystart.PLAN_NAME).write_text(plan)
    read = earlystart.read_plan(str(config_path))
    assert read.checked == []
    assert read.available == {"VRAM": 24000, "RAM": 64}
    assert read.needs == {"a": {"VRAM": 20000}, "b": {}}
    assert read.generation == 7
    config_path.write_text(CONFIG.replace("20000", "20001"))
    with pytest.raises(Declined, match="config changed"):
        earlystart.read_plan(str(config_path))


def test_paths_are_the_shims(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmproxy.paths import Scope, paths_for
    from lmproxy.systemd import bus_address

    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/4242")
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    for scope in Scope:
        system = scope is Scope.SYSTEM
        assert earlystart.runtime_dir(system) == str(paths_for(scope).runtime_dir)
        assert earlystart.bus_address(system) == bus_address(scope)
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/tmp/x")
    assert earlystart.bus_address(False) == bus_address(Scope.USER)
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert earlystart.runtime_dir(False) == str(paths_for(Scope.USER, os.environ).runtime_dir)


def test_what_the_first_stage_copies_is_what_lmproxy_has() -> None:
    """It imports none of these modules (they cost a cold start their imports)."""
    from lmproxy import ledger, systemd

    assert {phase.value for phase in Phase} == earlystart._PHASES
    assert set(earlystart.RUNNING_STATES) == systemd.RUNNING_STATES
    assert earlystart.LEDGER_VERSION == ledger.FORMAT_VERSION
    assert earlystart.MAX_LEDGER_BYTES == ledger.MAX_LEDGER_BYTES
    assert earlystart.DEFAULT_SYSTEM_BUS == systemd.DEFAULT_SYSTEM_BUS
    assert set(RUNNING_ENTRY) == earlystart._ENTRY_KEYS
