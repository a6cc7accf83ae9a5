"""Options and error handling shared by the verbs."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from lmproxy.config import ConfigError
from lmproxy.paths import Scope

F = TypeVar("F", bound=Callable[..., Any])


def scope_option(function: F) -> F:
    """--user / --system; default: --system for root, --user otherwise."""
    return click.option(
        "--user",
        "scope",
        flag_value=Scope.USER.value,
        help="Use the calling user's systemd manager (default unless root).",
    )(
        click.option(
            "--system",
            "scope",
            flag_value=Scope.SYSTEM.value,
            help="Use the system manager (default for root).",
        )(function)
    )


def resolve_scope(value: str | None) -> Scope:
    return Scope(value) if value else Scope.default()


def config_option(function: F) -> F:
    return click.option(
        "--config",
        "-c",
        "config_path",
        type=click.Path(path_type=Path, dir_okay=False),
        default=Path("config.json"),
        show_default=True,
        help="large-model-proxy's config.json (JSON or JSONC).",
    )(function)


def base_dir_option(function: F) -> F:
    return click.option(
        "--base-dir",
        "base_dir",
        type=click.Path(path_type=Path, file_okay=False, exists=True),
        default=None,
        help="Where relative paths in the config resolve, and where a service without "
        "WorkDir runs (default: the current directory, as large-model-proxy does).",
    )(function)


def reserve_option(function: F) -> F:
    return click.option(
        "--reserve-mib",
        type=click.IntRange(min=0),
        default=1024,
        show_default=True,
        help='What a GPU resource with "Amount": "auto" leaves free of its GPU\'s memory.',
    )(function)


def refuse_config(error: ConfigError, path: Path) -> None:
    """Prints every problem with its JSON path and exits with status 2."""
    click.echo(f"lmproxy: {path} is not a valid config; nothing was changed:", err=True)
    for json_path, problem in error.problems:
        click.echo(f"  {json_path}: {problem}", err=True)
    sys.exit(2)


def warn(line: str) -> None:
    """A warning on stderr: the command goes on."""
    click.echo(line, err=True)


def fail(message: str, status: int = 1) -> None:
    click.echo(f"lmproxy: {message}", err=True)
    sys.exit(status)
