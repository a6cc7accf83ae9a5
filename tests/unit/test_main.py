"""The entry point's fast path for the shim matches what the units run."""

from __future__ import annotations

from pathlib import Path

from lmproxy.__main__ import shim_arguments
from lmproxy.config import parse_config
from lmproxy.paths import Scope
from lmproxy.render import Interpreter, render_units

CONFIG = """{"Services": [{"Name": "m.1", "ListenPort": 8080, "ProxyTargetPort": 18080,
             "Command": "/bin/true"}]}"""


def test_rendered_shim_command_takes_the_fast_path() -> None:
    for scope in Scope:
        units = render_units(
            parse_config(CONFIG, Path("/")),
            scope=scope,
            config_path=Path("/etc/lmproxy dir/config.json"),
            interpreter=Interpreter("/usr/bin/python3", {}),
        )
        exec_start = next(
            line.split("=", 1)[1]
            for line in units["lmproxy-m.1.service"].splitlines()
            if line.startswith("ExecStart=")
        )
        words = [w.strip('"') for w in exec_start.split('" "')]
        assert words[:3] == ["/usr/bin/python3", "-m", "lmproxy"]
        assert shim_arguments(words[3:]) == (
            "m.1",
            scope.value,
            Path("/etc/lmproxy dir/config.json"),
        )


def test_anything_else_goes_through_click() -> None:
    assert shim_arguments(["shim", "--help"]) is None
    assert shim_arguments(["shim", "--user", "--config", "c.json", "--help"]) is None
    assert shim_arguments(["status", "--user", "--config", "c.json", "x"]) is None
    assert shim_arguments(["shim", "--root", "--config", "c.json", "x"]) is None
