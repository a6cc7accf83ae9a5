"""What the router acts on, read from the installed config: at start and at each reload.

The model ids and where each service listens (lmproxy.router.routing.Catalog), the API
keys (kept only as SHA-256 digests: compared in constant time, never logged) and the
limits. The states /v1/models shows come from the ledger, read without its lock as
`lmproxy status` reads it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from lmproxy.config import Config, Service
from lmproxy.config.model import Router
from lmproxy.paths import Paths
from lmproxy.router.routing import Catalog, Listing, Upstream

MAX_KEYS_FILE_BYTES = 1024 * 1024


class KeysFileError(Exception):
    """The ApiKeysFile could not be read: the router refuses every request (fails closed)."""


@dataclass(frozen=True)
class Settings:
    catalog: Catalog
    # SHA-256 digests of the accepted keys; None: no key needed; KeysFileError: refuse all.
    keys: frozenset[bytes] | KeysFileError | None
    max_body_bytes: int
    response_timeout_s: int
    created: int  # /v1/models' "created": when the config was installed
    runtime_dir: Path  # the shims' (their ledger, their turn-away reasons)

    def authorized(self, authorization: bytes | None) -> bool | KeysFileError:
        keys = self.keys
        if keys is None:
            return True
        if isinstance(keys, KeysFileError):
            return keys
        if authorization is None or authorization[:7].lower() != b"bearer ":
            return False
        return hashlib.sha256(authorization[7:].strip()).digest() in keys


def settings_of(config: Config, paths: Paths, created: int) -> Settings:
    upstreams = {service.name: upstream_of(service, paths) for service in config.routed}
    listing = [
        Listing(model, service.name) for service in config.routed for model in service.model_ids
    ]
    router = config.router
    keys: frozenset[bytes] | KeysFileError | None = None
    if router.needs_keys:
        try:
            keys = frozenset(digest(key) for key in (*router.api_keys, *file_keys(router)))
        except KeysFileError as error:
            keys = error
    return Settings(
        catalog=Catalog(upstreams, listing),
        keys=keys,
        max_body_bytes=router.max_request_body_bytes,
        response_timeout_s=router.response_timeout_s,
        created=created,
        runtime_dir=paths.runtime_dir,
    )


def upstream_of(service: Service, paths: Paths) -> Upstream:
    path = paths.socket_path(service)
    if path is not None:
        return Upstream(service.name, path=path)
    return Upstream(service.name, host=service.connect_host, port=service.listen_port)


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def file_keys(router: Router) -> list[str]:
    """ApiKeysFile's keys: one per line; blank lines and lines starting with # skipped."""
    if router.api_keys_file is None:
        return []
    try:
        with open(router.api_keys_file, "rb") as file:
            text = file.read(MAX_KEYS_FILE_BYTES + 1)
    except OSError as error:
        raise KeysFileError(f"cannot read {router.api_keys_file}: {error.strerror}") from error
    if len(text) > MAX_KEYS_FILE_BYTES:
        raise KeysFileError(f"{router.api_keys_file} is larger than {MAX_KEYS_FILE_BYTES} bytes")
    try:
        lines = text.decode().splitlines()
    except UnicodeDecodeError as error:
        raise KeysFileError(f"{router.api_keys_file} is not UTF-8 text") from error
    keys = [line.strip() for line in lines]
    return [key for key in keys if key and not key.startswith("#")]


def service_states(runtime_dir: Path) -> dict[str, str]:
    """Each service's state as the ledger last says (absent: stopped); {} if unreadable.
    Read by the ledger's own reader, without its lock, as `lmproxy status` reads it: the
    file must be the shims' regular file (a FIFO put in its place cannot hang the router)."""
    from lmproxy.ledger import Ledger, LedgerError  # (at the first /v1/models, not at start)

    try:
        entries = Ledger(runtime_dir, {}, {}, lambda _: {}, lambda _: None).snapshot()
    except (OSError, LedgerError):
        return {}
    return {name: entry.phase.value for name, entry in entries.items()}
