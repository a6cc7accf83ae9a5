"""Every unit lmproxy renders passes ``systemd-analyze verify`` without a word.

systemd-analyze exits 0 on unknown settings, bad values it ignores and unsafe choices,
and only warns on stderr, so any output on stderr fails a test here. The rendered
units are verified together, in one folder (a unit's Requires=, After=, Slice= and
WantedBy= must name units that exist); every ExecStart= must name an executable that
exists, so Command is /usr/bin/python3, /bin/sleep or a link made for the test.

systemd-analyze needs no running manager for this: for --user it only wants
XDG_RUNTIME_DIR to be set (without it, "Failed to initialize manager"), so each call
gets a private HOME, XDG_RUNTIME_DIR and XDG_CONFIG_HOME. XDG_RUNTIME_DIR must be short:
sockets.target brings in the user's other socket units (gpg-agent's), whose paths under
it must fit in an AF_UNIX address, or systemd-analyze complains about those.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lmproxy import unitnames
from lmproxy.config import Config, ConfigError, parse_config
from lmproxy.installer import refuse_missing_commands
from lmproxy.paths import Scope, paths_for
from lmproxy.render import Interpreter, render_units
from tests.unit.test_render import (
    CONFIG_CHARS,
    HOSTILE_ARGS,
    HOSTILE_ENVIRONMENT,
    exec_argv,
    splittable,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "config.json"
BASE = Path("/srv/lmproxy")

PYTHON = "/usr/bin/python3"
SLEEP = "/bin/sleep"
INSTALLED = Interpreter(PYTHON, {}, "/usr/lib/python3/dist-packages")
CHECKOUT = Interpreter(PYTHON, {"PYTHONPATH": "/src"}, "/src")

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None or not os.access(PYTHON, os.X_OK) or not os.access(SLEEP, os.X_OK),
    reason="needs systemd-analyze, /usr/bin/python3 and /bin/sleep",
)


def installed_config(scope: Scope, home: Path) -> Path:
    return paths_for(scope, {"HOME": str(home)}).installed_config


def analyze(
    units: Mapping[str, str], scope: Scope, where: Path
) -> subprocess.CompletedProcess[str]:
    """Writes the units to a fresh folder under `where` and runs
    ``systemd-analyze --user|--system verify`` on all of them at once."""
    assert SYSTEMD_ANALYZE is not None
    unit_dir = Path(tempfile.mkdtemp(prefix="units-", dir=where))
    for name, text in units.items():
        (unit_dir / name).write_text(text, encoding="utf-8")
    # A short runtime path: the user manager's own sockets (gpg-agent's, say, which
    # sockets.target pulls in) live there and must fit in an AF_UNIX address.
    with tempfile.TemporaryDirectory(prefix="lmp-rt-") as runtime:
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(unit_dir / ".home"),
            "XDG_RUNTIME_DIR": runtime,
            "XDG_CONFIG_HOME": str(unit_dir / ".config"),
            "SYSTEMD_LOG_LEVEL": "info",  # warnings must show, whatever the caller's setting
        }
        return subprocess.run(
            [SYSTEMD_ANALYZE, scope.systemctl_flag, "verify", *(str(unit_dir / n) for n in units)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def verify(units: Mapping[str, str], scope: Scope, where: Path) -> None:
    # The rendered set is complete on its own: the static units come with it.
    assert {"lmproxy.target", "lmproxy.slice"} <= units.keys()
    result = analyze(units, scope, where)
    shown = "\n".join(f"=== {name}\n{text}" for name, text in sorted(units.items()))
    assert result.stderr == "", f"systemd-analyze said:\n{result.stderr}\n{shown}"
    assert result.returncode == 0, f"systemd-analyze exited {result.returncode}\n{shown}"


def render(config: Config, scope: Scope, interpreter: Interpreter, home: Path) -> dict[str, str]:
    return render_units(
        config,
        scope=scope,
        config_path=installed_config(scope, home),
        interpreter=interpreter,
    )


def example_with(command: str) -> Config:
    document = json.loads(EXAMPLE.read_text())
    for entry in document["Services"]:
        entry["Command"] = command
    return parse_config(json.dumps(document), BASE)


def make_config(*services: dict[str, Any], **top: Any) -> Config:
    return parse_config(json.dumps({"Services": list(services), **top}), BASE)


def plain_service(name: str, port: int, **fields: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "Name": name,
        "ListenPort": port,
        "ProxyTargetPort": port + 10000,
        "Command": SLEEP,
        "Args": "1000",
    }
    entry.update(fields)
    return entry


# --- The example and hand-written configs ------------------------------------------------------


@pytest.mark.parametrize("interpreter", [INSTALLED, CHECKOUT], ids=["installed", "checkout"])
@pytest.mark.parametrize("command", [PYTHON, SLEEP])
@pytest.mark.parametrize("scope", list(Scope))
def test_example_verifies(
    scope: Scope, command: str, interpreter: Interpreter, tmp_path: Path
) -> None:
    units = render(example_with(command), scope, interpreter, tmp_path)
    assert len(units) == 3 * 2 + 2 + 2  # two services, the static units, the router's
    verify(units, scope, tmp_path)


@pytest.mark.parametrize("scope", list(Scope))
def test_every_optional_setting_verifies(scope: Scope, tmp_path: Path) -> None:
    config = make_config(
        plain_service("plain", 8081),
        plain_service(
            "full",
            8082,
            ListenAddress="::1",
            WorkDir="/srv/models",
            LogFilePath="/var/log/full.log",
            KillCommand="kill $MAINPID",
            Environment={"A": "1", "B": "2"},
            User="models",
            ConsiderStoppedOnProcessExit=False,
        ),
        plain_service("bare-name", 8083, Command="sleep"),
        plain_service("v6-any", 8084, ListenAddress="::"),
        ListenAddress="0.0.0.0",
    )
    verify(render(config, scope, CHECKOUT, tmp_path), scope, tmp_path)


def hostile_command(where: Path) -> str:
    """An executable whose path has a space, a ``$`` and a ``%``."""
    folder = where / "my models"
    folder.mkdir()
    command = folder / "run $1 %n"
    command.symlink_to(SLEEP)
    return str(command)


@pytest.mark.parametrize("interpreter", [INSTALLED, CHECKOUT], ids=["installed", "checkout"])
@pytest.mark.parametrize("scope", list(Scope))
def test_hostile_values_verify(scope: Scope, interpreter: Interpreter, tmp_path: Path) -> None:
    command = hostile_command(tmp_path)
    hostile: dict[str, Any] = {
        "Command": command,
        "Args": HOSTILE_ARGS,
        "WorkDir": "/srv/my models/100%n \"q\" 'q' $HOME back\\slash é/dir",
        "Environment": HOSTILE_ENVIRONMENT,
        "KillCommand": 'kill -TERM "$MAINPID"; echo %n \\ "done"',
        "User": "models",
        "ConsiderStoppedOnProcessExit": False,
    }
    config = make_config(
        plain_service("h.1", 8081, **hostile),
        plain_service("h_2", 8082, **hostile, LogFilePath="/var/log/my logs/%n $x 'q'.log"),
        plain_service("H-3", 8083, **{**hostile, "Command": PYTHON}, ListenAddress="::"),
    )
    units = render(config, scope, interpreter, tmp_path)
    # The hostile command really is in the unit (in systemd's "@path argv0" form).
    assert "$$1 %%n" in units["lmproxy-backend@h.1.service"]
    verify(units, scope, tmp_path)


@pytest.mark.parametrize("scope", list(Scope))
def test_a_config_path_with_odd_characters_verifies(scope: Scope, tmp_path: Path) -> None:
    config_path = Path("/home/a b/100%n $HOME/'q' \"d\" \\x/config.json")
    units = render_units(
        make_config(plain_service("llm", 8081)),
        scope=scope,
        config_path=config_path,
        interpreter=CHECKOUT,
    )
    verify(units, scope, tmp_path)


# --- How exposed a system-mode model server is -------------------------------------------------

# The security issue's target for `systemd-analyze security` (0 is best, 10 worst); the
# end-to-end test (tests/e2e/test_system_hardening.py) checks the installed unit too.
MAX_BACKEND_EXPOSURE = 5.0


def exposure(unit_text: str, where: Path) -> float:
    """systemd-analyze security's overall exposure level of a backend unit, offline."""
    assert SYSTEMD_ANALYZE is not None
    unit = Path(tempfile.mkdtemp(prefix="security-", dir=where)) / "lmproxy-backend@llm.service"
    unit.write_text(unit_text, encoding="utf-8")
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    return float(found.group(1))


@pytest.mark.parametrize(
    "fields",
    [{}, {"User": "models"}, {"User": "root", "AllowRoot": True}],
    ids=["lmproxy-model", "named-user", "root"],
)
def test_system_backend_is_rated_5_or_below(fields: dict[str, Any], tmp_path: Path) -> None:
    config = make_config(plain_service("llm", 8081, **fields))
    units = render(config, Scope.SYSTEM, INSTALLED, tmp_path)
    rated = exposure(units["lmproxy-backend@llm.service"], tmp_path)
    assert rated <= MAX_BACKEND_EXPOSURE, units["lmproxy-backend@llm.service"]


def test_exposure_tells_an_unhardened_unit(tmp_path: Path) -> None:
    """The user manager's backend carries none of the hardening: rated far worse (else a
    pass above would prove nothing)."""
    units = render(make_config(plain_service("llm", 8081)), Scope.USER, INSTALLED, tmp_path)
    assert exposure(units["lmproxy-backend@llm.service"], tmp_path) > MAX_BACKEND_EXPOSURE


# --- The check itself --------------------------------------------------------------------------


def test_verify_speaks_up_about_what_it_must_catch(tmp_path: Path) -> None:
    """systemd-analyze, as run here, reports each kind of problem these tests look for
    (else a pass above would prove nothing)."""
    units = render(make_config(plain_service("llm", 8081)), Scope.USER, INSTALLED, tmp_path)
    backend = "lmproxy-backend@llm.service"
    assert analyze(units, Scope.USER, tmp_path).stderr == ""
    broken = {
        "an unknown setting": {**units, backend: units[backend] + "Bogus=1\n"},
        "a bad value": {**units, backend: units[backend] + "Restart=sometimes\n"},
        "a missing command": {**units, backend: units[backend].replace(SLEEP, "/nonexistent")},
        "a missing dependency": {k: v for k, v in units.items() if not k.endswith(".socket")},
    }
    for what, broken_units in broken.items():
        assert analyze(broken_units, Scope.USER, tmp_path).stderr != "", what


@pytest.mark.parametrize("scope", list(Scope))
def test_longest_user_name_verifies(scope: Scope, tmp_path: Path) -> None:
    config = make_config(plain_service("llm", 8081, User="u" * 31))
    verify(render(config, scope, INSTALLED, tmp_path), scope, tmp_path)


# --- Property: any valid config verifies -------------------------------------------------------


_text = st.text(CONFIG_CHARS, max_size=20)


def _path_part_ok(part: str) -> bool:
    # Where WorkDir goes verbatim: no trailing blank or backslash, no line breaks (the
    # other half of the same known bug).
    escaped = False
    for char in part:
        escaped = not escaped and char == "\\"
    return (
        part not in (".", "..")
        and part == part.rstrip(" \t")
        and not escaped
        and all(unicodedata.category(c) not in ("Cc", "Zl", "Zp") for c in part)
    )


_args = _text.filter(splittable) | st.lists(_text, max_size=4).map(
    lambda words: " ".join(shlex.quote(word) for word in words)
)
_paths = st.lists(
    st.text(CONFIG_CHARS.filter(lambda c: c != "/"), min_size=1, max_size=10).filter(_path_part_ok),
    min_size=1,
    max_size=3,
).map(lambda parts: "/" + "/".join(parts))
_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", fullmatch=True)
_users = st.from_regex(r"[a-z_][a-z0-9_-]{0,30}", fullmatch=True).filter(
    lambda u: u not in ("nobody", "root", "lmproxy")  # refused unless asked for, or always
)


@st.composite
def _services(draw: st.DrawFn, index: int, name: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "Name": name,
        "ListenPort": 2000 + index,
        "ListenAddress": str(draw(st.ip_addresses())),
        "ProxyTargetPort": 30000 + index,
        "Command": draw(st.sampled_from([PYTHON, SLEEP, "sleep"])),
        "Args": draw(_args),
        "Environment": draw(
            st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True), _text)
        ),
        "ConsiderStoppedOnProcessExit": draw(st.booleans()),
    }
    for key, strategy in (
        ("WorkDir", _paths),
        ("LogFilePath", _paths),
        ("KillCommand", _text.filter(bool)),
        ("User", _users),
    ):
        value = draw(st.none() | strategy)
        if value is not None:
            entry[key] = value
    return entry


@st.composite
def _configs(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(
        st.lists(
            _names,
            min_size=1,
            max_size=8,
            unique_by=str.lower,
        )
    )
    services = [draw(_services(i, name)) for i, name in enumerate(names)]
    return {"Services": services}


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(document=_configs(), scope=st.sampled_from(list(Scope)), checkout=st.booleans())
def test_any_valid_config_verifies(document: dict[str, Any], scope: Scope, checkout: bool) -> None:
    # Several services per config: one systemd-analyze call checks them all.
    config = parse_config(json.dumps(document), BASE)
    assert len(config.services) == len(document["Services"])
    with tempfile.TemporaryDirectory() as where:
        units = render(config, scope, CHECKOUT if checkout else INSTALLED, Path(where))
        verify(units, scope, Path(where))


# --- Property: any config at all is refused naming a path, or renders to units that verify ----

_hostile_text = st.text(
    st.sampled_from(list("\n\r\t%$\\\"' ./..é€\u2028\x00\x7f-@+!:;")) | st.characters(),
    max_size=16,
)
_hostile_numbers = st.integers(min_value=-(2**70), max_value=2**70) | st.sampled_from(
    [0, -1, 65535, 65536, 2**53, 2**53 + 1]
)
_anything = _hostile_text | _hostile_numbers | st.booleans() | st.none()


def _mostly(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> Any:
    """Valid nine times in ten, so that a fair share of configs get through to systemd.
    (st.one_of(valid, valid, ..., hostile) would not do: it merges equal branches.)"""
    return st.integers(0, 9).flatmap(lambda roll: valid if roll else hostile)


@st.composite
def _hostile_services(draw: st.DrawFn, index: int) -> dict[str, Any]:
    """A service whose every field may be valid, odd, or plainly wrong."""
    entry: dict[str, Any] = {
        "Name": draw(_mostly(_names, _hostile_text)),
        "ListenPort": draw(_mostly(st.just(2000 + index), _hostile_numbers | _hostile_text)),
        "ProxyTargetPort": draw(_mostly(st.just(30000 + index), _hostile_numbers)),
        "Command": draw(_mostly(st.sampled_from([PYTHON, SLEEP]), _hostile_text)),
        "Args": draw(_mostly(_args, _hostile_text)),
        "ResourceRequirements": draw(
            _mostly(st.just({}), st.dictionaries(_hostile_text, _hostile_numbers, max_size=2))
        ),
    }
    for key, strategy in (
        ("ListenAddress", _mostly(st.ip_addresses().map(str), _hostile_text)),
        ("WorkDir", _mostly(_paths, _hostile_text)),
        ("LogFilePath", _mostly(_paths, _hostile_text)),
        ("KillCommand", _mostly(_text.filter(bool), _hostile_text)),
        (
            "Environment",
            st.dictionaries(
                _mostly(
                    _names.map(lambda n: "V" + n.replace(".", "_").replace("-", "_")), _hostile_text
                ),
                _hostile_text,
                max_size=2,
            ),
        ),
        ("StartupTimeoutMilliseconds", _mostly(st.integers(1, 2**31 - 1), _hostile_numbers)),
    ):
        if draw(st.booleans()):
            entry[key] = draw(strategy)
    if draw(st.integers(0, 9)) == 0:
        entry[draw(_hostile_text)] = draw(_anything)  # an unknown field, usually
    return entry


@st.composite
def _hostile_configs(draw: st.DrawFn) -> dict[str, Any]:
    count = draw(st.integers(min_value=1, max_value=3))
    return {
        "ResourcesAvailable": draw(
            _mostly(st.just({}), st.dictionaries(_hostile_text, _hostile_numbers, max_size=2))
        ),
        "Services": [draw(_hostile_services(index)) for index in range(count)],
    }


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(document=_hostile_configs())
def test_any_config_is_refused_naming_a_path_or_verifies(document: dict[str, Any]) -> None:
    try:
        config = parse_config(json.dumps(document), BASE)
        refuse_missing_commands(config)  # what validate and install check on top
    except ConfigError as refused:
        event("refused")
        assert refused.problems
        for path, problem in refused.problems:
            assert path.startswith("$") and problem
        return
    event("accepted")
    with tempfile.TemporaryDirectory() as where:
        units = render(config, Scope.USER, INSTALLED, Path(where))
        # Exactly the units asked for: three per service and the two static ones.
        assert len(units) == 3 * len(config.services) + 2
        for service in config.services:
            backend = units[unitnames.backend_unit(service.name)]
            exec_start = [line for line in backend.splitlines() if line.startswith("ExecStart=")]
            assert len(exec_start) == 1
            if service.log_file_path is None:
                assert exec_argv(exec_start[0].removeprefix("ExecStart=")) == list(service.argv)
        verify(units, Scope.USER, Path(where))
