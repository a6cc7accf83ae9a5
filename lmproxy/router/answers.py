"""The answers the router writes itself: OpenAI's error shape, /v1/models, /health.

An error is `{"error": {"message", "type", "param", "code"}}` with its HTTP status, so that
OpenAI's client libraries raise the matching exception (404 NotFoundError, 401
AuthenticationError, 503 InternalServerError...). Bytes out, nothing else: no I/O here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from lmproxy.router.routing import Listing, Refusal

REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def response(
    status: int,
    document: object,
    *,
    keep_alive: bool,
    head_only: bool = False,
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    body = json.dumps(document, ensure_ascii=False).encode()
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: " + ("keep-alive" if keep_alive else "close"),
        *(f"{name}: {value}" for name, value in headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return head if head_only else head + body


def error_document(refusal: Refusal) -> dict[str, Any]:
    return {
        "error": {
            "message": refusal.message,
            "type": refusal.type,
            "param": refusal.param,
            "code": refusal.code,
        }
    }


def error(refusal: Refusal, *, keep_alive: bool) -> bytes:
    headers = [("WWW-Authenticate", "Bearer")] if refusal.status == 401 else []
    return response(refusal.status, error_document(refusal), keep_alive=keep_alive, headers=headers)


def model_entry(entry: Listing, created: int, state: str) -> dict[str, Any]:
    """One model as OpenAI lists it, with lmproxy's own fields beside: which service
    serves it and that service's state now (stopped, starting, running, sleeping...)."""
    return {
        "id": entry.id,
        "object": "model",
        "created": created,
        "owned_by": "lmproxy",
        "lmproxy": {"service": entry.service, "state": state},
    }


def models_document(
    listing: Sequence[Listing], created: int, states: Mapping[str, str]
) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [model_entry(e, created, states.get(e.service, "stopped")) for e in listing],
    }


# --- The errors themselves -----------------------------------------------------------------


def missing_key() -> Refusal:
    return Refusal(
        401,
        "You didn't provide a valid API key: pass it as 'Authorization: Bearer KEY'",
        code="invalid_api_key",
    )


def keys_unreadable() -> Refusal:
    return Refusal(
        503,
        "the router cannot read its API keys file; see its journal "
        "(`journalctl -t lmproxy-openai`)",
        type="server_error",
        code="api_keys_unreadable",
    )


def too_large(limit: int) -> Refusal:
    return Refusal(
        413,
        f"the request body is larger than this router's limit of {limit} bytes "
        "(OpenAiApi.MaxRequestBodyBytes)",
        code="request_too_large",
    )


def unknown_url(method: str, path: str) -> Refusal:
    return Refusal(404, f"Invalid URL ({method} {path})", code="unknown_url")


def wrong_method(method: str, path: str) -> Refusal:
    return Refusal(405, f"{path} does not take {method}", code="method_not_allowed")


def unavailable(service: str, why: str) -> Refusal:
    return Refusal(
        503, f"the model's service {service!r} {why}", type="server_error", code="model_unavailable"
    )


def timed_out(service: str, seconds: int) -> Refusal:
    return Refusal(
        504,
        f"the model's service {service!r} did not begin to answer within {seconds} s "
        "(OpenAiApi.ResponseTimeoutSeconds)",
        type="server_error",
        code="upstream_timeout",
    )


def bad_gateway(service: str, why: str) -> Refusal:
    return Refusal(
        502, f"the model's service {service!r} {why}", type="server_error", code="upstream_error"
    )
