"""The OpenAI router (issue 14) with real parts: llama.cpp's llama-server as the models (built
by tools/real-backends) and the official `openai` Python client, against the sandboxed
systemd. Two models that cannot run together, each reachable only through the router."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from lmproxy.sandbox import Sandbox
from tests.e2e.helpers import free_port, install, journal, service_status, wait_for, write_config
from tests.e2e.real_backends import LlamaServer, llama_server, openai_python


def routed_llama(name: str, needs: int, llama: LlamaServer, *extra: str) -> dict[str, Any]:
    """A llama-server that only the router reaches (no ListenPort)."""
    backend = free_port() + 10000
    return {
        "Name": name,
        "OpenAiApi": True,
        "ProxyTargetHost": "127.0.0.1",
        "ProxyTargetPort": str(backend),
        "Command": str(llama.binary),
        "Args": f"-m {llama.model} --alias {name} --host 127.0.0.1 --port {backend} -c 2048 -t 1 "
        + " ".join(extra),
        "HealthcheckCommand": (
            "/usr/bin/python3 -c 'import urllib.request as u; "
            f'u.urlopen("http://127.0.0.1:{backend}/health", timeout=2)\''
        ),
        "HealthcheckIntervalMilliseconds": 100,
        "StartupTimeoutMilliseconds": 60000,
        "ResourceRequirements": {"VRAM": needs},
    }


@pytest.fixture
def two_models(systemd_sandbox: Sandbox, tmp_path: Path) -> tuple[str, LlamaServer, Path]:
    """chat and embed (an embeddings server), which cannot run together; the router's URL."""
    llama, python = llama_server(), openai_python()
    port = free_port()
    config = write_config(
        tmp_path / "config.json",
        [
            routed_llama("chat", 16000, llama),
            routed_llama("embed", 20000, llama, "--embeddings --pooling mean"),
        ],
        OpenAiApi={"ListenPort": port},
        SwapAfterWaitingSeconds=1,
    )
    install(systemd_sandbox, config)
    return f"http://127.0.0.1:{port}/v1", llama, python


def run_client(python: Path, script: str, *args: str, timeout: float = 240) -> Any:
    result = subprocess.run(
        [str(python), "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


ONE_CLIENT = r"""
import json, sys
import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=120)
chat = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8}
report = {"models": [m.id for m in client.models.list()]}
answer = client.chat.completions.create(model="chat", **chat)
report["chat"] = [answer.model, answer.choices[0].message.content]
words = []
for chunk in client.chat.completions.create(model="chat", stream=True, **chat):
    if chunk.choices and chunk.choices[0].delta.content:
        words.append(chunk.choices[0].delta.content)
report["streamed"] = "".join(words)
done = client.completions.create(model="chat", prompt="hello", max_tokens=8)
report["completion"] = done.choices[0].text
# The same client and its pooled connection: each request goes to its own model.
vector = client.embeddings.create(model="embed", input="hello world")
report["embedding"] = [vector.model, len(vector.data[0].embedding)]
again = client.chat.completions.create(model="chat", **chat)
report["chat_again"] = [again.model, again.choices[0].message.content]
try:
    client.chat.completions.create(model="gpt-9", **chat)
except openai.NotFoundError as error:
    report["unknown"] = [error.status_code, error.body["code"]]
print(json.dumps(report))
"""


def test_the_openai_client_reaches_every_model_through_one_endpoint(
    systemd_sandbox: Sandbox, two_models: tuple[str, LlamaServer, Path]
) -> None:
    url, llama, python = two_models
    report = run_client(python, ONE_CLIENT, url)
    assert report["models"] == ["chat", "embed"]
    for key in ("chat", "chat_again"):
        model, text = report[key]
        assert model == "chat" and text.split() and set(text.split()) <= llama.words, report
    assert set(report["streamed"].split()) <= llama.words and report["streamed"].split()
    assert set(report["completion"].split()) <= llama.words
    assert report["embedding"] == ["embed", 64]
    assert report["unknown"] == [404, "model_not_found"]
    # The two could not run together: each was evicted for the other, on one connection.
    assert "evicting chat" in journal(systemd_sandbox, "LMPROXY_SERVICE=embed")
    assert "evicting embed" in journal(systemd_sandbox, "LMPROXY_SERVICE=chat")


LEAVING_CLIENT = r"""
import json, sys
import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=120)
stream = client.chat.completions.create(
    model="chat",
    messages=[{"role": "user", "content": "Talk."}],
    max_tokens=1900,
    stream=True,
    extra_body={"ignore_eos": True},
)
received = 0
for chunk in stream:
    received += 1
    if received == 3:
        break
stream.close()  # the client leaves half-way
print(json.dumps({"received": received}))
"""


def test_a_streaming_client_that_leaves_half_way_frees_its_model(
    systemd_sandbox: Sandbox, two_models: tuple[str, LlamaServer, Path]
) -> None:
    url, _, python = two_models
    assert run_client(python, LEAVING_CLIENT, url) == {"received": 3}
    left = time.monotonic()
    wait_for(lambda: service_status(systemd_sandbox, "chat")["connections"] == 0, 5)
    assert time.monotonic() - left < 1.0
    # It left while the model was still writing (the router's line says so, as 499).
    assert "POST /v1/chat/completions chat -> 499" in journal(
        systemd_sandbox, "LMPROXY_EVENT=request"
    )
    # ...and it can be evicted: embed gets the room without waiting for a swap.
    embed = "import openai,sys; c=openai.OpenAI(base_url=sys.argv[1],api_key='x',max_retries=0)\n"
    embed += "print(len(c.embeddings.create(model='embed', input='x').data))"
    result = subprocess.run(
        [str(python), "-c", embed, url], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0 and result.stdout.strip() == "1", result.stderr


MANY_CLIENTS = r"""
import json, sys, threading
import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=300)
results = [None] * 64

def stream(index):
    model = ("chat", "embed")[index % 2]
    if model == "embed":
        results[index] = len(client.embeddings.create(model="embed", input="x").data)
        return
    words = []
    for chunk in client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            words.append(chunk.choices[0].delta.content)
    results[index] = "".join(words)

threads = [threading.Thread(target=stream, args=(i,)) for i in range(64)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps(results))
"""


def test_64_concurrent_clients_over_two_models_that_take_turns_all_complete(
    two_models: tuple[str, LlamaServer, Path],
) -> None:
    url, llama, python = two_models
    started = time.monotonic()
    results = run_client(python, MANY_CLIENTS, url, timeout=300)
    assert all(r == 1 for r in results[1::2]), results
    for text in results[0::2]:
        assert isinstance(text, str) and set(text.split()) <= llama.words, results
    assert time.monotonic() - started < 240
