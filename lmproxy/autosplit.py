"""`"TensorSplit": "auto"`: a llama.cpp model's layers split across the GPUs by their free
memory at each start (issue 15; seed 004's reordering).

Before its shim starts the backend, it reads the model file's layers (lmproxy.gguf_layers)
and the GPUs' free memory (lmproxy.nvml), plans the split (lmproxy.layerplan: most free
first), and writes what the backend unit takes from its EnvironmentFile: the arguments
for llama-server (`--tensor-split COUNTS --n-gpu-layers N`, in LMPROXY_SPLIT_ARGS, which
its ExecStart ends with as `$LMPROXY_SPLIT_ARGS`) and CUDA_VISIBLE_DEVICES in the split's
order. The file holds only digits, commas and those option names, whatever the model or
the GPUs: no path into the unit. Where the split cannot be computed (no NVML, no gguf, a
file it cannot read) the file is left empty and llama.cpp splits by itself, as without
TensorSplit; the start goes on.
"""

from __future__ import annotations

from pathlib import Path

from lmproxy import unitnames
from lmproxy.config import Service
from lmproxy.files import write_atomically
from lmproxy.journal import Logger

SPLIT_VARIABLE = "LMPROXY_SPLIT_ARGS"
DEFAULT_CONTEXT = 4096  # llama-server's -c when its Args give none
RESERVE_MIB = 1024


def split_file(runtime_dir: Path, service: str) -> Path:
    return runtime_dir / "split" / f"{unitnames.component(service)}.env"


def unit_split_file(service: str) -> str:
    """The same file as the backend unit names it: %t is the manager's runtime directory
    (XDG_RUNTIME_DIR for a user manager, /run for the system's); "-": it may be missing."""
    return f"-%t/lmproxy/split/{unitnames.component(service)}.env"


def environment(service: Service) -> str:
    """The backend's split, as its EnvironmentFile's lines."""
    from lmproxy import layerplan
    from lmproxy.gguf_layers import read_layers
    from lmproxy.nvml import session

    assert service.split_model is not None
    layers = read_layers(service.split_model)
    with session() as nvml:
        readings = nvml.readings()
    devices = layerplan.arrange(
        [
            layerplan.Device(r.facts.index, r.facts.name, r.free_mib, r.facts.total_mib)
            for r in readings
        ]
    )
    context = service.split_context or DEFAULT_CONTEXT
    kv = [layers.kv_bytes(i, context) for i in range(len(layers.layers))]
    plan = layerplan.plan(layers.layers, layers.output_bytes, kv, devices, reserve_mib=RESERVE_MIB)
    if not plan.shares:
        return f"{SPLIT_VARIABLE}=--n-gpu-layers 0\n"
    arguments = f"--tensor-split {plan.tensor_split} --n-gpu-layers {plan.n_gpu_layers}"
    return f"{SPLIT_VARIABLE}={arguments}\nCUDA_VISIBLE_DEVICES={plan.cuda_visible_devices}\n"


def prepare(service: Service, runtime_dir: Path, log: Logger) -> None:
    """Writes the backend's split before its start, and says what it is."""
    from lmproxy.gguf_layers import GgufError
    from lmproxy.nvml import NvmlError

    path = split_file(runtime_dir, service.name)
    try:
        text = environment(service)
    except (GgufError, NvmlError, OSError) as error:
        log.warning(
            f"cannot split {service.name} across the GPUs ({error}): llama.cpp splits by itself",
            event="split-failed",
        )
        text = ""
    else:
        said = " ".join(line.partition("=")[2] for line in reversed(text.splitlines()))
        log.info(f"split {service.name}: CUDA_VISIBLE_DEVICES={said}", event="split")
    path.parent.mkdir(mode=0o755, exist_ok=True)
    write_atomically(path, text.encode(), 0o644)
