"""What the tests of the fast copier do where lmproxy._fastcopy was not built."""

from __future__ import annotations

import os

import pytest

BUILD_HINT = (
    "lmproxy._fastcopy is not built: run tools/setup (or `python3 setup.py build_ext --inplace`)"
)


def require_fast_copier() -> None:
    """Skip the test, or fail it where LMPROXY_REQUIRE_FASTCOPY=1 (CI sets it): a package
    built without its C module would otherwise pass unnoticed."""
    if os.environ.get("LMPROXY_REQUIRE_FASTCOPY") == "1":
        pytest.fail(BUILD_HINT)
    pytest.skip(BUILD_HINT)
