"""Which service a request goes to: a pure function of its method, path, headers and body.

The router (lmproxy.router.server) reads a request's head, asks `classify` what the path
is, reads as much of the body as the answer needs (all of a JSON body; a multipart body
up to its `model` field; nothing for a query), and asks `Catalog.route` for the service.
Nothing here does I/O: every decision is tested on its own (tests/unit/router/).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote

# POST routes whose body names the model: OpenAI's, llama.cpp's own, Anthropic's messages
# (llama-server speaks it) and Stable Diffusion web UI's (as llama-swap routes them). A
# multipart body (audio transcriptions, image edits) names it in its `model` field.
BODY_ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/v1/audio/speech",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/variations",
        "/v1/rerank",
        "/v1/reranking",
        "/v1/score",
        "/completion",
        "/completions",
        "/chat/completions",
        "/embedding",
        "/embeddings",
        "/infill",
        "/rerank",
        "/reranking",
        "/tokenize",
        "/detokenize",
        "/apply-template",
        "/sdapi/v1/txt2img",
        "/sdapi/v1/img2img",
    }
)
# GET routes that take the model as ?model= (llama.cpp's /props, /slots, /metrics; voices).
QUERY_ROUTES = frozenset({"/props", "/slots", "/metrics", "/v1/audio/voices"})
MODELS_PATHS = frozenset({"/v1/models", "/models"})
MODEL_PREFIXES = ("/v1/models/", "/models/")
HEALTH_PATHS = frozenset({"/health", "/v1/health"})

_BOUNDARY_RE = re.compile(rb'boundary=(?:"([^"]{1,70})"|([^\s;,]{1,70}))', re.IGNORECASE)
_FIELD_NAME_RE = re.compile(rb'(?:^|;)\s*name="([^"]*)"', re.IGNORECASE)
# Longest headers of one multipart part that are looked at.
PART_HEAD_LIMIT = 16 * 1024


class Kind(enum.Enum):
    MODELS = enum.auto()  # GET /v1/models: the list
    MODEL = enum.auto()  # GET /v1/models/{id}
    HEALTH = enum.auto()
    BODY = enum.auto()  # the model is in the body
    QUERY = enum.auto()  # the model is ?model=
    UNKNOWN = enum.auto()  # 404
    WRONG_METHOD = enum.auto()  # 405


@dataclass(frozen=True)
class Route:
    kind: Kind
    path: str  # without the query
    query: str = ""
    model: str | None = None  # Kind.MODEL's id, URL-decoded


@dataclass(frozen=True)
class Refusal:
    """An answer in OpenAI's error shape (lmproxy.router.errors writes it)."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None


def classify(method: str, target: str) -> Route:
    """What a request line asks for. target: the request-target as sent (origin form)."""
    path, _, query = target.partition("?")
    if path in BODY_ROUTES:
        return Route(Kind.BODY if method == "POST" else Kind.WRONG_METHOD, path, query)
    reading = method in ("GET", "HEAD")
    if path in MODELS_PATHS:
        return Route(Kind.MODELS if reading else Kind.WRONG_METHOD, path, query)
    for prefix in MODEL_PREFIXES:
        if path.startswith(prefix) and len(path) > len(prefix):
            model = unquote(path[len(prefix) :])
            return Route(Kind.MODEL if reading else Kind.WRONG_METHOD, path, query, model)
    if path in HEALTH_PATHS:
        return Route(Kind.HEALTH if reading else Kind.WRONG_METHOD, path, query)
    if path in QUERY_ROUTES:
        return Route(Kind.QUERY if method == "GET" else Kind.WRONG_METHOD, path, query)
    return Route(Kind.UNKNOWN, path, query)


def model_from_query(query: str) -> str | Refusal:
    values = parse_qs(query, keep_blank_values=True).get("model")
    if not values or not values[0]:
        return Refusal(400, "you must provide a model parameter (?model=)", param="model")
    return values[0]


def model_from_json(body: bytes | bytearray) -> str | Refusal:
    """The `model` of a JSON object body."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return Refusal(400, "the request body is not valid JSON")
    if not isinstance(document, dict):
        return Refusal(400, "the request body must be a JSON object")
    model = document.get("model")
    if model is None:
        return Refusal(400, "you must provide a model parameter", param="model")
    if not isinstance(model, str) or not model:
        return Refusal(400, "model must be a non-empty string", param="model")
    return model


def multipart_boundary(content_type: bytes) -> bytes | None:
    """The boundary of a multipart/form-data body, or None for any other body."""
    kind = content_type.split(b";", 1)[0].strip().lower()
    if kind != b"multipart/form-data":
        return None
    match = _BOUNDARY_RE.search(content_type)
    if match is None:
        return b""  # multipart without a usable boundary: refused by MultipartModel
    return match.group(1) or match.group(2)


class MultipartModel:
    """Finds the `model` field of a multipart/form-data body as its bytes arrive.

    Fed the body from its start, `feed` returns None while more is needed, then the
    model or a Refusal. It keeps the position of the part it has reached, so that a model
    field after a large file costs one pass over the file, not one per chunk; the caller
    keeps the bytes (to forward them once the route is known)."""

    def __init__(self, boundary: bytes) -> None:
        self.delimiter = b"--" + boundary
        self.position = 0  # where the next part's delimiter is looked for
        self.searched = 0  # how far the current part's content was searched for its end

    def feed(self, body: bytes, *, complete: bool) -> str | Refusal | None:
        """body: every byte of the body so far; complete: that is all of it."""
        if not self.delimiter[2:]:
            return Refusal(400, "the multipart body has no boundary in its Content-Type")
        while True:
            found = self._next_part(body)
            if found is None:
                if complete:
                    return Refusal(400, "you must provide a model parameter", param="model")
                return None
            if isinstance(found, Refusal):
                return found
            head, content_start = found
            name = _FIELD_NAME_RE.search(_disposition(head))
            closing = b"\r\n" + self.delimiter
            end = body.find(closing, max(content_start, self.searched))
            if name is not None and name.group(1) == b"model":
                if end < 0:
                    return None if not complete else _unterminated()
                try:
                    model = body[content_start:end].decode("utf-8")
                except UnicodeDecodeError:
                    return Refusal(400, "model must be UTF-8 text", param="model")
                if not model:
                    return Refusal(400, "model must be a non-empty string", param="model")
                return model
            if end < 0:
                if complete:
                    return _unterminated()
                # The end may straddle what came and what comes: look again from there.
                self.searched = max(content_start, len(body) - len(closing) + 1)
                return None
            self.position = end + 2  # at the next delimiter
            self.searched = 0

    def _next_part(self, body: bytes) -> tuple[bytes, int] | Refusal | None:
        """The head of the part at self.position and where its content starts; None
        when more is needed (or the body ended: the closing delimiter)."""
        at = body.find(self.delimiter, self.position)
        if at < 0:
            return None
        after = at + len(self.delimiter)
        if body[after : after + 2] == b"--":
            return Refusal(400, "you must provide a model parameter", param="model")
        head_end = body.find(b"\r\n\r\n", after)
        if head_end < 0:
            if len(body) - after > PART_HEAD_LIMIT:
                return Refusal(400, "a multipart part's headers are too long")
            return None
        self.position = at
        return body[after:head_end], head_end + 4


def _disposition(head: bytes) -> bytes:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-disposition":
            return value.strip()
    return b""


def _unterminated() -> Refusal:
    return Refusal(400, "the multipart body ends inside a part")


@dataclass(frozen=True)
class Upstream:
    """Where a service is reached: a unix socket's path, or a TCP address and port."""

    service: str
    path: str | None = None
    host: str | None = None
    port: int | None = None


@dataclass(frozen=True)
class Listing:
    """A model id as /v1/models lists it."""

    id: str
    service: str


class Catalog:
    """The model ids the router knows, each to its service (from the installed config)."""

    def __init__(self, upstreams: Mapping[str, Upstream], listing: Iterable[Listing]) -> None:
        self.listing = tuple(listing)
        self.upstreams = upstreams  # by service name
        self.by_model = {entry.id: upstreams[entry.service] for entry in self.listing}

    def route(self, model: str) -> Upstream | Refusal:
        upstream = self.by_model.get(model)
        if upstream is not None:
            return upstream
        return unknown_model(model, [entry.id for entry in self.listing])


def unknown_model(model: str, known: Iterable[str]) -> Refusal:
    ids = ", ".join(known) or "none"
    return Refusal(
        404,
        f"The model {model!r} does not exist here; the models are: {ids}",
        code="model_not_found",
        param="model",
    )
