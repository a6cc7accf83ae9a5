"""lmproxy analyze MODEL.gguf and lmproxy plan: how a model's layers (or any model's) would
be split across the GPUs, with the --tensor-split for llama.cpp (seed 004's commands)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from lmproxy.commands.common import fail

F = TypeVar("F", bound=Callable[..., Any])


def _indices(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(part) for part in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected GPU indices such as 0,2, got {value!r}") from None


def _amounts(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        amounts = [int(part) for part in value.split(",")]
    except ValueError:
        amounts = [-1]
    if any(amount < 0 for amount in amounts):
        raise click.BadParameter(f"expected free MiB per GPU such as 23000,11000, got {value!r}")
    return amounts


def gpu_options(function: F) -> F:
    """The options both commands take about the GPUs."""
    for option in reversed(
        [
            click.option("--reserve-mib", type=click.IntRange(min=0), default=1024,
                         show_default=True, help="What each GPU keeps free (compute buffers)."),
            click.option("--min-budget-mib", type=click.IntRange(min=0), default=1024,
                         show_default=True, help="Leave out a GPU with less than this to give."),
            click.option("--devices", callback=_indices, metavar="0,2",
                         help="Use these GPUs only (NVML's indices)."),
            click.option("--order", type=click.Choice(["free_desc", "total_desc", "index"]),
                         default="free_desc", show_default=True,
                         help="The split's order (CUDA_VISIBLE_DEVICES' too)."),
            click.option("--free", "free", callback=_amounts, metavar="MiB,MiB,...",
                         help="Plan for GPUs given by hand (another machine, or no NVML)."),
            click.option("--json", "as_json", is_flag=True, help="Print a JSON document."),
        ]
    ):  # fmt: skip
        function = option(function)
    return function


def _devices(free: list[int] | None) -> list[Any]:
    from lmproxy.layerplan import Device
    from lmproxy.nvml import NvmlError, session

    if free is not None:
        return [Device(i, f"GPU {i} (given)", mib, mib) for i, mib in enumerate(free)]
    try:
        with session() as nvml:
            return [
                Device(r.facts.index, r.facts.name, r.free_mib, r.facts.total_mib)
                for r in nvml.readings()
            ]
    except NvmlError as error:
        fail(f"{error} (or give the GPUs' free memory with --free)")
        return []


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--ctx-size", type=click.IntRange(min=0), default=4096, show_default=True,
              help="The context whose KV cache (f16) each GPU holds for its layers.")  # fmt: skip
@gpu_options
def analyze(model: str, ctx_size: int, **options: Any) -> None:
    """Read MODEL.gguf's layer sizes from its tensor table (no weight is loaded) and plan
    them across the GPUs as llama.cpp places them: the last layers offloaded first, the
    output layer on the last GPU, the token embedding on the CPU. Prints the plan with
    the --tensor-split, -ngl and CUDA_VISIBLE_DEVICES for llama-server.

    Needs the gguf package (`pip install gguf`), and NVML unless --free is given."""
    from lmproxy import layerplan
    from lmproxy.gguf_layers import GgufError, read_layers

    try:
        layers = read_layers(model)
    except GgufError as error:
        fail(str(error))
        return
    devices = layerplan.arrange(_devices(options["free"]), options["order"], options["devices"])
    kv = [layers.kv_bytes(i, ctx_size) for i in range(len(layers.layers))]
    result = layerplan.plan(
        layers.layers,
        layers.output_bytes,
        kv,
        devices,
        reserve_mib=options["reserve_mib"],
        min_budget_mib=options["min_budget_mib"],
    )
    if options["as_json"]:
        click.echo(json.dumps(_analysis_json(layers, ctx_size, devices, result), indent=2))
    else:
        click.echo(_analysis_text(layers, ctx_size, devices, result))


@click.command()
@gpu_options
def plan(**options: Any) -> None:
    """Show each GPU's budget (free memory less the reserve), in the split's order, and
    the --tensor-split that shares a model in proportion to them, without a model.

    Needs NVML unless --free is given."""
    from lmproxy import layerplan

    devices = layerplan.arrange(_devices(options["free"]), options["order"], options["devices"])
    kept, left = layerplan.budgets(devices, options["reserve_mib"], options["min_budget_mib"])
    split = layerplan.budget_split(devices, options["reserve_mib"], options["min_budget_mib"])
    if options["as_json"]:
        document = {
            "gpus": [
                {"index": d.index, "name": d.name, "free_mib": d.free_mib, "budget_mib": b}
                for d, b in kept
            ],
            "left_out": [d.index for d in left],
            "tensor_split": split,
            "cuda_visible_devices": ",".join(str(d.index) for d, _ in kept),
        }
        click.echo(json.dumps(document, indent=2))
        return
    lines = _gpu_lines(devices)
    lines += [f"  GPU {d.index}: budget {b:,} MiB" for d, b in kept]
    lines += [f"  GPU {d.index}: left out (under the minimum budget)" for d in left]
    if split:
        lines.append(f'TENSOR SPLIT: --tensor-split "{split}"')
        lines.append(f"CUDA_VISIBLE_DEVICES={','.join(str(d.index) for d, _ in kept)}")
    click.echo("\n".join(lines))


def _gpu_lines(devices: list[Any]) -> list[str]:
    lines = ["GPUs, in the split's order:"]
    lines += [
        f"  GPU {d.index}: {d.name} - {d.free_mib:,} / {d.total_mib:,} MiB free" for d in devices
    ]
    return lines


def _analysis_text(layers: Any, ctx_size: int, devices: list[Any], result: Any) -> str:
    sizes = [b / 2**20 for b in layers.layers]
    lines = [
        f"Model: {layers.path}",
        f"  Size: {layers.size_bytes / 2**30:.2f} GiB ({layers.architecture or 'unknown'})",
        f"  Layers: {len(sizes)}",
        f"  Layer size: average {sum(sizes) / len(sizes):,.2f} MiB, "
        f"range {min(sizes):,.2f} - {max(sizes):,.2f} MiB",
        f"  Output layer: {layers.output_bytes / 2**20:,.2f} MiB; token embedding (CPU): "
        f"{layers.embedding_bytes / 2**20:,.2f} MiB",
        f"  KV cache for {ctx_size} tokens: "
        f"{sum(layers.kv_bytes(i, ctx_size) for i in range(len(sizes))) / 2**20:,.2f} MiB",
        *_gpu_lines(devices),
        "Plan:",
    ]
    for share in result.shares:
        last = share.first + share.count - 1
        output = " + output" if share.output else ""
        lines.append(
            f"  GPU {share.device.index}: {share.count:3} layers (#{share.first}-{last}){output}"
            f" | {share.used_mib:,.0f} / {share.budget_mib:,} MiB ({share.percent:.1f}%)"
        )
    if result.cpu_layers:
        lines.append(
            f"  CPU: {result.cpu_layers} layers (#0-{result.cpu_layers - 1}): they do not fit"
        )
    if result.shares:
        lines.append(
            f'TENSOR SPLIT: --tensor-split "{result.tensor_split}" -ngl {result.n_gpu_layers}'
        )
        lines.append(f"CUDA_VISIBLE_DEVICES={result.cuda_visible_devices}")
    else:
        lines.append("Nothing fits on the GPUs: the model runs on the CPU")
    return "\n".join(lines)


def _analysis_json(layers: Any, ctx_size: int, devices: list[Any], result: Any) -> dict[str, Any]:
    return {
        "model": {
            "path": layers.path,
            "size_bytes": layers.size_bytes,
            "architecture": layers.architecture,
            "layers": len(layers.layers),
            "layer_bytes": list(layers.layers),
            "output_bytes": layers.output_bytes,
            "embedding_bytes": layers.embedding_bytes,
            "context_size": ctx_size,
            "kv_bytes": sum(layers.kv_bytes(i, ctx_size) for i in range(len(layers.layers))),
        },
        "gpus": [
            {"index": d.index, "name": d.name, "free_mib": d.free_mib, "total_mib": d.total_mib}
            for d in devices
        ],
        "plan": [
            {
                "gpu": s.device.index,
                "first_layer": s.first,
                "layers": s.count,
                "output": s.output,
                "used_mib": round(s.used_mib, 1),
                "budget_mib": s.budget_mib,
                "percent": round(s.percent, 1),
            }
            for s in result.shares
        ],
        "cpu_layers": result.cpu_layers,
        "tensor_split": result.tensor_split,
        "n_gpu_layers": result.n_gpu_layers,
        "cuda_visible_devices": result.cuda_visible_devices,
    }
