"""NVML readings (through the fake binding, tests/fakes/pynvml.py) and `lmproxy gpus`'
attribution of GPU memory to lmproxy's models through their cgroups."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmproxy import gpus, nvml
from lmproxy.nvml import GpuFacts, GpuProcess, GpuReading, NvmlError
from tests.fakes import pynvml as fake

A100 = {"name": "NVIDIA A100", "uuid": "GPU-aaaaaaaa-0000", "total_mib": 40960, "used_mib": 30000}
L4 = {"name": "NVIDIA L4", "uuid": "GPU-bbbbbbbb-0000", "total_mib": 23034, "used_mib": 1000}


@pytest.fixture
def nvml_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The fake binding in place of pynvml, reading the GPUs from a file."""
    state = tmp_path / "nvml.json"
    monkeypatch.setenv("FAKE_NVML", str(state))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    yield state


def write(state: Path, *gpu_list: dict[str, Any], driver: bool = True) -> None:
    state.write_text(json.dumps({"driver": driver, "gpus": list(gpu_list)}))


def test_readings_in_mib_with_their_processes(nvml_state: Path) -> None:
    write(
        nvml_state,
        {**A100, "utilization": 87, "processes": [{"pid": 9, "used_mib": 29000}, {"pid": 4}]},
        {**L4, "utilization": None},
    )
    with nvml.session() as session:
        a100, l4 = session.readings()
        assert session.reading("GPU-bbbbbbbb-0000") == l4
        assert session.reading("0") == a100
        with pytest.raises(NvmlError, match="there is no GPU '7'"):
            session.reading("7")
    assert a100 == GpuReading(
        GpuFacts(0, "GPU-aaaaaaaa-0000", "NVIDIA A100", 40960),
        used_mib=30000,
        free_mib=10960,
        utilization_percent=87,
        processes=(GpuProcess(4, None), GpuProcess(9, 29000)),
    )
    assert l4.utilization_percent is None  # not supported there: no reading, no failure
    assert [r.facts.index for r in gpus.by_free_memory([a100, l4])] == [1, 0]


def test_without_the_binding_or_the_driver_one_clear_message(
    nvml_state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(nvml_state, A100, driver=False)
    with pytest.raises(NvmlError, match="no NVIDIA driver is loaded"), nvml.session():
        pass
    blocked: Any = None  # in sys.modules, None makes `import pynvml` raise ImportError
    monkeypatch.setitem(sys.modules, "pynvml", blocked)
    with pytest.raises(NvmlError, match="pip install nvidia-ml-py"), nvml.session():
        pass


def fake_proc(root: Path, pid: int, cgroup: str, argv: list[str]) -> None:
    folder = root / str(pid)
    folder.mkdir(parents=True)
    (folder / "cgroup").write_text(f"0::{cgroup}\n")
    (folder / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def test_memory_is_attributed_to_models_through_their_cgroups(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    user = "/user.slice/user-1000.slice/user@1000.service/lmproxy.slice"
    fake_proc(proc, 10, f"{user}/lmproxy-backend@Qwen_Qwen2.5-7B-Instruct-1bb1e77d.service",
              ["llama-server", "-m", "qwen.gguf"])  # fmt: skip
    fake_proc(proc, 11, f"{user}/lmproxy-backend@gone.service", ["vllm", "serve"])
    fake_proc(proc, 12, "/user.slice/user-1000.slice/session-3.scope", ["python3", "train.py"])
    reading = GpuReading(
        GpuFacts(0, "GPU-aaaaaaaa-0000", "A100", 40960),
        30000,
        10960,
        None,
        (GpuProcess(10, 20000), GpuProcess(11, 5000), GpuProcess(12, 4000), GpuProcess(13, 1)),
    )
    held = gpus.holders(reading, ["Qwen/Qwen2.5-7B-Instruct", "other"], str(proc))
    assert [(h.pid, h.service) for h in held] == [
        (10, "Qwen/Qwen2.5-7B-Instruct"),
        (11, "lmproxy-backend@gone.service"),  # not configured now: its unit
        (12, None),
        (13, None),
    ]
    assert held[2].command == "python3 train.py"
    assert held[3].command == "(gone, or not visible to this user)"
    text = gpus.as_text([reading], {0: held})
    assert "20000 MiB  pid 10       Qwen/Qwen2.5-7B-Instruct" in text
    assert "4000 MiB  pid 12       outside lmproxy: python3 train.py" in text
    used = gpus.used_by_service([reading], ["Qwen/Qwen2.5-7B-Instruct"], str(proc))
    assert used["Qwen/Qwen2.5-7B-Instruct"] == {0: 20000}


def test_install_settles_auto_amounts_and_refuses_what_cannot_fit(nvml_state: Path) -> None:
    from lmproxy.config import ConfigError, parse_config
    from lmproxy.gpuresources import settle

    write(nvml_state, A100, L4)
    document = {
        "ResourcesAvailable": {
            "VRAM-GPU-0": {"Gpu": "0", "Amount": "auto"},
            "VRAM-GPU-1": {"Gpu": "GPU-bbbbbbbb-0000", "Amount": 20000},
        },
        "Services": [
            {"Name": "m", "ListenPort": 1, "ProxyTargetPort": 2, "Command": "/bin/true",
             "ResourceRequirements": {"VRAM-GPU-0": 39000, "VRAM-GPU-1": 20000}},
        ],
    }  # fmt: skip
    config, amounts = settle(parse_config(json.dumps(document), Path("/srv")), reserve_mib=1024)
    assert amounts == {"VRAM-GPU-0": 40960 - 1024}
    assert config.resources_available == {"VRAM-GPU-0": 39936, "VRAM-GPU-1": 20000}
    with pytest.raises(ConfigError) as refused:
        settle(parse_config(json.dumps(document), Path("/srv")), reserve_mib=4096)
    assert refused.value.problems == [
        (
            "$.Services[0].ResourceRequirements.VRAM-GPU-0",
            "needs 39000 of 'VRAM-GPU-0' but its GPU has 36864 MiB "
            "(its total less the 4096 MiB reserve)",
        )
    ]
    plain = parse_config(json.dumps({"ResourcesAvailable": {"RAM": 1}}), Path("/srv"))
    write(nvml_state, driver=False)
    assert settle(plain) == (plain, {})  # no GPU resource: NVML is not even asked


def test_backends_are_found_through_the_cgroup_tree_where_proc_hides_them(
    tmp_path: Path,
) -> None:
    """A shim under the system manager sees no other user's /proc entries: the backends'
    cgroups, siblings of its own, say which processes are theirs."""
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("0::/lmproxy.slice/lmproxy-a.service\n")
    backend = cgroups / "lmproxy.slice" / "lmproxy-backend@a.service"
    (backend / "child").mkdir(parents=True)
    (backend / "cgroup.procs").write_text("123\n124\n")
    (backend / "child" / "cgroup.procs").write_text("125\n")
    pids = gpus.backend_pids(["a", "b"], str(proc), str(cgroups))
    assert pids == {123: "a", 124: "a", 125: "a"}
    reading = GpuReading(
        GpuFacts(0, "GPU-aaaaaaaa-0000", "A100", 40960),
        30000,
        10960,
        None,
        (GpuProcess(124, 20000), GpuProcess(999, 4000)),
    )
    held = gpus.holders(reading, ["a"], str(proc), known=pids)
    assert [(h.pid, h.service) for h in held] == [(124, "a"), (999, None)]
    (proc / "self" / "cgroup").write_text("0::/user.slice/session-1.scope\n")
    assert gpus.backend_pids(["a"], str(proc), str(cgroups)) == {}  # not in a shim's unit
