"""`lmproxy gpus`: every GPU by free memory, and who holds its memory.

A process NVML lists is lmproxy's when its cgroup is a backend unit's
(lmproxy-backend@COMPONENT.service): the model server, whatever it forked, runs in
its unit's cgroup, so the cgroup names the service. Every other process is "outside
lmproxy", shown with its command line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmproxy import unitnames

if TYPE_CHECKING:
    from lmproxy.nvml import GpuReading

OUTSIDE = "outside lmproxy"


@dataclass(frozen=True)
class Holder:
    pid: int
    used_mib: int | None
    service: str | None  # the lmproxy service, or None: outside lmproxy
    command: str  # its command line (or what /proc says of a process it cannot read)


def by_free_memory(readings: Iterable[GpuReading]) -> list[GpuReading]:
    """Most free first (seed 004's order); by index among equals."""
    return sorted(readings, key=lambda r: (-r.free_mib, r.facts.index))


def unit_of(pid: int | str, proc: str = "/proc") -> str | None:
    """The systemd unit whose cgroup holds pid (cgroup v2), or None."""
    try:
        with open(f"{proc}/{pid}/cgroup", encoding="utf-8", errors="replace") as file:
            lines = file.read().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            for part in reversed(line[3:].split("/")):
                if part.endswith((".service", ".scope")):
                    return part
    return None


def command_of(pid: int, proc: str = "/proc") -> str:
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as file:
            argv = file.read().split(b"\0")
    except OSError:
        return "(gone, or not visible to this user)"
    return " ".join(arg.decode(errors="replace") for arg in argv if arg) or "(no command line)"


def holders(
    reading: GpuReading,
    services: Sequence[str],
    proc: str = "/proc",
    known: Mapping[int, str] | None = None,
) -> list[Holder]:
    """Who holds reading's GPU memory; services: the configured names, to name a
    backend by (a backend of a service no longer configured shows its unit); known: the
    backends' processes by pid, where their /proc entries cannot be read (a shim under
    the system manager sees no other user's: backend_pids)."""
    backends = {unitnames.backend_unit(name): name for name in services}
    found = []
    for process in reading.processes:
        service = (known or {}).get(process.pid)
        unit = unit_of(process.pid, proc) if service is None else None
        if unit is not None and unitnames.is_backend_unit(unit):
            service = backends.get(unit, unit)
        found.append(Holder(process.pid, process.used_mib, service, command_of(process.pid, proc)))
    return found


def backend_pids(
    services: Sequence[str], proc: str = "/proc", cgroups: str = "/sys/fs/cgroup"
) -> dict[int, str]:
    """The processes of each service's backend, by pid, from the cgroup tree (readable by
    every user): the backends' cgroups are the siblings of this process's own, the shim's,
    in lmproxy.slice. Empty where that is not where this process runs."""
    own = unit_of("self", proc)
    try:
        with open(f"{proc}/self/cgroup", encoding="utf-8") as file:
            lines = [line for line in file.read().splitlines() if line.startswith("0::")]
    except OSError:
        return {}
    if own is None or not lines:
        return {}
    root = Path(cgroups)
    if not (root / "cgroup.controllers").exists() and (root / "unified").is_dir():
        root = root / "unified"  # a hybrid hierarchy: cgroup v2 beside v1's
    slice_dir = Path(str(root) + lines[0][3:]).parent
    pids: dict[int, str] = {}
    for name in services:
        unit_dir = slice_dir / unitnames.backend_unit(name)
        for members in unit_dir.rglob("cgroup.procs") if unit_dir.is_dir() else ():
            try:
                pids.update({int(pid): name for pid in members.read_text().split()})
            except (OSError, ValueError):
                continue
    return pids


def used_by_service(
    readings: Iterable[GpuReading], services: Sequence[str], proc: str = "/proc"
) -> dict[str, dict[int, int]]:
    """MiB each lmproxy service's processes use, by GPU index (for status)."""
    used: dict[str, dict[int, int]] = {}
    for reading in readings:
        for holder in holders(reading, services, proc):
            if holder.service is not None and holder.used_mib is not None:
                per_gpu = used.setdefault(holder.service, {})
                per_gpu[reading.facts.index] = per_gpu.get(reading.facts.index, 0) + holder.used_mib
    return used


def as_json(readings: Sequence[GpuReading], held: Mapping[int, Sequence[Holder]]) -> dict[str, Any]:
    return {
        "gpus": [
            {
                "index": r.facts.index,
                "name": r.facts.name,
                "uuid": r.facts.uuid,
                "total_mib": r.facts.total_mib,
                "used_mib": r.used_mib,
                "free_mib": r.free_mib,
                "utilization_percent": r.utilization_percent,
                "processes": [
                    {
                        "pid": h.pid,
                        "used_mib": h.used_mib,
                        "service": h.service,
                        "command": h.command,
                    }
                    for h in held[r.facts.index]
                ],
            }
            for r in readings
        ]
    }


def as_text(readings: Sequence[GpuReading], held: Mapping[int, Sequence[Holder]]) -> str:
    if not readings:
        return "no NVIDIA GPU"
    lines = []
    for r in readings:
        busy = "-" if r.utilization_percent is None else f"{r.utilization_percent}%"
        lines.append(
            f"GPU {r.facts.index}  {r.facts.name}  {r.facts.uuid}\n"
            f"  used {r.used_mib} / total {r.facts.total_mib} MiB, free {r.free_mib} MiB, "
            f"utilization {busy}"
        )
        for h in held[r.facts.index]:
            used = "?" if h.used_mib is None else str(h.used_mib)
            who = h.service if h.service is not None else f"{OUTSIDE}: {h.command}"
            lines.append(f"  {used:>7} MiB  pid {h.pid:<7}  {who}")
    return "\n".join(lines)
