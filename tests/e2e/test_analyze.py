"""`lmproxy analyze MODEL.gguf` and `lmproxy plan` (issue 15, point 5) on GGUF files that
gguf's own writer made with known layer sizes (in the tests' client venv, where
tools/real-backends installs gguf; lmproxy reads them through the same package)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.e2e.real_backends import openai_python

CHECKOUT = Path(__file__).resolve().parents[2]

WRITER = r"""
import sys
import numpy as np
from gguf import GGUFWriter
path, n_layer, layer_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
writer = GGUFWriter(path, "llama")
writer.add_block_count(n_layer)
writer.add_context_length(4096)
writer.add_embedding_length(1024)
writer.add_head_count(8)
writer.add_head_count_kv(2)
writer.add_tensor("token_embd.weight", np.zeros((256, 1024), dtype=np.float16))
for i in range(n_layer):  # each layer: layer_mib MiB, in two tensors
    half = layer_mib * 2**20 // 2 // 2  # f16 elements
    writer.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((half // 1024, 1024), dtype=np.float16))
    writer.add_tensor(f"blk.{i}.ffn_up.weight", np.zeros((half // 1024, 1024), dtype=np.float16))
writer.add_tensor("output.weight", np.zeros((2048, 1024), dtype=np.float16))
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
"""


def model(tmp_path: Path, n_layer: int, layer_mib: int) -> tuple[Path, str]:
    """A GGUF of n_layer layers of layer_mib MiB each; and the PYTHONPATH with gguf."""
    python = openai_python()
    path = tmp_path / "model.gguf"
    subprocess.run([str(python), "-c", WRITER, str(path), str(n_layer), str(layer_mib)], check=True)
    site = subprocess.run(
        [
            str(python),
            "-c",
            "import gguf, os; print(os.path.dirname(os.path.dirname(gguf.__file__)))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return path, site


def lmproxy(pythonpath: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmproxy", *args],
        env={"PYTHONPATH": f"{CHECKOUT}:{pythonpath}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_analyze_plans_the_layers_of_a_real_gguf_across_gpus_given_by_hand(
    tmp_path: Path,
) -> None:
    path, site = model(tmp_path, 10, 4)
    # KV per layer and token: (128 + 128) * 2 heads * 2 bytes = 1 KiB; 4096 tokens: 4 MiB.
    options = ["--free", "1040,1052", "--reserve-mib", "1024", "--min-budget-mib", "1"]
    result = lmproxy(site, "analyze", str(path), *options, "--ctx-size", "4096")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "Layers: 10" in text
    assert "Layer size: average 4.00 MiB, range 4.00 - 4.00 MiB" in text
    assert "Output layer: 4.00 MiB; token embedding (CPU): 0.50 MiB" in text
    assert "KV cache for 4096 tokens: 40.00 MiB" in text
    # Budgets 28 and 16 MiB, 8 MiB a layer with its cache: GPU 1 (most free) takes 3, GPU 0
    # one, and the output (4 MiB) with it; the first 6 stay on the CPU.
    assert "GPU 1:   3 layers (#6-8)" in text
    assert "GPU 0:   1 layers (#9-9) + output" in text
    assert "CPU: 6 layers (#0-5)" in text
    assert 'TENSOR SPLIT: --tensor-split "3,2" -ngl 5' in text
    assert "CUDA_VISIBLE_DEVICES=1,0" in text

    options = ["--free", "1040,1052", "--min-budget-mib", "1", "--json"]
    document = json.loads(lmproxy(site, "analyze", str(path), *options).stdout)
    assert document["model"]["layer_bytes"] == [4 * 2**20] * 10
    assert document["tensor_split"] == "3,2" and document["cpu_layers"] == 6


def test_without_gguf_or_nvml_one_clear_message(tmp_path: Path) -> None:
    path, site = model(tmp_path, 2, 1)
    missing = lmproxy("", "analyze", str(path), "--free", "1000")
    assert missing.returncode == 1
    assert "the gguf package is not installed: install the gguf package" in missing.stderr
    no_nvml = lmproxy(site, "analyze", str(path))
    assert no_nvml.returncode == 1
    assert "(or give the GPUs' free memory with --free)" in no_nvml.stderr


def test_plan_gives_each_gpu_its_budget_and_share() -> None:
    result = lmproxy("", "plan", "--free", "23287,11047,500", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert [g["budget_mib"] for g in document["gpus"]] == [22263, 10023]
    assert document["left_out"] == [2]
    assert document["tensor_split"] == "0.69,0.31"
    assert document["cuda_visible_devices"] == "0,1"
