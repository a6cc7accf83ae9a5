"""A model's real GPU memory beside what it declared, from NVML, for its shim.

Declared amounts are guesses: a model that uses more than its ResourceRequirements say
makes every admission decision about its GPU wrong. The shim of a model that needs a GPU
resource (lmproxy's `Gpu`) looks a moment after the model is ready and then now and then,
and warns in the journal (LMPROXY_EVENT=over-declared) with both numbers, once per
resource until it is back within them, so that the config can be corrected.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from lmproxy.config import Config, Service
from lmproxy.gpus import backend_pids, holders
from lmproxy.journal import Logger
from lmproxy.nvml import NvmlError, session

FIRST_LOOK_S = 2.0  # after the model is ready: most servers allocate while loading
EVERY_S = 30.0


class VramWatch:
    def __init__(self, config: Config, service: Service, log: Logger) -> None:
        self.service = service
        self.log = log
        # resource -> (its GPU, as the config names it; what the service declares)
        self.resources = {
            resource: (gpu, service.resource_requirements[resource])
            for resource, gpu in config.gpus_of(service).items()
        }
        self.warned: set[str] = set()

    def used_mib(self) -> dict[str, int]:
        """What the service's processes use of each of its GPU resources now."""
        used = {}
        known = backend_pids([self.service.name])
        with session() as nvml:
            for resource, (gpu, _) in self.resources.items():
                reading = nvml.reading(gpu)
                used[resource] = sum(
                    h.used_mib or 0
                    for h in holders(reading, [self.service.name], known=known)
                    if h.service == self.service.name
                )
        return used

    def look(self) -> None:
        """Warns of each resource the service now uses more of than it declares."""
        for resource, used in self.used_mib().items():
            gpu, declared = self.resources[resource]
            if used > declared and resource not in self.warned:
                self.log.warning(
                    f"{self.service.name} uses {used} MiB of GPU {gpu} but declares {declared} "
                    f"of {resource}: raise its ResourceRequirements, or other models will be "
                    "started into memory it holds",
                    event="over-declared",
                )
                self.warned.add(resource)
            elif used <= declared:
                self.warned.discard(resource)

    def start(self, running: Callable[[], bool]) -> None:
        """Looks in a thread of its own while running() says the backend runs."""
        if self.resources:
            threading.Thread(target=self._run, args=(running,), name="vram", daemon=True).start()

    def _run(self, running: Callable[[], bool]) -> None:
        wait = threading.Event()
        delay = FIRST_LOOK_S
        while not wait.wait(delay) and running():
            delay = EVERY_S
            try:
                self.look()
            except NvmlError as error:
                self.log.warning(f"cannot read GPU memory: {error}", event="vram-unknown")
                return

    def held_outside(self, services: list[str]) -> list[str]:
        """Who holds the service's GPUs' memory outside lmproxy now, one line per GPU, for
        a start that gave up: 'GPU 0: 4000 MiB by pid 4242 (python3 train.py)'."""
        lines = []
        known = backend_pids(services)
        try:
            with session() as nvml:
                for gpu in sorted({gpu for gpu, _ in self.resources.values()}):
                    reading = nvml.reading(gpu)
                    others = [
                        f"{h.used_mib if h.used_mib is not None else '?'} MiB by pid {h.pid} "
                        f"({h.command})"
                        for h in holders(reading, services, known=known)
                        if h.service is None
                    ]
                    if others:
                        lines.append(f"GPU {gpu}: {'; '.join(others)}")
        except NvmlError:
            return []
        return lines
