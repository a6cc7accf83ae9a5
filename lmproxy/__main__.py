"""Entry point: `lmproxy` and `python3 -m lmproxy`."""

from __future__ import annotations

import sys
from pathlib import Path


def shim_arguments(argv: list[str]) -> tuple[str, str, Path] | None:
    """(name, scope, config) when argv is exactly what a shim unit runs:
    `shim --user|--system --config PATH NAME` (see lmproxy.render)."""
    if (
        len(argv) == 5
        and argv[0] == "shim"
        and argv[1] in ("--user", "--system")
        and argv[2] == "--config"
        and not argv[4].startswith("-")
    ):
        return argv[4], argv[1].removeprefix("--"), Path(argv[3])
    return None


def main() -> None:
    shim = shim_arguments(sys.argv[1:])
    if shim is not None:
        # What a shim unit runs by hand: its first stage, as the unit does (see
        # lmproxy.earlystart). `lmproxy shim --help` and odd spellings go through click.
        from lmproxy.earlystart import main as first_stage

        name, scope, config = shim
        first_stage([f"--{scope}", "--config", str(config), name])
    from lmproxy.cli import cli

    cli()


if __name__ == "__main__":
    main()
