"""The ledger watch: a rename into the folder makes it readable; reading clears it."""

from __future__ import annotations

import os
import select
from pathlib import Path

import pytest

from lmproxy.watch import DirectoryWatch, WatchError


def readable(watch: DirectoryWatch) -> bool:
    poller = select.poll()
    poller.register(watch, select.POLLIN)
    return bool(poller.poll(0))


def test_a_rename_into_the_folder_wakes_and_consume_clears_it(tmp_path: Path) -> None:
    watch = DirectoryWatch(tmp_path)
    try:
        (tmp_path / "other").write_text("not a rename")
        assert not readable(watch)
        (tmp_path / ".ledger.json.tmp").write_text("{}")
        os.replace(tmp_path / ".ledger.json.tmp", tmp_path / "ledger.json")
        assert readable(watch)
        watch.consume()
        assert not readable(watch)
    finally:
        watch.close()


def test_a_missing_folder_is_a_watch_error(tmp_path: Path) -> None:
    with pytest.raises(WatchError, match="inotify_add_watch"):
        DirectoryWatch(tmp_path / "missing")
