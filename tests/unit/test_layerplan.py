"""The layer planner against llama.cpp's own placement rules, on examples and on generated
models and GPUs."""

from __future__ import annotations

import bisect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmproxy.layerplan import MIB, Device, LayerPlan, _fill, arrange, budgets, plan

GPU = [
    Device(0, "RTX 4080 Laptop", 11047, 12281),
    Device(1, "RTX 3090 Ti", 23287, 24563),
    Device(2, "RTX 3090 Ti", 23287, 24563),
]


def llama_cpp_devices(split: str, offloaded: int, n_layer: int) -> list[int | None]:
    """Where llama.cpp puts each layer (None: the CPU) and the output layer (last), given
    --tensor-split and -ngl: the last `offloaded` layers, by the split's running share."""
    shares = [int(x) for x in split.split(",")]
    total = sum(shares)
    running, cumulative = 0, []
    for share in shares:
        running += share
        cumulative.append(running / total)
    start = n_layer - offloaded
    where: list[int | None] = []
    for layer in range(n_layer + 1):
        if layer < start:
            where.append(None)
        else:
            where.append(bisect.bisect_right(cumulative, (layer - start) / (offloaded + 1)))
    return where


def test_seed_004s_machine_fills_the_gpus_most_free_first() -> None:
    """80 layers of about 605 MiB, 1 GiB reserve: 3090s first (most free), the 4080 last."""
    devices = arrange(GPU, "free_desc")
    assert [d.index for d in devices] == [1, 2, 0]
    layers = [605 * MIB] * 80
    result = plan(layers, 800 * MIB, [0] * 80, devices)
    assert [(s.device.index, s.first, s.count, s.output) for s in result.shares] == [
        (1, 0, 36, False),
        (2, 36, 36, False),
        (0, 72, 8, True),
    ]
    assert result.offloaded == 80 and result.cpu_layers == 0
    assert result.tensor_split == "36,36,9" and result.cuda_visible_devices == "1,2,0"


def test_what_does_not_fit_stays_on_the_cpu_from_the_first_layer() -> None:
    result = plan([1000 * MIB] * 10, 100 * MIB, [0] * 10, [Device(0, "small", 5024, 8192)])
    assert result.offloaded == 3 and result.cpu_layers == 7  # 4000 MiB budget, +output
    [share] = result.shares
    assert (share.first, share.count, share.output) == (7, 3, True)


def test_the_kv_cache_counts_and_small_gpus_are_left_out() -> None:
    devices = [Device(0, "big", 9216, 9216), Device(1, "tiny", 1500, 2048)]
    result = plan([1000 * MIB] * 8, 0, [1000 * MIB] * 8, devices, min_budget_mib=1024)
    assert result.left_out == (devices[1],)  # 476 MiB budget
    assert result.offloaded == 4  # 8192 MiB budget: 4 layers with their KV cache


def test_orders_and_device_choice() -> None:
    assert [d.index for d in arrange(GPU, "index", only=[2, 0])] == [0, 2]
    assert [d.index for d in arrange(GPU, "total_desc")] == [1, 2, 0]
    with pytest.raises(ValueError, match="order must be one of"):
        arrange(GPU, "random")
    kept, left = budgets(GPU, reserve_mib=22000, min_budget_mib=1024)
    assert [d.index for d, _ in kept] == [1, 2] and [d.index for d in left] == [0]


models = st.lists(st.integers(1, 3000), min_size=1, max_size=60)
gpus = st.lists(
    st.builds(lambda free: Device(0, "g", free, free + 500), st.integers(0, 40000)),
    min_size=1,
    max_size=4,
).map(lambda ds: [Device(i, d.name, d.free_mib, d.total_mib) for i, d in enumerate(ds)])


@settings(max_examples=400, deadline=None)
@given(layers=models, output=st.integers(0, 3000), kv=st.integers(0, 500), devices=gpus)
def test_any_plan_is_where_llama_cpp_puts_the_layers_within_budgets_and_maximal(
    layers: list[int], output: int, kv: int, devices: list[Device]
) -> None:
    layer_bytes = [mib * MIB for mib in layers]
    kv_bytes = [kv * MIB] * len(layers)
    result: LayerPlan = plan(layer_bytes, output * MIB, kv_bytes, devices, reserve_mib=512)
    n = len(layers)
    for share in result.shares:
        assert share.used_bytes <= share.budget_mib * MIB
        assert share.count > 0
    if result.offloaded:
        where = llama_cpp_devices(result.tensor_split, result.offloaded, n)
        planned: list[int | None] = [None] * (n - result.offloaded)
        for slot, share in enumerate(result.shares):
            planned += [slot] * share.count
        assert where[:n] == planned
        assert where[n] == len(result.shares) - 1  # the output layer: the last GPU
        assert result.shares[-1].output
    # Maximal: one layer more does not fit.
    if result.offloaded < n:
        kept, _ = budgets(devices, 512, 1024)
        costs = [w + k for w, k in zip(layer_bytes, kv_bytes, strict=True)]
        assert _fill(costs, n - result.offloaded - 1, output * MIB, kept) is None
