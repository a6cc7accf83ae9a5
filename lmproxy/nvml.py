"""NVIDIA's GPUs as NVML reports them, through NVIDIA's own binding (PyPI `nvidia-ml-py`,
imported as `pynvml`): an optional extra, not in Debian, so everything here says plainly
when it is missing, or when there is no driver or no GPU.

Facts (`GpuFacts`: index, UUID, name, total memory) are kept apart from live readings
(`GpuReading`: what is used and free now, utilization, the processes holding memory).
Memory is in MiB, as the config's GPU resources and nvidia-smi count it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

MIB = 2**20
INSTALL_HINT = (
    "install NVIDIA's binding, `pip install nvidia-ml-py` (lmproxy's `gpu` extra), "
    "where lmproxy's Python finds it"
)


class NvmlError(Exception):
    """NVML cannot be used here; the message says why, and what to do."""


@dataclass(frozen=True)
class GpuFacts:
    index: int
    uuid: str
    name: str
    total_mib: int


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_mib: int | None  # None: the driver does not say (some setups never do)


@dataclass(frozen=True)
class GpuReading:
    facts: GpuFacts
    used_mib: int
    free_mib: int
    utilization_percent: int | None
    processes: tuple[GpuProcess, ...]


@contextlib.contextmanager
def session() -> Iterator[Nvml]:
    """NVML, initialised for the block; NvmlError when it cannot be."""
    try:
        import pynvml
    except ImportError:
        raise NvmlError(f"NVML's Python binding is not installed: {INSTALL_HINT}") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        raise NvmlError(
            f"NVML cannot start ({error}): no NVIDIA driver is loaded on this machine"
        ) from None
    try:
        yield Nvml(pynvml)
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


class Nvml:
    """Readings of every GPU, or of one."""

    def __init__(self, binding: Any) -> None:
        self._nvml = binding

    def readings(self) -> list[GpuReading]:
        """Every GPU, in NVML's order (its index)."""
        count = self._call(self._nvml.nvmlDeviceGetCount)
        return [self._reading(index) for index in range(count)]

    def reading(self, gpu: str) -> GpuReading:
        """One GPU, by index ("0") or UUID ("GPU-..."), as a config's `Gpu` names it."""
        for reading in self.readings():
            if gpu in (str(reading.facts.index), reading.facts.uuid):
                return reading
        raise NvmlError(f"there is no GPU {gpu!r} on this machine")

    def _reading(self, index: int) -> GpuReading:
        nvml = self._nvml
        handle = self._call(nvml.nvmlDeviceGetHandleByIndex, index)
        memory = self._call(nvml.nvmlDeviceGetMemoryInfo, handle)
        facts = GpuFacts(
            index=index,
            uuid=_text(self._call(nvml.nvmlDeviceGetUUID, handle)),
            name=_text(self._call(nvml.nvmlDeviceGetName, handle)),
            total_mib=int(memory.total) // MIB,
        )
        try:
            utilization: int | None = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except nvml.NVMLError:
            utilization = None  # not supported on every GPU
        return GpuReading(
            facts=facts,
            used_mib=int(memory.used) // MIB,
            free_mib=int(memory.free) // MIB,
            utilization_percent=utilization,
            processes=self._processes(handle),
        )

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...]:
        """The processes that hold memory for compute (model servers; a desktop's
        graphics processes are left out)."""
        found: dict[int, GpuProcess] = {}
        for process in self._call(self._nvml.nvmlDeviceGetComputeRunningProcesses, handle):
            used = getattr(process, "usedGpuMemory", None)
            found[int(process.pid)] = GpuProcess(
                int(process.pid), None if used is None else int(used) // MIB
            )
        return tuple(sorted(found.values(), key=lambda p: p.pid))

    def _call(self, function: Any, *args: Any) -> Any:
        try:
            return function(*args)
        except self._nvml.NVMLError as error:
            raise NvmlError(f"NVML failed: {error}") from None


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
