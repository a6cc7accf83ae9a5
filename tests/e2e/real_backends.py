"""The real model server of the end-to-end tests: llama.cpp's llama-server and a tiny GGUF.

tools/real-backends builds both once and caches them outside the checkout (5 to 10
minutes on 2 cores); here they are only looked up (`tools/real-backends --cached`,
which builds nothing). Where they are missing a test is skipped, saying what to run,
or fails where LMPROXY_REQUIRE_SANDBOX=1 (CI, whose .ci/run builds them first).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "real-backends"


@dataclass(frozen=True)
class LlamaServer:
    binary: Path  # llama-server, CPU only
    model: Path  # a tiny GGUF with a ChatML template; it samples only a few words
    words: frozenset[str]  # what it can say


def find_llama_server() -> LlamaServer | str:
    """The cached build, or why there is none."""
    result = subprocess.run(
        [str(SCRIPT), "--cached"], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        return result.stderr.strip() or f"{SCRIPT} --cached exited {result.returncode}"
    paths = cached_paths(result.stdout)
    binary, model = Path(paths["LLAMA_SERVER"]), Path(paths["LLAMA_MODEL"])
    return LlamaServer(binary, model, frozenset({"hello", "world", "proxy", "model"}))


def cached_paths(output: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def openai_python() -> Path:
    """A Python that imports the official `openai` client (installed by
    tools/real-backends in its cache: Debian has no package of it); skips the test (fails it
    in CI) where there is none."""
    result = subprocess.run(
        [str(SCRIPT), "--cached"], capture_output=True, text=True, timeout=60, check=False
    )
    python = cached_paths(result.stdout).get("OPENAI_PYTHON") if result.returncode == 0 else None
    if python is not None:
        return Path(python)
    message = "the openai client is not installed: run tools/real-backends (once)"
    if os.environ.get("LMPROXY_REQUIRE_SANDBOX") == "1":
        pytest.fail(message)
    pytest.skip(message)


def llama_server() -> LlamaServer:
    """The cached build; skips the test (fails it in CI) where there is none."""
    found = find_llama_server()
    if isinstance(found, LlamaServer):
        return found
    message = f"llama-server is not built ({found}): run tools/real-backends (5-10 min, once)"
    if os.environ.get("LMPROXY_REQUIRE_SANDBOX") == "1":
        pytest.fail(message)
    pytest.skip(message)
