"""Where an installed config came from: the directory its relative paths resolve in.

large-model-proxy resolves a relative WorkDir, LogFilePath or Command against the
directory it was started in, and runs a service without WorkDir there. lmproxy's
counterpart is the directory `lmproxy install` ran in (or its --base-dir): the
installer records it beside the installed copy of the config, and everything that
reads that copy later (the shims, status, start and stop) resolves paths the same
way, whatever directory it runs in itself.

The record also numbers the install: its generation, which grows with every install
(lmproxy.ledger: every shim acts on the newest one).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lmproxy.config import Config, ConfigError, load_config

ORIGIN_FILE = "origin.json"


def origin_path(installed_config: Path) -> Path:
    return installed_config.with_name(ORIGIN_FILE)


@dataclass(frozen=True)
class Origin:
    base_dir: Path
    generation: int  # 0: an install from before generations were recorded
    run_pid: int | None = None  # made by `lmproxy run` in this process, to be undone
    # GPU resources' "auto" amounts as install read them from NVML (lmproxy.gpuresources)
    amounts: Mapping[str, int] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Installed:
    config: Config
    generation: int


def render_origin(
    config: Config,
    source: Path,
    generation: int,
    run_pid: int | None = None,
    amounts: Mapping[str, int] | None = None,
) -> str:
    """The record written beside the installed config."""
    record: dict[str, object] = {
        "base_dir": config.base_dir,
        "generation": generation,
        "source": str(source.absolute()),
    }
    if run_pid is not None:
        record["run_pid"] = run_pid
    if amounts:
        record["amounts"] = dict(amounts)
    return json.dumps(record, indent=1, sort_keys=True) + "\n"


def next_generation(installed_config: Path) -> int:
    """A generation above the installed one's, and above any before it: the clock's
    nanoseconds, so that it grows also after the record was deleted by hand."""
    try:
        previous = read_origin(installed_config).generation
    except ConfigError:
        previous = 0
    return max(time.time_ns(), previous + 1)


def read_origin(installed_config: Path) -> Origin:
    """The install record. An install made before lmproxy recorded one resolved paths
    against the config file's own directory."""
    path = origin_path(installed_config)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return Origin(installed_config.absolute().parent, 0)
    except (OSError, ValueError) as error:
        raise ConfigError([(str(path), f"cannot read the install record: {error}")]) from None
    if not isinstance(record, dict):
        raise ConfigError([(str(path), "the install record is not an object")])
    base = record.get("base_dir")
    if not isinstance(base, str) or not base.startswith("/"):
        raise ConfigError([(str(path), "the install record names no absolute base_dir")])
    generation = record.get("generation", 0)
    if type(generation) is not int or generation < 0:
        raise ConfigError([(str(path), "the install record's generation is not a count")])
    run_pid = record.get("run_pid")
    if run_pid is not None and (type(run_pid) is not int or run_pid <= 0):
        raise ConfigError([(str(path), "the install record's run_pid is not a process id")])
    amounts = record.get("amounts", {})
    if not isinstance(amounts, dict) or not all(
        isinstance(k, str) and type(v) is int and v >= 0 for k, v in amounts.items()
    ):
        raise ConfigError([(str(path), "the install record's amounts are not amounts")])
    return Origin(Path(base), generation, run_pid, amounts)


def installed_base_dir(installed_config: Path) -> Path:
    return read_origin(installed_config).base_dir


def load_installed(installed_config: Path) -> Installed:
    """The installed config, its relative paths resolved as they were at install, and
    its generation."""
    origin = read_origin(installed_config)
    config = load_config(installed_config, origin.base_dir)
    if origin.amounts:  # GPU resources' "auto" amounts, as install read them
        from lmproxy.gpuresources import with_amounts

        config = with_amounts(config, dict(origin.amounts))
    return Installed(config, origin.generation)


def load_installed_config(installed_config: Path) -> Config:
    return load_installed(installed_config).config
