"""A fake of NVIDIA's NVML binding (PyPI nvidia-ml-py, `pynvml`): the functions lmproxy
calls, with their names, arguments and results' shapes (tests/unit/test_nvml.py checks
them against the real binding where it is installed), reading the GPUs from the JSON
file that $FAKE_NVML names, at every call, so that a test changes them as it goes:

    {"driver": true, "gpus": [{"name": "...", "uuid": "GPU-...", "total_mib": 24576,
      "used_mib": 1000, "utilization": 5, "processes": [{"pid": 1234, "used_mib": 900}]}]}

Put this folder first on PYTHONPATH (or in sys.modules) to use it.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

MIB = 2**20


class NVMLError(Exception):
    pass


def _state() -> dict[str, Any]:
    with open(os.environ["FAKE_NVML"], encoding="utf-8") as file:
        state: dict[str, Any] = json.load(file)
    if not state.get("driver", True):
        raise NVMLError("Driver Not Loaded")
    return state


def _gpu(handle: int) -> dict[str, Any]:
    gpu: dict[str, Any] = _state()["gpus"][handle]
    return gpu


def nvmlInit() -> None:  # noqa: N802 (the binding's names, throughout)
    _state()


def nvmlShutdown() -> None:  # noqa: N802
    pass


def nvmlDeviceGetCount() -> int:  # noqa: N802
    return len(_state()["gpus"])


def nvmlDeviceGetHandleByIndex(index: int) -> int:  # noqa: N802
    if not 0 <= index < nvmlDeviceGetCount():
        raise NVMLError("Invalid Argument")
    return index


def nvmlDeviceGetName(handle: int) -> str:  # noqa: N802
    return str(_gpu(handle)["name"])


def nvmlDeviceGetUUID(handle: int) -> str:  # noqa: N802
    return str(_gpu(handle)["uuid"])


def nvmlDeviceGetMemoryInfo(handle: int, version: int | None = None) -> SimpleNamespace:  # noqa: N802
    gpu = _gpu(handle)
    total, used = gpu["total_mib"] * MIB, gpu["used_mib"] * MIB
    return SimpleNamespace(total=total, used=used, free=total - used)


def nvmlDeviceGetUtilizationRates(handle: int) -> SimpleNamespace:  # noqa: N802
    gpu = _gpu(handle)
    if gpu.get("utilization") is None:
        raise NVMLError("Not Supported")
    return SimpleNamespace(gpu=gpu["utilization"], memory=0)


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[SimpleNamespace]:  # noqa: N802
    return [
        SimpleNamespace(
            pid=p["pid"],
            usedGpuMemory=None if p.get("used_mib") is None else p["used_mib"] * MIB,
        )
        for p in _gpu(handle).get("processes", [])
    ]
