"""What every service is doing: systemd's unit states joined with the ledger."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmproxy import unitnames
from lmproxy.checks import Measurement, held_outside
from lmproxy.config import UNBOUNDED, Config
from lmproxy.ledger import Ledger
from lmproxy.lifecycle import Entry, Phase
from lmproxy.paths import Scope, paths_for
from lmproxy.systemd import Manager, UnitState

STATES = (
    "cold",
    "starting",
    "running",
    "draining",
    "falling-asleep",
    "sleeping",
    "waking",
    "stopping",
    "failed",
)


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: str  # one of STATES
    listen: str
    backend_unit: str
    reserved: dict[str, int]
    connections: int  # clients in use
    last_used: float | None  # seconds since the epoch
    waiting_since: float | None  # when its oldest waiting client came
    waiting_for_resources: bool = False  # starting, but with no room yet
    # GPU memory its processes use now, MiB by GPU index (NVML); None: NVML unavailable
    vram_used_mib: dict[int, int] | None = None
    vram_declared_mib: dict[str, int] = dataclasses.field(default_factory=dict)  # by resource


@dataclass(frozen=True)
class ResourceStatus:
    name: str
    available: int  # UNBOUNDED: measured by a CheckCommand alone, no declared total
    reserved: int
    outside: int = 0  # held by programs outside lmproxy, as last measured
    measured: Measurement | None = None  # its CheckCommand's last result

    @property
    def free(self) -> int:
        """What the lifecycle counts as free (for a measured resource: what was found
        free, less what models not loaded then have reserved since)."""
        return self.available - self.reserved - self.outside

    @property
    def total(self) -> int | None:
        return None if self.available == UNBOUNDED else self.available


def service_state(entry: Entry | None, backend: UnitState, shim: UnitState) -> str:
    """One word for a service, from its ledger entry and its units' states."""
    if backend.active_state == "failed" or (shim.active_state == "failed" and not backend.running):
        return "failed"
    if backend.active_state == "deactivating" or (entry and entry.phase is Phase.STOPPING):
        return "stopping"
    if entry and entry.phase in (Phase.WAITING, Phase.STARTING):
        return "starting"
    if entry and entry.phase is not Phase.RUNNING and backend.running:
        return str(entry.phase.value)  # draining, falling-asleep, sleeping, waking
    if backend.running:
        return "running" if backend.active_state == "active" else "starting"
    return "cold"


def gpu_usage(services: Sequence[str]) -> dict[str, dict[int, int]] | None:
    """MiB each service's processes use, by GPU index; None where NVML cannot be used
    (no binding, no driver: status then shows no GPU column)."""
    from lmproxy.gpus import used_by_service
    from lmproxy.nvml import NvmlError, session

    try:
        with session() as nvml:
            readings = nvml.readings()
    except NvmlError:
        return None
    return used_by_service(readings, services)


def collect(config: Config, scope: Scope) -> tuple[list[ServiceStatus], list[ResourceStatus]]:
    paths = paths_for(scope)
    entries = Ledger(paths.runtime_dir, config.resources_available, {}, lambda _: {}, _ignore)
    snapshot, measurements = entries.snapshot_and_measurements()
    names = [
        u
        for s in config.services
        for u in (unitnames.backend_unit(s.name), unitnames.shim_unit(s.name))
    ]
    with Manager.connect(scope) as manager:
        units = manager.unit_states(names)
    usage = gpu_usage([s.name for s in config.services])
    gpu_resources = {r for r, c in config.resource_checks.items() if c.gpu is not None}
    services = []
    for service in config.services:
        entry = snapshot.get(service.name)
        state = service_state(
            entry,
            units[unitnames.backend_unit(service.name)],
            units[unitnames.shim_unit(service.name)],
        )
        held = dict(entry.reserved) if entry and state != "cold" else {}
        # A service only the router reaches: its private socket is no address to give out.
        listen = "router only" if service.router_only else service.listen_stream
        services.append(
            ServiceStatus(
                name=service.name,
                state=state,
                listen=listen,
                backend_unit=unitnames.backend_unit(service.name),
                reserved=held,
                connections=entry.in_use if entry and state != "cold" else 0,
                last_used=entry.last_used if entry and entry.last_used else None,
                waiting_since=entry.waiting_since if entry else None,
                waiting_for_resources=entry is not None and entry.phase is Phase.WAITING,
                vram_used_mib=None if usage is None else usage.get(service.name, {}),
                vram_declared_mib={
                    r: n for r, n in service.resource_requirements.items() if r in gpu_resources
                },
            )
        )
    reserved = {s.name: s.reserved for s in services}
    outside = held_outside(config.resources_available, measurements, reserved)
    resources = [
        ResourceStatus(
            name=resource,
            available=amount,
            reserved=sum(s.reserved.get(resource, 0) for s in services),
            outside=outside.get(resource, 0),
            measured=measurements.get(resource),
        )
        for resource, amount in sorted(config.resources_available.items())
    ]
    return services, resources


def _ignore(_: object) -> None:
    """status only reads the ledger: reconciliation never runs, so nothing is logged."""


def as_json(
    scope: Scope, services: list[ServiceStatus], resources: list[ResourceStatus]
) -> dict[str, Any]:
    """The stable document of `lmproxy status --json` (documented in the README)."""
    return {
        "version": 1,
        "scope": scope.value,
        "services": [
            {
                "name": s.name,
                "state": s.state,
                "listen": s.listen,
                "backend_unit": s.backend_unit,
                "reserved": s.reserved,
                "connections": s.connections,
                "last_used": _iso(s.last_used),
                "waiting_since": _iso(s.waiting_since),
                "vram": None
                if s.vram_used_mib is None
                else {
                    "used_mib": {str(i): n for i, n in sorted(s.vram_used_mib.items())},
                    "declared_mib": s.vram_declared_mib,
                },
            }
            for s in services
        ],
        "resources": [_resource_json(r) for r in resources],
    }


def _resource_json(resource: ResourceStatus) -> dict[str, Any]:
    document: dict[str, Any] = {
        "name": resource.name,
        "available": resource.total,
        "reserved": resource.reserved,
        "free": resource.free,
    }
    if resource.measured is not None:
        document["measured"] = {
            "free": resource.measured.free,
            "at": _iso(resource.measured.at),
        }
    return document


def as_table(services: list[ServiceStatus], resources: list[ResourceStatus]) -> str:
    gpu = any(s.vram_used_mib is not None for s in services)
    header: tuple[str, ...] = ("SERVICE", "STATE", "LISTEN", "CONNS", "RESERVED", "LAST USED")
    rows: list[tuple[str, ...]] = [header + (("VRAM USED/DECLARED",) if gpu else ())]
    for s in services:
        reserved = ", ".join(f"{k}={v}" for k, v in sorted(s.reserved.items())) or "-"
        row: tuple[str, ...] = (
            s.name,
            s.state,
            s.listen,
            str(s.connections),
            reserved,
            _iso(s.last_used) or "-",
        )
        if gpu:
            row += (_vram(s),)
        rows.append(row)
    lines = _columns(rows)
    lines.append("")
    resource_rows = [("RESOURCE", "AVAILABLE", "RESERVED", "FREE", "MEASURED FREE")]
    resource_rows += [
        (
            r.name,
            "-" if r.total is None else str(r.total),
            str(r.reserved),
            str(r.free),
            "-" if r.measured is None else f"{r.measured.free} at {_iso(r.measured.at)}",
        )
        for r in resources
    ]
    lines += _columns(resource_rows)
    return "\n".join(lines)


def _vram(service: ServiceStatus) -> str:
    used = sum((service.vram_used_mib or {}).values())
    declared = sum(service.vram_declared_mib.values())
    return f"{used}/{declared} MiB" if declared else f"{used} MiB"


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.isoformat(timespec="seconds")
