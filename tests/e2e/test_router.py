"""The OpenAI router (issue 14) against the sandboxed systemd, with fake models: what a tiny
real model cannot show (multipart routing, 413, 401, 503 and 504, the no-pinning rule,
reloads). tests/e2e/test_router_real.py runs llama-server and the openai client."""

from __future__ import annotations

import http.client
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from lmproxy.sandbox import Sandbox
from tests.e2e.helpers import (
    fake_model,
    free_port,
    install,
    journal,
    lmproxy,
    main_pid,
    service_status,
    unit_state,
    wait_for,
    write_config,
)

ROUTER = "lmproxy-api@openai.service"


def post(
    conn: http.client.HTTPConnection, path: str, document: object, **headers: str
) -> tuple[int, bytes]:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    conn.request("POST", path, body, {"Content-Type": "application/json", **headers})
    answer = conn.getresponse()
    return answer.status, answer.read()


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, Any]:
    conn.request("GET", path)
    answer = conn.getresponse()
    return answer.status, json.loads(answer.read())


def served_by(body: bytes) -> set[str]:
    """Which fake models wrote the events of a streamed answer."""
    events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: {")]
    return {json.loads(event)["model"] for event in events}


def error_of(body: bytes) -> dict[str, Any]:
    document = json.loads(body)
    assert set(document) == {"error"}, document
    error: dict[str, Any] = document["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


@pytest.fixture
def router(systemd_sandbox: Sandbox, tmp_path: Path) -> tuple[int, Path]:
    """Two models that cannot run together, one reachable only through the router (no
    ListenPort, a name with a slash as large-model-proxy's README has it); the router's port."""
    port, small = free_port(), free_port()
    qwen = fake_model("Qwen/Qwen2.5-7B-Instruct", free_port(), needs={"VRAM": 20000})
    del qwen["ListenPort"]
    qwen["Args"] = qwen["Args"].replace("--name Qwen/Qwen2.5-7B-Instruct", "--name qwen")
    config = write_config(
        tmp_path / "config.json",
        [
            fake_model("small", small, needs={"VRAM": 16000}, OpenAiApi=True),
            {**qwen, "OpenAiApi": True, "OpenAiApiModels": ["qwen", "qwen-7b"]},
        ],
        OpenAiApi={"ListenPort": port, "MaxRequestBodyBytes": 100_000},
    )
    install(systemd_sandbox, config)
    return port, config


def test_every_request_on_one_connection_goes_to_its_model(
    systemd_sandbox: Sandbox, router: tuple[int, Path]
) -> None:
    port, _ = router
    assert unit_state(systemd_sandbox, ROUTER) == "inactive"  # socket-activated
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    status, models = get(conn, "/v1/models")
    assert status == 200 and models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["small", "qwen", "qwen-7b"]
    assert {m["lmproxy"]["service"] for m in models["data"]} == {
        "small",
        "Qwen/Qwen2.5-7B-Instruct",
    }
    for model, expected in [("small", "small"), ("qwen-7b", "qwen"), ("small", "small")]:
        status, body = post(conn, "/v1/chat/completions", {"model": model, "messages": []})
        assert status == 200, body
        assert served_by(body) == {expected}
        other = "Qwen/Qwen2.5-7B-Instruct" if expected == "small" else "small"
        # The two cannot run together: the other was evicted for this one.
        assert service_status(systemd_sandbox, other)["state"] in ("cold", "stopping")
    assert get(conn, "/v1/models/qwen-7b")[1]["lmproxy"]["state"] == "stopped"
    # The router-only service has no address anyone else can reach; the commands reach it
    # through its private socket.
    assert service_status(systemd_sandbox, "Qwen/Qwen2.5-7B-Instruct")["listen"] == "router only"
    result = lmproxy(systemd_sandbox, "start", "--user", "Qwen/Qwen2.5-7B-Instruct")
    assert result.returncode == 0, result.stdout + result.stderr
    assert get(conn, "/v1/models/qwen")[1]["lmproxy"]["state"] == "running"
    conn.close()


def test_unknown_models_and_bad_requests_get_openai_errors(router: tuple[int, Path]) -> None:
    port, _ = router
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    status, body = post(conn, "/v1/chat/completions", {"model": "gpt-9", "messages": []})
    error = error_of(body)
    assert status == 404 and error["code"] == "model_not_found"
    assert "small, qwen, qwen-7b" in error["message"]
    status, body = post(conn, "/v1/completions", b"{not json")
    assert status == 400 and "JSON" in error_of(body)["message"]
    status, body = post(conn, "/v1/embeddings", {"input": "x"})
    assert status == 400 and error_of(body)["param"] == "model"
    status, body = get(conn, "/v1/models/gpt-9")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body = post(conn, "/v1/nothing-here", {"model": "small"})
    assert status == 404
    # The connection survived every error above.
    status, body = post(conn, "/v1/completions", {"model": "small", "prompt": "x"})
    assert status == 200 and served_by(body) == {"small"}
    status, body = post(conn, "/v1/completions", {"model": "small", "prompt": "x" * 200_000})
    assert status == 413 and error_of(body)["code"] == "request_too_large"
    conn.close()


def test_multipart_bodies_are_routed_by_their_model_field(router: tuple[int, Path]) -> None:
    port, _ = router
    boundary = "lmproxy-test-boundary"
    audio = bytes(range(256)) * 200  # the file comes first: the router reads past it
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode() + audio
    body += (
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nqwen\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(
        "POST",
        "/v1/audio/transcriptions",
        body,
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    answer = conn.getresponse()
    assert answer.status == 200 and served_by(answer.read()) == {"qwen"}
    conn.close()


def test_api_keys_from_the_config_and_from_a_file(systemd_sandbox: Sandbox, tmp_path: Path) -> None:
    port = free_port()
    keys = tmp_path / "keys"
    keys.write_text("# the team's keys\nsk-from-file-1234\n\n")
    config = write_config(
        tmp_path / "config.json",
        [fake_model("small", free_port(), OpenAiApi=True)],
        OpenAiApi={"ListenPort": port, "ApiKeys": ["sk-in-config"], "ApiKeysFile": str(keys)},
    )
    install(systemd_sandbox, config)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    status, body = post(conn, "/v1/completions", {"model": "small"})
    assert status == 401 and error_of(body)["code"] == "invalid_api_key"
    status, body = post(conn, "/v1/completions", {"model": "small"}, Authorization="Bearer nope")
    assert status == 401
    for key in ("sk-in-config", "sk-from-file-1234"):
        headers = {"Authorization": f"Bearer {key}"}
        status, body = post(conn, "/v1/completions", {"model": "small"}, **headers)
        assert status == 200, body
    conn.request("GET", "/v1/models")
    answer = conn.getresponse()
    assert answer.status == 401 and answer.read()
    assert get(conn, "/health") == (200, {"status": "ok"})  # for load balancers, keyless
    conn.close()
    logged = journal(systemd_sandbox, "SYSLOG_IDENTIFIER=lmproxy-openai")
    assert "/v1/completions" in logged
    assert "sk-" not in logged


def test_a_model_that_cannot_start_gets_503_with_the_reason(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    port = free_port()
    broken = fake_model("broken", free_port(), OpenAiApi=True, Command="/bin/false", Args="")
    config = write_config(tmp_path / "config.json", [broken], OpenAiApi={"ListenPort": port})
    install(systemd_sandbox, config)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    status, body = post(conn, "/v1/chat/completions", {"model": "broken", "messages": []})
    error = error_of(body)
    assert status == 503, body
    assert error["code"] == "model_unavailable" and "broken" in error["message"]
    assert "exited" in error["message"] or "failed" in error["message"], error


def test_a_model_that_does_not_answer_in_time_gets_504(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    port = free_port()
    slow = fake_model("slow", free_port(), OpenAiApi=True, extra_args="--first-token-delay 30")
    config = write_config(
        tmp_path / "config.json",
        [slow],
        OpenAiApi={"ListenPort": port, "ResponseTimeoutSeconds": 2},
    )
    install(systemd_sandbox, config)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    started = time.monotonic()
    status, body = post(conn, "/v1/completions", {"model": "slow"})
    assert status == 504 and error_of(body)["code"] == "upstream_timeout"
    assert 2 <= time.monotonic() - started < 10
    # The abandoned request no longer holds the model.
    wait_for(lambda: service_status(systemd_sandbox, "slow")["connections"] == 0, 5)


def test_idle_upstream_connections_never_hold_a_model(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    """After its last request a model is evictable at once, although the router keeps the
    connection it used: another model that needs the room gets it without waiting for
    a swap (which would take a minute here)."""
    port = free_port()
    config = write_config(
        tmp_path / "config.json",
        [
            fake_model("first", free_port(), needs={"VRAM": 16000}, OpenAiApi=True),
            fake_model("second", free_port(), needs={"VRAM": 20000}, OpenAiApi=True),
        ],
        OpenAiApi={"ListenPort": port},
        SwapAfterWaitingSeconds=60,
    )
    install(systemd_sandbox, config)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    assert post(conn, "/v1/completions", {"model": "first"})[0] == 200
    wait_for(lambda: service_status(systemd_sandbox, "first")["connections"] == 0, 1)
    other = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    started = time.monotonic()
    status, body = post(other, "/v1/completions", {"model": "second"})
    assert status == 200 and served_by(body) == {"second"}
    assert time.monotonic() - started < 20  # not the swap's 60 s
    # ...and the first connection, whose pooled upstream was closed by the eviction, still
    # works: its next request starts "first" again.
    status, body = post(conn, "/v1/completions", {"model": "first"})
    assert status == 200 and served_by(body) == {"first"}


def test_a_client_that_leaves_mid_stream_cancels_its_request(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "config.json",
        [
            fake_model(
                "talker",
                free_port(),
                OpenAiApi=True,
                extra_args="--tokens 600 --token-interval 0.05",
            )
        ],
        OpenAiApi={"ListenPort": port},
    )
    install(systemd_sandbox, config)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
        body = json.dumps({"model": "talker", "prompt": "x", "stream": True}).encode()
        client.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        received = b""
        while received.count(b"data: ") < 3:
            received += client.recv(65536)
        assert service_status(systemd_sandbox, "talker")["connections"] == 1
    left = time.monotonic()
    wait_for(lambda: service_status(systemd_sandbox, "talker")["connections"] == 0, 5)
    assert time.monotonic() - left < 1.5
    result = lmproxy(systemd_sandbox, "stop", "--user", "talker")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_reinstall_adds_models_without_a_restart_or_a_dropped_request(
    systemd_sandbox: Sandbox, tmp_path: Path
) -> None:
    port, first = free_port(), free_port()
    talker = fake_model(
        "talker", first, OpenAiApi=True, extra_args="--tokens 40 --token-interval 0.05"
    )
    config = write_config(tmp_path / "config.json", [talker], OpenAiApi={"ListenPort": port})
    install(systemd_sandbox, config)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    assert [m["id"] for m in get(conn, "/v1/models")[1]["data"]] == ["talker"]
    pid = main_pid(systemd_sandbox, ROUTER)
    streaming = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    streaming.request(
        "POST",
        "/v1/completions",
        json.dumps({"model": "talker", "stream": True}),
        {"Content-Type": "application/json"},
    )
    answer = streaming.getresponse()  # its head is here; 2 s of events are to come
    write_config(
        config,
        [talker, fake_model("newcomer", free_port(), OpenAiApi=True)],
        OpenAiApi={"ListenPort": port},
    )
    result = lmproxy(systemd_sandbox, "install", "--user", "--config", str(config), "--now")
    assert result.returncode == 0, result.stderr
    assert f"reloaded {ROUTER}" in result.stdout
    assert main_pid(systemd_sandbox, ROUTER) == pid
    body = answer.read()
    assert body.endswith(b"data: [DONE]\n\n") and body.count(b"data: {") == 40
    wait_for(lambda: len(get(conn, "/v1/models")[1]["data"]) == 2, 5, "the reload")
    status, body = post(conn, "/v1/completions", {"model": "newcomer"})
    assert status == 200 and served_by(body) == {"newcomer"}


def test_each_request_is_one_journal_line_that_lmproxy_logs_shows(
    systemd_sandbox: Sandbox, router: tuple[int, Path]
) -> None:
    port, _ = router
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    assert post(conn, "/v1/chat/completions", {"model": "qwen", "messages": []})[0] == 200
    systemd_sandbox.run(["journalctl", "--sync"], check=True)
    result = systemd_sandbox.run(
        ["journalctl", "--no-pager", "-o", "json", "LMPROXY_EVENT=request", "LMPROXY_MODEL=qwen"]
    )
    (line,) = [json.loads(text) for text in result.stdout.splitlines()]
    assert line["LMPROXY_SERVICE"] == "Qwen/Qwen2.5-7B-Instruct"
    assert line["LMPROXY_PATH"] == "/v1/chat/completions"
    assert line["LMPROXY_STATUS"] == "200"
    assert float(line["LMPROXY_DURATION_MS"]) >= float(line["LMPROXY_TTFB_MS"]) > 0
    assert int(line["LMPROXY_BYTES_IN"]) > 0 and int(line["LMPROXY_BYTES_OUT"]) > 0
    logs = lmproxy(systemd_sandbox, "logs", "Qwen/Qwen2.5-7B-Instruct")
    assert "POST /v1/chat/completions qwen -> 200" in logs.stdout, logs.stdout
