"""Tests for lmproxy.render: what users rely on in the units rendered from a config.

The units are read back with a small reader of systemd's unit file syntax (written
here, independent of lmproxy.unitsyntax): sections, ``Key=value`` lines with repeated
keys kept in order, quoted words with C escapes, ``%%`` and ``$$``. A rendered value
that systemd would read differently from the config value (an expanded specifier, an
extra word, a line continuation) fails the reader or the comparison.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmproxy import render, resources, unitnames
from lmproxy.config import Config, ConfigError, parse_config
from lmproxy.paths import Scope, paths_for
from lmproxy.render import FIRST_STAGE, Escaped, Interpreter, render_units

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "config.json"
BASE = Path("/srv/lmproxy")  # the directory relative paths in a config are taken from

PLAIN_PYTHON = Interpreter("/usr/bin/python3", {}, "/usr/lib/python3/dist-packages")
CHECKOUT_PYTHON = Interpreter("/x/python", {"PYTHONPATH": "/src"}, "/src")

USER_CONFIG = paths_for(Scope.USER, {"HOME": "/home/ann"}).installed_config
SYSTEM_CONFIG = paths_for(Scope.SYSTEM, {}).installed_config
CONFIG_PATHS = {Scope.USER: USER_CONFIG, Scope.SYSTEM: SYSTEM_CONFIG}

STATIC_UNITS = ("lmproxy.target", "lmproxy.slice")


# --- A reader of systemd unit files ------------------------------------------------------------


@dataclass
class Unit:
    """One unit file as systemd reads it: every setting, repeated keys in order."""

    text: str
    sections: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    directives: list[tuple[str, str]] = field(default_factory=list)  # (section, key), in order

    def values(self, section: str, key: str) -> list[str]:
        return self.sections.get(section, {}).get(key, [])

    def value(self, section: str, key: str) -> str:
        found = self.values(section, key)
        assert len(found) == 1, f"[{section}] {key}= is set {len(found)} times:\n{self.text}"
        return found[0]

    def has(self, section: str, key: str) -> bool:
        return bool(self.values(section, key))


_SECTION_RE = re.compile(r"\[([A-Za-z][A-Za-z0-9-]*)\]")
_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_BLANKS = " \t\n\r"  # what systemd strips from both ends of a line and of a value


def _continues(line: str) -> bool:
    """Whether systemd joins the next line to this one: a backslash left unpaired at the
    end when the line's backslashes are read as escape pairs from the start."""
    escaped = False
    for char in line:
        escaped = not escaped and char == "\\"
    return escaped


def parse_unit(text: str) -> Unit:
    assert "\r" not in text and "\x00" not in text, "systemd ends a line at CR and NUL too"
    unit = Unit(text)
    section: str | None = None
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip(_BLANKS)
        if not line or line[0] in "#;":
            continue  # a comment never continues onto the next line
        assert not _continues(line), f"line {number} continues onto the next: {raw!r}"
        header = _SECTION_RE.fullmatch(line)
        if header:
            section = header.group(1)
            assert section not in unit.sections, f"section [{section}] twice"
            unit.sections[section] = {}
            continue
        key, equals, value = line.partition("=")
        key = key.strip(_BLANKS)
        assert equals and _KEY_RE.fullmatch(key), f"line {number} is no setting: {raw!r}"
        assert section is not None, f"line {number} is outside any section: {raw!r}"
        unit.sections[section].setdefault(key, []).append(value.strip(_BLANKS))
        unit.directives.append((section, key))
    return unit


_C_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "s": " ",
    "\\": "\\",
    '"': '"',
    "'": "'",
}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}


def split_words(value: str) -> list[str]:
    """The words of an ``Exec*=`` or ``Environment=`` value: split at blanks, quotes
    removed and C escapes decoded, as systemd's extract_first_word() does with
    EXTRACT_UNQUOTE | EXTRACT_CUNESCAPE. Fails on anything this reader does not know."""
    words: list[str] = []
    i, n = 0, len(value)
    while True:
        while i < n and value[i] in _BLANKS:
            i += 1
        if i == n:
            return words
        word: list[str] = []
        quote = ""
        while i < n:
            char = value[i]
            if char == "\\":
                escape = value[i + 1 : i + 2]
                if escape in _C_ESCAPES:
                    word.append(_C_ESCAPES[escape])
                    i += 2
                    continue
                digits = _HEX_DIGITS.get(escape)
                assert digits, f"unknown escape \\{escape} in {value!r}"
                code = value[i + 2 : i + 2 + digits]
                assert re.fullmatch(f"[0-9a-fA-F]{{{digits}}}", code), value
                word.append(chr(int(code, 16)))
                i += 2 + digits
                continue
            if quote:
                if char == quote:
                    quote = ""
                else:
                    word.append(char)
            elif char in "\"'":
                quote = char
            elif char in _BLANKS:
                break
            else:
                word.append(char)
            i += 1
        assert not quote, f"unterminated quote in {value!r}"
        words.append("".join(word))


def unspecify(text: str, *, dollar: bool = False) -> str:
    """Undo the doubling of ``%`` (and, where systemd expands variables, of ``$``); a
    lone ``%`` or ``$`` would be expanded by systemd, and fails."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "%" or (dollar and char == "$"):
            assert text[i + 1 : i + 2] == char, f"systemd would expand {text[i:]!r}"
            i += 1
        out.append(char)
        i += 1
    return "".join(out)


def exec_argv(value: str) -> list[str]:
    """The argv an ``Exec*=`` line runs; for the ``@`` form, also checks that the
    executed path is argv[0]."""
    words = split_words(value)
    assert words, "empty command line"
    first = words[0]
    if first.startswith("@"):
        path = unspecify(first[1:])
        argv = [unspecify(word, dollar=True) for word in words[1:]]
        assert argv and argv[0] == path, value
        return argv
    assert first[:1] not in set("-:+!"), f"command prefix in {value!r}"
    return [unspecify(word, dollar=True) for word in words]


def environment(values: Sequence[str]) -> dict[str, str]:
    """The variables set by ``Environment=`` lines (no ``$`` expansion there)."""
    result: dict[str, str] = {}
    for line in values:
        for word in split_words(line):
            key, equals, value = unspecify(word).partition("=")
            assert equals, f"{word!r} is no assignment"
            result[key] = value
    return result


def environment_file_values(text: str) -> dict[str, str]:
    """What systemd's reader of EnvironmentFile= (parse_env_file_internal) takes from
    lines of the form lmproxy writes, KEY="value": inside the quotes a backslash
    unescapes one of " \\ ` $ and is kept before anything else; line breaks are
    part of the value. Strict: anything else in the file fails the test."""
    result: dict[str, str] = {}
    rest = text
    while rest:
        key, equals, rest = rest.partition('="')
        assert equals and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), rest
        value, index = [], 0
        while rest[index] != '"':
            if rest[index] == "\\":
                index += 1
                if rest[index] not in '"\\`$':
                    value.append("\\")
            value.append(rest[index])
            index += 1
        assert rest[index + 1] == "\n", rest
        result[key] = "".join(value)
        rest = rest[index + 2 :]
    return result


def backend_environment(
    config: Config, name: str = "llm", interpreter: Interpreter = PLAIN_PYTHON
) -> dict[str, str]:
    """The environment that name's backend gets from its environment file."""
    text = render.render_environment_files(config, interpreter).get(name)
    return {} if text is None else environment_file_values(text)


def test_the_reader_is_strict() -> None:
    unit = parse_unit("# c \\\n[Unit]\nA=1\n; c\n[Service]\nB = x y \nB=\nC=a\\\\\n")
    assert unit.sections == {"Unit": {"A": ["1"]}, "Service": {"B": ["x y", ""], "C": ["a\\\\"]}}
    assert unit.directives == [("Unit", "A"), ("Service", "B"), ("Service", "B"), ("Service", "C")]
    for bad in ("A=1\n", "[Unit]\nA=1\\\nB=2\n", "[Unit]\nnot a setting\n", "[Unit]\r\nA=1\n"):
        with pytest.raises(AssertionError):
            parse_unit(bad)
    assert split_words('"a b" c\\x41 \'d"e\' "\\u00e9\\"" ""') == ["a b", "cA", 'd"e', 'é"', ""]
    assert exec_argv('"/bin/x" "%%n" "$$HOME"') == ["/bin/x", "%n", "$HOME"]
    assert exec_argv('"@/bin/a$b" "/bin/a$$b" "x"') == ["/bin/a$b", "x"]
    for bad in ('"/bin/x" "%n"', '"/bin/x" "$HOME"', '"-/bin/x"', '"/bin/x" "a', "/bin/x \\q"):
        with pytest.raises(AssertionError):
            exec_argv(bad)
    assert environment(['"A=$x %%" "B=1"']) == {"A": "$x %", "B": "1"}


# --- Configs and their units -------------------------------------------------------------------


def service(name: str = "llm", port: int = 8081, **fields: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "Name": name,
        "ListenPort": port,
        "ProxyTargetPort": port + 10000,
        "Command": "/usr/bin/model-server",
    }
    entry.update(fields)
    return entry


def make_config(*services: dict[str, Any], **top: Any) -> Config:
    return parse_config(json.dumps({"Services": list(services), **top}), BASE)


def example_config() -> Config:
    return parse_config(EXAMPLE.read_text(), BASE)


def render_texts(
    config: Config,
    *,
    scope: Scope = Scope.USER,
    interpreter: Interpreter = PLAIN_PYTHON,
    config_path: Path | None = None,
) -> dict[str, str]:
    return render_units(
        config,
        scope=scope,
        config_path=config_path or CONFIG_PATHS[scope],
        interpreter=interpreter,
    )


def render_parsed(
    config: Config,
    *,
    scope: Scope = Scope.USER,
    interpreter: Interpreter = PLAIN_PYTHON,
    config_path: Path | None = None,
) -> dict[str, Unit]:
    texts = render_texts(config, scope=scope, interpreter=interpreter, config_path=config_path)
    return {name: parse_unit(text) for name, text in texts.items()}


def files_of(*names: str) -> set[str]:
    """The unit files users find for services of these names."""
    files = set(STATIC_UNITS)
    for name in names:
        files |= {f"lmproxy-{name}.socket", f"lmproxy-{name}.service"}
        files.add(f"lmproxy-backend@{name}.service")
    return files


def example_services() -> list[dict[str, Any]]:
    services: list[dict[str, Any]] = json.loads(EXAMPLE.read_text())["Services"]
    return services


# --- Unit files --------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", list(Scope))
def test_example_gives_three_units_per_service_the_routers_and_the_static_ones(
    scope: Scope,
) -> None:
    names = [entry["Name"] for entry in example_services()]
    assert names == ["llama-server", "automatic1111"]
    router = {"lmproxy-api@openai.socket", "lmproxy-api@openai.service"}
    assert set(render_texts(example_config(), scope=scope)) == files_of(*names) | router


def test_hand_written_config_gives_three_units_per_service() -> None:
    names = ["a", "Llama-3.1_8b", "x.y", "9-z_"]
    config = make_config(*(service(name, 8000 + i) for i, name in enumerate(names)))
    texts = render_texts(config)
    assert set(texts) == files_of(*names)
    assert len(texts) == 3 * len(names) + 2


def test_no_services_gives_only_the_static_units() -> None:
    assert set(render_texts(make_config())) == set(STATIC_UNITS)


def test_static_units_are_copied_unchanged() -> None:
    texts = render_texts(example_config())
    for name in STATIC_UNITS:
        assert texts[name] == (resources.data_dir("units") / name).read_text()
    assert parse_unit(texts["lmproxy.target"]).value("Install", "WantedBy") == "sockets.target"
    assert parse_unit(texts["lmproxy.slice"]).sections.keys() == {"Unit"}


def test_every_unit_is_well_formed() -> None:
    for text in render_texts(example_config(), interpreter=CHECKOUT_PYTHON).values():
        assert text.endswith("\n")
        unit = parse_unit(text)
        assert unit.directives
        assert unit.has("Unit", "Description")


# --- The socket --------------------------------------------------------------------------------


def test_example_sockets() -> None:
    units = render_parsed(example_config())
    # The example exposes nothing beyond loopback: a model server has no authentication.
    llama = units["lmproxy-llama-server.socket"]
    assert llama.value("Socket", "ListenStream") == "127.0.0.1:8081"
    assert units["lmproxy-automatic1111.socket"].value("Socket", "ListenStream") == "127.0.0.1:7860"
    for name in ("llama-server", "automatic1111"):
        socket = units[f"lmproxy-{name}.socket"]
        assert socket.value("Socket", "Accept") == "no"
        assert socket.value("Install", "WantedBy") == "lmproxy.target"
        assert socket.sections.keys() == {"Unit", "Socket", "Install"}


@pytest.mark.parametrize(
    ("address", "listen"),
    [
        ("127.0.0.1", "127.0.0.1:8081"),
        ("0.0.0.0", "0.0.0.0:8081"),
        ("10.1.2.3", "10.1.2.3:8081"),
        ("::1", "[::1]:8081"),
        ("::", "[::]:8081"),
        ("2001:db8::7", "[2001:db8::7]:8081"),
        ("2001:0DB8:0000:0000:0000:0000:0000:0007", "[2001:db8::7]:8081"),
        ("fe80::1", "[fe80::1]:8081"),
    ],
)
def test_listen_stream_forms(address: str, listen: str) -> None:
    for config in (
        make_config(service(ListenAddress=address)),
        make_config(service(), ListenAddress=address),
    ):
        socket = render_parsed(config)["lmproxy-llm.socket"]
        assert socket.values("Socket", "ListenStream") == [listen]


def test_listen_port_as_string_or_number() -> None:
    for port in (65535, "65535", "0065535"):
        config = make_config(service(ListenPort=port, ProxyTargetPort=1))
        assert render_parsed(config)["lmproxy-llm.socket"].value("Socket", "ListenStream") == (
            "127.0.0.1:65535"
        )


# --- The shim ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", list(Scope))
def test_shim_runs_the_first_stage_for_its_service(scope: Scope) -> None:
    units = render_parsed(example_config(), scope=scope)
    for name in ("llama-server", "automatic1111"):
        shim = units[f"lmproxy-{name}.service"]
        # -S: no site start-up on the way to a cold start's StartUnit; -P: the working
        # directory is not on the module path.
        assert exec_argv(shim.value("Service", "ExecStart")) == [
            "/usr/bin/python3",
            "-P",
            "-S",
            "-c",
            "from lmproxy.earlystart import main; main()",
            f"--{scope.value}",
            "--config",
            str(CONFIG_PATHS[scope]),
            name,
        ]
        assert shim.value("Service", "Type") == "notify"
        assert shim.value("Unit", "StartLimitIntervalSec") == "0"
        assert shim.values("Unit", "Requires") == [f"lmproxy-{name}.socket"]
        assert shim.values("Unit", "After") == [f"lmproxy-{name}.socket"]
        assert shim.value("Service", "Slice") == "lmproxy.slice"
        assert "Install" not in shim.sections  # only ever started by its socket


def test_shim_config_path_is_passed_exactly() -> None:
    path = Path("/home/a b/100%n $HOME/'q' \"d\"/config.json")
    shim = render_parsed(example_config(), config_path=path)["lmproxy-llama-server.service"]
    argv = exec_argv(shim.value("Service", "ExecStart"))
    assert argv[argv.index("--config") + 1] == str(path)


def test_render_for_uses_the_installed_config_and_this_interpreter(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from lmproxy.installer import render_for

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    units = {
        name: parse_unit(text) for name, text in render_for(example_config(), Scope.USER).items()
    }
    argv = exec_argv(units["lmproxy-llama-server.service"].value("Service", "ExecStart"))
    assert argv[0] == sys.executable
    assert argv[1:6] == ["-P", "-S", "-c", FIRST_STAGE, "--user"]
    assert argv[argv.index("--config") + 1] == str(tmp_path / "xdg" / "lmproxy" / "config.json")


def test_shim_of_an_installed_interpreter_finds_lmproxy_without_site() -> None:
    units = render_parsed(example_config(), interpreter=PLAIN_PYTHON)
    for name in ("llama-server", "automatic1111"):
        shim = units[f"lmproxy-{name}.service"]
        assert environment(shim.values("Service", "Environment")) == {
            "PYTHONPATH": "/usr/lib/python3/dist-packages"
        }


def test_shim_gets_the_pythonpath_of_a_checkout() -> None:
    units = render_parsed(example_config(), interpreter=CHECKOUT_PYTHON)
    for name in ("llama-server", "automatic1111"):
        shim = units[f"lmproxy-{name}.service"]
        assert environment(shim.values("Service", "Environment")) == {"PYTHONPATH": "/src"}
        assert exec_argv(shim.value("Service", "ExecStart"))[0] == "/x/python"
    # A backend that runs its command directly gets the config's environment only.
    backend_env = backend_environment(example_config(), "llama-server", CHECKOUT_PYTHON)
    assert backend_env == {"CUDA_VISIBLE_DEVICES": "0"}


# --- The backend -------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", list(Scope))
def test_rendered_units_hold_no_secret(scope: Scope, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit files are readable by every local user and systemd shows Environment= to
    anyone over D-Bus: the environment is in a file beside the installed config."""
    from lmproxy.installer import render_for

    monkeypatch.setenv("XDG_CONFIG_HOME", "/home/u/.config")
    secret = {"API_KEY": "s3cret", "HF_TOKEN": "hf_s3cret"}
    config = make_config(service(Environment=secret, LogFilePath="/var/log/x.log"))
    units = render_for(config, scope)
    assert not [name for name, text in units.items() if "s3cret" in text]
    backend = parse_unit(units["lmproxy-backend@llm.service"])
    expected = paths_for(scope).config_dir / "environment" / "llm.env"
    assert backend.value("Service", "EnvironmentFile") == str(expected)
    assert not backend.has("Service", "Environment")
    assert backend_environment(config) == secret


def test_example_backends() -> None:
    units = render_parsed(example_config())
    for entry in example_services():
        name = entry["Name"]
        backend = units[f"lmproxy-backend@{name}.service"]
        argv = [entry["Command"], *shlex.split(entry["Args"])]
        exec_start = backend.value("Service", "ExecStart")
        if "LogFilePath" in entry:
            log = str(BASE / entry["LogFilePath"])
            argv = ["/usr/bin/python3", "-P", "-m", "lmproxy.logtee", log, "--", *argv]
        # Plain values: a POSIX shell's reading of the line gives the argv back.
        assert shlex.split(exec_start) == argv
        assert backend.value("Service", "Type") == "exec"
        assert backend.value("Service", "SyslogIdentifier") == f"lmproxy-{name}"
        assert backend.value("Service", "Slice") == "lmproxy.slice"
        assert backend.value("Service", "WorkingDirectory") == entry["WorkDir"]
        assert backend_environment(example_config(), name) == entry["Environment"]
        assert not backend.has("Service", "User")
        assert not backend.has("Service", "RemainAfterExit")
        assert not backend.has("Service", "ExecStop")
        assert "Install" not in backend.sections  # never started at boot


def test_backend_argv_of_simple_args() -> None:
    config = make_config(
        service(Command="/opt/bin/server", Args="--model /m/a.gguf  -c 8192 --flag=x 'two words'")
    )
    backend = render_parsed(config)["lmproxy-backend@llm.service"]
    expected = ["/opt/bin/server", "--model", "/m/a.gguf", "-c", "8192", "--flag=x", "two words"]
    assert shlex.split(backend.value("Service", "ExecStart")) == expected
    assert exec_argv(backend.value("Service", "ExecStart")) == expected


def test_backend_without_args_runs_the_bare_command() -> None:
    cases: list[dict[str, Any]] = [{}, {"Args": ""}, {"Args": "   "}]
    for args in cases:
        backend = render_parsed(make_config(service(**args)))["lmproxy-backend@llm.service"]
        assert exec_argv(backend.value("Service", "ExecStart")) == ["/usr/bin/model-server"]


def test_backend_minimal_has_no_optional_settings() -> None:
    backend = render_parsed(make_config(service()))["lmproxy-backend@llm.service"]
    for key in ("EnvironmentFile", "User", "RemainAfterExit", "ExecStop"):
        assert not backend.has("Service", key), key


def test_without_work_dir_backend_and_shim_run_in_the_base_dir() -> None:
    """Where large-model-proxy would run them: where it was started. "-": a directory
    the unit's user cannot enter leaves it in its default instead of failing."""
    units = render_parsed(make_config(service()))
    for unit in ("lmproxy-backend@llm.service", "lmproxy-llm.service"):
        assert units[unit].value("Service", "WorkingDirectory") == "-/srv/lmproxy", unit
    with_work_dir = render_parsed(make_config(service(WorkDir="/opt/m")))
    backend = with_work_dir["lmproxy-backend@llm.service"]
    assert backend.value("Service", "WorkingDirectory") == "/opt/m"
    shim = with_work_dir["lmproxy-llm.service"]
    assert shim.value("Service", "WorkingDirectory") == "-/srv/lmproxy"


def test_backend_user_only_when_set() -> None:
    cases: list[dict[str, Any]] = [{}, {"User": None}]
    for fields in cases:
        backend = render_parsed(make_config(service(**fields)))["lmproxy-backend@llm.service"]
        assert not backend.has("Service", "User")
    backend = render_parsed(make_config(service(User="models")))["lmproxy-backend@llm.service"]
    assert backend.values("Service", "User") == ["models"]


@pytest.mark.parametrize(("consider_stopped", "remain"), [(None, []), (True, []), (False, ["yes"])])
def test_remain_after_exit_only_when_processes_outlive_the_command(
    consider_stopped: bool | None, remain: list[str]
) -> None:
    fields: dict[str, Any] = (
        {} if consider_stopped is None else {"ConsiderStoppedOnProcessExit": consider_stopped}
    )
    backend = render_parsed(make_config(service(**fields)))["lmproxy-backend@llm.service"]
    assert backend.values("Service", "RemainAfterExit") == remain


def test_kill_command_becomes_exec_stop_through_sh() -> None:
    kill = 'docker stop "llm-$MAINPID" && pkill -f "serve %n"; echo \\done'
    backend = render_parsed(make_config(service(KillCommand=kill)))["lmproxy-backend@llm.service"]
    stops = backend.values("Service", "ExecStop")
    assert len(stops) == 1
    assert exec_argv(stops[0]) == ["/bin/sh", "-c", kill]
    for empty in ("", None):
        backend = render_parsed(make_config(service(KillCommand=empty)))[
            "lmproxy-backend@llm.service"
        ]
        assert not backend.has("Service", "ExecStop")


def test_relative_work_dir_and_command_are_resolved() -> None:
    config = make_config(service(WorkDir="models/llm", Command="./bin/serve", Args="-x"))
    backend = render_parsed(config)["lmproxy-backend@llm.service"]
    assert backend.value("Service", "WorkingDirectory") == "/srv/lmproxy/models/llm"
    assert exec_argv(backend.value("Service", "ExecStart")) == [
        "/srv/lmproxy/models/llm/bin/serve",
        "-x",
    ]


def test_bare_command_name_is_kept() -> None:
    config = make_config(service(Command="llama-server", Args="--port 1"))
    backend = render_parsed(config)["lmproxy-backend@llm.service"]
    assert exec_argv(backend.value("Service", "ExecStart")) == ["llama-server", "--port", "1"]


def test_environment_entries_in_order() -> None:
    env = {"B_SECOND": "2", "A_FIRST": "1", "_x9": "", "PATH": "/opt/bin:/usr/bin"}
    text = render.render_environment_files(make_config(service(Environment=env)), PLAIN_PYTHON)
    assert [line.split("=")[0] for line in text["llm"].splitlines()] == list(env)
    assert environment_file_values(text["llm"]) == env


@pytest.mark.parametrize("interpreter", [PLAIN_PYTHON, CHECKOUT_PYTHON])
def test_log_file_path_runs_the_command_through_logtee(interpreter: Interpreter) -> None:
    config = make_config(
        service(
            Command="/opt/bin/server",
            Args="--port 18081 -v",
            LogFilePath="logs/llm.log",
            Environment={"CUDA_VISIBLE_DEVICES": "1"},
        )
    )
    backend = render_parsed(config, interpreter=interpreter)["lmproxy-backend@llm.service"]
    assert exec_argv(backend.value("Service", "ExecStart")) == [
        interpreter.executable,
        "-P",
        "-m",
        "lmproxy.logtee",
        "/srv/lmproxy/logs/llm.log",
        "--",
        "/opt/bin/server",
        "--port",
        "18081",
        "-v",
    ]
    # The tee is lmproxy's own module: it needs the interpreter's environment too.
    assert backend_environment(config, "llm", interpreter) == {
        **interpreter.environment,
        "CUDA_VISIBLE_DEVICES": "1",
    }
    assert backend.value("Service", "SyslogIdentifier") == "lmproxy-llm"


def test_names_reach_the_units_unchanged() -> None:
    name = "Llama-3.1_8b"
    units = render_parsed(make_config(service(name)))
    backend = units[f"lmproxy-backend@{name}.service"]
    assert backend.value("Service", "SyslogIdentifier") == f"lmproxy-{name}"
    shim = units[f"lmproxy-{name}.service"]
    assert exec_argv(shim.value("Service", "ExecStart"))[-1] == name
    assert shim.values("Unit", "Requires") == [f"lmproxy-{name}.socket"]


# --- The guard against unescaped values --------------------------------------------------------


def test_guard_refuses_a_plain_str() -> None:
    env = render._environment()
    assert isinstance(env.loader, jinja2.FileSystemLoader)
    template = env.from_string("Description={{ value }}\n")
    with pytest.raises(TypeError, match="unescaped"):
        template.render(value="plain; injected\nExecStart=/bin/evil")
    assert template.render(value=Escaped("safe")) == "Description=safe\n"


@pytest.mark.parametrize("value", [42, None, ["a"], "", "%n"])
def test_guard_refuses_anything_not_escaped(value: object) -> None:
    template = render._environment().from_string("X={{ value }}\n")
    with pytest.raises(TypeError):
        template.render(value=value)


def test_guard_refuses_what_an_expression_makes_of_an_escaped_value() -> None:
    env = render._environment()
    for source in ("{{ v ~ 'x' }}", "{{ v | upper }}", "{{ v[0] }}", "{{ '%s' % v }}"):
        with pytest.raises(TypeError):
            env.from_string(source).render(v=Escaped("abc"))


def test_guard_applies_to_the_real_templates() -> None:
    env = render._environment()
    for name in ("socket.j2", "shim.service.j2", "backend.service.j2"):
        source = (resources.data_dir("templates") / name).read_text()
        variables = jinja2.meta.find_undeclared_variables(env.parse(source))
        assert "config_path" in variables, name
        with pytest.raises(TypeError, match="unescaped"):
            env.get_template(name).render({variable: "x" for variable in variables})


# --- Hostile but valid values ------------------------------------------------------------------

HOSTILE_ARGS = (
    '%n %% %%n "$HOME" \'${HOME}\' $$ $1 \'a b\' "c  d" back\\\\slash \'single\\\' "dq\\"x" '
    "; && | > '' \"\" -x @y +z !w :v --opt=%i%u é ☃ \\$PATH"
)
HOSTILE_WORK_DIR = "/srv/my models/100%n \"q\" 'q' $HOME back\\slash é/dir"
HOSTILE_ENVIRONMENT = {
    "PERCENT": "100% %n %%",
    "DOLLAR": "$HOME ${HOME} $$",
    "QUOTES": '"double" \'single\' "',
    "BACKSLASH": "a\\b\\\\c\\",
    "SPACES": "  two  spaces  ",
    "EMPTY": "",
    "ODD": "x=y;z # not a comment é ☃ \u00a0nbsp \u2028 \u0085 \ue000",
}
HOSTILE_KILL = 'kill -TERM "$MAINPID"; echo %n \\ "done"'
HOSTILE_LOG = "/var/log/my logs/%n $x 'q'.log"
HOSTILE_COMMAND = "/opt/my models/run $1 %n"

PLAIN_FIELDS: dict[str, Any] = {
    "Command": "/opt/models/run",
    "Args": "a b",
    "WorkDir": "/srv/plain",
    "Environment": {f"V{i}": "v" for i in range(len(HOSTILE_ENVIRONMENT))},
    "KillCommand": "kill x",
    "LogFilePath": "/var/log/plain.log",
    "User": "models",
    "ConsiderStoppedOnProcessExit": False,
}
HOSTILE_FIELDS: dict[str, Any] = {
    "Command": HOSTILE_COMMAND,
    "Args": HOSTILE_ARGS,
    "WorkDir": HOSTILE_WORK_DIR,
    "Environment": HOSTILE_ENVIRONMENT,
    "KillCommand": HOSTILE_KILL,
    "LogFilePath": HOSTILE_LOG,
    "User": "models",
    "ConsiderStoppedOnProcessExit": False,
}


def same_shape(hostile: Mapping[str, Unit], plain: Mapping[str, Unit]) -> None:
    """Every unit has the same settings in the same order and as many lines."""
    assert hostile.keys() == plain.keys()
    for name, unit in hostile.items():
        assert unit.directives == plain[name].directives, name
        assert unit.text.count("\n") == plain[name].text.count("\n"), name


@pytest.mark.parametrize("with_log", [False, True])
@pytest.mark.parametrize("scope", list(Scope))
def test_hostile_values_add_no_line_and_no_directive(with_log: bool, scope: Scope) -> None:
    keep = {key for key in HOSTILE_FIELDS if with_log or key != "LogFilePath"}
    hostile_fields = {key: HOSTILE_FIELDS[key] for key in keep}
    plain_fields = {key: PLAIN_FIELDS[key] for key in keep}
    hostile = render_parsed(
        make_config(service("h", 8081, **hostile_fields), service("p", 8082, **hostile_fields)),
        scope=scope,
        interpreter=CHECKOUT_PYTHON,
    )
    plain = render_parsed(
        make_config(service("h", 8081, **plain_fields), service("p", 8082, **plain_fields)),
        scope=scope,
        interpreter=CHECKOUT_PYTHON,
    )
    same_shape(hostile, plain)
    counts = {name: len(unit.directives) for name, unit in hostile.items()}
    assert counts == {name: len(unit.directives) for name, unit in plain.items()}


def test_hostile_values_reach_the_program_unchanged() -> None:
    config = make_config(service(**{k: v for k, v in HOSTILE_FIELDS.items() if k != "LogFilePath"}))
    backend = render_parsed(config)["lmproxy-backend@llm.service"]
    argv = exec_argv(backend.value("Service", "ExecStart"))
    assert argv == [HOSTILE_COMMAND, *shlex.split(HOSTILE_ARGS)]
    for word in ("%n", "%%", "$HOME", "${HOME}", "$$", "a b", "c  d", "back\\slash", 'dq"x', ""):
        assert word in argv, word
    assert backend.value("Service", "WorkingDirectory").replace("%%", "%") == HOSTILE_WORK_DIR
    assert unspecify(backend.value("Service", "WorkingDirectory")) == HOSTILE_WORK_DIR
    assert backend_environment(config) == HOSTILE_ENVIRONMENT
    assert exec_argv(backend.value("Service", "ExecStop")) == ["/bin/sh", "-c", HOSTILE_KILL]


def test_hostile_log_file_path_reaches_the_tee_unchanged() -> None:
    config = make_config(service(**HOSTILE_FIELDS))
    backend = render_parsed(config)["lmproxy-backend@llm.service"]
    argv = exec_argv(backend.value("Service", "ExecStart"))
    assert argv[:6] == ["/usr/bin/python3", "-P", "-m", "lmproxy.logtee", HOSTILE_LOG, "--"]
    assert argv[6:] == [HOSTILE_COMMAND, *shlex.split(HOSTILE_ARGS)]


# Values systemd's unit syntax cannot carry: parse_config must refuse them, naming the field,
# rather than let `lmproxy render` and `lmproxy install` end in a traceback.
UNRENDERABLE = [
    pytest.param({"WorkDir": "/srv/models "}, id="WorkDir-trailing-space"),
    pytest.param({"WorkDir": "/srv/models\\"}, id="WorkDir-trailing-backslash"),
    pytest.param({"WorkDir": "/srv/a\u2028b"}, id="WorkDir-line-separator"),
    pytest.param({"WorkDir": "/srv/a\x85b"}, id="WorkDir-C1-control"),
    pytest.param({"Args": "x\ufffe"}, id="Args-noncharacter"),
    pytest.param({"Environment": {"X": "\ufdd0"}}, id="Environment-noncharacter"),
    pytest.param({"KillCommand": "kill \uffff"}, id="KillCommand-noncharacter"),
    pytest.param({"Command": "-server"}, id="Command-prefix-character"),
    pytest.param({"Command": "my'server"}, id="Command-quote"),
]


@pytest.mark.parametrize("fields", UNRENDERABLE)
def test_unrenderable_values_are_refused_naming_the_field(fields: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as refused:
        make_config(service(**fields))
    (field,) = fields
    assert any(f".{field}" in path for path, _ in refused.value.problems)


# --- Property: any valid config renders to the same shape, values intact -----------------------


def is_noncharacter(char: str) -> bool:
    code = ord(char)
    return 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE


# Printable text as config.py accepts it (no C0 controls, no DEL), less what it wrongly
# accepts (noncharacters: see test_an_accepted_config_always_renders).
_odd_chars = st.characters(min_codepoint=0x20, blacklist_categories=("Cs",)).filter(
    lambda c: c != "\x7f" and not is_noncharacter(c)
)
CONFIG_CHARS = st.sampled_from(list(" %$\\\"'`;&|<>-@+!:=#{}()*?~\u00a0\u2028")) | _odd_chars
_text = st.text(CONFIG_CHARS, max_size=24)


def splittable(text: str) -> bool:
    try:
        shlex.split(text)
    except ValueError:
        return False
    return True


_args = _text.filter(splittable) | st.lists(_text, max_size=5).map(
    lambda words: " ".join(shlex.quote(word) for word in words)
)
_component = st.text(CONFIG_CHARS.filter(lambda c: c != "/"), min_size=1, max_size=12).filter(
    lambda part: (
        part not in (".", "..")
        and part == part.rstrip(" \t")
        and not _continues(part)
        and all(unicodedata.category(c) not in ("Cc", "Zl", "Zp") for c in part)
    )
)
_paths = st.lists(_component, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts))
_environments = st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True), _text)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    args=_args,
    work_dir=st.none() | _paths,
    env=_environments,
    kill=st.none() | _text.filter(bool),
    log=st.none() | _paths,
    consider_stopped=st.booleans(),
    scope=st.sampled_from(list(Scope)),
)
def test_any_valid_values_keep_the_shape_and_reach_the_program(
    *,
    args: str,
    work_dir: str | None,
    env: dict[str, str],
    kill: str | None,
    log: str | None,
    consider_stopped: bool,
    scope: Scope,
) -> None:
    hostile: dict[str, Any] = {
        "Command": "/opt/bin/serve",
        "Args": args,
        "Environment": env,
        "ConsiderStoppedOnProcessExit": consider_stopped,
    }
    plain: dict[str, Any] = {
        "Command": "/opt/bin/serve",
        "Args": "a",
        "Environment": {key: "v" for key in env},
        "ConsiderStoppedOnProcessExit": consider_stopped,
    }
    for key, value, simple in (
        ("WorkDir", work_dir, "/w"),
        ("KillCommand", kill, "k"),
        ("LogFilePath", log, "/l"),
    ):
        if value is not None:
            hostile[key], plain[key] = value, simple
    hostile_units = render_parsed(make_config(service(**hostile)), scope=scope)
    plain_units = render_parsed(make_config(service(**plain)), scope=scope)
    same_shape(hostile_units, plain_units)

    backend = hostile_units["lmproxy-backend@llm.service"]
    argv = ["/opt/bin/serve", *shlex.split(args)]
    if log is not None:
        argv = ["/usr/bin/python3", "-P", "-m", "lmproxy.logtee", log, "--", *argv]
    assert exec_argv(backend.value("Service", "ExecStart")) == argv
    assert backend_environment(make_config(service(**hostile))) == env
    if work_dir is not None:
        assert unspecify(backend.value("Service", "WorkingDirectory")) == work_dir
    if kill is not None:
        assert exec_argv(backend.value("Service", "ExecStop")) == ["/bin/sh", "-c", kill]


def test_user_needs_the_system_manager() -> None:
    from lmproxy.installer import render_for

    config = make_config(service(User="llm"))
    with pytest.raises(ConfigError) as refused:
        render_for(config, Scope.USER)
    assert refused.value.problems == [
        ("$.Services[0].User", "User needs the system manager (--system)")
    ]
    assert "User=llm" in render_for(config, Scope.SYSTEM)["lmproxy-backend@llm.service"]


# --- System mode: unprivileged shims, model servers never root by default ------------------


def test_system_shim_runs_unprivileged_and_hardened() -> None:
    units = render_parsed(make_config(service()), scope=Scope.SYSTEM)
    shim = units["lmproxy-llm.service"]
    assert shim.values("Service", "User") == ["lmproxy"]
    assert shim.values("Service", "RuntimeDirectory") == ["lmproxy"]
    assert shim.values("Service", "RuntimeDirectoryPreserve") == ["yes"]
    for setting, value in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
    ]:
        assert shim.values("Service", setting) == [value], setting


def test_user_shim_has_no_system_settings() -> None:
    shim = render_parsed(make_config(service()), scope=Scope.USER)["lmproxy-llm.service"]
    for setting in ("User", "RuntimeDirectory", "ProtectSystem", "CapabilityBoundingSet"):
        assert shim.values("Service", setting) == [], setting


def test_system_backend_defaults_to_the_model_user_with_gpu_groups() -> None:
    backend = render_parsed(make_config(service()), scope=Scope.SYSTEM)[
        "lmproxy-backend@llm.service"
    ]
    assert backend.values("Service", "User") == ["lmproxy-model"]
    assert backend.values("Service", "SupplementaryGroups") == ["video render"]
    assert backend.values("Service", "NoNewPrivileges") == ["yes"]
    assert backend.values("Service", "RemoveIPC") == ["yes"]  # nothing else runs as this user


def test_system_backend_runs_as_root_only_when_the_config_says_so() -> None:
    for user in ("root", "llm"):
        fields: dict[str, Any] = {"User": user, "AllowRoot": user == "root"}
        backend = render_parsed(make_config(service(**fields)), scope=Scope.SYSTEM)[
            "lmproxy-backend@llm.service"
        ]
        assert backend.values("Service", "User") == [user]
        assert backend.values("Service", "SupplementaryGroups") == []


# The system backend's hardening (templates/backend.service.j2), in every system backend
# whoever it runs as: a model server needs no capability, namespace or exotic system call.
BACKEND_HARDENING = [
    ("CapabilityBoundingSet", ""),
    ("AmbientCapabilities", ""),
    ("NoNewPrivileges", "yes"),
    ("RestrictSUIDSGID", "yes"),
    ("PrivateTmp", "yes"),
    ("PrivateMounts", "yes"),
    ("ProtectSystem", "full"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("ProtectControlGroups", "yes"),
    ("ProtectClock", "yes"),
    ("ProtectHostname", "yes"),
    ("ProtectProc", "invisible"),
    ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6 AF_NETLINK"),
    ("RestrictNamespaces", "yes"),
    ("RestrictRealtime", "yes"),
    ("LockPersonality", "yes"),
    ("SystemCallArchitectures", "native"),
    ("SystemCallFilter", "@system-service"),
    ("SystemCallErrorNumber", "EPERM"),
    ("UMask", "0027"),
]
# Settings that would hide GPUs (PrivateDevices, DevicePolicy, ProcSubset hides
# /proc/driver/nvidia), break their JIT compilers (MemoryDenyWriteExecute), models in
# homes (ProtectHome), the GPU groups (PrivateUsers) or the relay (PrivateNetwork).
BACKEND_LEFT_OUT = (
    "PrivateDevices",
    "DevicePolicy",
    "DeviceAllow",
    "MemoryDenyWriteExecute",
    "ProtectHome",
    "ProcSubset",
    "PrivateUsers",
    "PrivateNetwork",
    "IPAddressDeny",
)


@pytest.mark.parametrize(
    "fields", [{}, {"User": "root", "AllowRoot": True}, {"User": "llm"}], ids=str
)
def test_system_backend_is_hardened_for_any_user(fields: dict[str, Any]) -> None:
    backend = render_parsed(make_config(service(**fields)), scope=Scope.SYSTEM)[
        "lmproxy-backend@llm.service"
    ]
    for setting, value in BACKEND_HARDENING:
        assert backend.values("Service", setting) == [value], setting
    for setting in BACKEND_LEFT_OUT:
        assert backend.values("Service", setting) == [], setting


def test_system_backend_keeps_the_resource_system_calls() -> None:
    """One allow list and no deny list: @resources (mbind, set_mempolicy,
    sched_setaffinity, setrlimit) and @memlock stay allowed, as @system-service has them."""
    backend = render_parsed(make_config(service()), scope=Scope.SYSTEM)[
        "lmproxy-backend@llm.service"
    ]
    filters = backend.values("Service", "SystemCallFilter")
    assert filters == ["@system-service"]
    assert not any(f.startswith("~") for f in filters)


@pytest.mark.parametrize("user", ["root", "llm"])
def test_system_backend_removes_ipc_only_for_the_model_user(user: str) -> None:
    """A User= of the config may share its shared memory with a login session."""
    backend = render_parsed(make_config(service(User=user, AllowRoot=True)), scope=Scope.SYSTEM)[
        "lmproxy-backend@llm.service"
    ]
    assert backend.values("Service", "RemoveIPC") == []


@pytest.mark.parametrize("with_log", [False, True])
def test_user_backend_has_no_system_hardening(with_log: bool) -> None:
    """A user manager cannot apply most of it (capabilities, mount namespaces, ProtectProc,
    ProtectSystem need privileges there), and would fail or warn: none of it goes there."""
    fields: dict[str, Any] = {"LogFilePath": "/tmp/llm.log"} if with_log else {}
    backend = render_parsed(make_config(service(**fields)), scope=Scope.USER)[
        "lmproxy-backend@llm.service"
    ]
    for setting in [*(s for s, _ in BACKEND_HARDENING), *BACKEND_LEFT_OUT, "RemoveIPC"]:
        assert backend.values("Service", setting) == [], setting
    for setting in ("User", "Group", "SupplementaryGroups"):
        assert backend.values("Service", setting) == [], setting


def test_a_unix_socket_unit_says_who_may_connect() -> None:
    entry = service(ListenPath="/run/models/llm.sock", SocketUser="root", SocketGroup="models")
    del entry["ListenPort"]
    entry["SocketMode"] = "0660"
    socket_unit = render_parsed(make_config(entry), scope=Scope.SYSTEM)["lmproxy-llm.socket"]
    assert socket_unit.values("Socket", "ListenStream") == ["/run/models/llm.sock"]
    assert socket_unit.values("Socket", "SocketUser") == ["root"]
    assert socket_unit.values("Socket", "SocketGroup") == ["models"]
    assert socket_unit.values("Socket", "SocketMode") == ["0660"]
    assert socket_unit.values("Socket", "RemoveOnStop") == ["yes"]
    tcp = render_parsed(make_config(service()), scope=Scope.SYSTEM)["lmproxy-llm.socket"]
    for setting in ("SocketUser", "SocketGroup", "SocketMode", "RemoveOnStop"):
        assert tcp.values("Socket", setting) == [], setting


def test_socket_owners_need_the_system_manager() -> None:
    from lmproxy.installer import render_for

    entry = service(ListenPath="/run/models/llm.sock", SocketGroup="models")
    del entry["ListenPort"]
    with pytest.raises(ConfigError) as refused:
        render_for(make_config(entry), Scope.USER)
    assert refused.value.problems == [
        ("$.Services[0].SocketGroup", "SocketGroup needs the system manager (--system)")
    ]


# --- Any service name (large-model-proxy takes any string) ----------------------------------


def _takes(name: str) -> bool:
    try:
        make_config(service(name))
    except ConfigError:
        return False
    return True


_names = (st.text(CONFIG_CHARS | st.characters(), min_size=1, max_size=40)).filter(_takes)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(name=_names, scope=st.sampled_from(list(Scope)))
def test_any_name_gets_units_of_its_own_that_carry_it_unchanged(name: str, scope: Scope) -> None:
    """Whatever the name, its units have lmproxy's shape, their names are unit-safe and
    the backend's alone matches polkit's rule, and the name reaches the shim and each
    Description as written: no name can inject a directive or reach another unit."""
    units = render_parsed(make_config(service(name)), scope=scope)
    plain = render_parsed(make_config(service("llm")), scope=scope)
    part = unitnames.component(name)
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", part)
    as_llm = dict(zip(unitnames.units_of(name), unitnames.units_of("llm"), strict=True))
    renamed = {as_llm.get(key, key): unit for key, unit in units.items()}
    same_shape(renamed, plain)
    socket, shim, backend = unitnames.units_of(name)
    assert {socket, shim, backend} <= units.keys()
    assert re.fullmatch(r"lmproxy-backend@[A-Za-z0-9:_.\\-]+\.service", backend)
    assert not unitnames.is_backend_unit(shim)
    for unit, what in ((socket, "listening socket"), (shim, "shim"), (backend, "backend")):
        description = unspecify(units[unit].value("Unit", "Description"))
        assert description == f"lmproxy: {name} {what}"
    assert exec_argv(units[shim].value("Service", "ExecStart"))[-1] == name
    assert unitnames.syslog_identifier(name) == unspecify(
        units[backend].value("Service", "SyslogIdentifier")
    )


# --- lmproxy's own services: the management API ------------------------------------------


def test_the_management_api_gets_a_socket_and_a_service_only_when_configured() -> None:
    assert not any("api@" in name for name in render_parsed(make_config(service())))
    for scope in Scope:
        units = render_parsed(
            make_config(service(), ManagementApi={"ListenPort": 7070}), scope=scope
        )
        socket_unit = units["lmproxy-api@management.socket"]
        assert socket_unit.values("Socket", "ListenStream") == ["127.0.0.1:7070"]
        assert socket_unit.values("Socket", "Accept") == ["no"]
        assert socket_unit.values("Install", "WantedBy") == ["lmproxy.target"]
        api = units["lmproxy-api@management.service"]
        argv = exec_argv(api.value("Service", "ExecStart"))
        assert argv[1:4] == ["-P", "-m", "lmproxy.management"]
        assert argv[4:] == [scope.systemctl_flag, "--config", str(CONFIG_PATHS[scope])]
        assert api.values("Service", "Type") == ["notify"]
        system = scope is Scope.SYSTEM
        assert api.values("Service", "User") == (["lmproxy"] if system else [])
        assert api.values("Service", "ProtectSystem") == (["strict"] if system else [])
        assert not api.has("Service", "ProcSubset")  # it reads /proc/net/tcp


def test_the_management_api_listens_where_the_services_do() -> None:
    config = make_config(service(), ManagementApi={"ListenPort": 7070}, ListenAddress="::1")
    units = render_parsed(config)
    assert units["lmproxy-api@management.socket"].values("Socket", "ListenStream") == ["[::1]:7070"]


# --- The OpenAI router ------------------------------------------------------------------------


def test_the_router_gets_a_socket_and_a_reloadable_service_only_when_configured() -> None:
    assert not any("openai" in name for name in render_parsed(make_config(service())))
    for scope in Scope:
        config = make_config(service(OpenAiApi=True), OpenAiApi={"ListenPort": 8080})
        units = render_parsed(config, scope=scope)
        socket_unit = units["lmproxy-api@openai.socket"]
        assert socket_unit.values("Socket", "ListenStream") == ["127.0.0.1:8080"]
        assert socket_unit.values("Install", "WantedBy") == ["lmproxy.target"]
        router = units["lmproxy-api@openai.service"]
        argv = exec_argv(router.value("Service", "ExecStart"))
        assert argv[1:4] == ["-P", "-m", "lmproxy.router"]
        assert argv[4:] == [scope.systemctl_flag, "--config", str(CONFIG_PATHS[scope])]
        assert router.values("Service", "ExecReload") == ["/bin/kill -HUP $MAINPID"]
        system = scope is Scope.SYSTEM
        assert router.values("Service", "User") == (["lmproxy"] if system else [])
        assert router.values("Service", "NoNewPrivileges") == (["yes"] if system else [])
    management = render_parsed(make_config(service(), ManagementApi={"ListenPort": 7070}))
    assert not management["lmproxy-api@management.service"].has("Service", "ExecReload")


def test_a_service_only_the_router_reaches_listens_on_a_private_socket() -> None:
    qwen = service("Qwen/Qwen2.5-7B-Instruct", OpenAiApi=True)
    del qwen["ListenPort"]
    config = make_config(qwen, OpenAiApi={"ListenPort": 8080})
    for scope in Scope:
        units = render_parsed(config, scope=scope)
        socket_unit = units["lmproxy-Qwen_Qwen2.5-7B-Instruct-1bb1e77d.socket"]
        (listen,) = socket_unit.values("Socket", "ListenStream")
        assert re.fullmatch(r"%t/lmproxy-private/[0-9a-f]{8}\.sock", listen)
        assert socket_unit.values("Socket", "SocketMode") == ["0600"]
        owner = ["lmproxy"] if scope is Scope.SYSTEM else []
        assert socket_unit.values("Socket", "SocketUser") == owner
        assert socket_unit.values("Socket", "SocketGroup") == owner
        # ...where the router and `lmproxy start` look for it.
        path = paths_for(scope).socket_path(config.services[0])
        assert path is not None and path.endswith(listen.removeprefix("%t"))


def test_tensor_split_auto_gives_the_backend_the_split_its_shim_writes() -> None:
    units = render_parsed(make_config(service(Args="-m /m/q.gguf", TensorSplit="auto")))
    backend = units["lmproxy-backend@llm.service"]
    assert backend.value("Service", "ExecStart").endswith(" $LMPROXY_SPLIT_ARGS")
    assert "-%t/lmproxy/split/llm.env" in backend.values("Service", "EnvironmentFile")
    plain = render_parsed(make_config(service(Args="-m /m/q.gguf")))["lmproxy-backend@llm.service"]
    assert "$LMPROXY_SPLIT_ARGS" not in plain.value("Service", "ExecStart")
    assert not plain.has("Service", "EnvironmentFile")


def test_a_system_shim_that_reads_nvml_may_open_nvidias_devices_and_no_other() -> None:
    gpu = {"VRAM-GPU-0": {"Gpu": "0", "Amount": 24000}}
    needs = service(ResourceRequirements={"VRAM-GPU-0": 1000})
    units = render_parsed(make_config(needs, ResourcesAvailable=gpu), scope=Scope.SYSTEM)
    shim = units["lmproxy-llm.service"]
    assert shim.values("Service", "PrivateDevices") == ["no"]
    assert shim.values("Service", "DevicePolicy") == ["closed"]
    assert shim.values("Service", "DeviceAllow") == ["char-nvidia-frontend rw"]
    assert not shim.has("Service", "ProcSubset")
    plain = render_parsed(make_config(service()), scope=Scope.SYSTEM)["lmproxy-llm.service"]
    assert plain.values("Service", "PrivateDevices") == ["yes"]
    assert not plain.has("Service", "DeviceAllow")
