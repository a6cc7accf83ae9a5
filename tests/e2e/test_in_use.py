"""What "in use" means for a service that speaks HTTP (the default): a request in flight.

A connection that has been answered and sits in a client's pool does not keep its model
loaded (it is closed when the model goes; HTTP clients open a new one), while a request in
flight always does: a long prompt with nothing sent back yet, and a stream that pauses
between tokens, are never cut. The last test shows it with the official `openai` client and
two real llama-server models that cannot be loaded together.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from lmproxy.sandbox import Sandbox
from tests.e2e.helpers import (
    ask,
    fake_model,
    free_port,
    http_get,
    idle_connection,
    install,
    install_busy_and_newcomer,
    journal,
    unit_state,
    wait_for,
    write_config,
)
from tests.e2e.real_backends import llama_server, openai_python


def closed_by_the_proxy(conn: socket.socket) -> bool:
    """The proxy closed (or reset) the connection: a client would open a new one."""
    conn.settimeout(30)
    try:
        return conn.recv(100) == b""
    except ConnectionResetError:
        return True


def test_an_answered_connection_in_a_clients_pool_does_not_keep_its_model(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    busy, newcomer = install_busy_and_newcomer(systemd_sandbox, tmp_path, 60)
    pooled = idle_connection(busy)  # answered, kept open as a client's pool keeps it
    try:
        started = time.monotonic()
        assert http_get(newcomer)["model"] == "newcomer"
        # Not the 60 s wait for the connection to close: busy was evicted at once.
        assert time.monotonic() - started < 10
        assert unit_state(systemd_sandbox, "lmproxy-backend@busy.service") != "active"
        assert closed_by_the_proxy(pooled)
    finally:
        pooled.close()
    assert "evicting busy" in journal(systemd_sandbox, "LMPROXY_SERVICE=newcomer")
    assert http_get(busy)["model"] == "busy"  # a new connection starts it again


def stream_completion(port: int) -> tuple[bytes, float]:
    """A streamed completion on a fresh connection: the whole answer, and when it ended."""
    body = b'{"prompt": "a long prompt"}'
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            chunk = conn.recv(65536)
            assert chunk, f"cut after {data!r}"
            data += chunk
    return data, time.monotonic()


def test_a_slow_prompt_and_a_paused_stream_are_never_cut(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """busy reads its prompt for 2 s, then streams 3 tokens 1.5 s apart (longer than the
    claim outlives the last byte); newcomer, which cannot fit beside it, comes meanwhile
    and waits past its swap bound (1 s): busy admits nobody new, and its request in flight
    runs to its end before busy is swapped out."""
    busy, newcomer = free_port(), free_port()
    slow = "--first-token-delay 2 --tokens 3 --token-interval 1.5"
    config = write_config(
        tmp_path / "slow.json",
        [
            fake_model("busy", busy, needs={"VRAM": 16000}, extra_args=slow),
            fake_model("newcomer", newcomer, needs={"VRAM": 20000}),
        ],
        SwapAfterWaitingSeconds=1,
        MaxTimeToWaitForServiceToCloseConnectionBeforeGivingUpSeconds=60,
    )
    install(systemd_sandbox, config)
    assert http_get(busy)["model"] == "busy"  # loaded
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        stream = pool.submit(stream_completion, busy)
        time.sleep(0.5)  # the prompt is being read
        waiter = pool.submit(lambda: (http_get(newcomer), time.monotonic()))
        answer, stream_ended = stream.result(timeout=60)
        served, newcomer_served = waiter.result(timeout=60)
    assert answer.count(b'"token"') == 3 and b"[DONE]" in answer, answer
    assert served["model"] == "newcomer"
    assert newcomer_served > stream_ended  # swapped only once the stream had ended
    log = journal(systemd_sandbox, "LMPROXY_SERVICE=busy")
    assert "closed 1 connection" not in log, log  # nothing was cut


OPENAI_CLIENT = r"""
import json, sys, time
import openai

busy_url, newcomer_url = sys.argv[1], sys.argv[2]
chat = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8}
busy = openai.OpenAI(base_url=busy_url, api_key="unused", max_retries=0, timeout=120)
newcomer = openai.OpenAI(base_url=newcomer_url, api_key="unused", max_retries=0, timeout=120)
report = {}
first = busy.chat.completions.create(model="busy", **chat)
report["busy"] = first.choices[0].message.content
# busy's connection stays in its client's pool (the client is still alive), as in any app.
started = time.monotonic()
words = []
for chunk in newcomer.chat.completions.create(model="newcomer", stream=True, **chat):
    if chunk.choices and chunk.choices[0].delta.content:
        words.append(chunk.choices[0].delta.content)
report["newcomer_s"] = time.monotonic() - started
report["newcomer"] = "".join(words)
# The same busy client again: its pooled connection was closed, it opens a new one.
again = busy.chat.completions.create(model="busy", **chat)
report["busy_again"] = again.choices[0].message.content
print(json.dumps(report))
"""


def llama_service(name: str, port: int, needs: int, binary: Path, model: Path) -> dict[str, Any]:
    return {
        "Name": name,
        "ListenPort": str(port),
        "ProxyTargetHost": "127.0.0.1",
        "ProxyTargetPort": str(port + 10000),
        "Command": str(binary),
        "Args": f"-m {model} --alias {name} --host 127.0.0.1 --port {port + 10000} -c 512 -t 1",
        "HealthcheckCommand": (
            "/usr/bin/python3 -c 'import urllib.request as u; "
            f'u.urlopen("http://127.0.0.1:{port + 10000}/health", timeout=2)\''
        ),
        "HealthcheckIntervalMilliseconds": 100,
        "StartupTimeoutMilliseconds": 60000,
        "ResourceRequirements": {"VRAM": needs},
    }


def test_an_openai_clients_pooled_connection_does_not_keep_a_real_model_loaded(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """Observed before: the openai client kept busy's answered connection in its pool, so
    busy could never be evicted and newcomer's stream hung until the client gave up."""
    llama, python = llama_server(), openai_python()
    busy, newcomer = free_port(), free_port()
    config = write_config(
        tmp_path / "real.json",
        [
            llama_service("busy", busy, 16000, llama.binary, llama.model),
            llama_service("newcomer", newcomer, 20000, llama.binary, llama.model),
        ],
        MaxTimeToWaitForServiceToCloseConnectionBeforeGivingUpSeconds=60,
    )
    install(systemd_sandbox, config)
    result = subprocess.run(
        [
            str(python),
            "-c",
            OPENAI_CLIENT,
            f"http://127.0.0.1:{busy}/v1",
            f"http://127.0.0.1:{newcomer}/v1",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("busy", "newcomer", "busy_again"):
        assert set(report[key].split()) <= llama.words and report[key].split(), report
    assert report["newcomer_s"] < 15, report  # a swap, not a wait for the client's timeout
    log = journal(systemd_sandbox, "LMPROXY_SERVICE=newcomer")
    assert "evicting busy" in log, log
    wait_for(lambda: unit_state(systemd_sandbox, "lmproxy-backend@busy.service") == "active")
    assert unit_state(systemd_sandbox, "lmproxy-backend@newcomer.service") != "active"


def test_a_raw_service_counts_every_open_connection(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """ "Protocol": "raw" keeps the old rule, for servers that do not speak HTTP/1.1."""
    busy, newcomer = free_port(), free_port()
    config = write_config(
        tmp_path / "raw.json",
        [
            fake_model("busy", busy, needs={"VRAM": 16000}, Protocol="raw"),
            fake_model("newcomer", newcomer, needs={"VRAM": 20000}),
        ],
        MaxTimeToWaitForServiceToCloseConnectionBeforeGivingUpSeconds=60,
    )
    install(systemd_sandbox, config)
    pooled = idle_connection(busy)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(http_get, newcomer)
        time.sleep(2)
        assert not answer.done()  # the open connection keeps busy loaded
        assert b'"busy"' in ask(pooled)  # still served meanwhile
        pooled.close()
        assert answer.result(timeout=30)["model"] == "newcomer"
