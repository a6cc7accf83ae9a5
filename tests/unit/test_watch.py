"""The ledger watch: a rename into the folder makes it readable; reading clears it."""

from __future__ import annotations

import os
import select
from pathlib import Path

import pytest

from lmproxy.watch import DirectoryWatch, PollingWatch, WatchError, watch_directory


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


def test_without_inotify_a_polling_watch_says_how_often_to_look(tmp_path: Path) -> None:
    watch, error = watch_directory(tmp_path / "missing")
    assert isinstance(watch, PollingWatch) and isinstance(error, WatchError)
    try:
        assert watch.poll_ms is not None and 0 < watch.poll_ms <= 1000
        poller = select.poll()
        poller.register(watch, select.POLLIN)
        assert poller.poll(0) == []  # never readable: the waiter's timeout does the work
    finally:
        watch.close()
    working, none = watch_directory(tmp_path)
    assert isinstance(working, DirectoryWatch) and none is None and working.poll_ms is None
    working.close()
