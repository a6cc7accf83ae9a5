"""Unit names: the polkit rule that lets the shims manage backends matches backends only."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from lmproxy import unitnames

PLAIN = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", fullmatch=True)
NAMES = PLAIN | st.text(min_size=1, max_size=300)


def polkit_backend_pattern() -> re.Pattern[str]:
    """The regular expression of system/60-lmproxy.rules (JavaScript's and Python's agree
    on it: anchors, classes and escapes only)."""
    rules = (Path(__file__).parents[2] / "system" / "60-lmproxy.rules").read_text()
    (source,) = re.findall(r"/(\^lmproxy-[^/]+\$)/\.test\(unit\)", rules)
    return re.compile(source)


@given(NAMES)
def test_the_polkit_rule_matches_every_backend_unit_and_no_other(name: str) -> None:
    pattern = polkit_backend_pattern()
    assert pattern.fullmatch(unitnames.backend_unit(name))
    assert not pattern.fullmatch(unitnames.shim_unit(name))
    assert not pattern.fullmatch(unitnames.socket_unit(name))
    assert unitnames.is_backend_unit(unitnames.backend_unit(name))
    assert not unitnames.is_backend_unit(unitnames.shim_unit(name))


def test_a_service_named_like_a_backend_gets_a_shim_polkit_does_not_match() -> None:
    """A service called "c-backend" once had the shim unit lmproxy-c-backend.service,
    which the old pattern took for c's backend: the shims' user could manage it."""
    pattern = polkit_backend_pattern()
    for name in ("c-backend", "backend", "backend-c", "backend.c"):
        assert not pattern.fullmatch(unitnames.shim_unit(name)), name


@given(PLAIN)
def test_a_plain_name_is_its_own_unit_name(name: str) -> None:
    """Names lmproxy took before any other keep their units across an upgrade."""
    assert unitnames.component(name) == name
    assert unitnames.shim_unit(name) == f"lmproxy-{name}.service"


@given(st.text(min_size=1, max_size=300))
def test_any_name_maps_to_a_unit_safe_stable_component(name: str) -> None:
    part = unitnames.component(name)
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", part)
    assert part == unitnames.component(name)
    if not unitnames.is_plain(name):
        assert re.fullmatch(r".+-[0-9a-f]{8}", part)
    for unit in unitnames.units_of(name):
        assert not set(unit) & set("*?[]\\@/ ") or unit.startswith("lmproxy-backend@")


def test_names_users_write_get_readable_unit_names() -> None:
    assert unitnames.component("Qwen/Qwen2.5-7B-Instruct") == "Qwen_Qwen2.5-7B-Instruct-1bb1e77d"
    assert unitnames.component("{Service 3}") == "Service_3-8c9d9468"
    assert unitnames.component("\u043f\u0440\u043e\u0432\u0435\u0440\u043a\u0430") == (
        "service-e778c6d8"
    )
