"""Switching the installed files: the old set or the new set, never a mix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmproxy import installer
from lmproxy.paths import Paths

OLD = {"a.socket": b"old a", "b.socket": b"old b", "gone.socket": b"old gone"}
NEW = {"a.socket": b"new a", "b.socket": b"new b", "c.socket": b"new c"}


def make_paths(tmp_path: Path) -> Paths:
    paths = Paths(tmp_path / "units", tmp_path / "config", tmp_path / "run")
    paths.unit_dir.mkdir()
    paths.config_dir.mkdir()
    for name, data in OLD.items():
        (paths.unit_dir / name).write_bytes(data)
    return paths


def files_of(paths: Paths) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in paths.unit_dir.iterdir()}


def switch(paths: Paths) -> None:
    installer.switch_files(
        paths,
        {paths.unit_dir / name: (data, 0o644) for name, data in NEW.items()},
        [paths.unit_dir / "gone.socket"],
    )


def test_switch_installs_exactly_the_new_set(tmp_path: Path) -> None:
    paths = make_paths(tmp_path)
    switch(paths)
    assert files_of(paths) == NEW
    assert not paths.intent.exists()
    assert (paths.unit_dir / "c.socket").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("renames_before_crash", [0, 1, 2])
def test_crash_after_commit_point_is_finished_by_recover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renames_before_crash: int
) -> None:
    paths = make_paths(tmp_path)
    real_replace = os.replace
    calls = {"n": 0}

    def crashing_replace(src: str, dst: str) -> None:
        # The intent itself is written with one replace: let it through.
        if str(dst) != str(paths.intent):
            if calls["n"] == renames_before_crash:
                raise KeyboardInterrupt("killed half-way")
            calls["n"] += 1
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        switch(paths)
    monkeypatch.setattr(os, "replace", real_replace)
    installer.recover(paths)
    assert files_of(paths) == NEW


def test_crash_before_commit_point_leaves_the_old_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = make_paths(tmp_path)

    def crash(*_: object) -> None:
        raise KeyboardInterrupt("killed while staging")

    monkeypatch.setattr(installer, "write_atomically", crash)
    with pytest.raises(KeyboardInterrupt):
        switch(paths)
    assert any(p.name.endswith(installer.STAGED_SUFFIX) for p in paths.unit_dir.iterdir())
    installer.recover(paths)
    assert files_of(paths) == OLD


def test_commands_that_cannot_run_here_are_refused(tmp_path: Path) -> None:
    from lmproxy.config import ConfigError, parse_config

    not_executable = tmp_path / "model.gguf"
    not_executable.write_text("")
    config = parse_config(
        '{"Services": ['
        '{"Name": "a", "ListenPort": 1, "ProxyTargetPort": 2, "Command": "sleep"},'
        '{"Name": "b", "ListenPort": 3, "ProxyTargetPort": 4, "Command": "/bin/sleep"},'
        '{"Name": "c", "ListenPort": 5, "ProxyTargetPort": 6, "Command": "no-such-server"},'
        f'{{"Name": "d", "ListenPort": 7, "ProxyTargetPort": 8, "Command": "{not_executable}"}}'
        "]}"
    )
    with pytest.raises(ConfigError) as refused:
        installer.refuse_missing_commands(config)
    assert [path for path, _ in refused.value.problems] == [
        "$.Services[2].Command",
        "$.Services[3].Command",
    ]


def test_environment_files_are_private_and_stale_ones_go(tmp_path: Path) -> None:
    from lmproxy.config import parse_config

    paths = make_paths(tmp_path)
    folder = installer.environment_dir(paths)
    folder.mkdir(mode=0o755)
    (folder / "gone.env").write_text('A="1"\n')
    service = {"ListenPort": 1, "ProxyTargetPort": 2, "Command": "/bin/true"}
    document = {
        "Services": [
            {**service, "Name": "keyed", "Environment": {"KEY": "s3cret"}},
            {**service, "Name": "plain", "ListenPort": 3, "ProxyTargetPort": 4},
        ]
    }
    config = parse_config(json.dumps(document), tmp_path)
    write, stale = installer._environment_changes(config, paths)
    assert write == {folder / "keyed.env": (b'KEY="s3cret"\n', 0o600)}
    assert stale == [folder / "gone.env"]
    assert folder.stat().st_mode & 0o777 == 0o700
    installer.switch_files(paths, dict(write), stale)
    assert [p.name for p in folder.iterdir()] == ["keyed.env"]
    assert (folder / "keyed.env").stat().st_mode & 0o777 == 0o600
