"""Which of a GGUF model's layers go to which GPU: a pure planner, GPUs and layer sizes in,
a plan out, following llama.cpp's own placement (`../shared/docs/peers.md`):

- With `-ngl N` llama.cpp offloads the **last** N layers; the first ones stay on the CPU.
- The output layer counts as layer `n_layer`, and lands on the last GPU of the split.
- The token embedding stays on the CPU.
- `--tensor-split` gives each device's share as proportions of the offloaded layers
  (the output counted as one more): layer i goes to the first device whose running
  share exceeds i / (N + 1). Integer counts are exact proportions, so the plan gives
  them as counts.

The plan offloads as many layers as fit: for each device, in the order given (most free
memory first by default, seed 004's ordering, with CUDA_VISIBLE_DEVICES in that order), a
budget of its free memory less a reserve (devices under a minimum budget are left out);
the offloaded layers fill the devices in turn, each layer with its KV cache for the
context size, and the last one with the output layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MIB = 2**20
ORDERS = ("free_desc", "total_desc", "index")


@dataclass(frozen=True)
class Device:
    index: int  # as NVML (and CUDA without CUDA_VISIBLE_DEVICES) numbers it
    name: str
    free_mib: int
    total_mib: int


@dataclass(frozen=True)
class Share:
    device: Device
    budget_mib: int
    first: int  # the first layer it holds
    count: int  # how many layers
    output: bool  # whether it holds the output layer
    used_bytes: int  # its layers, their KV cache, and the output layer

    @property
    def used_mib(self) -> float:
        return self.used_bytes / MIB

    @property
    def percent(self) -> float:
        return 100 * self.used_mib / self.budget_mib if self.budget_mib else 0.0


@dataclass(frozen=True)
class LayerPlan:
    n_layer: int
    shares: tuple[Share, ...]  # the devices that hold layers, in the split's order
    left_out: tuple[Device, ...]  # under the minimum budget, or not asked for

    @property
    def offloaded(self) -> int:
        """The model's layers on GPUs."""
        return sum(share.count for share in self.shares)

    @property
    def n_gpu_layers(self) -> int:
        """llama.cpp's `-ngl`, which counts the output layer as one more."""
        return self.offloaded + 1 if self.offloaded else 0

    @property
    def cpu_layers(self) -> int:
        return self.n_layer - self.offloaded

    @property
    def tensor_split(self) -> str:
        """`--tensor-split`: each device's share of the offloaded layers, the output
        layer counted with the last one."""
        return ",".join(str(share.count + int(share.output)) for share in self.shares)

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(str(share.device.index) for share in self.shares)


def arrange(
    devices: Sequence[Device], order: str = "free_desc", only: Sequence[int] | None = None
) -> list[Device]:
    """The devices to use, in the split's order: most free first (`free_desc`), most
    memory first (`total_desc`), or by `index`; `only`: these indices alone."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
    chosen = [d for d in devices if only is None or d.index in only]
    keys = {
        "free_desc": lambda d: (-d.free_mib, d.index),
        "total_desc": lambda d: (-d.total_mib, d.index),
        "index": lambda d: (d.index, 0),
    }
    return sorted(chosen, key=keys[order])


def budgets(
    devices: Sequence[Device], reserve_mib: int, min_budget_mib: int
) -> tuple[list[tuple[Device, int]], list[Device]]:
    """Each device's budget (free less the reserve), and the devices left out for
    having less than min_budget_mib."""
    kept, left = [], []
    for device in devices:
        budget = device.free_mib - reserve_mib
        if budget >= max(min_budget_mib, 1):
            kept.append((device, budget))
        else:
            left.append(device)
    return kept, left


def plan(
    layer_bytes: Sequence[int],
    output_bytes: int,
    kv_bytes: Sequence[int],
    devices: Sequence[Device],
    *,
    reserve_mib: int = 1024,
    min_budget_mib: int = 1024,
) -> LayerPlan:
    """The plan that offloads the most layers. layer_bytes and kv_bytes: each layer's
    weights and its KV cache for the context, in bytes; devices in the split's order."""
    if len(kv_bytes) != len(layer_bytes):
        raise ValueError("one KV cache size per layer")
    kept, left = budgets(devices, reserve_mib, min_budget_mib)
    n_layer = len(layer_bytes)
    costs = [w + k for w, k in zip(layer_bytes, kv_bytes, strict=True)]
    for offloaded in range(n_layer, 0, -1):
        shares = _fill(costs, n_layer - offloaded, output_bytes, kept)
        if shares is not None:
            return LayerPlan(n_layer, shares, tuple(left))
    return LayerPlan(n_layer, (), tuple(left))


def _fill(
    costs: Sequence[int], first: int, output_bytes: int, kept: Sequence[tuple[Device, int]]
) -> tuple[Share, ...] | None:
    """Layers first.. onto the devices in turn (the last layer with the output), or
    None when they do not fit."""
    shares: list[Share] = []
    slot, start, used = 0, first, 0
    last = len(costs) - 1
    for layer in range(first, len(costs)):
        cost = costs[layer] + (output_bytes if layer == last else 0)
        while slot < len(kept) and used + cost > kept[slot][1] * MIB:
            if layer > start:
                shares.append(
                    Share(kept[slot][0], kept[slot][1], start, layer - start, False, used)
                )
            slot, start, used = slot + 1, layer, 0
        if slot == len(kept):
            return None
        used += cost
    device, budget = kept[slot]
    shares.append(Share(device, budget, start, len(costs) - start, True, used))
    return tuple(shares)


def budget_split(devices: Sequence[Device], reserve_mib: int, min_budget_mib: int) -> str:
    """Without a model (`lmproxy plan`): each device's share in proportion to its budget,
    as llama.cpp splits by free memory when not told."""
    kept, _ = budgets(devices, reserve_mib, min_budget_mib)
    total = sum(budget for _, budget in kept)
    return ",".join(f"{budget / total:.2f}" for _, budget in kept) if total else ""
