"""Entry point: `lmproxy` and `python3 -m lmproxy`."""

from __future__ import annotations


def main() -> None:
    from lmproxy.cli import cli

    cli()


if __name__ == "__main__":
    main()
