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
        # Every cold start waits for the shim's imports: this path skips click and
        # the other verbs. `lmproxy shim --help` and odd spellings go through click.
        from lmproxy.paths import Scope
        from lmproxy.shim import main as run_shim

        name, scope, config = shim
        sys.exit(run_shim(name, Scope(scope), config))
    from lmproxy.cli import cli

    cli()


if __name__ == "__main__":
    main()
