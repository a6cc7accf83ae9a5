"""Which code system units may run: only what root alone can change."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from lmproxy import trust

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own and chown files")

NOBODY = 65534


def package(tmp_path: Path) -> Path:
    """A root-owned package in a root-owned folder, as a careful root leaves it."""
    tmp_path.chmod(0o755)
    root = tmp_path / "opt" / "lmproxy"
    (root / "sub").mkdir(parents=True)
    for file in (root / "__init__.py", root / "sub" / "shim.py"):
        file.write_text("")
        file.chmod(0o644)
    return root


def test_a_tree_only_root_can_change_passes(tmp_path: Path) -> None:
    assert trust.problems([package(tmp_path)]) == []


def test_a_file_others_or_its_group_may_write_is_named(tmp_path: Path) -> None:
    root = package(tmp_path)
    (root / "sub" / "shim.py").chmod(0o646)
    (root / "__init__.py").chmod(0o664)
    assert trust.problems([root]) == [
        f"{root / '__init__.py'}: writable by its group (mode 0664)",
        f"{root / 'sub' / 'shim.py'}: writable by others (mode 0646)",
    ]


def test_a_folder_another_user_owns_is_named_at_any_depth(tmp_path: Path) -> None:
    root = package(tmp_path)
    os.chown(root.parent, NOBODY, NOBODY)  # above the package: it could swap the package
    os.chown(root / "sub", NOBODY, NOBODY)  # below it
    assert trust.problems([root]) == [
        f"{root.parent}: owned by uid {NOBODY}, not root",
        f"{root / 'sub'}: owned by uid {NOBODY}, not root",
    ]


def test_compiled_files_count_too(tmp_path: Path) -> None:
    """Python loads a .pyc from __pycache__ when its header matches the source: whoever
    may write there may run code."""
    root = package(tmp_path)
    cache = root / "__pycache__"
    cache.mkdir(mode=0o755)
    compiled = cache / "shim.cpython-311.pyc"
    compiled.write_bytes(b"")
    compiled.chmod(0o666)
    assert trust.problems([root]) == [f"{compiled}: writable by others (mode 0666)"]


def test_a_sticky_folder_on_the_way_passes_and_a_plain_writable_one_does_not(
    tmp_path: Path,
) -> None:
    root = package(tmp_path)
    root.parent.chmod(0o1777)
    assert trust.problems([root]) == []
    root.parent.chmod(0o777)
    assert trust.problems([root]) == [f"{root.parent}: writable by others (mode 0777)"]


def test_links_are_followed_to_their_targets(tmp_path: Path) -> None:
    """A root-owned link in a root-owned folder, to an interpreter anyone may replace."""
    root = package(tmp_path)
    elsewhere = tmp_path / "home" / "user" / "venv"
    elsewhere.mkdir(parents=True)
    os.chown(elsewhere, NOBODY, NOBODY)
    python = elsewhere / "python3"
    python.write_text("")
    os.chown(python, NOBODY, NOBODY)
    link = root / "python3"
    link.symlink_to(python)
    assert trust.problems([link]) == [
        f"{elsewhere}: owned by uid {NOBODY}, not root",
        f"{python}: owned by uid {NOBODY}, not root",
    ]


def test_the_running_interpreter_and_package_are_what_is_checked() -> None:
    paths = trust.code_paths()
    assert Path(sys.executable) in paths
    assert Path(trust.__file__).parent in paths


def test_refusal_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = package(tmp_path)
    (root / "__init__.py").chmod(0o666)
    monkeypatch.setattr(trust, "code_paths", lambda: [root])
    with pytest.raises(trust.UntrustedCode) as refused:
        trust.require_root_owned_code()
    message = str(refused.value)
    assert f"{root / '__init__.py'}: writable by others" in message
    assert "/usr/bin/lmproxy" in message and "chmod -R go-w" in message
