"""CheckCommand: the amount free as a command prints it, and what others hold of it."""

from __future__ import annotations

import pytest

from lmproxy.checks import CheckError, Measurement, held_outside, measure
from lmproxy.config import UNBOUNDED, ResourceCheck


def check(command: str) -> ResourceCheck:
    return ResourceCheck(command, 1000)


def test_the_amount_printed_is_the_amount_free() -> None:
    assert measure(check("echo 23456")) == 23456
    assert measure(check("printf ' 12\\n'")) == 12
    assert measure(check("echo 7; echo 'a warning' >&2")) == 7  # stderr is not the amount


@pytest.mark.parametrize(
    ("command", "why"),
    [
        ("exit 3", "exited with status 3"),
        ("echo no GPU; exit 1", "exited with status 1: no GPU"),
        ("echo 12 MiB", "printed '12 MiB', not an amount"),
        ("echo -5", "printed '-5', not an amount"),
        ("echo ²", "not an amount"),
        ("true", "printed nothing"),
    ],
)
def test_anything_else_is_a_failed_check(command: str, why: str) -> None:
    with pytest.raises(CheckError, match=why):
        measure(check(command))


def test_a_check_that_hangs_is_cut() -> None:
    with pytest.raises(CheckError, match=r"did not finish within 0\.5 s"):
        measure(check("sleep 10"), timeout_s=0.5)


def test_what_others_hold_is_what_is_neither_free_nor_shown_as_lmproxys() -> None:
    """24 total: 8 free when measured while a (loaded, 10) ran: others hold 6. b (4),
    reserved since but not loaded then, is not counted as shown: it comes off what is
    free (24 - 14 reserved - 6 outside = 4 = 8 - 4)."""
    available = {"VRAM": 24, "RAM": 64}
    measured = {"VRAM": Measurement(8, 1.0, ("a",))}
    reserved = {"a": {"VRAM": 10}, "b": {"VRAM": 4}}
    assert held_outside(available, measured, reserved) == {"VRAM": 6}
    # a stopped since: its memory is not counted back before a new measurement shows it.
    assert held_outside(available, measured, {"b": {"VRAM": 4}}) == {"VRAM": 16}
    # Without a declared total: only the measurement bounds it.
    unbounded = {"VRAM": UNBOUNDED}
    outside = held_outside(unbounded, measured, reserved)["VRAM"]
    assert UNBOUNDED - 14 - outside == 4
    # Nothing held outside where the measurement shows all of the total free.
    assert held_outside(available, {"VRAM": Measurement(24, 1.0, ())}, {}) == {}
