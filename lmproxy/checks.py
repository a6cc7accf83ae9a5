"""A resource's CheckCommand: the amount free now, as a shell command prints it.

large-model-proxy's resources can be measured rather than declared: `"VRAM-GPU-0":
{"CheckCommand": "nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits
-i 0"}`. A shim whose model needs such a resource runs the command before it asks for
room, outside the ledger's lock, and again every CheckWhenNotEnoughIntervalMilliseconds
and whenever the ledger changes (a model holding it stopped) while it is short. The
ledger keeps the last measurement (lmproxy.ledger), and the lifecycle counts what is
not free and not lmproxy's models' as held outside lmproxy (World.outside): waited for,
never evicted, while lmproxy's idle models holding it are evicted as for any resource.

A resource with lmproxy's `Gpu` is measured the same way, as that GPU's free memory in
MiB from NVML (lmproxy.nvml), and so waits until a stopped model's memory is back.

The command runs like a HealthcheckCommand (lmproxy.readiness.run_shell): in the
shim's sandbox, as its user, with a small environment. It must print one non-negative
integer; anything else is a failed check, which counts as nothing free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmproxy.config import ResourceCheck
from lmproxy.readiness import run_shell

CHECK_TIMEOUT_S = 30.0


class CheckError(Exception):
    """The command did not say how much is free; the message says why."""


def measure(check: ResourceCheck, timeout_s: float = CHECK_TIMEOUT_S) -> int:
    """The amount free now: as the check's command prints it, or its GPU's free MiB."""
    if check.gpu is not None:
        return _gpu_free(check.gpu)
    assert check.command is not None
    status, output = run_shell(check.command, timeout_s, with_stderr=False)
    if status is None:
        raise CheckError(f"it did not finish within {timeout_s:g} s")
    if status != 0:
        said = f": {output}" if output else ""
        raise CheckError(f"it exited with status {status}{said}")
    text = output.strip()
    if not (text.isascii() and text.isdigit()):
        shown = repr(text[:60]) if text else "nothing"
        raise CheckError(f"it printed {shown}, not an amount (one non-negative integer)")
    return int(text)


# --- What the ledger keeps of measurements, and what they leave free --------------------------

# Entries whose memory a measurement already shows as used: awake and loaded, or asleep
# with what they keep. The others (starting, waking, stopping, falling asleep) may or may
# not show in it yet, so they are counted as not shown: the safe side.
LOADED_PHASES = ("running", "draining", "sleeping")


@dataclass(frozen=True)
class Measurement:
    """One check's result, as the ledger stores it: `free` at `at` (seconds since the
    epoch), with the services whose reservations it already showed as used (`loaded`:
    loaded before the command ran, and still when the result was recorded)."""

    free: int
    at: float
    loaded: tuple[str, ...]

    def as_json(self) -> dict[str, object]:
        return {"free": self.free, "at": self.at, "loaded": list(self.loaded)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Measurement:
        loaded = data["loaded"]
        if not isinstance(loaded, list) or not all(isinstance(n, str) for n in loaded):
            raise ValueError("a measurement's loaded services are not a list of names")
        return cls(int(data["free"]), float(data["at"]), tuple(loaded))


def held_outside(
    available: Mapping[str, int],
    measurements: Mapping[str, Measurement],
    reserved: Mapping[str, Mapping[str, int]],
) -> dict[str, int]:
    """What programs other than lmproxy's models hold of each measured resource, for
    the lifecycle (World.outside), given what each service reserves now.

    What is free is then what was measured free, less the reservations of services
    that were not loaded when it was measured (they may not be using their memory yet):
    free = available - reserved now - outside. A loaded service that stopped since
    gives nothing back until the next measurement shows it back."""
    outside = {}
    for resource, measurement in measurements.items():
        if resource not in available:
            continue
        shown = sum(reserved.get(name, {}).get(resource, 0) for name in measurement.loaded)
        held = available[resource] - measurement.free - shown
        if held > 0:
            outside[resource] = held
    return outside


def _gpu_free(gpu: str) -> int:
    from lmproxy.nvml import NvmlError, session

    try:
        with session() as nvml:
            return nvml.reading(gpu).free_mib
    except NvmlError as error:
        raise CheckError(str(error)) from None
