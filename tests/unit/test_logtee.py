"""The log tee: opening LogFilePath as the backend's user (root included) safely."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lmproxy import logtee

NOBODY = 65534


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    return logs


def test_the_output_goes_to_the_file_and_the_status_is_the_commands(
    folder: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    log = folder / "model.log"
    log.write_text("before\n")
    status = logtee.main([str(log), "--", "/bin/sh", "-c", "echo hello; exit 3"])
    assert status == 3
    assert log.read_text() == "before\nhello\n"
    assert capfd.readouterr().out == "hello\n"


def test_a_command_killed_by_a_signal_kills_the_tee_by_it(folder: Path) -> None:
    """systemd counts a main process that SIGTERM ended as stopped cleanly; an exit
    status of 143 would make a backend stopped by its shim "failed"."""
    tee = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmproxy.logtee",
            str(folder / "m.log"),
            "--",
            "/bin/sh",
            "-c",
            "echo up; kill -TERM $$",
        ],
        capture_output=True,
        check=False,
    )
    assert tee.returncode == -signal.SIGTERM
    assert (folder / "m.log").read_text() == "up\n"


def test_a_planted_symlink_is_not_followed(folder: Path, tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep\n")
    (folder / "model.log").symlink_to(target)
    with pytest.raises(OSError):
        logtee.open_log(str(folder / "model.log"))
    assert target.read_text() == "keep\n"


def test_a_planted_hard_link_is_refused(folder: Path, tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep\n")
    os.link(target, folder / "model.log")
    with pytest.raises(logtee.UnsafeLog, match="2 names"):
        logtee.open_log(str(folder / "model.log"))


def test_a_folder_others_may_write_is_refused_unless_sticky(folder: Path) -> None:
    folder.chmod(0o777)
    with pytest.raises(logtee.UnsafeLog, match="writable by others"):
        logtee.open_log(str(folder / "model.log"))
    folder.chmod(0o1777)
    os.close(logtee.open_log(str(folder / "model.log")))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_someone_elses_folder_or_file_is_refused(folder: Path) -> None:
    log = folder / "model.log"
    log.write_text("")
    os.chown(log, NOBODY, NOBODY)
    with pytest.raises(logtee.UnsafeLog, match=f"it is owned by uid {NOBODY}"):
        logtee.open_log(str(log))
    os.chown(folder, NOBODY, NOBODY)
    with pytest.raises(logtee.UnsafeLog, match=f"folder belongs to uid {NOBODY}"):
        logtee.open_log(str(log))


def test_a_refused_log_runs_nothing_and_says_why(
    folder: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    (folder / "model.log").symlink_to(tmp_path / "elsewhere")
    marker = tmp_path / "ran"
    status = logtee.main([str(folder / "model.log"), "--", "/bin/touch", str(marker)])
    assert status == 1
    assert not marker.exists()
    assert "cannot use" in capfd.readouterr().err
