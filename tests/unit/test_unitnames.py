"""Unit names: the polkit rule that lets the shims manage backends matches backends only."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from lmproxy import unitnames

NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", fullmatch=True)


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
