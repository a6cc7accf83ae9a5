"""The shim's first stage reads what the units run; `lmproxy shim` runs the same."""

from __future__ import annotations

from pathlib import Path

from lmproxy import earlystart
from lmproxy.__main__ import shim_arguments
from lmproxy.config import parse_config
from lmproxy.paths import Scope
from lmproxy.render import FIRST_STAGE, Interpreter, render_units

CONFIG = """{"Services": [{"Name": "m.1", "ListenPort": 8080, "ProxyTargetPort": 18080,
             "Command": "/bin/true"}]}"""


def test_rendered_shim_command_is_read_by_the_first_stage() -> None:
    for scope in Scope:
        units = render_units(
            parse_config(CONFIG, Path("/")),
            scope=scope,
            config_path=Path("/etc/lmproxy dir/config.json"),
            interpreter=Interpreter("/usr/bin/python3", {}, "/usr/lib/python3/dist-packages"),
        )
        exec_start = next(
            line.split("=", 1)[1]
            for line in units["lmproxy-m.1.service"].splitlines()
            if line.startswith("ExecStart=")
        )
        words = [w.strip('"') for w in exec_start.split('" "')]
        assert words[:5] == ["/usr/bin/python3", "-P", "-S", "-c", FIRST_STAGE]
        assert earlystart.arguments(words[5:]) == (
            scope is Scope.SYSTEM,
            "/etc/lmproxy dir/config.json",
            "m.1",
        )


def test_lmproxy_shim_by_hand_takes_the_same_path() -> None:
    argv = ["shim", "--user", "--config", "/c d/config.json", "m.1"]
    assert shim_arguments(argv) == ("m.1", "user", Path("/c d/config.json"))
    assert earlystart.arguments(["--user", "--config", "/c d/config.json", "m.1"]) == (
        False,
        "/c d/config.json",
        "m.1",
    )


def test_the_first_stage_takes_nothing_else() -> None:
    assert earlystart.arguments(["--user", "--config", "c.json"]) is None
    assert earlystart.arguments(["--root", "--config", "c.json", "x"]) is None
    assert earlystart.arguments(["--user", "--conf", "c.json", "x"]) is None


def test_anything_else_goes_through_click() -> None:
    assert shim_arguments(["shim", "--help"]) is None
    assert shim_arguments(["shim", "--user", "--config", "c.json", "--help"]) is None
    assert shim_arguments(["status", "--user", "--config", "c.json", "x"]) is None
    assert shim_arguments(["shim", "--root", "--config", "c.json", "x"]) is None
