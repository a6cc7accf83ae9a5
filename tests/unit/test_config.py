"""Tests for lmproxy.config: reading large-model-proxy's config.json."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmproxy import unitnames
from lmproxy.config import (
    SERVICE_FIELDS,
    SLEEP_FIELDS,
    TOP_LEVEL_FIELDS,
    UNBOUNDED,
    Config,
    ConfigError,
    ResourceCheck,
    Service,
    Sleep,
    load_config,
    parse_config,
)

BASE = Path("/etc/lmproxy")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "config.json"


def minimal_service(**overrides: Any) -> dict[str, Any]:
    service: dict[str, Any] = {
        "Name": "llm",
        "ListenPort": "8081",
        "ProxyTargetPort": "18081",
        "Command": "llama-server",
    }
    service.update(overrides)
    return service


def document(*services: dict[str, Any], **top: Any) -> str:
    return json.dumps({"Services": list(services), **top})


def parse(text: str) -> Config:
    return parse_config(text, BASE)


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert caught.value.problems, "a ConfigError must list at least one problem"
    return caught.value.problems


def only_problem(text: str) -> tuple[str, str]:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


def service_problem(**overrides: Any) -> tuple[str, str]:
    """The one problem with a single service made of the minimal one plus `overrides`."""
    return only_problem(document(minimal_service(**overrides)))


def one_service(**overrides: Any) -> Service:
    config = parse(document(minimal_service(**overrides)))
    assert len(config.services) == 1
    return config.services[0]


# --- Valid configs -----------------------------------------------------------------------------


def test_minimal_config_gets_every_default() -> None:
    config = parse(document(minimal_service()))
    assert config == Config(
        resources_available={},
        services=(
            Service(
                name="llm",
                listen_port=8081,
                listen_address="127.0.0.1",
                proxy_target_host="localhost",
                proxy_target_port=18081,
                command="llama-server",
                args="",
                argv=("llama-server",),
                work_dir=None,
                log_file_path=None,
                restart_on_connection_failure=False,
                resource_requirements={},
                healthcheck_command=None,
                healthcheck_interval_ms=200,
                startup_timeout_ms=600_000,
                shutdown_after_inactivity_s=0,
                kill_command=None,
                consider_stopped_on_process_exit=True,
                environment={},
                user=None,
                openai_api=False,
                openai_api_models=(),
                service_url=None,
            ),
        ),
        max_wait_for_connection_close_s=1200,
        shutdown_after_inactivity_s=0,
        swap_after_waiting_s=5,
        min_loaded_s=0,
        output_service_logs=True,
        listen_address="127.0.0.1",
        openai_api_listen_port=None,
        management_api_listen_port=None,
        default_service_url=None,
        base_dir=str(BASE),
    )


def test_every_field_set() -> None:
    text = json.dumps(
        {
            "ShutDownAfterInactivitySeconds": 120,
            "MaxTimeToWaitForServiceToCloseConnectionBeforeGivingUpSeconds": 30,
            "OutputServiceLogs": False,
            "DefaultServiceUrl": "http://localhost:{{.PORT}}/",
            "ListenAddress": "::1",
            "OpenAiApi": {"ListenPort": "7070"},
            "ManagementApi": {"ListenPort": 7071},
            "ResourcesAvailable": {"VRAM-GPU-1": 24000, "RAM": 32000, "cpu:cores": 0},
            "Services": [
                {
                    "Name": "Gemma-27B",
                    "ListenPort": 8081,
                    "ListenAddress": "192.168.1.10",
                    "ProxyTargetHost": "127.0.0.1",
                    "ProxyTargetPort": 18081,
                    "Command": "bin/llama-server",
                    "Args": "-m '/models/my model.gguf' --port 18081 -a \"x y\"",
                    "KillCommand": "pkill -f gemma",
                    "LogFilePath": "logs/gemma.log",
                    "WorkDir": "/opt/llama.cpp/",
                    "HealthcheckCommand": "curl --fail http://localhost:18081/health",
                    "HealthcheckIntervalMilliseconds": 500,
                    "StartupTimeoutMilliseconds": 60000,
                    "ShutDownAfterInactivitySeconds": 600,
                    "RestartOnConnectionFailure": True,
                    "ConsiderStoppedOnProcessExit": False,
                    "OpenAiApi": True,
                    "OpenAiApiModels": ["gemma", "gemma-27b"],
                    "ServiceUrl": "http://gemma/",
                    "ResourceRequirements": {"VRAM-GPU-1": 20000, "RAM": 3000},
                    "Environment": {"CUDA_VISIBLE_DEVICES": "0", "_X1": ""},
                    "User": "llm-runner",
                }
            ],
        }
    )
    config = parse(text)
    assert config.shutdown_after_inactivity_s == 120
    assert config.max_wait_for_connection_close_s == 30
    assert config.output_service_logs is False
    assert config.default_service_url == "http://localhost:{{.PORT}}/"
    assert config.listen_address == "::1"
    assert config.openai_api_listen_port == 7070
    assert config.management_api_listen_port == 7071
    assert config.resources_available == {"VRAM-GPU-1": 24000, "RAM": 32000, "cpu:cores": 0}
    assert config.services == (
        Service(
            name="Gemma-27B",
            listen_port=8081,
            listen_address="192.168.1.10",
            proxy_target_host="127.0.0.1",
            proxy_target_port=18081,
            command="/opt/llama.cpp/bin/llama-server",
            args="-m '/models/my model.gguf' --port 18081 -a \"x y\"",
            argv=(
                "/opt/llama.cpp/bin/llama-server",
                "-m",
                "/models/my model.gguf",
                "--port",
                "18081",
                "-a",
                "x y",
            ),
            work_dir="/opt/llama.cpp",
            log_file_path="/etc/lmproxy/logs/gemma.log",
            restart_on_connection_failure=True,
            resource_requirements={"VRAM-GPU-1": 20000, "RAM": 3000},
            healthcheck_command="curl --fail http://localhost:18081/health",
            healthcheck_interval_ms=500,
            startup_timeout_ms=60000,
            shutdown_after_inactivity_s=600,
            kill_command="pkill -f gemma",
            consider_stopped_on_process_exit=False,
            environment={"CUDA_VISIBLE_DEVICES": "0", "_X1": ""},
            user="llm-runner",
            openai_api=True,
            openai_api_models=("gemma", "gemma-27b"),
            service_url="http://gemma/",
        ),
    )
    assert config.service("Gemma-27B") is config.services[0]
    with pytest.raises(KeyError):
        config.service("nope")


def test_services_may_be_empty_or_absent_and_resources_absent() -> None:
    assert parse('{"Services": []}').services == ()
    empty = parse("{}")
    assert empty.services == ()
    assert empty.resources_available == {}


# The example from large-model-proxy's README (ports as strings, JSONC), less the services
# lmproxy cannot run (see test_readme_openai_only_service_is_refused).
README_EXAMPLE = """
{
  "DefaultServiceUrl": "http://localhost:{{.PORT}}/",
  "OpenAiApi": {
    "ListenPort": "7070",
  },
  "ManagementApi": {
    "ListenPort": "7071",
  },
  "MaxTimeToWaitForServiceToCloseConnectionBeforeGivingUpSeconds": 1200,
  "ShutDownAfterInactivitySeconds": 120,
  "ResourcesAvailable": {
    "VRAM-GPU-1": 24000,
    "RAM": 32000,
  },
  "Services": [
    {
      "Name": "automatic1111",
      "ListenPort": "7860",
      "ProxyTargetHost": "localhost",
      "ProxyTargetPort": "17860",
      "Command": "/opt/stable-diffusion-webui/webui.sh",
      "Args": "--port 17860",
      "WorkDir": "/opt/stable-diffusion-webui",
      "ShutDownAfterInactivitySeconds": 600,
      "RestartOnConnectionFailure": true,
      "ResourceRequirements": {
        "VRAM-GPU-1": 2000,
        "RAM": 30000,
      },
    },
    {
      "Name": "Gemma-27B",
      "OpenAiApi": true,
      "ListenPort": "8081",
      "ProxyTargetHost": "localhost",
      "ProxyTargetPort": "18081",
      "Command": "/opt/llama.cpp/llama-server",
      "Args": "-m /opt/Gemma-27B-v1_Q4km.gguf -c 8192 -ngl 100 -t 4 --port 18081",
      "ServiceUrl": "http://gemma-proxy-server/",
      "HealthcheckCommand": "curl --fail http://localhost:18081/health",
      "HealthcheckIntervalMilliseconds": 200,
      "RestartOnConnectionFailure": false,
      "ResourceRequirements": {
        "VRAM-GPU-1": 20000,
        "RAM": 3000,
      },
    },
    {
      "Name": "ComfyUI",
      "ListenPort": "8188",
      "ProxyTargetPort": "18188",
      "Command": "docker",
      "Args": "run -d --rm --name comfyui -p 18188:8188 pytorch/pytorch /bin/bash -c 'cd /workspace && python main.py --listen'",
      "KillCommand": "docker kill comfyui",
      "ConsiderStoppedOnProcessExit": false,
      "StartupTimeoutMilliseconds": 60000,
      "RestartOnConnectionFailure": true,
      "ShutDownAfterInactivitySeconds": 600,
      "ResourceRequirements": {
        "VRAM-GPU-1": 20000,
        "RAM": 16000,
      },
    },
  ],
}
"""  # noqa: E501


def test_large_model_proxy_readme_example() -> None:
    config = parse(README_EXAMPLE)
    assert config.openai_api_listen_port == 7070
    assert config.management_api_listen_port == 7071
    assert config.shutdown_after_inactivity_s == 120
    assert config.resources_available == {"VRAM-GPU-1": 24000, "RAM": 32000}
    assert [s.name for s in config.services] == ["automatic1111", "Gemma-27B", "ComfyUI"]
    a1111, gemma, comfy = config.services
    assert (a1111.listen_port, a1111.proxy_target_port) == (7860, 17860)
    assert a1111.argv == ("/opt/stable-diffusion-webui/webui.sh", "--port", "17860")
    assert a1111.shutdown_after_inactivity_s == 600
    assert gemma.shutdown_after_inactivity_s == 120  # inherited
    assert gemma.service_url == "http://gemma-proxy-server/"
    assert gemma.openai_api is True
    assert comfy.argv[-1] == "cd /workspace && python main.py --listen"
    assert comfy.kill_command == "docker kill comfyui"
    assert comfy.consider_stopped_on_process_exit is False
    assert comfy.proxy_target_host == "localhost"


def test_readme_openai_only_service_is_refused() -> None:
    qwen = {
        "Name": "Qwen/Qwen2.5-7B-Instruct",
        "OpenAiApi": True,
        "ProxyTargetHost": "localhost",
        "ProxyTargetPort": "18082",
        "Command": "/home/user/.conda/envs/vllm/bin/vllm",
        "LogFilePath": "/var/log/Qwen2.5-7B.log",
        "Args": "serve Qwen/Qwen2.5-7B-Instruct --port 18082",
        "ServiceUrl": None,
    }
    found = problems(document(qwen))
    assert [path for path, _ in found] == ["$.Services[0].ListenPort"]
    assert "OpenAI" in found[0][1]


def test_example_config_file_parses() -> None:
    config = load_config(EXAMPLE, EXAMPLE.parent)
    assert len(config.services) == 2
    assert {s.name for s in config.services} == {"llama-server", "automatic1111"}
    for service in config.services:
        if service.log_file_path is not None:
            assert service.log_file_path.startswith(str(EXAMPLE.parent) + "/")


# --- load_config -------------------------------------------------------------------------------


def test_load_config_resolves_relative_paths_where_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As large-model-proxy does: against the working directory, not the file's."""
    path = tmp_path / "conf" / "config.json"
    path.parent.mkdir()
    path.write_text(
        "\ufeff"
        + document(minimal_service(WorkDir="work", LogFilePath="../logs/x.log", Command="./run"))
    )
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    config = load_config(path)
    assert config.base_dir == str(tmp_path / "here")
    service = config.services[0]
    assert service.work_dir == str(tmp_path / "here" / "work")
    assert service.log_file_path == str(tmp_path / "logs" / "x.log")
    assert service.command == str(tmp_path / "here" / "work" / "run")
    elsewhere = load_config(path, tmp_path / "conf").services[0]
    assert elsewhere.work_dir == str(tmp_path / "conf" / "work")


def test_base_dir_that_no_unit_can_carry_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(document(minimal_service()), Path("/srv/a\nb"))
    [(path, message)] = caught.value.problems
    assert path == "$"
    assert "relative paths cannot be taken from this directory" in message
    assert "control character" in message


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "missing.json")
    [(path, message)] = caught.value.problems
    assert path == "$"
    assert "No such file or directory" in message


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b'{"Services": ["\xff"]}')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems[0][0] == "$"


def test_config_error_message_lists_every_problem() -> None:
    error = ConfigError([("$.A", "one"), ("$.B", "two")])
    assert str(error) == "$.A: one\n$.B: two"
    assert isinstance(error, ValueError)


# --- JSONC -------------------------------------------------------------------------------------


def test_comments_and_trailing_commas() -> None:
    text = """// leading comment
    {
      /* block
         comment */ "Services": [
        {
          "Name": "llm", // the name
          "ListenPort": "8081", /* inline */
          "ProxyTargetPort": "18081",
          "Command": "llama-server",
          "OpenAiApiModels": ["a", "b",],
        },
      ],
    } // trailing
    """
    assert parse(text).services[0].openai_api_models == ("a", "b")


def test_comment_markers_inside_strings_are_kept() -> None:
    text = r"""{"Services": [{
      "Name": "llm", "ListenPort": "8081", "ProxyTargetPort": "18081",
      "Command": "llama-server",
      "Args": "--url http://x/y // not a comment /* nor this */ ,]",
      "ServiceUrl": "http://h/\"//x,}"
    }]}"""
    service = parse(text).services[0]
    assert service.args == "--url http://x/y // not a comment /* nor this */ ,]"
    assert service.service_url == 'http://h/"//x,}'


def test_syntax_error_points_at_the_line_after_comments() -> None:
    text = '{\n/* one\ntwo\nthree */\n  "Services": [}\n'
    path, message = only_problem(text)
    assert path == "$"
    assert message.startswith("line 5 column 16: ")


def test_syntax_error_line_and_column() -> None:
    path, message = only_problem('{\n  "Services": [],\n  "ShutDownAfterInactivitySeconds" 1\n}')
    assert path == "$"
    assert message == "line 3 column 36: Expecting ':' delimiter"


@pytest.mark.parametrize(
    "text",
    ["", "   ", "{", '{"Services": [,]}', "{,}", '{"A": 1,,}', "[1,]x", "/* open"],
)
def test_invalid_jsonc_is_a_syntax_error(text: str) -> None:
    path, message = only_problem(text)
    assert path == "$"
    assert message.startswith("line ")


def test_unterminated_block_comment() -> None:
    assert only_problem('{"Services": []}\n  /* open') == (
        "$",
        "line 2 column 3: unterminated /* comment",
    )


@pytest.mark.parametrize(
    "text", ['{"Services": [] /* a */ /* b */}', "{} // no newline", '{"Services": [ // c\n]}']
)
def test_comments_in_odd_places(text: str) -> None:
    assert parse(text).services == ()


@pytest.mark.parametrize("text", ["[]", "1", '"x"', "null", "true"])
def test_top_level_must_be_an_object(text: str) -> None:
    path, message = only_problem(text)
    assert path == "$"
    assert "top level must be an object" in message


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(constant: str) -> None:
    path, message = only_problem('{"ShutDownAfterInactivitySeconds": ' + constant + "}")
    assert path == "$.ShutDownAfterInactivitySeconds"
    assert "not valid JSON" in message


def test_deep_nesting_is_a_config_error() -> None:
    path, _ = only_problem('{"Services": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert path == "$"


# --- Keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["WorkDir", "Workdir", "workdir", "WORKDIR", "wOrKdIr"])
def test_keys_are_case_insensitive(key: str) -> None:
    text = json.dumps({"services": [{**minimal_service(), key: "/srv"}]})
    assert parse(text).services[0].work_dir == "/srv"


def test_keys_fold_like_go() -> None:
    # Go's encoding/json folds the Kelvin sign to k and the long s to s.
    text = json.dumps({"\u017fervices": [{**minimal_service(), "\u212aillCommand": "x"}]})
    assert parse(text).services[0].kill_command == "x"
    # ...and nothing else outside ASCII.
    path, message = only_problem(json.dumps({"Servİces": []}))
    assert path == '$["Serv\\u0130ces"]'
    assert message.startswith("unknown field ")


def test_the_same_field_twice_is_an_error() -> None:
    service = '{"Name": "a", "ListenPort": 1, "ProxyTargetPort": 2, "Command": "c"'
    assert only_problem('{"Services": [' + service + ', "WorkDir": "/a", "Workdir": "/b"}]}') == (
        "$.Services[0].Workdir",
        "duplicate field 'Workdir': the same field as 'WorkDir' (field names are case-insensitive)",
    )
    assert only_problem('{"Services": [], "Services": []}') == (
        "$.Services",
        "duplicate field 'Services'",
    )


def test_unknown_fields() -> None:
    found = problems(
        json.dumps(
            {
                "Foo": 1,
                "OpenAiApi": {"ListenPort": "1", "Bar": 2},
                "Services": [minimal_service(Foo=1, ContextSize=4096, WorkDirr="/x")],
            }
        )
    )
    assert found == [
        ("$.Foo", "unknown field 'Foo'"),
        ("$.OpenAiApi.Bar", "unknown field 'Bar'"),
        ("$.Services[0].Foo", "unknown field 'Foo'"),
        ("$.Services[0].ContextSize", "unknown field 'ContextSize'"),
        ("$.Services[0].WorkDirr", "unknown field 'WorkDirr' (did you mean 'WorkDir'?)"),
    ]


def test_paths_quote_keys_that_are_not_plain() -> None:
    path, _ = only_problem(json.dumps({"ResourcesAvailable": {"a b": 1}}))
    assert path == '$.ResourcesAvailable["a b"]'


# --- Types -------------------------------------------------------------------------------------

BOOL_FIELDS = ["RestartOnConnectionFailure", "ConsiderStoppedOnProcessExit", "OpenAiApi"]


@pytest.mark.parametrize("field", BOOL_FIELDS)
@pytest.mark.parametrize("value", [1, 0, "true", [], {}, 1.0])
def test_bool_fields_take_only_booleans(field: str, value: object) -> None:
    path, message = service_problem(**{field: value})
    assert path == f"$.Services[0].{field}"
    assert message.startswith("expected true or false, got ")


def test_output_service_logs_is_a_bool() -> None:
    assert only_problem('{"OutputServiceLogs": "no"}') == (
        "$.OutputServiceLogs",
        "expected true or false, got 'no'",
    )


INT_FIELDS = {
    "HealthcheckIntervalMilliseconds": (0, 2**31 - 1),
    "StartupTimeoutMilliseconds": (1, 2**31 - 1),
    "ShutDownAfterInactivitySeconds": (0, 2**31 - 1),
}


@pytest.mark.parametrize("field", INT_FIELDS)
def test_service_integer_ranges(field: str) -> None:
    low, high = INT_FIELDS[field]
    extra = {"HealthcheckCommand": "true"}
    attribute = {
        "HealthcheckIntervalMilliseconds": "healthcheck_interval_ms",
        "StartupTimeoutMilliseconds": "startup_timeout_ms",
        "ShutDownAfterInactivitySeconds": "shutdown_after_inactivity_s",
    }[field]
    lowest = 200 if field == "HealthcheckIntervalMilliseconds" else low  # 0: the default
    assert getattr(one_service(**{field: low}, **extra), attribute) == lowest
    assert getattr(one_service(**{field: high}, **extra), attribute) == high
    for bad in (low - 1, high + 1):
        path, message = service_problem(**{field: bad}, **extra)
        assert path == f"$.Services[0].{field}"
        assert message == f"must be between {low} and {high}, got {bad}"


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", [True, False, 1.5, 1.0, 1e3, "5", [], {}])
def test_integer_fields_take_only_json_integers(field: str, value: object) -> None:
    path, message = service_problem(**{field: value}, HealthcheckCommand="true")
    assert path == f"$.Services[0].{field}"
    assert message.startswith("expected an integer between ")


def test_huge_integers_are_out_of_range() -> None:
    text = '{"ShutDownAfterInactivitySeconds": ' + "9" * 5000 + "}"
    path, message = only_problem(text)
    assert path == "$.ShutDownAfterInactivitySeconds"
    assert message.startswith("must be between 0 and 2147483647, got 9999")
    assert len(message) < 200


@pytest.mark.parametrize(
    "field",
    [
        "ShutDownAfterInactivitySeconds",
        "MaxTimeToWaitForServiceToCloseConnectionBeforeGivingUpSeconds",
    ],
)
def test_top_level_seconds(field: str) -> None:
    assert only_problem(json.dumps({field: -1})) == (
        f"$.{field}",
        "must be between 0 and 2147483647, got -1",
    )
    assert only_problem(json.dumps({field: 2**31}))[0] == f"$.{field}"
    assert only_problem(json.dumps({field: "60"}))[0] == f"$.{field}"
    parse(json.dumps({field: 0}))


PORT_FIELDS = ["ListenPort", "ProxyTargetPort"]


@pytest.mark.parametrize("field", PORT_FIELDS)
@pytest.mark.parametrize(("value", "expected"), [(1, 1), ("1", 1), (65535, 65535), ("080", 80)])
def test_ports_accept_integers_and_digit_strings(field: str, value: object, expected: int) -> None:
    other = {"ListenPort": "ProxyTargetPort", "ProxyTargetPort": "ListenPort"}[field]
    service = one_service(**{field: value, other: 2 if expected != 2 else 3})
    attribute = {"ListenPort": "listen_port", "ProxyTargetPort": "proxy_target_port"}[field]
    assert getattr(service, attribute) == expected


@pytest.mark.parametrize("field", PORT_FIELDS)
@pytest.mark.parametrize(
    "value",
    [
        0,
        "0",
        65536,
        "65536",
        -1,
        "-1",
        "+1",
        " 80",
        "80 ",
        "8O",
        "\uff18\uff10",
        "1" * 50,
        80.0,
        True,
        [],
        {},
    ],
)
def test_bad_ports(field: str, value: object) -> None:
    path, message = service_problem(**{field: value})
    assert path == f"$.Services[0].{field}"
    assert message.startswith("expected a port number from 1 to 65535")


@pytest.mark.parametrize("api", ["OpenAiApi", "ManagementApi"])
def test_api_ports(api: str) -> None:
    attribute = {
        "OpenAiApi": "openai_api_listen_port",
        "ManagementApi": "management_api_listen_port",
    }
    assert getattr(parse(json.dumps({api: {"ListenPort": "7070"}})), attribute[api]) == 7070
    assert getattr(parse(json.dumps({api: {"ListenPort": 7070}})), attribute[api]) == 7070
    assert getattr(parse(json.dumps({api: {"ListenPort": ""}})), attribute[api]) is None
    assert getattr(parse(json.dumps({api: {}})), attribute[api]) is None
    assert only_problem(json.dumps({api: {"ListenPort": "x"}}))[0] == f"$.{api}.ListenPort"
    assert only_problem(json.dumps({api: "7070"})) == (f"$.{api}", "expected an object, got '7070'")


@pytest.mark.parametrize(
    "field",
    [
        "Name",
        "Command",
        "Args",
        "KillCommand",
        "HealthcheckCommand",
        "LogFilePath",
        "WorkDir",
        "ServiceUrl",
        "ProxyTargetHost",
        "ListenAddress",
        "User",
    ],
)
@pytest.mark.parametrize("value", [1, True, [], {}])
def test_string_fields_take_only_strings(field: str, value: object) -> None:
    path, message = service_problem(**{field: value})
    assert path == f"$.Services[0].{field}"
    assert message.startswith("expected a string")


@pytest.mark.parametrize("char", ["\n", "\t", "\r", "\x00", "\x1b", "\x1f", "\x7f"])
@pytest.mark.parametrize(
    "field",
    [
        "Command",
        "Args",
        "KillCommand",
        "HealthcheckCommand",
        "LogFilePath",
        "WorkDir",
        "ServiceUrl",
        "Name",
    ],
)
def test_control_characters_are_refused(field: str, char: str) -> None:
    value = f"x{char}y"
    path, message = service_problem(**{field: value})
    assert path == f"$.Services[0].{field}"
    if field != "Name":
        assert message == (
            f"{value!r} contains the control character {char!r} at index 1; "
            "control characters are not allowed"
        )


def test_control_characters_in_nested_strings() -> None:
    found = problems(
        document(
            minimal_service(OpenAiApiModels=["ok", "a\nb"], Environment={"A": "1\x7f"}),
            DefaultServiceUrl="http://\x00/",
        )
    )
    assert [path for path, _ in found] == [
        "$.DefaultServiceUrl",
        "$.Services[0].OpenAiApiModels[1]",
        "$.Services[0].Environment.A",
    ]


def test_lone_surrogates_do_not_break_messages() -> None:
    found = problems('{"Services": [{"Name": "\\ud800", "\\udfff": 1}], "\ud800": 2}')
    assert [path for path, _ in found] == [
        '$["\\ud800"]',
        '$.Services[0]["\\udfff"]',
        "$.Services[0].Name",
        "$.Services[0].ProxyTargetPort",
        "$.Services[0].Command",
        "$.Services[0].ListenPort",  # (known only once OpenAiApi is read)
    ]
    str(ConfigError(found)).encode("utf-8")  # printable: surrogates are escaped


def test_non_ascii_is_fine_where_strings_are_free() -> None:
    service = one_service(Args="--prompt 'héllo wörld ✓'", ServiceUrl="http://ü/")
    assert service.argv == ("llama-server", "--prompt", "héllo wörld ✓")


# --- ListenAddress, Environment, User ---------------------------------------------------------


def test_listen_address_defaults_and_inherits() -> None:
    config = parse(
        document(
            minimal_service(),
            minimal_service(Name="b", ListenPort=2, ListenAddress="0.0.0.0"),
            ListenAddress="10.0.0.1",
        )
    )
    assert config.listen_address == "10.0.0.1"
    assert [s.listen_address for s in config.services] == ["10.0.0.1", "0.0.0.0"]
    assert one_service().listen_address == "127.0.0.1"


def test_ipv6_listen_address_is_canonical() -> None:
    assert one_service(ListenAddress="0:0::0001").listen_address == "::1"
    assert one_service(ListenAddress="FE80::A").listen_address == "fe80::a"


@pytest.mark.parametrize(
    "value", ["", "localhost", "[::1]", "127.0.0.1:80", "fe80::1%eth0", "1.2.3", "01.2.3.4", " ::1"]
)
def test_bad_listen_addresses(value: str) -> None:
    path, message = service_problem(ListenAddress=value)
    assert path == "$.Services[0].ListenAddress"
    assert message.startswith("expected an IPv4 or IPv6 address")
    assert repr(value) in message
    path, _ = only_problem(json.dumps({"ListenAddress": value}))
    assert path == "$.ListenAddress"


def test_environment() -> None:
    service = one_service(Environment={"A": "1", "b_2": "x y", "_": "$HOME %h"})
    assert service.environment == {"A": "1", "b_2": "x y", "_": "$HOME %h"}
    assert service_problem(Environment={"1A": "x"}) == (
        "$.Services[0].Environment.1A",
        "invalid variable name '1A': expected letters, digits and '_', not starting with a digit",
    )
    assert service_problem(Environment={"A-B": "x"})[0] == "$.Services[0].Environment.A-B"
    assert service_problem(Environment={"A": 1}) == (
        "$.Services[0].Environment.A",
        "expected a string, got 1",
    )
    assert service_problem(Environment=["A=1"]) == (
        "$.Services[0].Environment",
        "expected an object, got an array",
    )
    text = document(minimal_service(Environment={})).replace(
        '"Environment": {}', '"Environment": {"A": "1", "A": "2"}'
    )
    assert only_problem(text) == ("$.Services[0].Environment.A", "duplicate variable 'A'")


@pytest.mark.parametrize("user", ["_x", "llm-runner", "lmproxy-model", "a" * 31, "u1_-"])
def test_good_users(user: str) -> None:
    assert one_service(User=user).user == user


def test_root_needs_to_be_asked_for() -> None:
    path, message = service_problem(User="root")
    assert path == "$.Services[0].User"
    assert '"AllowRoot": true' in message
    assert one_service(User="root", AllowRoot=True).user == "root"
    assert service_problem(User="root", AllowRoot=False)[0] == "$.Services[0].User"


def test_the_shims_user_is_refused() -> None:
    """A model server running as lmproxy would hold the shims' polkit rights and could
    rewrite the ledger."""
    path, message = service_problem(User="lmproxy")
    assert path == "$.Services[0].User"
    assert "the shims' own user" in message


def test_user_null_or_absent() -> None:
    assert one_service(User=None).user is None
    assert one_service().user is None


@pytest.mark.parametrize("user", ["", "Root", "1abc", "-a", "a" * 32, "a b", "a.b", "a$"])
def test_bad_users(user: str) -> None:
    path, message = service_problem(User=user)
    assert path == "$.Services[0].User"
    assert message.startswith(f"invalid User {user!r}")


# --- Names and unit names ----------------------------------------------------------------------


def test_unit_names() -> None:
    assert unitnames.units_of("llm") == (
        "lmproxy-llm.socket",
        "lmproxy-llm.service",
        "lmproxy-backend@llm.service",
    )


# large-model-proxy takes any string: its README's own example, and names seen in use.
ANY_NAMES = [
    "a",
    "A.b-c_d",
    "0",
    "x" * 63,
    "Gemma-27B",
    "Qwen/Qwen2.5-7B-Instruct",
    "Service TWO2\ufe0f\u20e3 \u0414\u0432\u0430",
    "{Service 3}",
    "$-_.+!*'(),\u043f\u0440\u043e\u0432\u0435\u0440\u043a\u0430-2/",
    "-a",
    "_a",
    "a b",
    "a@b",
    "a\\",
    " padded ",
    "%n %i ${HOME}",
    "x" * 255,
    "\u00e9",
]


@pytest.mark.parametrize("name", ANY_NAMES)
def test_any_name_is_taken_as_written(name: str) -> None:
    assert one_service(Name=name).name == name


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "Name must not be empty"),
        ("x" * 256, "Name is longer than 255 characters"),
        ("a\u2028b", "control character"),
        ("a\ud800", "lone surrogate"),
        ("a\ufffe", "noncharacter"),
    ],
)
def test_names_no_unit_can_carry(name: str, problem: str) -> None:
    path, message = service_problem(Name=name)
    assert path == "$.Services[0].Name"
    assert problem in message


def test_names_with_control_characters_are_refused() -> None:
    path, message = service_problem(Name="a\n")
    assert path == "$.Services[0].Name"
    assert "control character" in message


def test_two_names_with_one_unit_name_are_refused_naming_both() -> None:
    """The mapping is a slug plus a CRC-32: two names that meet (found by search) are
    refused rather than sharing units."""
    first, second = "a/b", "a b"
    assert unitnames.component(first) != unitnames.component(second)
    slug_twin = unitnames.component(first)  # a plain name equal to another's component
    found = problems(
        document(minimal_service(Name=first, ListenPort=1), minimal_service(Name=slug_twin))
    )
    assert found == [
        (
            "$.Services[1].Name",
            f"the names 'a/b' ($.Services[0]) and {slug_twin!r} both give the unit name "
            f"'lmproxy-{slug_twin}.service': rename one of them",
        )
    ]


def test_name_is_required() -> None:
    service = minimal_service()
    del service["Name"]
    assert only_problem(document(service)) == ("$.Services[0].Name", "Name is required")


def test_duplicate_names() -> None:
    found = problems(
        document(
            minimal_service(ListenPort=1),
            minimal_service(Name="b", ListenPort=2),
            minimal_service(ListenPort=3),
        )
    )
    assert found == [
        ("$.Services[2].Name", "duplicate service name 'llm': $.Services[0] has it too")
    ]


def test_similar_names_that_do_not_collide() -> None:
    names = ["a", "A", "a-backend", "backend", "a-backend-x", "a.backend", "a_backend"]
    services = [minimal_service(Name=n, ListenPort=i + 1) for i, n in enumerate(names)]
    assert [s.name for s in parse(document(*services)).services] == names


# --- Ports and targets -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, ""])
def test_listen_port_is_required(value: str | None) -> None:
    service = minimal_service(ListenPort=value)
    if value is None:
        del service["ListenPort"]
    path, message = only_problem(document(service))
    assert path == "$.Services[0].ListenPort"
    assert message.startswith("ListenPort is required")
    assert "OpenAI" in message
    assert "unreachable" in message


def test_proxy_target_port_is_required() -> None:
    service = minimal_service()
    del service["ProxyTargetPort"]
    assert only_problem(document(service)) == (
        "$.Services[0].ProxyTargetPort",
        "ProxyTargetPort is required",
    )


def test_duplicate_listen_ports() -> None:
    found = problems(
        document(
            minimal_service(Name="a", ListenPort="8080", ProxyTargetPort=1),
            minimal_service(Name="b", ListenPort=8081, ProxyTargetPort=2),
            minimal_service(Name="c", ListenPort=8080, ProxyTargetPort=3),
        )
    )
    assert found == [
        (
            "$.Services[2].ListenPort",
            "ListenPort 8080 is already used by service 'a' ($.Services[0])",
        )
    ]


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("", "localhost"),
        ("localhost", "localhost"),
        ("gpu-box.lan", "gpu-box.lan"),
        ("10.0.0.2", "10.0.0.2"),
        ("0:0::1", "::1"),
        ("a" * 253, "a" * 253),
    ],
)
def test_proxy_target_host(host: str, expected: str) -> None:
    assert one_service(ProxyTargetHost=host).proxy_target_host == expected


@pytest.mark.parametrize(
    "host",
    ["[::1]", "host:80", "-host", ".host", "a" * 254, "http://x", "a b", "fe80::1%eth0", "é"],
)
def test_bad_proxy_target_hosts(host: str) -> None:
    path, message = service_problem(ProxyTargetHost=host)
    assert path == "$.Services[0].ProxyTargetHost"
    assert message.startswith("expected a host name or an IP address")


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST",
        "localhost.",
        "x.localhost",
        "127.0.0.1",
        "127.1.2.3",
        "::1",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "::",
        "127.1",
        "",
    ],
)
def test_target_on_loopback_must_not_be_a_listen_port(host: str) -> None:
    found = problems(
        document(
            minimal_service(Name="a", ListenPort=8080, ProxyTargetPort=18080),
            minimal_service(Name="b", ListenPort=8081, ProxyTargetPort=8080, ProxyTargetHost=host),
        )
    )
    [(path, message)] = found
    assert path == "$.Services[1].ProxyTargetPort"
    assert message.endswith(
        " port 8080 is where lmproxy itself listens for service 'a' ($.Services[0]): "
        "the service would connect back to lmproxy instead of to its backend"
    )
    if host in ("localhost", "127.0.0.1", ""):
        assert message.startswith(f"{host or 'localhost'!r} port")


def test_target_on_its_own_listen_port() -> None:
    path, message = service_problem(ListenPort=8080, ProxyTargetPort="8080")
    assert path == "$.Services[0].ProxyTargetPort"
    assert "this service" in message


def test_target_on_the_listen_address() -> None:
    path, _ = service_problem(
        ListenAddress="10.0.0.5", ListenPort=8080, ProxyTargetHost="10.0.0.5", ProxyTargetPort=8080
    )
    assert path == "$.Services[0].ProxyTargetPort"


@pytest.mark.parametrize("host", ["gpu-box", "10.0.0.2", "128.0.0.1", "::2"])
def test_remote_target_may_reuse_a_listen_port(host: str) -> None:
    assert (
        one_service(ListenPort=8080, ProxyTargetPort=8080, ProxyTargetHost=host).listen_port == 8080
    )


# --- Command, Args and paths -------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "   "])
def test_command_must_not_be_empty(value: str) -> None:
    assert service_problem(Command=value) == (
        "$.Services[0].Command",
        f"Command must not be empty, got {value!r}",
    )


def test_command_is_required() -> None:
    service = minimal_service()
    del service["Command"]
    assert only_problem(document(service)) == ("$.Services[0].Command", "Command is required")


@pytest.mark.parametrize(
    ("command", "work_dir", "expected"),
    [
        ("llama-server", None, "llama-server"),
        ("llama-server", "/opt", "llama-server"),
        ("./llama-server", None, "/etc/lmproxy/llama-server"),
        ("bin/x", "/opt/app", "/opt/app/bin/x"),
        ("../bin/x", "app", "/etc/lmproxy/bin/x"),
        ("/usr/bin/x", "/opt", "/usr/bin/x"),
        ("/usr/./bin//x", None, "/usr/bin/x"),
    ],
)
def test_command_resolution(command: str, work_dir: str | None, expected: str) -> None:
    extra = {} if work_dir is None else {"WorkDir": work_dir}
    service = one_service(Command=command, **extra)
    assert service.command == expected
    assert service.argv[0] == expected


@pytest.mark.parametrize(
    ("args", "argv"),
    [
        ("", ()),
        ("   ", ()),
        ("-m a.gguf  --port 1", ("-m", "a.gguf", "--port", "1")),
        ("'a b' \"c d\" e\\ f", ("a b", "c d", "e f")),
        ("--x='$HOME' # not a comment", ("--x=$HOME", "#", "not", "a", "comment")),
    ],
)
def test_args_are_split_like_a_posix_shell(args: str, argv: tuple[str, ...]) -> None:
    service = one_service(Args=args)
    assert service.args == args
    assert service.argv == ("llama-server", *argv)


@pytest.mark.parametrize("args", ["'open", '"open', "a\\"])
def test_unbalanced_args(args: str) -> None:
    path, message = service_problem(Args=args)
    assert path == "$.Services[0].Args"
    assert repr(args) in message


@pytest.mark.parametrize("field", ["WorkDir", "LogFilePath"])
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("x", "/etc/lmproxy/x"),
        ("./a/../b/", "/etc/lmproxy/b"),
        ("../x", "/etc/x"),
        ("/var/log/x", "/var/log/x"),
        ("//srv//x", "/srv/x"),
    ],
)
def test_paths_are_made_absolute(field: str, value: str, expected: str) -> None:
    service = one_service(**{field: value})
    assert (
        getattr(service, {"WorkDir": "work_dir", "LogFilePath": "log_file_path"}[field]) == expected
    )


@pytest.mark.parametrize("value", ["/", "//", "/..", "../../..", "/tmp/.."])
def test_log_file_path_must_not_be_root(value: str) -> None:
    assert service_problem(LogFilePath=value) == (
        "$.Services[0].LogFilePath",
        "LogFilePath must name a file, not '/'",
    )


def test_work_dir_may_be_root() -> None:
    assert one_service(WorkDir="/").work_dir == "/"


def test_relative_base_dir_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = parse_config(document(minimal_service(WorkDir="w")), Path("sub"))
    assert config.services[0].work_dir == str(tmp_path / "sub" / "w")
    config = parse_config(document(minimal_service(WorkDir="w")))
    assert config.services[0].work_dir == str(tmp_path / "w")


# --- Resources ---------------------------------------------------------------------------------


def test_resource_names() -> None:
    good = {"VRAM-GPU-1": 1, "a.b:c_d": 2, "0": 3, "x" * 64: 4}
    assert parse(json.dumps({"ResourcesAvailable": good})).resources_available == good
    for bad in ["", "-a", "a b", "x" * 65, "é", "a/b"]:
        path, message = only_problem(json.dumps({"ResourcesAvailable": {bad: 1}}))
        assert path.startswith("$.ResourcesAvailable")
        assert message.startswith(f"invalid resource name {bad!r}")


def test_resource_amounts() -> None:
    parse(json.dumps({"ResourcesAvailable": {"A": 0, "B": 2**53}}))
    for bad in [-1, 2**53 + 1, 1.5, "1", True, None]:
        path, _ = only_problem(json.dumps({"ResourcesAvailable": {"RAM": bad}}))
        assert path == "$.ResourcesAvailable.RAM"


def test_resources_in_large_model_proxys_object_form() -> None:
    """{"Amount": N} is a resource of N, as an integer is; Go writes null for the rest."""
    config = parse(
        json.dumps(
            {
                "ResourcesAvailable": {
                    "VRAM-GPU-0": {"Amount": 24000},
                    "RAM": {
                        "Amount": 64000,
                        "CheckCommand": None,
                        "CheckWhenNotEnoughIntervalMilliseconds": None,
                    },
                    "disk": 5,
                }
            }
        )
    )
    assert config.resources_available == {"VRAM-GPU-0": 24000, "RAM": 64000, "disk": 5}


NVIDIA_FREE = "nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits -i 0"


def test_resources_measured_by_a_check_command() -> None:
    config = parse(
        json.dumps(
            {
                "ResourcesAvailable": {
                    "VRAM-GPU-0": {
                        "CheckCommand": NVIDIA_FREE,
                        "CheckWhenNotEnoughIntervalMilliseconds": 500,
                    },
                    "RAM": {"Amount": 64000, "CheckCommand": "cat /srv/free"},
                },
                "Services": [minimal_service(ResourceRequirements={"VRAM-GPU-0": 10**9})],
            }
        )
    )
    assert config.resources_available == {"VRAM-GPU-0": UNBOUNDED, "RAM": 64000}
    assert config.resource_checks == {
        "VRAM-GPU-0": ResourceCheck(NVIDIA_FREE, 500),
        "RAM": ResourceCheck("cat /srv/free", 1000),
    }


def test_gpu_resources() -> None:
    """lmproxy's addition: a resource that is a GPU's memory, measured through NVML, its
    Amount given or "auto" (read at install)."""
    uuid = "GPU-8f3c2a1e-1b2c-4d5e-8f90-123456789abc"
    config = parse(
        json.dumps(
            {
                "ResourcesAvailable": {
                    "VRAM-GPU-0": {"Gpu": "0", "Amount": "auto"},
                    "VRAM-GPU-1": {"Gpu": 1, "Amount": 24000},
                    "VRAM-GPU-2": {"Gpu": uuid, "CheckWhenNotEnoughIntervalMilliseconds": 250},
                },
            }
        )
    )
    assert config.resources_available == {
        "VRAM-GPU-0": UNBOUNDED,
        "VRAM-GPU-1": 24000,
        "VRAM-GPU-2": UNBOUNDED,
    }
    assert config.auto_amounts == {"VRAM-GPU-0"}
    assert config.resource_checks == {
        "VRAM-GPU-0": ResourceCheck(None, 1000, "0"),
        "VRAM-GPU-1": ResourceCheck(None, 1000, "1"),
        "VRAM-GPU-2": ResourceCheck(None, 250, uuid),
    }


@pytest.mark.parametrize(
    ("resource", "path", "message"),
    [
        ({}, "$.ResourcesAvailable.RAM.Amount", "Amount is required (or a CheckCommand, or a Gpu)"),
        ({"Amount": "auto"}, "$.ResourcesAvailable.RAM.Amount", 'Amount "auto" is a GPU\'s total'),
        ({"Gpu": "one"}, "$.ResourcesAvailable.RAM.Gpu", "expected a GPU index"),
        ({"Gpu": True}, "$.ResourcesAvailable.RAM.Gpu", "expected a GPU index"),
        (
            {"Gpu": "0", "CheckCommand": "echo 1"},
            "$.ResourcesAvailable.RAM.Gpu",
            "by its Gpu or by a CheckCommand, not both",
        ),
        ({"Amount": None}, "$.ResourcesAvailable.RAM.Amount", "Amount is required"),
        ({"Amount": -1}, "$.ResourcesAvailable.RAM.Amount", "must be between 0 and"),
        ({"Amount": "1"}, "$.ResourcesAvailable.RAM.Amount", "expected an integer"),
        ({"Amount": 1, "Total": 2}, "$.ResourcesAvailable.RAM.Total", "unknown field"),
        ({"CheckCommand": " "}, "$.ResourcesAvailable.RAM.CheckCommand", "must not be blank"),
        (
            {"Amount": 1, "CheckWhenNotEnoughIntervalMilliseconds": 0},
            "$.ResourcesAvailable.RAM.CheckWhenNotEnoughIntervalMilliseconds",
            "must be between 1 and",
        ),
    ],
)
def test_bad_resource_objects(resource: dict[str, object], path: str, message: str) -> None:
    found = problems(
        document(
            minimal_service(ResourceRequirements={"RAM": 1}), ResourcesAvailable={"RAM": resource}
        )
    )
    assert found[0][0] == path
    assert message in found[0][1]
    assert len(found) == 1  # the requirement is not reported again


def test_resources_available_must_be_an_object() -> None:
    text = document(minimal_service(ResourceRequirements={"RAM": 1}), ResourcesAvailable=[1])
    assert only_problem(text) == (
        "$.ResourcesAvailable",
        "expected an object of resource amounts, got an array",
    )


def test_duplicate_resource() -> None:
    text = '{"ResourcesAvailable": {"RAM": 1, "RAM": 2}}'
    assert only_problem(text) == ("$.ResourcesAvailable.RAM", "duplicate resource 'RAM'")


def test_requirements() -> None:
    available = {"VRAM-GPU-1": 24000, "RAM": 32000}
    service = parse(
        document(
            minimal_service(ResourceRequirements={"VRAM-GPU-1": 24000, "RAM": 0}),
            ResourcesAvailable=available,
        )
    ).services[0]
    assert service.resource_requirements == {"VRAM-GPU-1": 24000, "RAM": 0}

    found = problems(
        document(
            minimal_service(ResourceRequirements={"VRAM-GPU-1": 30000, "CPU": 1, "RAM": -1}),
            ResourcesAvailable=available,
        )
    )
    assert found == [
        (
            "$.Services[0].ResourceRequirements.VRAM-GPU-1",
            "needs 30000 of 'VRAM-GPU-1' but only 24000 is available",
        ),
        ("$.Services[0].ResourceRequirements.CPU", "resource 'CPU' is not in ResourcesAvailable"),
        (
            "$.Services[0].ResourceRequirements.RAM",
            "must be between 0 and 9007199254740992, got -1",
        ),
    ]


def test_requirement_without_any_resources_available() -> None:
    assert service_problem(ResourceRequirements={"RAM": 1}) == (
        "$.Services[0].ResourceRequirements.RAM",
        "resource 'RAM' is not in ResourcesAvailable",
    )


def test_requirement_on_a_badly_declared_resource_is_reported_once() -> None:
    text = document(
        minimal_service(ResourceRequirements={"RAM": 1}), ResourcesAvailable={"RAM": "lots"}
    )
    assert [path for path, _ in problems(text)] == ["$.ResourcesAvailable.RAM"]


def test_requirements_must_be_an_object() -> None:
    assert service_problem(ResourceRequirements=[]) == (
        "$.Services[0].ResourceRequirements",
        "expected an object, got an array",
    )


# --- Defaults and the remaining fields ---------------------------------------------------------


@pytest.mark.parametrize(
    ("top", "own", "expected"),
    [(None, None, 0), (120, None, 120), (120, 0, 120), (120, 5, 5), (None, 7, 7)],
)
def test_shutdown_after_inactivity_inheritance(
    top: int | None, own: int | None, expected: int
) -> None:
    service = (
        minimal_service() if own is None else minimal_service(ShutDownAfterInactivitySeconds=own)
    )
    extra = {} if top is None else {"ShutDownAfterInactivitySeconds": top}
    assert parse(document(service, **extra)).services[0].shutdown_after_inactivity_s == expected


def test_healthcheck_interval_needs_a_healthcheck_command() -> None:
    assert service_problem(HealthcheckIntervalMilliseconds=100) == (
        "$.Services[0].HealthcheckIntervalMilliseconds",
        "HealthcheckIntervalMilliseconds is set but there is no HealthcheckCommand",
    )
    path, _ = service_problem(HealthcheckIntervalMilliseconds=100, HealthcheckCommand="")
    assert path == "$.Services[0].HealthcheckIntervalMilliseconds"
    service = one_service(HealthcheckIntervalMilliseconds=100, HealthcheckCommand="curl x")
    assert service.healthcheck_interval_ms == 100


@pytest.mark.parametrize("value", ["", None])
@pytest.mark.parametrize(
    ("field", "attribute"),
    [
        ("HealthcheckCommand", "healthcheck_command"),
        ("KillCommand", "kill_command"),
        ("LogFilePath", "log_file_path"),
        ("WorkDir", "work_dir"),
        ("ServiceUrl", "service_url"),
    ],
)
def test_empty_optional_strings_mean_none(field: str, attribute: str, value: str | None) -> None:
    assert getattr(one_service(**{field: value}), attribute) is None


def test_service_url() -> None:
    assert one_service(ServiceUrl="http://x/{{.PORT}}").service_url == "http://x/{{.PORT}}"
    assert one_service(ServiceUrl=None).service_url is None
    assert one_service().service_url is None


def test_default_service_url() -> None:
    assert parse('{"DefaultServiceUrl": "http://h/"}').default_service_url == "http://h/"
    assert parse('{"DefaultServiceUrl": null}').default_service_url is None
    assert parse('{"DefaultServiceUrl": ""}').default_service_url is None


def test_openai_api_models() -> None:
    assert one_service(OpenAiApiModels=[]).openai_api_models == ()
    assert one_service(OpenAiApiModels=["a", "b"]).openai_api_models == ("a", "b")
    assert service_problem(OpenAiApiModels="a") == (
        "$.Services[0].OpenAiApiModels",
        "expected an array of strings, got 'a'",
    )
    assert service_problem(OpenAiApiModels=["a", 1]) == (
        "$.Services[0].OpenAiApiModels[1]",
        "expected a string, got 1",
    )


NULLABLE_AS_GO_WRITES_THEM = {
    # large-model-proxy (Go) writes null for every unset optional field and reads it as the
    # default: the shapes seen in its users' configs.
    "RestartOnConnectionFailure": ("restart_on_connection_failure", False),
    "ConsiderStoppedOnProcessExit": ("consider_stopped_on_process_exit", True),
    "OpenAiApi": ("openai_api", False),
    "OpenAiApiModels": ("openai_api_models", ()),
    "ResourceRequirements": ("resource_requirements", {}),
    "StartupTimeoutMilliseconds": ("startup_timeout_ms", 600_000),
    "HealthcheckIntervalMilliseconds": ("healthcheck_interval_ms", 200),
    "ShutDownAfterInactivitySeconds": ("shutdown_after_inactivity_s", 0),
    "Args": ("args", ""),
    "ProxyTargetHost": ("proxy_target_host", "localhost"),
    "ListenAddress": ("listen_address", "127.0.0.1"),
    "LogFilePath": ("log_file_path", None),
    "WorkDir": ("work_dir", None),
    "ServiceUrl": ("service_url", None),
}


@pytest.mark.parametrize("field", NULLABLE_AS_GO_WRITES_THEM)
def test_null_means_the_default(field: str) -> None:
    attribute, default = NULLABLE_AS_GO_WRITES_THEM[field]
    assert getattr(one_service(**{field: None}), attribute) == default


def test_null_at_the_top_level_means_the_default() -> None:
    config = parse(
        document(
            minimal_service(),
            MaxTimeToWaitForServiceToCloseConnectionBeforeGivingUpSeconds=None,
            OutputServiceLogs=None,
            ShutDownAfterInactivitySeconds=None,
            DefaultServiceUrl=None,
            OpenAiApi=None,
            ManagementApi=None,
            LogLevel=None,
            ClientRequestBufferLimitBytes=None,
        )
    )
    assert config.max_wait_for_connection_close_s == 1200
    assert config.output_service_logs is True
    assert config.openai_api_listen_port is None


def test_a_required_field_left_null_is_missing() -> None:
    for field in ["Name", "Command", "ListenPort", "ProxyTargetPort"]:
        path, message = service_problem(**{field: None})
        assert path == f"$.Services[0].{field}"
        assert "required" in message or "needs" in message, message


def test_large_model_proxys_log_level_and_request_buffer_are_accepted() -> None:
    parse(document(minimal_service(), LogLevel="debug", ClientRequestBufferLimitBytes=1 << 20))
    assert only_problem('{"LogLevel": 3}')[0] == "$.LogLevel"
    assert only_problem('{"ClientRequestBufferLimitBytes": -1}')[0] == (
        "$.ClientRequestBufferLimitBytes"
    )


def test_a_healthcheck_interval_of_0_is_the_default_and_needs_no_command() -> None:
    assert one_service(HealthcheckIntervalMilliseconds=0).healthcheck_interval_ms == 200
    assert service_problem(HealthcheckIntervalMilliseconds=100) == (
        "$.Services[0].HealthcheckIntervalMilliseconds",
        "HealthcheckIntervalMilliseconds is set but there is no HealthcheckCommand",
    )


# --- Shapes and collecting problems -------------------------------------------------------------


@pytest.mark.parametrize("value", [{}, "a", 1])
def test_services_must_be_a_list(value: object) -> None:
    path, message = only_problem(json.dumps({"Services": value}))
    assert path == "$.Services"
    assert message.startswith("expected an array of services, got ")


@pytest.mark.parametrize("value", [[], "a", 1, None])
def test_each_service_must_be_an_object(value: object) -> None:
    text = json.dumps({"Services": [minimal_service(), value]})
    path, message = only_problem(text)
    assert path == "$.Services[1]"
    assert message.startswith("expected a service object, got ")


def test_every_problem_is_reported_at_once() -> None:
    found = problems(
        json.dumps(
            {
                "ListenAddress": "nope",
                "OutputServiceLogs": 1,
                "Services": [
                    {"Name": "ok", "ListenPort": 1, "ProxyTargetPort": 99999, "Command": ""},
                    {"ListenPort": "x"},
                ],
            }
        )
    )
    assert [path for path, _ in found] == [
        "$.OutputServiceLogs",
        "$.ListenAddress",
        "$.Services[0].ProxyTargetPort",
        "$.Services[0].Command",
        "$.Services[1].Name",
        "$.Services[1].ListenPort",
        "$.Services[1].ProxyTargetPort",
        "$.Services[1].Command",
    ]


def test_field_lists_are_documented_names() -> None:
    assert "WorkDir" in SERVICE_FIELDS
    assert "ListenAddress" in TOP_LEVEL_FIELDS
    for fields in (SERVICE_FIELDS, TOP_LEVEL_FIELDS, SLEEP_FIELDS):
        assert len(set(map(str.lower, fields))) == len(fields)


def test_every_field_of_the_settings_tables_is_in_the_readme() -> None:
    """The README's config tables document every field lmproxy reads, and no other."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    config_section = readme[readme.index("\n## Config\n") : readme.index("### `lmproxy status")]
    documented = set(re.findall(r"`([A-Z][A-Za-z]+)(?:\.ListenPort)?`", config_section))
    for name in (*TOP_LEVEL_FIELDS, *SERVICE_FIELDS, *SLEEP_FIELDS):
        assert name in documented, f"{name} is read but not in README's Config section"


# --- Fuzzing -----------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["", "0", "80", "65535", "localhost", "::1", "/", "a", "a-backend", "'"])
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=8,
)
small_json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["RAM", "A", "a b", ""]), children, max_size=3)
    ),
    max_leaves=4,
)
# A valid service with a few fields replaced or added: reaches the checks behind the first error.
service_dicts = st.builds(
    lambda overrides: {**minimal_service(), **overrides},
    st.dictionaries(
        st.sampled_from([*SERVICE_FIELDS, "workdir", "LISTENPORT", "Bogus"]),
        small_json_values,
        max_size=4,
    ),
)
config_dicts = st.builds(
    lambda services, top: {"Services": services, **top},
    st.lists(service_dicts, max_size=3),
    st.dictionaries(
        st.sampled_from([name for name in TOP_LEVEL_FIELDS if name != "Services"]),
        small_json_values,
        max_size=3,
    ),
)


def parses_or_refuses(text: str) -> None:
    try:
        config = parse(text)
    except ConfigError as error:
        assert error.problems
        for path, message in error.problems:
            assert path.startswith("$")
            assert isinstance(message, str) and message
    else:
        assert isinstance(config, Config)


@FUZZ
@given(st.text())
def test_fuzz_any_text(text: str) -> None:
    parses_or_refuses(text)


@FUZZ
@given(st.text(alphabet='{}[],:"/*\n \\tnu0123456789-.eE', max_size=60))
def test_fuzz_jsonc_punctuation(text: str) -> None:
    parses_or_refuses(text)


@FUZZ
@given(json_values)
def test_fuzz_any_json_value(value: object) -> None:
    parses_or_refuses(json.dumps(value))


@FUZZ
@given(config_dicts)
def test_fuzz_config_shaped_values(value: dict[str, object]) -> None:
    parses_or_refuses(json.dumps(value))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(SERVICE_FIELDS), json_scalars), max_size=25))
def test_fuzz_services_with_repeated_keys(pairs: list[tuple[str, object]]) -> None:
    body = ", ".join(f"{json.dumps(key)}: {json.dumps(value)}" for key, value in pairs)
    parses_or_refuses('{"Services": [{' + body + "}]}")


def test_connection_limits_default_to_none_and_take_counts() -> None:
    service = one_service()
    assert (service.max_connections, service.idle_connection_timeout_s) == (0, 0)
    service = one_service(MaxConnections=64, IdleConnectionTimeoutSeconds=300)
    assert (service.max_connections, service.idle_connection_timeout_s) == (64, 300)
    for field, value in (("MaxConnections", -1), ("IdleConnectionTimeoutSeconds", "x")):
        assert service_problem(**{field: value})[0] == f"$.Services[0].{field}"


def test_connections_are_counted_as_http_requests_unless_raw() -> None:
    assert one_service().protocol == "http"
    assert one_service(Protocol=None).protocol == "http"
    assert one_service(Protocol="raw").protocol == "raw"
    path, message = service_problem(Protocol="tcp")
    assert path == "$.Services[0].Protocol"
    assert message == 'expected "http" or "raw", got \'tcp\''


def unix_service(**overrides: Any) -> dict[str, Any]:
    service = minimal_service(**overrides)
    del service["ListenPort"]
    return service


def test_a_unix_socket_instead_of_a_port() -> None:
    fields = {"ListenPath": "/run/models/llm.sock", "SocketGroup": "models", "SocketMode": "0660"}
    service = parse(document(unix_service(**fields))).services[0]
    assert (service.listen_port, service.listen_path) == (None, "/run/models/llm.sock")
    assert (service.socket_user, service.socket_group, service.socket_mode) == (
        None,
        "models",
        "0660",
    )
    assert service.listen_stream == "/run/models/llm.sock"


@pytest.mark.parametrize(
    ("fields", "path", "problem"),
    [
        ({"ListenPath": "/run/x.sock"}, "ListenPath", "not both"),
        ({"Unix": True, "ListenPath": "run/x.sock"}, "ListenPath", "not absolute"),
        ({"Unix": True, "ListenPath": "/run/a b.sock"}, "ListenPath", "blanks"),
        ({"Unix": True, "ListenPath": "/" + "s" * 107}, "ListenPath", "at most 107"),
        ({"Unix": True, "ListenPath": "/x", "SocketMode": "rw"}, "SocketMode", "octal"),
        ({"Unix": True, "ListenPath": "/x", "SocketUser": "A B"}, "SocketUser", "invalid"),
        ({"SocketGroup": "models"}, "SocketGroup", "needs a ListenPath"),
    ],
)
def test_bad_unix_sockets(fields: dict[str, Any], path: str, problem: str) -> None:
    unix = fields.pop("Unix", False)
    where, message = only_problem(
        document(unix_service(**fields) if unix else minimal_service(**fields))
    )
    assert where == f"$.Services[0].{path}"
    assert problem in message


def test_two_services_on_one_unix_socket() -> None:
    first = unix_service(Name="a", ListenPath="/run/x.sock")
    second = unix_service(Name="b", ListenPath="/run/x.sock")
    path, message = only_problem(document(first, second))
    assert path == "$.Services[1].ListenPath"
    assert "already used by service 'a'" in message


def test_swap_after_waiting_and_min_loaded_default_from_the_top_level() -> None:
    first = minimal_service()
    second = minimal_service(Name="other", ListenPort=8082, ProxyTargetPort=18082)
    second.update(SwapAfterWaitingSeconds=1, MinLoadedSeconds=30)
    config = parse(document(first, second, SwapAfterWaitingSeconds=12, MinLoadedSeconds=4))
    assert (config.swap_after_waiting_s, config.min_loaded_s) == (12, 4)
    assert [(s.swap_after_waiting_s, s.min_loaded_s) for s in config.services] == [
        (12, 4),
        (1, 30),
    ]
    assert parse(document(minimal_service())).services[0].swap_after_waiting_s == 5


def test_swap_after_waiting_must_be_whole_seconds() -> None:
    with pytest.raises(ConfigError, match=r"\$.SwapAfterWaitingSeconds"):
        parse(document(minimal_service(), SwapAfterWaitingSeconds=-1))


def test_sleep_defaults_to_level_1_with_vllms_api() -> None:
    service = one_service(Sleep={})
    assert service.sleep == Sleep(level=1, holds={})
    assert one_service().sleep is None


def test_sleep_with_what_it_keeps_and_commands() -> None:
    sleepy = minimal_service(
        ResourceRequirements={"VRAM": 20000},
        Sleep={
            "level": 2,
            "ResourceRequirements": {"RAM": 500},
            "SleepCommand": "sd-unload",
            "WakeCommand": "sd-load",
        },
    )
    service = parse(document(sleepy, ResourcesAvailable={"VRAM": 24000, "RAM": 1000})).services[0]
    assert service.sleep == Sleep(2, {"RAM": 500}, "sd-unload", "sd-load")


@pytest.mark.parametrize(
    ("sleep", "path", "message"),
    [
        ({"Level": 3}, "Sleep.Level", "between 1 and 2, got 3"),
        ({"Levels": 1}, "Sleep.Levels", "did you mean 'Level'?"),
        ({"ResourceRequirements": {"RAM": 1}}, "Sleep.ResourceRequirements.RAM", "not in "),
        ({"ResourceRequirements": {"VRAM": 10**6}}, "Sleep.ResourceRequirements.VRAM", "only"),
        ({"SleepCommand": "x"}, "Sleep.SleepCommand", "WakeCommand is not"),
        ({"WakeCommand": "x"}, "Sleep.WakeCommand", "SleepCommand is not"),
        ({"SleepCommand": " ", "WakeCommand": "x"}, "Sleep.SleepCommand", "must not be blank"),
        (1, "Sleep", "expected an object, got 1"),
    ],
)
def test_sleep_problems_name_the_field(sleep: object, path: str, message: str) -> None:
    sleepy = minimal_service(ResourceRequirements={"VRAM": 1}, Sleep=sleep)
    where, problem = only_problem(document(sleepy, ResourcesAvailable={"VRAM": 24000}))
    assert where.endswith(path), where
    assert message in problem


# --- TensorSplit ---------------------------------------------------------------------------


def test_tensor_split_auto_takes_the_model_its_args_name() -> None:
    service = one_service(
        Command="/opt/llama-server",
        Args="--port 1 -m first.gguf -c 8192 --model models/qwen.gguf",
        WorkDir="/srv/llm",
        TensorSplit="auto",
    )
    assert service.split_model == "/srv/llm/models/qwen.gguf"  # the last -m, as llama reads
    assert service.split_context == 8192
    assert one_service(Args="--model=/m.gguf", TensorSplit="auto").split_model == "/m.gguf"
    assert one_service(TensorSplit=None).split_model is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"TensorSplit": "yes"}, 'expected "auto" or null'),
        ({"TensorSplit": "auto"}, "TensorSplit needs the model file in Args"),
        ({"TensorSplit": "auto", "Args": "-m m.gguf -ts 1,1"}, "leave -ts out of Args"),
        ({"TensorSplit": "auto", "Args": "-m m.gguf --n-gpu-layers=99"}, "leave --n-gpu-layers"),
        (
            {
                "TensorSplit": "auto",
                "Args": "-m m.gguf",
                "Environment": {"CUDA_VISIBLE_DEVICES": "0"},
            },
            "leave CUDA_VISIBLE_DEVICES out of Environment",
        ),
    ],
)
def test_tensor_split_problems(fields: dict[str, Any], message: str) -> None:
    path, problem = service_problem(**fields)
    assert path == "$.Services[0].TensorSplit"
    assert message in problem


# --- The OpenAI router ----------------------------------------------------------------------


def router_only(**overrides: Any) -> dict[str, Any]:
    service = minimal_service(**{"OpenAiApi": True, **overrides})
    del service["ListenPort"]
    return service


def test_a_routed_service_needs_no_port_where_there_is_a_router() -> None:
    config = parse(document(router_only(), OpenAiApi={"ListenPort": 8080}))
    (service,) = config.services
    assert service.router_only and service.listen_port is None
    assert config.routed == (service,) and service.model_ids == ("llm",)
    # Without the router it would be unreachable; without OpenAiApi, too.
    path, message = only_problem(document(router_only()))
    assert path == "$.Services[0].ListenPort" and "OpenAiApi.ListenPort" in message
    path, _ = only_problem(document(router_only(OpenAiApi=False), OpenAiApi={"ListenPort": 1}))
    assert path == "$.Services[0].ListenPort"


def test_the_routers_settings_and_their_defaults() -> None:
    config = parse(document(minimal_service(), OpenAiApi={"ListenPort": 8080}))
    assert config.router.api_keys == () and config.router.api_keys_file is None
    assert config.router.max_request_body_bytes == 64 * 1024 * 1024
    assert config.router.response_timeout_s == 600
    config = parse(
        document(
            minimal_service(),
            OpenAiApi={
                "ListenPort": 8080,
                "ApiKeys": ["sk-1"],
                "ApiKeysFile": "keys.txt",
                "MaxRequestBodyBytes": 1000,
                "ResponseTimeoutSeconds": 0,
            },
        )
    )
    assert config.router.api_keys == ("sk-1",)
    assert config.router.api_keys_file == str(BASE / "keys.txt")
    assert (config.router.max_request_body_bytes, config.router.response_timeout_s) == (1000, 0)


@pytest.mark.parametrize("key", ["", "has space", "tab\tkey", "ünïcode"])
def test_api_keys_must_fit_a_header_and_are_never_repeated_in_errors(key: str) -> None:
    found = problems(document(minimal_service(), OpenAiApi={"ListenPort": 1, "ApiKeys": [key]}))
    assert found[0][0] == "$.OpenAiApi.ApiKeys[0]"
    assert all(key not in message for _, message in found if key)


def test_one_model_id_for_two_services_is_refused_naming_both() -> None:
    first = minimal_service(Name="a", OpenAiApi=True, OpenAiApiModels=["qwen", "x"])
    second = minimal_service(Name="b", ListenPort="8082", OpenAiApi=True, OpenAiApiModels=["qwen"])
    path, message = only_problem(document(first, second, OpenAiApi={"ListenPort": 8080}))
    assert path == "$.Services[1].OpenAiApiModels"
    assert "'qwen'" in message and "$.Services[0]" in message
    # A service's Name stands for its models when it lists none.
    named = minimal_service(Name="qwen", ListenPort="8083", OpenAiApi=True)
    path, _ = only_problem(document(first, named, OpenAiApi={"ListenPort": 8080}))
    assert path == "$.Services[1].Name"
    # Without the router the ids route nowhere: nothing to refuse.
    assert len(parse(document(first, second)).services) == 2


def test_the_routers_port_is_no_one_elses() -> None:
    path, message = only_problem(document(minimal_service(), OpenAiApi={"ListenPort": 8081}))
    assert path == "$.OpenAiApi.ListenPort" and "8081" in message
    both = {"OpenAiApi": {"ListenPort": 7000}, "ManagementApi": {"ListenPort": 7000}}
    path, message = only_problem(document(minimal_service(), **both))
    assert path == "$.ManagementApi.ListenPort" and "$.OpenAiApi.ListenPort" in message
