"""`lmproxy gpus` (issue 15) against real models' processes: NVML is faked at the binding
(tests/fakes/pynvml.py, itself checked here against NVIDIA's real binding), and the
processes it lists are real: a backend under the sandboxed systemd, found through its
cgroup, and one outside lmproxy."""

from __future__ import annotations

import concurrent.futures
import inspect
import json
import os
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path

from lmproxy.render import current_interpreter
from lmproxy.sandbox import Sandbox
from tests.e2e.helpers import (
    fake_model,
    free_port,
    http_get,
    install,
    journal,
    lmproxy,
    service_state,
    status_json,
    turned_away,
    wait_for,
    write_config,
)
from tests.e2e.real_backends import openai_python
from tests.fakes import pynvml as fake

FAKES = Path(__file__).resolve().parents[1] / "fakes"
CHECKOUT = Path(__file__).resolve().parents[2]


def gpus(sandbox: Sandbox, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return with_fake_nvml(sandbox, state, "gpus", "--user", *args)


def test_gpus_sorted_by_free_memory_with_models_named_and_the_rest_outside(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    port = free_port()
    install(systemd_sandbox, _config(tmp_path, port))
    backend_pid = http_get(port)["pid"]
    state = tmp_path / "nvml.json"
    gpu0 = {"name": "NVIDIA L4", "uuid": "GPU-0000", "total_mib": 23034, "used_mib": 21000,
            "utilization": 91,
            "processes": [{"pid": backend_pid, "used_mib": 18000},
                          {"pid": os.getpid(), "used_mib": 3000}]}  # fmt: skip
    gpu1 = {"name": "NVIDIA L4", "uuid": "GPU-1111", "total_mib": 23034, "used_mib": 500}
    state.write_text(json.dumps({"gpus": [gpu0, gpu1]}))

    result = gpus(systemd_sandbox, state)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "GPU 1  NVIDIA L4  GPU-1111"  # most free first
    assert "used 21000 / total 23034 MiB, free 2034 MiB, utilization 91%" in result.stdout
    assert f"18000 MiB  pid {backend_pid:<7}  Qwen/Qwen2.5-7B-Instruct" in result.stdout
    assert f"3000 MiB  pid {os.getpid():<7}  outside lmproxy: " in result.stdout

    document = json.loads(gpus(systemd_sandbox, state, "--json").stdout)
    [first, second] = document["gpus"]
    assert first["uuid"] == "GPU-1111" and first["processes"] == []
    services = {p["pid"]: p["service"] for p in second["processes"]}
    assert services == {backend_pid: "Qwen/Qwen2.5-7B-Instruct", os.getpid(): None}

    state.write_text(json.dumps({"driver": False, "gpus": []}))
    refused = gpus(systemd_sandbox, state)
    assert refused.returncode == 1
    assert "no NVIDIA driver is loaded on this machine" in refused.stderr


def _config(tmp_path: Path, port: int) -> Path:
    return write_config(tmp_path / "config.json", [fake_model("Qwen/Qwen2.5-7B-Instruct", port)])


# What the fake offers, as the real binding's functions take it: their parameters.
SIGNATURES = r"""
import inspect, json, pynvml, sys
names = json.loads(sys.argv[1])
print(json.dumps({n: list(inspect.signature(getattr(pynvml, n)).parameters) for n in names}))
"""

NO_DRIVER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from lmproxy import nvml
try:
    with nvml.session() as session:
        print("readings", len(session.readings()))
except nvml.NvmlError as error:
    print("refused", error)
"""


def test_the_fake_binding_is_the_real_ones_shape_and_the_real_one_is_understood() -> None:
    python = openai_python()  # the tests' client venv has nvidia-ml-py (tools/real-backends)
    functions = [name for name, value in vars(fake).items() if name.startswith("nvml")]
    real = subprocess.run(
        [str(python), "-c", SIGNATURES, json.dumps(functions)],
        capture_output=True,
        text=True,
        check=True,
    )
    for name, parameters in json.loads(real.stdout).items():
        assert list(inspect.signature(getattr(fake, name)).parameters) == parameters, name
    answer = subprocess.run(
        [str(python), "-c", NO_DRIVER, str(CHECKOUT)], capture_output=True, text=True, check=True
    ).stdout
    if Path("/proc/driver/nvidia").exists():
        assert answer.startswith("readings"), answer
    else:  # the real binding, without a driver: one clear message
        assert answer.startswith("refused NVML cannot start"), answer
        assert "no NVIDIA driver is loaded" in answer


# --- GPU resources: NVML's free memory bounds admission (issue 15, points 2, 3 and 7) -------


def fake_nvml_for_shims(sandbox: Sandbox, tmp_path: Path, state: Path) -> Path:
    """The fake binding where the shims' Python finds a user's own packages (the user
    base of the manager's environment), reading state: what `pip install --user
    nvidia-ml-py` would give them on a real machine."""
    userbase = tmp_path / "userbase"
    site = Path(sysconfig.get_path("purelib", "posix_user", vars={"userbase": str(userbase)}))
    site.mkdir(parents=True)
    shutil.copy(FAKES / "pynvml.py", site / "pynvml.py")
    result = sandbox.systemctl(
        "set-environment", f"PYTHONUSERBASE={userbase}", f"FAKE_NVML={state}"
    )
    assert result.returncode == 0, result.stderr
    return site


def nvml_state(state: Path, used_mib: int, *pids: int) -> None:
    processes = [{"pid": pid, "used_mib": used_mib // len(pids)} for pid in pids]
    gpu = {
        "name": "NVIDIA L4",
        "uuid": "GPU-0000",
        "total_mib": 24576,
        "used_mib": used_mib,
        "utilization": 0,
        "processes": processes,
    }
    state.write_text(json.dumps({"gpus": [gpu]}))


def with_fake_nvml(sandbox: Sandbox, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """An lmproxy command with the fake binding first on its path."""
    environment = dict(current_interpreter().environment)
    paths = [str(FAKES), environment.get("PYTHONPATH", ""), os.environ.get("PYTHONPATH", "")]
    environment["PYTHONPATH"] = ":".join(p for p in paths if p)
    environment["FAKE_NVML"] = str(state)
    return lmproxy(sandbox, *args, environment=environment)


def install_with_fake_nvml(
    sandbox: Sandbox, config: Path, state: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    return with_fake_nvml(sandbox, state, "install", "--user", "--config", str(config), *args)


def test_a_start_waits_until_nvml_shows_the_evicted_models_memory_back(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    state = tmp_path / "nvml.json"
    nvml_state(state, 0)
    fake_nvml_for_shims(systemd_sandbox, tmp_path, state)
    a, b = free_port(), free_port()
    needs = {"VRAM-GPU-0": 16000}
    config = write_config(
        tmp_path / "config.json",
        [fake_model("a", a, needs=needs), fake_model("b", b, needs=needs)],
        ResourcesAvailable={"VRAM-GPU-0": {"Gpu": "0", "Amount": "auto"}},
    )
    result = install_with_fake_nvml(systemd_sandbox, config, state, "--now")
    assert result.returncode == 0, result.stdout + result.stderr
    resources = {r["name"]: r for r in status_json(systemd_sandbox)["resources"]}
    assert resources["VRAM-GPU-0"]["available"] == 24576 - 1024  # "auto": total less reserve

    a_pid = http_get(a)["pid"]
    nvml_state(state, 16000, a_pid)  # a's model is loaded: the driver shows it
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(http_get, b)
        wait_for(lambda: service_state(systemd_sandbox, "a") == "cold", timeout=30)
        time.sleep(1.5)  # a is stopped, but its memory has not come back yet
        assert not answer.done()
        nvml_state(state, 0)  # now it has
        assert answer.result(timeout=30)["model"] == "b"
    said = journal(systemd_sandbox, "LMPROXY_SERVICE=b")
    assert "measured 8576 VRAM-GPU-0 free (needs 16000)" in said
    assert "evicting a" in said
    assert "measured 24576 VRAM-GPU-0 free (needs 16000)" in said


def test_gpu_resources_are_refused_at_install_without_nvml_or_the_gpu(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    state = tmp_path / "nvml.json"
    config = write_config(
        tmp_path / "config.json",
        [fake_model("a", free_port(), needs={"VRAM-GPU-3": 1000})],
        ResourcesAvailable={"VRAM-GPU-3": {"Gpu": "3", "Amount": "auto"}},
    )
    state.write_text(json.dumps({"driver": False, "gpus": []}))
    refused = install_with_fake_nvml(systemd_sandbox, config, state)
    assert refused.returncode == 2
    assert "$.ResourcesAvailable.VRAM-GPU-3.Gpu: a Gpu resource needs NVML" in refused.stderr
    assert "no NVIDIA driver is loaded" in refused.stderr
    nvml_state(state, 0)
    refused = install_with_fake_nvml(systemd_sandbox, config, state)
    assert refused.returncode == 2
    assert "there is no GPU '3' here (GPUs: 0 (GPU-0000))" in refused.stderr
    assert not (systemd_sandbox.config_home / "lmproxy" / "config.json").exists()


def test_a_model_over_its_declared_vram_is_shown_and_warned_of(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    state = tmp_path / "nvml.json"
    nvml_state(state, 0)
    fake_nvml_for_shims(systemd_sandbox, tmp_path, state)
    port = free_port()
    config = write_config(
        tmp_path / "config.json",
        [fake_model("a", port, needs={"VRAM-GPU-0": 16000})],
        ResourcesAvailable={"VRAM-GPU-0": {"Gpu": "0", "Amount": 20000}},
    )
    assert install_with_fake_nvml(systemd_sandbox, config, state, "--now").returncode == 0
    pid = http_get(port)["pid"]
    nvml_state(state, 18000, pid)  # it loads more than it said
    warning = "a uses 18000 MiB of GPU 0 but declares 16000 of VRAM-GPU-0"
    wait_for(lambda: warning in journal(systemd_sandbox, "LMPROXY_EVENT=over-declared"))
    status = with_fake_nvml(systemd_sandbox, state, "status", "--user", "--json")
    [service] = json.loads(status.stdout)["services"]
    assert service["vram"] == {"used_mib": {"0": 18000}, "declared_mib": {"VRAM-GPU-0": 16000}}
    table = with_fake_nvml(systemd_sandbox, state, "status", "--user").stdout
    assert "VRAM USED/DECLARED" in table and "18000/16000 MiB" in table


def test_a_start_that_gives_up_names_what_holds_the_gpu(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    state = tmp_path / "nvml.json"
    nvml_state(state, 20000, os.getpid())  # another program holds most of it
    fake_nvml_for_shims(systemd_sandbox, tmp_path, state)
    port = free_port()
    config = write_config(
        tmp_path / "config.json",
        [fake_model("a", port, needs={"VRAM-GPU-0": 16000})],
        ResourcesAvailable={"VRAM-GPU-0": {"Gpu": "0", "Amount": "auto"}},
        MaxTimeToWaitForServiceToCloseConnectionBeforeGivingUpSeconds=2,
        SwapAfterWaitingSeconds=1,
    )
    assert install_with_fake_nvml(systemd_sandbox, config, state, "--now").returncode == 0
    assert turned_away(port)
    said = journal(systemd_sandbox, "LMPROXY_SERVICE=a")
    assert "gave up after 2 s" in said
    assert f"held outside lmproxy: GPU 0: 20000 MiB by pid {os.getpid()} (" in said


# --- TensorSplit "auto": the split computed at each start (issue 15, point 6) ---------------


def test_tensor_split_auto_follows_the_gpus_free_memory_at_each_start(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    from tests.e2e.test_analyze import model

    path, gguf_site = model(tmp_path, 10, 4)  # 10 layers of 4 MiB
    state = tmp_path / "nvml.json"
    site = fake_nvml_for_shims(systemd_sandbox, tmp_path, state)
    # The shims find gguf where a user's own packages are (a .pth, as pip would).
    (site / "gguf-site.pth").write_text(gguf_site + "\n")

    def gpus_free(first: int, second: int) -> None:
        """Two GPUs with this much free (the reserve is 1024 MiB, the minimum budget too)."""
        state.write_text(
            json.dumps(
                {
                    "gpus": [
                        {"name": "A", "uuid": "GPU-aaaaaaaa-0000", "total_mib": 4096,
                         "used_mib": 4096 - first},
                        {"name": "B", "uuid": "GPU-bbbbbbbb-0000", "total_mib": 4096,
                         "used_mib": 4096 - second},
                    ]
                }
            )
        )  # fmt: skip

    port = free_port()
    service = fake_model("llama", port, extra_args=f"--model {path} -c 1024", TensorSplit="auto")
    install(systemd_sandbox, write_config(tmp_path / "config.json", [service]))

    # 10 layers of 5 MiB with their KV cache and a 4 MiB output: all fit on the GPU with
    # the most free memory, which is the one llama.cpp gets (the split across several is
    # tests/unit/test_layerplan.py's and test_analyze.py's).
    gpus_free(2100, 3000)
    split = http_get(port)["split"]
    assert split == {"tensor_split": "11", "n_gpu_layers": 11, "cuda_visible_devices": "1"}
    said = journal(systemd_sandbox, "LMPROXY_EVENT=split")
    assert "split llama: CUDA_VISIBLE_DEVICES=1 --tensor-split 11 --n-gpu-layers 11" in said

    stopped = lmproxy(systemd_sandbox, "stop", "--user", "llama")
    assert stopped.returncode == 0, stopped.stderr
    gpus_free(3000, 2100)  # now GPU 0 has more free
    assert http_get(port)["split"]["cuda_visible_devices"] == "0"
    split_file = Path(systemd_sandbox.env()["XDG_RUNTIME_DIR"]) / "lmproxy" / "split" / "llama.env"
    assert split_file.read_text().startswith("LMPROXY_SPLIT_ARGS=--tensor-split 11 ")
    removed = lmproxy(systemd_sandbox, "uninstall", "--user")
    assert removed.returncode == 0, removed.stderr
    assert not split_file.parent.exists()


def test_tensor_split_without_nvml_leaves_the_split_to_llama_cpp(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    port = free_port()
    service = fake_model("llama", port, extra_args="--model /nonexistent.gguf", TensorSplit="auto")
    install(systemd_sandbox, write_config(tmp_path / "config.json", [service]))
    split = http_get(port)["split"]  # it starts all the same
    assert split == {"tensor_split": None, "n_gpu_layers": None, "cuda_visible_devices": None}
    said = journal(systemd_sandbox, "LMPROXY_EVENT=split-failed")
    assert "cannot split llama across the GPUs" in said and "llama.cpp splits by itself" in said
