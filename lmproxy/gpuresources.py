"""Resources that are a GPU's memory (lmproxy's `Gpu`), as `lmproxy install` settles them.

`"VRAM-GPU-0": {"Gpu": "0", "Amount": "auto"}` says: this resource is GPU 0's memory in
MiB, measured through NVML before each start that needs it (lmproxy.checks), and its
total is the GPU's less a reserve (seed 004's `--reserve-mib`, default 1024). Install
reads that total once, records it beside the installed config (lmproxy.origin), and
refuses, naming the resource, where NVML cannot be used or the GPU does not exist.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from lmproxy.config import Config, ConfigError
from lmproxy.config.jsonc import child

if TYPE_CHECKING:
    from lmproxy.nvml import GpuReading

DEFAULT_RESERVE_MIB = 1024


def gpu_resources(config: Config) -> dict[str, str]:
    """Each resource that is a GPU's memory: the GPU, as the config names it."""
    return {r: c.gpu for r, c in config.resource_checks.items() if c.gpu is not None}


def settle(config: Config, reserve_mib: int = DEFAULT_RESERVE_MIB) -> tuple[Config, dict[str, int]]:
    """The config with each "auto" amount read from NVML, and those amounts; a config
    without GPU resources is returned as it is, without NVML."""
    wanted = gpu_resources(config)
    if not wanted:
        return config, {}
    from lmproxy.nvml import NvmlError, session  # only for GPU resources

    try:
        with session() as nvml:
            readings = nvml.readings()
    except NvmlError as error:
        raise ConfigError(
            [(_path(r), f"a Gpu resource needs NVML, and {error}") for r in sorted(wanted)]
        ) from None
    problems = []
    amounts: dict[str, int] = {}
    for resource, gpu in sorted(wanted.items()):
        reading = _find(readings, gpu)
        if reading is None:
            known = ", ".join(f"{r.facts.index} ({r.facts.uuid})" for r in readings) or "none"
            problems.append((_path(resource), f"there is no GPU {gpu!r} here (GPUs: {known})"))
        elif resource in config.auto_amounts:
            amounts[resource] = max(0, reading.facts.total_mib - reserve_mib)
    for index, service in enumerate(config.services):
        for resource, amount in amounts.items():
            need = service.resource_requirements.get(resource, 0)
            if need > amount:
                problems.append(
                    (
                        child(f"$.Services[{index}].ResourceRequirements", resource),
                        f"needs {need} of {resource!r} but its GPU has {amount} MiB "
                        f"(its total less the {reserve_mib} MiB reserve)",
                    )
                )
    if problems:
        raise ConfigError(problems)
    return with_amounts(config, amounts), amounts


def with_amounts(config: Config, amounts: dict[str, int]) -> Config:
    """The config with these amounts in place of "auto" (as install recorded them)."""
    if not amounts:
        return config
    available = {**config.resources_available, **amounts}
    return dataclasses.replace(config, resources_available=available)


def _find(readings: list[GpuReading], gpu: str) -> GpuReading | None:
    for reading in readings:
        if gpu in (str(reading.facts.index), reading.facts.uuid):
            return reading
    return None


def _path(resource: str) -> str:
    return child("$.ResourcesAvailable", resource) + ".Gpu"
