"""The sleep and wake edge's failures, as the journal will quote them: the lifecycle
falls back to a stop or a restart on each, so each must say why."""

from __future__ import annotations

import time

import pytest

from lmproxy.config import Service
from lmproxy.sleepwake import SleepWakeError, fall_asleep, wake_up
from tests.unit.test_config import one_service


def sleeper(port: int = 1, **sleep: object) -> Service:
    fields = {"Level": 1, **sleep}
    return one_service(ProxyTargetHost="127.0.0.1", ProxyTargetPort=port, Sleep=fields)


def test_a_backend_that_does_not_answer_is_named() -> None:
    with pytest.raises(SleepWakeError, match=r"POST /sleep\?level=1 on 127.0.0.1:1: "):
        fall_asleep(sleeper(), 1, time.monotonic() + 5)


def test_a_command_that_fails_is_quoted_with_its_status_and_output() -> None:
    service = sleeper(SleepCommand="echo no room >&2; exit 3", WakeCommand="exit 0")
    with pytest.raises(SleepWakeError, match=r"exited with status 3: no room$"):
        fall_asleep(service, 1, time.monotonic() + 5)
    wake_up(service, 1, time.monotonic() + 5)


def test_commands_see_the_service_and_level() -> None:
    service = sleeper(
        SleepCommand='test "$LMPROXY_SERVICE $LMPROXY_SLEEP_LEVEL" = "llm 2"'
        ' && test "$LMPROXY_TARGET_HOST:$LMPROXY_TARGET_PORT" = 127.0.0.1:1',
        WakeCommand="exit 0",
    )
    fall_asleep(service, 2, time.monotonic() + 5)  # the level asked for, not the config's


def test_a_command_past_the_deadline_is_cut() -> None:
    service = sleeper(SleepCommand="exit 0", WakeCommand="sleep 5")
    started = time.monotonic()
    with pytest.raises(SleepWakeError, match="did not finish in 0 s"):
        wake_up(service, 1, started + 0.3)
    assert time.monotonic() - started < 3


def test_a_service_without_sleep_cannot_be_put_to_sleep() -> None:
    with pytest.raises(SleepWakeError, match="has no Sleep"):
        fall_asleep(one_service(), 1, time.monotonic() + 5)
