"""Finding the templates and static units, in a source checkout or installed."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """`templates` or `units`: at the top of a source checkout, inside the package
    once installed (pyproject.toml maps them there)."""
    for candidate in (_PACKAGE / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"lmproxy's {name}/ directory is missing from {_PACKAGE}")
