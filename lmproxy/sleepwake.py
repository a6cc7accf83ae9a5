"""Putting a backend to sleep and waking it: the shim's edge for the lifecycle's
FallAsleep and Wake effects.

By default a service speaks vLLM's sleep API on its ProxyTarget (vLLM serves it with
VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode):

    POST /sleep?level=1|2     level 1 moves the weights to RAM, level 2 drops them
    POST /wake_up             from level 1
    POST /wake_up?tags=weights, POST /collective_rpc {"method": "reload_weights"},
    POST /wake_up?tags=kv_cache
                              from level 2: the weights are allocated, reloaded from
                              disk, then the KV cache is

Other servers give a SleepCommand and a WakeCommand, run like HealthcheckCommand
(lmproxy.readiness.run_shell; exit status 0 is success), which also see
LMPROXY_SERVICE, LMPROXY_SLEEP_LEVEL, LMPROXY_TARGET_HOST and LMPROXY_TARGET_PORT
in their environment.
"""

from __future__ import annotations

import http.client
import json
import time

from lmproxy.config import Service, Sleep
from lmproxy.readiness import run_shell

# The most of a failed call's answer (or a command's output) a message quotes.
QUOTED_CHARS = 200


class SleepWakeError(Exception):
    """The backend did not go to sleep, or did not wake; the message says why."""


def fall_asleep(service: Service, level: int, deadline: float) -> None:
    """Puts the service's backend to sleep at level, by deadline (time.monotonic())."""
    sleep = _sleep_of(service)
    if sleep.sleep_command is not None:
        _run(service, level, sleep.sleep_command, deadline)
    else:
        _post(service, f"/sleep?level={level}", deadline)


def wake_up(service: Service, level: int, deadline: float) -> None:
    """Wakes the service's backend, asleep at level, by deadline; it answers clients
    once readiness checks pass (the shim's next step)."""
    sleep = _sleep_of(service)
    if sleep.wake_command is not None:
        _run(service, level, sleep.wake_command, deadline)
    elif level == 1:
        _post(service, "/wake_up", deadline)
    else:
        _post(service, "/wake_up?tags=weights", deadline)
        _post(service, "/collective_rpc", deadline, {"method": "reload_weights"})
        _post(service, "/wake_up?tags=kv_cache", deadline)


def _sleep_of(service: Service) -> Sleep:
    if service.sleep is None:
        raise SleepWakeError(f"{service.name} has no Sleep in the config")
    return service.sleep


def _post(
    service: Service, path: str, deadline: float, body: dict[str, object] | None = None
) -> None:
    data = b"" if body is None else json.dumps(body).encode()
    headers = {"Content-Length": str(len(data))}
    if body is not None:
        headers["Content-Type"] = "application/json"
    where = f"POST {path} on {service.proxy_target_host}:{service.proxy_target_port}"
    connection = http.client.HTTPConnection(
        service.proxy_target_host, service.proxy_target_port, timeout=_left(deadline, where)
    )
    try:
        connection.request("POST", path, body=data, headers=headers)
        response = connection.getresponse()
        answer = response.read(QUOTED_CHARS).decode(errors="replace").strip()
    except (OSError, http.client.HTTPException) as error:
        raise SleepWakeError(f"{where}: {error or type(error).__name__}") from error
    finally:
        connection.close()
    if not 200 <= response.status < 300:
        raise SleepWakeError(f"{where}: HTTP {response.status} {answer}".rstrip())


def _run(service: Service, level: int, command: str, deadline: float) -> None:
    extra = {
        "LMPROXY_SERVICE": service.name,
        "LMPROXY_SLEEP_LEVEL": str(level),
        "LMPROXY_TARGET_HOST": service.proxy_target_host,
        "LMPROXY_TARGET_PORT": str(service.proxy_target_port),
    }
    timeout = _left(deadline, repr(command))
    try:
        status, said = run_shell(command, timeout, extra)
    except OSError as error:
        raise SleepWakeError(f"{command!r} could not run: {error}") from error
    if status is None:
        raise SleepWakeError(f"{command!r} did not finish in {timeout:.0f} s")
    if status != 0:
        raise SleepWakeError(f"{command!r} exited with status {status}: {said}".rstrip())


def _left(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise SleepWakeError(f"no time left for {what}")
    return left
